"""Benchmark: self-calibration fit time on 2 CPU cores (the issue's target: <= 60 s from <= 9 sweeps).

    .venv/bin/python bench/calibration.py [--model DIR] [--two-shot-model FILE] [--cache-dir build/autofocus-eval-cache]
                                          [--condenser-not-declared]

Calibrates both focus models on each held-out microscope's focus-map-like sweeps
(`shift_evaluation.CalibrationSpec`: 9 sweeps of validation specimens; rendered once into the evaluation's
cache, not timed) with `calibrate_both`, under the microscope's declared condenser or none (the specimen plane's
fit then tries every condenser of the training microscopes), as the autofocus node's CalibrateAutofocus and
`wsi-autofocus calibrate` do, and reports per microscope the wall time of the whole
calibration (the sweeps' specimen plane, found once; single shot: feature extraction, fit, temperatures, refit,
ONNX/TorchScript export; two shots: band spectra of every image, pairs, fine-tuning on two thirds of the sweeps,
then on all) and per model the held-back sweeps' MAE before and after, or why it was refused; and the wall time of
the same calibration when no tiles of the scan follow (a calibration-only goal, a finished scan: the two-shot model
alone, `calibrate_both(tiles_follow=False)`). Prints a table and writes bench/results/calibration.json.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from wsi_autofocus.calibration import calibrate_both
from wsi_autofocus.inference import default_model_dir
from wsi_autofocus.shift_evaluation import CalibrationSpec, imaging_condenser, render_all_sweeps, z_stacks
from wsi_autofocus.two_shot import UNKNOWN_CONDENSER
from wsi_autofocus.two_shot import default_model_path as default_two_shot_path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_FIT_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--two-shot-model", type=Path, default=default_two_shot_path())
    parser.add_argument("--cache-dir", type=Path, default=Path("build/autofocus-eval-cache"))
    parser.add_argument("--condenser-not-declared", action="store_true",
                        help="calibrate as a scanner that does not declare its condenser")
    parser.add_argument("--output", type=Path, default=RESULTS / "calibration.json")
    args = parser.parse_args()
    spec = CalibrationSpec()
    sweeps = render_all_sweeps(spec, args.cache_dir)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, stacks in sweeps.items():
            condenser = UNKNOWN_CONDENSER if args.condenser_not_declared else imaging_condenser(name)
            load_before = os.getloadavg()[0]
            started = time.monotonic()
            result = calibrate_both(z_stacks(stacks), Path(work) / name, args.model, args.two_shot_model,
                                    condenser=condenser)
            elapsed = time.monotonic() - started
            started = time.monotonic()
            calibrate_both(z_stacks(stacks), Path(work) / f"{name}-no-tiles", args.model, args.two_shot_model,
                           condenser=condenser, tiles_follow=False)
            elapsed_no_tiles = time.monotonic() - started
            held_back = {model: [calibrated.held_back_mae_before_um, calibrated.held_back_mae_after_um]
                         for model, calibrated in (("single-shot", result.single_shot), ("two-shot", result.two_shot))
                         if calibrated is not None}
            rows.append({"microscope": name, "sweeps": len(stacks),
                         "images": int(sum(len(sweep["images"]) for sweep in stacks)), "fit_s": elapsed,
                         "fit_s_no_tiles_follow": elapsed_no_tiles,
                         "load_1min": load_before, "held_back_mae_before_after_um": held_back,
                         "refused": list(result.errors)})
    print(f"self-calibration of both models on {os.cpu_count()} cores, models {args.model} and {args.two_shot_model} "
          f"(target <= {TARGET_FIT_S:.0f} s)")
    print(f"{'microscope':<18}{'sweeps':>7}{'images':>7}{'fit s':>8}{'no tiles s':>11}{'load':>6}  "
          "held-back MAE before -> after")
    for r in rows:
        outcomes = [f"{model} {before:.2f} -> {after:.2f} µm"
                    for model, (before, after) in r["held_back_mae_before_after_um"].items()]
        print(f"{r['microscope']:<18}{r['sweeps']:>7}{r['images']:>7}{r['fit_s']:>8.1f}"
              f"{r['fit_s_no_tiles_follow']:>11.1f}{r['load_1min']:>6.1f}  "
              + "; ".join(outcomes + [f"refused: {reason}" for reason in r["refused"]]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    summary = {"target_fit_s": TARGET_FIT_S, "condenser_declared": not args.condenser_not_declared, "results": rows}
    args.output.write_text(json.dumps(summary, indent=2))
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
