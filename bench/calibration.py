"""Benchmark: self-calibration fit time on 2 CPU cores (the issue's target: <= 60 s from <= 9 sweeps).

    .venv/bin/python bench/calibration.py [--model DIR] [--two-shot-model FILE] [--cache-dir build/autofocus-eval-cache]

Calibrates both focus models on each held-out microscope's focus-map-like sweeps
(`shift_evaluation.CalibrationSpec`: 9 sweeps of validation specimens; rendered once into the evaluation's
cache, not timed), as the autofocus node's CalibrateAutofocus does, and reports per microscope and model the
wall time (single shot: `calibrate`: feature extraction, fit, temperatures, refit, ONNX/TorchScript export;
two shots: `calibrate_two_shot`: band spectra of every image, pairs, ridge strength by leave-one-sweep-out,
refit), the held-back sweeps' MAE before and after, or why it was refused. Prints a table and writes
bench/results/calibration.json.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from wsi_autofocus.calibration import CalibrationError, calibrate
from wsi_autofocus.inference import default_model_dir
from wsi_autofocus.shift_evaluation import CalibrationSpec, imaging_condenser, render_all_sweeps, z_stacks
from wsi_autofocus.two_shot import MODEL_FILE as TWO_SHOT_MODEL_FILE
from wsi_autofocus.two_shot import default_model_path as default_two_shot_path
from wsi_autofocus.two_shot_calibration import calibrate_two_shot

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_FIT_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--two-shot-model", type=Path, default=default_two_shot_path())
    parser.add_argument("--cache-dir", type=Path, default=Path("build/autofocus-eval-cache"))
    parser.add_argument("--output", type=Path, default=RESULTS / "calibration.json")
    args = parser.parse_args()
    spec = CalibrationSpec()
    sweeps = render_all_sweeps(spec, args.cache_dir)
    models = {"single-shot": lambda stacks, work, name: calibrate(stacks, work, args.model),
              "two-shot": lambda stacks, work, name: calibrate_two_shot(stacks, work / TWO_SHOT_MODEL_FILE,
                                                                        args.two_shot_model,
                                                                        condenser=imaging_condenser(name))}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, stacks in sweeps.items():
            for model, calibrate_model in models.items():
                load_before = os.getloadavg()[0]
                started = time.monotonic()
                row = {"microscope": name, "model": model, "sweeps": len(stacks),
                       "images": int(sum(len(s["images"]) for s in stacks))}
                try:
                    result = calibrate_model(z_stacks(stacks), Path(work) / name, name)
                    row |= {"held_back_mae_before_um": result.held_back_mae_before_um,
                            "held_back_mae_after_um": result.held_back_mae_after_um, "refused": None}
                except CalibrationError as error:
                    row |= {"refused": str(error)}
                rows.append(row | {"fit_s": time.monotonic() - started, "load_1min": load_before})
    print(f"self-calibration on {os.cpu_count()} cores, models {args.model} and {args.two_shot_model} "
          f"(target <= {TARGET_FIT_S:.0f} s)")
    print(f"{'microscope':<18}{'model':<13}{'sweeps':>7}{'images':>7}{'fit s':>8}{'load':>6}  "
          "held-back MAE before -> after")
    for r in rows:
        outcome = (f"{r['held_back_mae_before_um']:.2f} -> {r['held_back_mae_after_um']:.2f} µm" if not r["refused"]
                   else f"refused: {r['refused']}")
        print(f"{r['microscope']:<18}{r['model']:<13}{r['sweeps']:>7}{r['images']:>7}{r['fit_s']:>8.1f}"
              f"{r['load_1min']:>6.1f}  {outcome}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"target_fit_s": TARGET_FIT_S, "results": rows}, indent=2))
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
