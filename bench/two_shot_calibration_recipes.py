"""Benchmark: how the two-shot calibration should refit the model, judged by the sweeps it is given only.

    .venv/bin/python bench/two_shot_calibration_recipes.py [--model FILE] [--cache-dir build/autofocus-eval-cache]

For each of the evaluation's nine calibrations (`wsi-autofocus eval-two-shot`: nine sweeps of validation specimens
under each held-out microscope, and nine sweeps of each slide under each; rendered once into the evaluation's cache),
splits the sweeps as `calibrate_two_shot` does (a third held back), fits on the rest by each recipe, and reports the
held-back sweeps' MAE (each pair read once, through its field window, as a scan reads): the criterion
`two_shot_calibration`'s recipe was chosen by, never the tiles the cards judge the calibration on. Recipes differ in
the fit (`fine_tune`'s steps, pairs per step, learning rate, penalty, how many of the last hidden layers it fits) and
in the pairs it reads: through the field window only, or also through corner sub-fields of a fraction of the field
(`sweep_pairs`).
The anchor is the recipe before `fine_tune`: each member's defocus output alone refitted by ridge regression towards
the trained weights, its strength chosen by leaving one fitted sweep out at a time. Prints a table and writes
bench/results/two_shot_calibration_recipes.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from wsi_autofocus import slide_calibration
from wsi_autofocus.calibration_store import held_back_stacks, stacks_with_focus
from wsi_autofocus.shift_evaluation import CalibrationSpec, imaging_condenser, render_all_sweeps, z_stacks
from wsi_autofocus.two_shot import TwoShotModel, default_model_path, label_depths
from wsi_autofocus.two_shot_calibration import (FINE_TUNE_BATCH, FINE_TUNE_LAYERS, FINE_TUNE_LEARNING_RATE,
                                                 FINE_TUNE_PENALTY, FINE_TUNE_STEPS, FIT_SUB_FIELD_FRACTION, _mae_um,
                                                 _subset, fine_tune, sweep_pairs)

RESULTS = Path(__file__).resolve().parent / "results"
RIDGE_STRENGTHS = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
# With the shipped sub-fields and layers: penalties at the shipped steps and learning rate, then steps and learning
# rates at the shipped penalty, then steps and pairs per step (EVERY_PAIR: all of them). Then the shipped fit on other
# sub-fields, on the field windows alone, and of other numbers of hidden layers.
PENALTIES = (5e-5, 5e-4, 5e-3)
STEPS_AND_RATES = ((300, 1e-2), (600, 1e-3), (1000, 1e-3))
EVERY_PAIR = 1 << 30
STEPS_AND_BATCHES = ((300, EVERY_PAIR), (300, 512), (600, 512), (600, 256))
SUB_FIELD_FRACTIONS = (0.5, 0.6, 0.8, None)
LAYERS = (1, 3)


class FineTune(NamedTuple):
    """A `fine_tune` recipe and the sub-field fraction of the pairs it fits (None: the field windows only)."""
    steps: int
    batch: int
    rate: float
    penalty: float
    fraction: float | None
    layers: int


def refit_outputs(model: TwoShotModel, pairs: dict, ridge: float) -> TwoShotModel:
    """The anchor: each member's defocus output fitted by least squares plus `ridge` x pairs x |change|^2."""
    depths = label_depths(pairs)
    arrays = dict(model.arrays)
    for member, hidden in zip(model.members, model.hidden(pairs["features"])):
        design = np.hstack([hidden, np.ones((len(hidden), 1), np.float32)]).astype(np.float64)
        weights, bias = arrays[f"m{member}_w_out"].copy(), arrays[f"m{member}_b_out"].copy()
        start = np.append(weights[:, 0], bias[0]).astype(np.float64)
        gram = design.T @ design + ridge * len(design) * np.eye(design.shape[1])
        fitted = start + np.linalg.solve(gram, design.T @ (depths - design @ start))
        weights[:, 0], bias[0] = fitted[:-1], fitted[-1]
        arrays[f"m{member}_w_out"], arrays[f"m{member}_b_out"] = weights, bias
    return TwoShotModel(arrays, dict(model.metadata))


def ridge_by_leaving_sweeps_out(model: TwoShotModel, pairs: dict) -> TwoShotModel:
    groups = np.unique(pairs["group"])
    errors = [np.mean([_mae_um(refit_outputs(model, _subset(pairs, pairs["group"] != left_out), ridge),
                               _subset(pairs, pairs["group"] == left_out)) for left_out in groups])
              for ridge in RIDGE_STRENGTHS]
    return refit_outputs(model, pairs, RIDGE_STRENGTHS[int(np.argmin(errors))])


def calibrations(cache_dir: Path) -> dict[str, tuple[list, object]]:
    """Every calibration of the evaluation: name -> (z-stacks, declared condenser)."""
    out = {f"{name} / other specimens": (z_stacks(stacks), imaging_condenser(name))
           for name, stacks in render_all_sweeps(CalibrationSpec(), cache_dir).items()}
    for (scope, slide), rendered in slide_calibration.render_all(slide_calibration.SlideCalibrationSpec(),
                                                                 cache_dir).items():
        out[f"{scope} / {slide}"] = (z_stacks(rendered["stacks"]), imaging_condenser(scope))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--cache-dir", type=Path, default=Path("build/autofocus-eval-cache"))
    parser.add_argument("--output", type=Path, default=RESULTS / "two_shot_calibration_recipes.json")
    args = parser.parse_args()
    model = TwoShotModel.load(args.model)
    # recipe -> (sub-field fraction of the pairs it fits, refit)
    recipes = {"output layer, ridge (anchor)": (None, ridge_by_leaving_sweeps_out)}
    shipped = FineTune(FINE_TUNE_STEPS, FINE_TUNE_BATCH, FINE_TUNE_LEARNING_RATE, FINE_TUNE_PENALTY,
                       FIT_SUB_FIELD_FRACTION, FINE_TUNE_LAYERS)
    grid = ([shipped._replace(penalty=penalty) for penalty in PENALTIES]
            + [shipped._replace(steps=steps, rate=rate) for steps, rate in STEPS_AND_RATES]
            + [shipped._replace(steps=steps, batch=batch) for steps, batch in STEPS_AND_BATCHES]
            + [shipped._replace(fraction=fraction) for fraction in SUB_FIELD_FRACTIONS]
            + [shipped._replace(layers=layers) for layers in LAYERS])
    for steps, batch, rate, penalty, fraction, layers in grid:
        pairs_read = f"sub-fields {fraction:g}" if fraction else "field window only"
        per_step = "every pair" if batch == EVERY_PAIR else f"{batch} pairs"
        recipes[f"{layers} layers, {steps} of {per_step} at {rate:g}, penalty {penalty:g}, {pairs_read}"] = (
            fraction, lambda m, pairs, steps=steps, batch=batch, rate=rate, penalty=penalty, layers=layers: fine_tune(
                m, pairs, penalty, steps, rate, layers, batch))
    held_back_mae, fit_s = {recipe: {} for recipe in recipes}, {recipe: [] for recipe in recipes}
    names = []
    for name, (stacks, condenser) in calibrations(args.cache_dir).items():
        names.append(name)
        usable, _ = stacks_with_focus(stacks, lambda line: None, condenser)
        held_back_groups = held_back_stacks(len(usable))
        by_fraction = {fraction: sweep_pairs(usable, condenser, fraction)
                       for fraction in dict.fromkeys(fraction for fraction, _ in recipes.values())}
        judge_pairs = by_fraction[None]
        judge = _subset(judge_pairs, np.isin(judge_pairs["group"], held_back_groups))
        for recipe, (fraction, refit) in recipes.items():
            pairs = by_fraction[fraction]
            started = time.monotonic()
            fitted = refit(model, _subset(pairs, ~np.isin(pairs["group"], held_back_groups)))
            fit_s[recipe].append(time.monotonic() - started)
            held_back_mae[recipe][name] = _mae_um(fitted, judge)
        print(f"{name}: done", file=sys.stderr, flush=True)
    short = [name.replace(" / other specimens", "/other").replace(" / ", "/").replace("abbe-", "")
             .replace("procedural-heldout", "proc").replace("astigmatic", "astig") for name in names]
    print(f"two-shot calibration recipes: held-back sweeps' MAE (µm) of each of the evaluation's calibrations, "
          f"model {args.model}")
    print(f"{'recipe':<76}" + "".join(f"{label:>16}" for label in short) + f"{'sum':>8}{'fit s':>7}")
    for recipe in recipes:
        values = [held_back_mae[recipe][name] for name in names]
        print(f"{recipe:<76}" + "".join(f"{value:>16.3f}" for value in values)
              + f"{sum(values):>8.3f}{np.median(fit_s[recipe]):>7.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": str(args.model), "held_back_mae_um": held_back_mae,
                                       "median_fit_s": {recipe: float(np.median(v)) for recipe, v in fit_s.items()},
                                       "sum_um": {recipe: float(sum(v.values())) for recipe, v in held_back_mae.items()}},
                                      indent=2))
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
