"""Benchmark: how large the sub-field should be that the two-shot model reads a field's off-centre tissue through.

    .venv/bin/python bench/two_shot_field_window.py [--model FILE] [--fractions F ...] [--data-dir D]

Renders the two-shot model's validation pairs (`two_shot_training.PAIR_SPLITS["val"]`: validation specimens and
textures under the training simulators, never the evaluation's microscopes or real images) with each sub-window
fraction (`two_shot.field_window`) and reports the model's MAE on them, over all pairs and over those whose reading
the fraction changes (their tissue lies off the field's centre) against the shipped fraction's reading of the same
pairs. The model is the shipped one, trained on pairs read with the shipped fraction: a fraction that wins here
wins against that advantage. Prints a table and writes bench/results/two_shot_field_window.json.
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from wsi_autofocus.two_shot import (SUB_WINDOW_FRACTION, TwoShotModel, default_model_path, depth_unit_um, label_depths,
                                    model_inputs)
from wsi_autofocus.two_shot_training import PAIR_SPLITS, split_pairs

RESULTS = Path(__file__).resolve().parent / "results"
MAX_DEFOCUS_UM = 10.0
CANDIDATE_FRACTIONS = (0.5, 0.35, 0.25)


def validation_pairs(fraction: float, data_dir: Path, workers: int) -> dict:
    sets = {name: replace(spec, sub_window_fraction=fraction) for name, spec in PAIR_SPLITS["val"].items()}
    return split_pairs(sets, data_dir / f"{fraction:g}", "val", workers, log=lambda line: print(line, flush=True))


def absolute_errors_um(model: TwoShotModel, pairs: dict) -> np.ndarray:
    """Each pair's |error| with its condenser declared, as the evaluation's scanners declare theirs."""
    inputs = model_inputs(pairs["features"], pairs["condenser_fill"], pairs["condenser_inner_fill"])
    predicted, _ = model.predict_depths(inputs)
    return np.abs(predicted - label_depths(pairs)) * depth_unit_um(pairs["numerical_aperture"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--fractions", type=float, nargs="+", default=list(CANDIDATE_FRACTIONS))
    parser.add_argument("--data-dir", type=Path, default=Path("build/two-shot-window"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    model = TwoShotModel.load(args.model)
    pairs = {fraction: validation_pairs(fraction, args.data_dir, args.workers)
             for fraction in dict.fromkeys([SUB_WINDOW_FRACTION, *args.fractions])}
    shipped = pairs[SUB_WINDOW_FRACTION]
    near = np.abs(shipped["defocus_um"]) <= MAX_DEFOCUS_UM
    shipped_errors = absolute_errors_um(model, shipped)
    rows = []
    print(f"two-shot validation pairs within ±{MAX_DEFOCUS_UM:g} µm, model {args.model} "
          f"(trained on pairs read with sub-window fraction {SUB_WINDOW_FRACTION:g})")
    print(f"{'fraction':>8} {'objective':>9} {'pairs':>6} {'MAE µm':>7} {'changed':>8} {'MAE changed':>12} "
          f"{'same at ' + format(SUB_WINDOW_FRACTION, 'g'):>10}")
    for fraction, read in pairs.items():
        errors = absolute_errors_um(model, read)
        changed = np.any(read["features"] != shipped["features"], axis=1)
        for objective in (None, *np.unique(shipped["objective"])):
            chosen = near & ((shipped["objective"] == objective) if objective is not None else True)
            moved = chosen & changed
            row = {"fraction": fraction, "objective": "all" if objective is None else f"{objective:g}x",
                   "pairs": int(chosen.sum()), "mae_um": float(errors[chosen].mean()), "changed": int(moved.sum()),
                   "mae_changed_um": float(errors[moved].mean()) if moved.any() else None,
                   "shipped_mae_changed_um": float(shipped_errors[moved].mean()) if moved.any() else None}
            rows.append(row)
            changed_text = (f"{row['mae_changed_um']:12.3f} {row['shipped_mae_changed_um']:10.3f}" if moved.any()
                            else f"{'–':>12} {'–':>10}")
            print(f"{fraction:8g} {row['objective']:>9} {row['pairs']:6d} {row['mae_um']:7.3f} {row['changed']:8d} "
                  f"{changed_text}")
    RESULTS.mkdir(exist_ok=True)
    output = RESULTS / "two_shot_field_window.json"
    output.write_text(json.dumps({"model": str(args.model), "max_defocus_um": MAX_DEFOCUS_UM, "rows": rows},
                                 indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
