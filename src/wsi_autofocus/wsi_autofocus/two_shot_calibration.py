"""Self-calibration of the two-shot model on the user's microscope, from the z-sweeps its focus map took.

Any two images of one sweep are a labelled pair: the lower image's defocus is its z minus the sweep's specimen
plane (`calibration_store.stacks_with_focus`), the step is their z difference; nine sweeps of ~20 images give
several hundred pairs. The ensemble's hidden layers stay as trained; each member's defocus output (one linear
layer over its last hidden layer) is refitted by ridge regression pulled towards the trained weights, so a few
sweeps correct how this microscope's optics map onto defocus rather than teach a new model. The ridge strength
is chosen by leaving one fitted sweep out at a time; the uncertainty's temperature is refitted on sweeps held
back from the fit (never below the trained model's), which also decide whether the calibration is kept at all.
numpy only, in a few seconds:

    from wsi_autofocus.calibration_store import ZStack
    from wsi_autofocus.two_shot import Condenser
    from wsi_autofocus.two_shot_calibration import calibrate_two_shot
    result = calibrate_two_shot([ZStack(images, z_um, 0.325, 0.75), ...], Path("my-scanner/two_shot.npz"),
                                condenser=Condenser(0.7))
    TwoShotModel.load(result.path)     # estimates with the same condenser declared

The calibration learns the microscope as declared: a scanner calibrated with its condenser declared (or not)
is read with the same declaration.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_autofocus.calibration_store import (MAX_LABEL_UM, CalibrationError, ZStack, check_stacks, held_back_stacks,
                                             stacks_with_focus)
from wsi_autofocus.two_shot import (UNKNOWN_CONDENSER, Condenser, TwoShotModel, band_log_power, default_model_path,
                                    depth_unit_um, features_from_bands, field_window, label_depths, model_inputs,
                                    sigma_temperature)

# Steps between the two images of a pair, in depths of focus: the range the model was trained on.
STEP_DEPTHS = (1.0, 12.0)
# Candidate ridge strengths, per pair: larger keeps the output layer nearer the trained one. Nine sweeps
# give ~1200 pairs against ~130 weights per member, so the choice usually falls low.
RIDGE_STRENGTHS = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)


@dataclass(frozen=True)
class TwoShotCalibrationResult:
    path: Path
    stacks: int
    pairs: int
    fit_s: float
    ridge: float                          # the strength chosen
    held_back_mae_before_um: float        # the model before calibration, on pairs of the held-back sweeps
    held_back_mae_after_um: float         # refitted without them
    skipped: tuple[str, ...] = ()          # sweeps left out, each with the reason


def sweep_pairs(stacks: list[ZStack], condenser: Condenser) -> dict:
    """Every pair of images of each stack whose step lies in `STEP_DEPTHS` and whose lower image lies
    within `MAX_LABEL_UM` of the stack's focus: model inputs (with the microscope's `condenser`), the lower
    image's defocus (µm), NA, stack index."""
    features, defocus, aperture, group = [], [], [], []
    for index, stack in enumerate(stacks):
        focus, unit = stack.focus_z_um(), depth_unit_um(stack.numerical_aperture)
        order = np.argsort(stack.z_um)
        z = np.asarray(stack.z_um, float)[order]
        # Every image of the stack is read in one region, the one the image nearest focus shows tissue in.
        region = field_window(stack.images[order[int(np.argmin(np.abs(z - focus)))]])
        bands = [band_log_power(stack.images[k], stack.numerical_aperture, stack.pixel_size_um, region)
                 for k in order]
        for lower in range(len(z)):
            if abs(z[lower] - focus) > MAX_LABEL_UM:
                continue
            for upper in range(lower + 1, len(z)):
                step = z[upper] - z[lower]
                if STEP_DEPTHS[0] * unit - 1e-6 <= step <= STEP_DEPTHS[1] * unit:
                    features.append(features_from_bands(bands[lower], bands[upper], stack.numerical_aperture,
                                                        stack.pixel_size_um, step))
                    defocus.append(z[lower] - focus)
                    aperture.append(stack.numerical_aperture)
                    group.append(index)
    if not features:
        raise CalibrationError(f"no two images of the z-stacks lie {STEP_DEPTHS[0]:g}-{STEP_DEPTHS[1]:g} depths of "
                               f"focus apart within ±{MAX_LABEL_UM} µm of focus")
    return {"features": model_inputs(np.array(features), condenser.fill, condenser.inner_fill),
            "defocus_um": np.array(defocus, np.float32),
            "numerical_aperture": np.array(aperture, np.float32), "group": np.array(group)}


def _subset(pairs: dict, mask: np.ndarray) -> dict:
    return {key: value[mask] for key, value in pairs.items()}


def refit_outputs(model: TwoShotModel, pairs: dict, ridge: float) -> TwoShotModel:
    """A copy of `model` whose members' defocus outputs are fitted to `pairs` by least squares plus
    `ridge` x pairs x |change of the weights|^2; hidden layers, log-variance outputs and temperature kept."""
    depths = label_depths(pairs)
    arrays = dict(model.arrays)
    for member, hidden in zip(model.members, model.last_hidden(pairs["features"])):
        design = np.hstack([hidden, np.ones((len(hidden), 1), np.float32)]).astype(np.float64)
        weights, bias = arrays[f"m{member}_w_out"], arrays[f"m{member}_b_out"]
        start = np.append(weights[:, 0], bias[0]).astype(np.float64)
        gram = design.T @ design + ridge * len(design) * np.eye(design.shape[1])
        fitted = start + np.linalg.solve(gram, design.T @ (depths - design @ start))
        weights, bias = weights.copy(), bias.copy()
        weights[:, 0], bias[0] = fitted[:-1], fitted[-1]
        arrays[f"m{member}_w_out"], arrays[f"m{member}_b_out"] = weights, bias
    return TwoShotModel(arrays, dict(model.metadata))


def _mae_um(model: TwoShotModel, pairs: dict) -> float:
    predicted, _ = model.predict_depths(pairs["features"])
    return float(np.mean(np.abs(predicted - label_depths(pairs)) * depth_unit_um(pairs["numerical_aperture"])))


def _choose_ridge(model: TwoShotModel, pairs: dict) -> float:
    """The strength with the lowest error on each fitted sweep when it is left out of the fit."""
    groups = np.unique(pairs["group"])
    errors = [np.mean([_mae_um(refit_outputs(model, _subset(pairs, pairs["group"] != left_out), ridge),
                               _subset(pairs, pairs["group"] == left_out)) for left_out in groups])
              for ridge in RIDGE_STRENGTHS]
    return RIDGE_STRENGTHS[int(np.argmin(errors))]


def calibrate_two_shot(stacks: list[ZStack], output: Path, base_model: Path | None = None, scanner: dict | None = None,
                       log=lambda line: None, condenser: Condenser = UNKNOWN_CONDENSER,
                       left_out: tuple[str, ...] = ()) -> TwoShotCalibrationResult:
    """Refit the base two-shot model on pairs from `stacks` (imaged under `condenser` as the scanner declares it)
    and write it to `output` (a .npz file).

    A third of the stacks (at least one) is held back from the fit: sigma's temperature is fitted on
    their pairs, and a fit that does not improve them raises `CalibrationError` and writes nothing. The
    kept model is then refitted on every stack with the same ridge strength. `left_out`: why stacks were left out
    before these (`calibration.calibrate_both`), recorded with the ones left out here."""
    started = time.monotonic()
    check_stacks(stacks)
    stacks, skipped = stacks_with_focus(stacks, log, condenser)
    skipped = [*left_out, *skipped]
    base_path = Path(base_model) if base_model else default_model_path()
    model = TwoShotModel.load(base_path)
    pairs = sweep_pairs(stacks, condenser)
    held_back = np.isin(pairs["group"], held_back_stacks(len(stacks)))
    fit, judge = _subset(pairs, ~held_back), _subset(pairs, held_back)
    if len(np.unique(fit["group"])) < 2 or not held_back.any():
        raise CalibrationError(f"{len(stacks)} usable z-stacks give pairs to fit on in "
                               f"{len(np.unique(fit['group']))} and to judge by in "
                               f"{len(np.unique(judge['group']))}; two and one are needed: take more sweeps")
    ridge = _choose_ridge(model, fit)
    trial = refit_outputs(model, fit, ridge)
    before, after = _mae_um(model, judge), _mae_um(trial, judge)
    # A few held-back sweeps are easier than every tile a scan will meet: sigma is never made sharper than
    # the temperature training fitted on its own shifted validation pairs.
    temperature = max(sigma_temperature(trial, judge), float(model.arrays.get("sigma_temperature", 1.0)))
    log(f"held-back sweeps ({len(judge['group'])} pairs): MAE {before:.3f} µm before, {after:.3f} µm after "
        f"(ridge {ridge:g}); sigma temperature {temperature:.2f}")
    if after >= before:
        raise CalibrationError(f"two-shot calibration made the held-back sweeps no better (MAE {before:.3f} µm "
                               f"before, {after:.3f} µm after): the model in use is kept")
    calibrated = refit_outputs(model, pairs, ridge)
    calibrated.arrays["sigma_temperature"] = np.float32(temperature)
    calibrated.metadata = model.metadata | {"sigma_temperature": temperature, "calibration": {
        "base_model": str(base_path), "stacks": len(stacks), "pairs": len(pairs["group"]), "ridge": ridge,
        "held_back_mae_before_um": before, "held_back_mae_after_um": after, "skipped_stacks": skipped,
        "condenser": dataclasses.asdict(condenser),
        "created_unix_s": time.time(), "scanner": scanner or {}}}
    path = calibrated.save(output)
    return TwoShotCalibrationResult(path, len(stacks), len(pairs["group"]), time.monotonic() - started, ridge,
                                    before, after, tuple(skipped))
