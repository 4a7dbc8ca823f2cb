"""Benchmark: what a scanner calibrated on one slide's sweeps makes of that slide's tiles and of other specimens'.

    .venv/bin/python bench/calibrated_scan_outcome.py [--model DIR] [--two-shot-model FILE]
                                                      [--cache-dir build/autofocus-eval-cache]

A scanner keeps its calibration (`CalibrationStore`) and uses it for every later slide, so a calibration from one
slide's focus map (`ScanSlide.calibrate_autofocus`, `wsi-autofocus calibrate`) steers the scans of the next
slides. Per held-out microscope this calibrates both focus models on its nine focus-map-like sweeps of validation
specimens with `calibrate_both` (as the autofocus node does), then runs the scan's inline autofocus
(`shift_evaluation.scan_outcomes`, the two-shot card's scan outcome) over that microscope's 20x tiles of the test
specimens and real content three times (`shift_evaluation.calibrated_scan_outcomes`): with the shipped models, with
the calibrated two-shot model beside the shipped single-shot one (what the node serves a later scan: a single-shot
calibration serves only the scan it was fitted on, `CalibratedEstimators`), and with both calibrated (what it served
before; a refused calibration leaves the shipped model). Then the same three on the slide itself, as a scan that
calibrates itself (`ScanSlide.calibrate_autofocus`) reads its own tiles: both models calibrated on nine sweeps of one
slide (`slide_calibration`: a procedural slide and a real H&E image under each held-out microscope), the scan
outcome of 30 other fields of that slide (`slide_calibration.self_calibrated_scan_outcomes`, the table the two-shot
card shows). Prints the scan outcome tables
and writes bench/results/calibrated_scan_outcome.json. The tiles, sweeps and slides come from the evaluation's
cache (rendered into it when missing: about an hour on 2 cores); the slides' fields re-imaged for the scan are
rendered each run (about a quarter of an hour).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from wsi_autofocus import slide_calibration
from wsi_autofocus.inference import default_model_dir
from wsi_autofocus.shift_evaluation import (CalibrationSpec, Refocuser, ShiftSpec, calibrated_scan_outcomes,
                                            format_calibrated_scan_outcomes, imaging_condenser, render_all_sweeps,
                                            render_tiles, single_shot_estimates)
from wsi_autofocus.two_shot import default_model_path as default_two_shot_path

RESULTS = Path(__file__).resolve().parent / "results"


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
    refocuser = Refocuser(spec, args.cache_dir)
    shipped = single_shot_estimates(args.model, tiles)
    other_specimens = {}
    with tempfile.TemporaryDirectory() as work:
        try:
            for name, stacks in sweeps.items():
                mask = (tiles["imaging"] == name) & (tiles["objective"] == calibration_spec.magnification)
                other_specimens[name] = calibrated_scan_outcomes(stacks, tiles, refocuser, mask,
                                                                 imaging_condenser(name), args.model,
                                                                 args.two_shot_model, Path(work) / name, shipped)
        finally:
            refocuser.save()
    on_the_slide = slide_calibration.self_calibrated_scan_outcomes(slide_calibration.SlideCalibrationSpec(),
                                                                   args.cache_dir, args.model, args.two_shot_model)
    print(format_calibrated_scan_outcomes(other_specimens, "scan outcome of a scanner calibrated on other specimens "
                                          "(nine sweeps of validation specimens under each held-out microscope; its "
                                          "20x tiles of test specimens and real content)"))
    print("\n" + format_calibrated_scan_outcomes(on_the_slide, slide_calibration.SCAN_OUTCOME_TITLE))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"single_shot_model": str(args.model), "two_shot_model": str(args.two_shot_model),
                                       "other_specimens": other_specimens, "on_the_slide": on_the_slide}, indent=2))
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
