"""Benchmark: what a scanner calibrated on one slide's sweeps makes of that slide's tiles and of other specimens'.

    .venv/bin/python bench/calibrated_scan_outcome.py [--model DIR] [--two-shot-model FILE]
                                                      [--cache-dir build/autofocus-eval-cache]

A scanner keeps its calibration (`CalibrationStore`) and uses it for every later slide, so a calibration from one
slide's focus map (`ScanSlide.calibrate_autofocus`, `wsi-autofocus calibrate`) steers the scans of the next
slides. Per held-out microscope this calibrates both focus models on its nine focus-map-like sweeps of validation
specimens with `calibrate_both` (as the autofocus node does), then runs the scan's inline autofocus
(`shift_evaluation.scan_outcomes`, the two-shot card's scan outcome) over that microscope's 20x tiles of the test
specimens and real content three times: with the shipped models, with the calibrated two-shot model beside the
shipped single-shot one (what the node serves a later scan: a single-shot calibration serves only the scan it was
fitted on, `CalibratedEstimators`), and with both calibrated (what it served before; a refused calibration leaves
the shipped model). Then the same three on the slide itself, as a scan that calibrates itself
(`ScanSlide.calibrate_autofocus`) reads its own tiles: both models calibrated on nine sweeps of one slide
(`slide_calibration`: a procedural slide and a real H&E image under each held-out microscope), the scan outcome of
30 other fields of that slide (`slide_calibration.SlideRefocuser` re-images them). Prints the scan outcome tables
and writes bench/results/calibrated_scan_outcome.json. The tiles, sweeps and slides come from the evaluation's
cache (rendered into it when missing: about an hour on 2 cores); the slides' fields re-imaged for the scan are
rendered each run (about a quarter of an hour).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from wsi_autofocus import slide_calibration
from wsi_autofocus.calibration import calibrate_both
from wsi_autofocus.data import starmap_in_processes
from wsi_autofocus.inference import FocusEstimator, default_model_dir, load_backend
from wsi_autofocus.shift_evaluation import (CalibrationSpec, Refocuser, ShiftSpec, estimate_tiles, format_scan_outcomes,
                                            imaging_condenser, render_all_sweeps, render_tiles, scan_outcome_statistics,
                                            scan_outcomes, z_stacks)
from wsi_autofocus.two_shot import TwoShotModel
from wsi_autofocus.two_shot import default_model_path as default_two_shot_path

RESULTS = Path(__file__).resolve().parent / "results"


def single_shot(model_dir: Path, tiles: dict, threads: int = 2) -> tuple[FocusEstimator, dict]:
    """The single-shot model of `model_dir` and its estimates of `tiles`."""
    estimator = FocusEstimator(load_backend("onnxruntime", model_dir, threads=threads)[0], model_dir)
    return estimator, estimate_tiles(estimator, tiles)


def outcome(single_shot_model: tuple[FocusEstimator, dict], two_shot_path: Path, tiles: dict, refocuser,
            mask: np.ndarray) -> dict:
    """The scan outcome of `tiles` in `mask`; `refocuser` re-images a tile's field (`shift_evaluation.Refocuser`,
    `slide_calibration.SlideRefocuser`)."""
    estimator, estimates = single_shot_model
    return scan_outcome_statistics(scan_outcomes(estimator, tiles, estimates, refocuser, mask,
                                                 TwoShotModel.load(two_shot_path)))


def outcomes(stacks: list, tiles: dict, refocuser, mask: np.ndarray, condenser, model: Path, two_shot_model: Path,
             work: Path, shipped: tuple[FocusEstimator, dict] | None = None, threads: int = 2) -> dict:
    """`calibrate_both` on `stacks`, then the scan outcome of `tiles` in `mask` with the shipped models, the
    calibrated two-shot model beside the shipped single shot, and both calibrated; and why a calibration was
    refused."""
    shipped = shipped or single_shot(model, tiles, threads)
    calibrated = calibrate_both(z_stacks(stacks), work, model, two_shot_model, condenser=condenser)
    calibrated_single_shot = (single_shot(calibrated.single_shot.model_dir, tiles, threads) if calibrated.single_shot
                              else shipped)
    two_shot = calibrated.two_shot.path if calibrated.two_shot else two_shot_model
    return {"refused": list(calibrated.errors),
            "outcomes": {"shipped models": outcome(shipped, two_shot_model, tiles, refocuser, mask),
                         "two-shot calib.": outcome(shipped, two_shot, tiles, refocuser, mask),
                         "both calibrated": outcome(calibrated_single_shot, two_shot, tiles, refocuser, mask)}}


def slide_itself(spec: slide_calibration.SlideCalibrationSpec, scope: str, slide: str, rendered: dict, model: Path,
                 two_shot_model: Path, work: Path) -> dict:
    """`outcomes` of one slide's test fields after calibrating on its sweeps (one of two processes: a thread each)."""
    tiles = rendered["tiles"] | {"imaging": np.full(len(rendered["tiles"]["images"]), scope)}
    return outcomes(rendered["stacks"], tiles, slide_calibration.SlideRefocuser(spec, scope, slide),
                    np.ones(len(tiles["images"]), bool), imaging_condenser(scope), model, two_shot_model, work,
                    threads=1)


def print_results(results: dict) -> None:
    for name, result in results.items():
        print(f"\n{name}" + "".join(f"\n  calibration refused: {reason}" for reason in result["refused"]))
        print(format_scan_outcomes(result["outcomes"], CalibrationSpec().magnification))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--two-shot-model", type=Path, default=default_two_shot_path())
    parser.add_argument("--cache-dir", type=Path, default=Path("build/autofocus-eval-cache"))
    parser.add_argument("--output", type=Path, default=RESULTS / "calibrated_scan_outcome.json")
    args = parser.parse_args()
    spec, calibration_spec = ShiftSpec(), CalibrationSpec()
    tiles = render_tiles(spec, args.cache_dir)
    sweeps = render_all_sweeps(calibration_spec, args.cache_dir)
    slide_spec = slide_calibration.SlideCalibrationSpec()
    slides = slide_calibration.render_all(slide_spec, args.cache_dir)
    refocuser = Refocuser(spec, args.cache_dir)
    shipped = single_shot(args.model, tiles)
    other_specimens = {}
    with tempfile.TemporaryDirectory() as work:
        try:
            for name, stacks in sweeps.items():
                mask = (tiles["imaging"] == name) & (tiles["objective"] == calibration_spec.magnification)
                other_specimens[name] = outcomes(stacks, tiles, refocuser, mask, imaging_condenser(name), args.model,
                                                 args.two_shot_model, Path(work) / name, shipped)
        finally:
            refocuser.save()
        on_the_slide = dict(zip((f"{scope} / {slide}" for scope, slide in slides), starmap_in_processes(
            slide_itself, [(slide_spec, scope, slide, rendered, args.model, args.two_shot_model,
                            Path(work) / f"{scope}-{slide}") for (scope, slide), rendered in slides.items()], 2)))
    print("scan outcome of a scanner calibrated on other specimens (nine sweeps of validation specimens under each "
          "held-out microscope; its 20x tiles of test specimens and real content)")
    print_results(other_specimens)
    print("\nscan outcome of a scan calibrated on its own slide (nine sweeps of the slide; 30 other fields of it)")
    print_results(on_the_slide)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"single_shot_model": str(args.model), "two_shot_model": str(args.two_shot_model),
                                       "other_specimens": other_specimens, "on_the_slide": on_the_slide}, indent=2))
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
