"""Self-calibration of the two-shot model on the user's microscope, from the z-sweeps its focus map took.

Any two images of one sweep are a labelled pair: the lower image's defocus is its z minus the sweep's specimen
plane (`calibration_store.stacks_with_focus`), the step is their z difference; nine sweeps of ~20 images give
about a thousand pairs, and the fit reads each pair again through four corner sub-fields of the field
(`FIT_SUB_FIELD_FRACTION`). Each member's last two hidden layers and its defocus output are fine-tuned on them
(`fine_tune`), pulled towards the trained weights, so a few sweeps correct how this microscope's optics map
onto defocus rather than teach a new model; the layer before stays as trained. The uncertainty's temperature is
refitted on sweeps held back from the fit (never below the trained model's), which also decide whether the
calibration is kept at all. numpy only, in about a quarter of a minute on 2 cores (the evaluation's nine sweeps;
each `fine_tune` step reads a random draw of the pairs):

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
# `fine_tune`: Adam steps (each on every pair, until FINE_TUNE_BATCH below) on the mean squared error in depths of
# focus plus FINE_TUNE_PENALTY x |change of the weights|^2. Chosen by the held-back sweeps of the evaluation's nine
# calibrations
# (`bench/two_shot_calibration_recipes.py`; the sweeps only, never the tiles the cards judge calibration on): summed
# MAE 2.74 µm refitting the output layer alone (ridge regression, as before); after 300 steps at 3e-3, 2.38 / 2.42 /
# 2.49 µm for penalties 5e-5 / 5e-4 / 5e-3, the strongest pull within 2 % of the best kept; 1000 steps at 1e-3
# 2.42 and 3000 2.40, for 3 and 10 times the time. Better than the output layer alone on eight of the nine, worse
# on the astigmatic microscope's other specimens (0.72 against 0.68 µm). With the model retrained on third-width
# sub-fields: 2.349 µm against 2.336 for the best (1000 steps) and 2.737 for the output layer alone. Fitted on the
# corner sub-fields too (below): 2.03 µm, 2.00 at penalty 5e-5 and 1.98 for 1000 steps (3.6 times the time).
# FINE_TUNE_LAYERS, the last hidden layers fitted (the layer before stays as trained): two, 1.875 µm at penalty
# 5e-4, better than the last layer alone (2.033) on all nine calibrations; three 1.823. With two, penalties 5e-5
# (kept) / 5e-4 / 5e-3 read 1.821 / 1.875 / 1.917 µm, and 1000 steps at 1e-3 1.776 (3.4 times the time: over a
# minute for both models). Each step reads FINE_TUNE_BATCH pairs drawn at random, not all of them (a calibration fits
# 3000-6000): 600 steps of 1024 read the sweeps a little better than 300 of every pair, 1.781 / 1.813 / 1.778 /
# 1.774 µm over four draws against 1.821, in 1.5 times less time (6.6 s a fit against 9.9); 600 of 512 1.842 /
# 1.819 / 1.844 / 1.792 in a third of the time; 300 of 512 1.898, 600 of 256 1.849.
FINE_TUNE_STEPS = 600
FINE_TUNE_BATCH = 1024
FINE_TUNE_PENALTY = 5e-5
FINE_TUNE_LEARNING_RATE = 3e-3
FINE_TUNE_LAYERS = 2
# The fit also reads each pair of a sweep read through the whole field through the field's four corner sub-fields
# of this fraction of its size: the same defocus over other content, so that the fit learns the microscope more
# than the few fields it was shown. Judged as the recipe above (`bench/two_shot_calibration_recipes.py`: held-back
# sweeps, read through the field window): summed MAE 2.03 µm against 2.33 without them; 2.45 / 2.38 / 2.14 at
# fractions 0.5 / 0.6 / 0.8. Better on eight of the nine calibrations at 0.7, worse on the astigmatic microscope's
# other specimens (0.70 against 0.63 µm).
FIT_SUB_FIELD_FRACTION = 0.7


@dataclass(frozen=True)
class TwoShotCalibrationResult:
    path: Path
    stacks: int
    images: int                           # in those stacks
    pairs: int
    fit_s: float
    held_back_mae_before_um: float        # the model before calibration, on pairs of the held-back sweeps
    held_back_mae_after_um: float         # refitted without them
    skipped: tuple[str, ...] = ()          # sweeps left out, each with the reason


def _readings(shape: tuple[int, int], region: tuple[slice, slice], sub_field_fraction: float | None) -> list:
    """The regions a stack read in `region` is read in: that one and, when it is the whole field and a
    `sub_field_fraction` is given, the field's four corner sub-fields of that fraction of its size."""
    height, width = shape
    if sub_field_fraction is None or region != (slice(0, height), slice(0, width)):
        return [region]
    sub_height, sub_width = round(height * sub_field_fraction), round(width * sub_field_fraction)
    return [region] + [(slice(top, top + sub_height), slice(left, left + sub_width))
                       for top in (0, height - sub_height) for left in (0, width - sub_width)]


def sweep_pairs(stacks: list[ZStack], condenser: Condenser, sub_field_fraction: float | None = None) -> dict:
    """Every pair of images of each stack whose step lies in `STEP_DEPTHS` and whose lower image lies
    within `MAX_LABEL_UM` of the stack's focus: model inputs (with the microscope's `condenser`), the lower
    image's defocus (µm), NA, stack index, and whether the pair is read in a corner sub-field (with a
    `sub_field_fraction`, each pair of a stack read through the whole field is read in them too, `_readings`)."""
    features, defocus, aperture, group, sub_field = [], [], [], [], []
    for index, stack in enumerate(stacks):
        focus, unit = stack.focus_z_um(), depth_unit_um(stack.numerical_aperture)
        order = np.argsort(stack.z_um)
        z = np.asarray(stack.z_um, float)[order]
        # Every image of the stack is read in one region, the one the image nearest focus shows tissue in (and,
        # when that is the whole field, in its corners: `_readings`).
        region = field_window(stack.images[order[int(np.argmin(np.abs(z - focus)))]])
        lowers_uppers = [(lower, upper) for lower in range(len(z)) if abs(z[lower] - focus) <= MAX_LABEL_UM
                         for upper in range(lower + 1, len(z))
                         if STEP_DEPTHS[0] * unit - 1e-6 <= z[upper] - z[lower] <= STEP_DEPTHS[1] * unit]
        for reading, read_region in enumerate(_readings(stack.images.shape[1:3], region, sub_field_fraction)):
            bands = [band_log_power(stack.images[k], stack.numerical_aperture, stack.pixel_size_um, read_region)
                     for k in order]
            features += [features_from_bands(bands[lower], bands[upper], stack.numerical_aperture, stack.pixel_size_um,
                                             z[upper] - z[lower]) for lower, upper in lowers_uppers]
            defocus += [z[lower] - focus for lower, _ in lowers_uppers]
            aperture += [stack.numerical_aperture] * len(lowers_uppers)
            group += [index] * len(lowers_uppers)
            sub_field += [reading > 0] * len(lowers_uppers)
    if not features:
        raise CalibrationError(f"no two images of the z-stacks lie {STEP_DEPTHS[0]:g}-{STEP_DEPTHS[1]:g} depths of "
                               f"focus apart within ±{MAX_LABEL_UM} µm of focus")
    return {"features": model_inputs(np.array(features), condenser.fill, condenser.inner_fill),
            "defocus_um": np.array(defocus, np.float32), "numerical_aperture": np.array(aperture, np.float32),
            "group": np.array(group), "sub_field": np.array(sub_field, bool)}


def _subset(pairs: dict, mask: np.ndarray) -> dict:
    return {key: value[mask] for key, value in pairs.items()}


def _adam(parameters: list[np.ndarray], gradient, steps: int, learning_rate: float) -> list[np.ndarray]:
    """`parameters` after `steps` Adam steps down `gradient(parameters)` (one array per parameter)."""
    parameters = [p.copy() for p in parameters]
    first = [np.zeros_like(p) for p in parameters]
    second = [np.zeros_like(p) for p in parameters]
    for step in range(1, steps + 1):
        for index, g in enumerate(gradient(parameters)):
            first[index] = 0.9 * first[index] + 0.1 * g
            second[index] = 0.999 * second[index] + 0.001 * g * g
            parameters[index] -= (learning_rate * first[index] / (1 - 0.9 ** step)
                                  / (np.sqrt(second[index] / (1 - 0.999 ** step)) + 1e-8))
    return parameters


def fine_tune(model: TwoShotModel, pairs: dict, penalty: float = FINE_TUNE_PENALTY, steps: int = FINE_TUNE_STEPS,
              learning_rate: float = FINE_TUNE_LEARNING_RATE, layers: int = FINE_TUNE_LAYERS,
              batch: int = FINE_TUNE_BATCH, seed: int = 0) -> TwoShotModel:
    """A copy of `model` whose members' last `layers` hidden layers and defocus output are fitted to `pairs` by
    `steps` Adam steps, each on `batch` pairs drawn at random (all of them when there are no more; `seed` sets the
    draws), on the mean squared error (depths of focus) plus `penalty` x |change of those weights|^2; the layers
    before, the log-variance output's weights and the temperature are kept."""
    all_depths = label_depths(pairs).astype(np.float32)
    arrays = dict(model.arrays)
    for member, all_inputs in zip(model.members, model.hidden(pairs["features"], layers_left_out=layers)):
        first = model.hidden_layer_count(member) - layers
        names = [f"m{member}_{kind}{layer}" for layer in range(first, first + layers) for kind in ("w", "b")]
        trained = [arrays[name] for name in names] + [arrays[f"m{member}_w_out"][:, 0], arrays[f"m{member}_b_out"][:1]]
        rng = np.random.default_rng([seed, member])

        def gradient(parameters, all_inputs=all_inputs, trained=trained, rng=rng):
            rows = (rng.choice(len(all_depths), batch, replace=False) if batch < len(all_depths)
                    else slice(None))
            inputs, depths = all_inputs[rows], all_depths[rows]
            activations, before_relu = [inputs], []
            for weights, bias in zip(parameters[0:-2:2], parameters[1:-2:2]):
                before_relu.append(activations[-1] @ weights + bias)
                activations.append(np.maximum(before_relu[-1], 0.0))
            output_weights, output_bias = parameters[-2:]
            d_output = (2.0 / len(depths)) * (activations[-1] @ output_weights + output_bias - depths)
            error = [activations[-1].T @ d_output, d_output.sum(keepdims=True)]
            d_hidden = np.outer(d_output, output_weights)
            for layer in reversed(range(layers)):
                d_before = d_hidden * (before_relu[layer] > 0)
                error[:0] = [activations[layer].T @ d_before, d_before.sum(axis=0)]
                if layer > 0:   # the first tuned layer's inputs are fixed: no gradient flows past them
                    d_hidden = d_before @ parameters[2 * layer].T
            return [g + 2.0 * penalty * (p - t) for g, p, t in zip(error, parameters, trained)]

        fitted = _adam(trained, gradient, steps, learning_rate)
        output_w, output_b = arrays[f"m{member}_w_out"].copy(), arrays[f"m{member}_b_out"].copy()
        output_w[:, 0], output_b[0] = fitted[-2], fitted[-1][0]
        arrays |= dict(zip(names, fitted[:-2])) | {f"m{member}_w_out": output_w, f"m{member}_b_out": output_b}
    return TwoShotModel(arrays, dict(model.metadata))


def _mae_um(model: TwoShotModel, pairs: dict) -> float:
    predicted, _ = model.predict_depths(pairs["features"])
    return float(np.mean(np.abs(predicted - label_depths(pairs)) * depth_unit_um(pairs["numerical_aperture"])))


def calibrate_two_shot(stacks: list[ZStack], output: Path, base_model: Path | None = None, scanner: dict | None = None,
                       log=lambda line: None, condenser: Condenser = UNKNOWN_CONDENSER,
                       left_out: tuple[str, ...] = ()) -> TwoShotCalibrationResult:
    """Refit the base two-shot model on pairs from `stacks` (imaged under `condenser` as the scanner declares it)
    and write it to `output` (a .npz file).

    A third of the stacks (at least one) is held back from the fit: sigma's temperature is fitted on
    their pairs, and a fit that does not improve them raises `CalibrationError` and writes nothing. The
    kept model is then fine-tuned again on every stack. `left_out`: why stacks were left out
    before these (`calibration.calibrate_both`), recorded with the ones left out here."""
    started = time.monotonic()
    check_stacks(stacks)
    stacks, skipped = stacks_with_focus(stacks, log, condenser)
    skipped = [*left_out, *skipped]
    base_path = Path(base_model) if base_model else default_model_path()
    model = TwoShotModel.load(base_path)
    pairs = sweep_pairs(stacks, condenser, FIT_SUB_FIELD_FRACTION)
    held_back = np.isin(pairs["group"], held_back_stacks(len(stacks)))
    # Judged as a scan reads: each field once, through its `field_window`.
    fit, judge = _subset(pairs, ~held_back), _subset(pairs, held_back & ~pairs["sub_field"])
    if len(np.unique(fit["group"])) < 2 or not held_back.any():
        raise CalibrationError(f"{len(stacks)} usable z-stacks give pairs to fit on in "
                               f"{len(np.unique(fit['group']))} and to judge by in "
                               f"{len(np.unique(judge['group']))}; two and one are needed: take more sweeps")
    trial = fine_tune(model, fit)
    before, after = _mae_um(model, judge), _mae_um(trial, judge)
    # A few held-back sweeps are easier than every tile a scan will meet: sigma is never made sharper than
    # the temperature training fitted on its own shifted validation pairs.
    temperature = max(sigma_temperature(trial, judge), float(model.arrays.get("sigma_temperature", 1.0)))
    log(f"held-back sweeps ({len(judge['group'])} pairs): MAE {before:.3f} µm before, {after:.3f} µm after "
        f"(fine-tuned); sigma temperature {temperature:.2f}")
    if after >= before:
        raise CalibrationError(f"two-shot calibration made the held-back sweeps no better (MAE {before:.3f} µm "
                               f"before, {after:.3f} µm after): the model in use is kept")
    calibrated = fine_tune(model, pairs)
    calibrated.arrays["sigma_temperature"] = np.float32(temperature)
    calibrated.metadata = model.metadata | {"sigma_temperature": temperature, "calibration": {
        "base_model": str(base_path), "stacks": len(stacks), "pairs": len(pairs["group"]),
        "fine_tune": {"steps": FINE_TUNE_STEPS, "batch": FINE_TUNE_BATCH, "penalty": FINE_TUNE_PENALTY,
                      "learning_rate": FINE_TUNE_LEARNING_RATE, "layers": FINE_TUNE_LAYERS,
                      "sub_field_fraction": FIT_SUB_FIELD_FRACTION},
        "held_back_mae_before_um": before, "held_back_mae_after_um": after, "skipped_stacks": skipped,
        "condenser": dataclasses.asdict(condenser),
        "created_unix_s": time.time(), "scanner": scanner or {}}}
    path = calibrated.save(output)
    return TwoShotCalibrationResult(path, len(stacks), int(sum(len(stack.images) for stack in stacks)),
                                    len(pairs["group"]), time.monotonic() - started, before, after, tuple(skipped))
