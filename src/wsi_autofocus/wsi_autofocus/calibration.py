"""Self-calibration of the focus model on the user's microscope, from z-stacks it took itself.

Every focus-map z-sweep is labelled data: each image's defocus is its z minus the specimen plane, found from
the images' sharpness (`wsi_common.focus_metrics`) and how the sharpness of each spatial frequency changes
through focus (`specimen_plane`: a stain's phase puts the sharpest image off the specimen). `calibrate`
fine-tunes the shipped model's head on such stacks (the ResNet and spectral features stay frozen, so a few
sweeps cannot undo what training taught and the fit takes seconds on a CPU), refits the uncertainty's
temperatures on sweeps held back from the fit, and writes a complete model directory (checkpoint, ONNX,
TorchScript, metadata) that every inference backend loads like the shipped one.

    from wsi_autofocus.calibration import ZStack, calibrate
    stacks = [ZStack(images, z_um, pixel_size_um=0.325, numerical_aperture=0.75), ...]
    result = calibrate(stacks, Path("calibration/my-scanner/20x"))
    FocusEstimator(load_backend("onnxruntime", result.model_dir)[0], result.model_dir)

`wsi_autofocus.calibration_store` holds what needs no torch: `ZStack`, `stacks_from_scan`, and the
`CalibrationStore` of one calibrated model per (scanner, objective, camera pixel) that the autofocus node
consults for every tile.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsi_autofocus.calibration_store import (MAX_LABEL_UM, CalibrationError, ZStack, check_stacks, held_back_stacks,
                                             stacks_with_focus)
from wsi_autofocus.inference import FocusEstimator, aggregate, default_model_dir, read_model_metadata
from wsi_autofocus.patches import select_patches
from wsi_autofocus.two_shot import MODEL_FILE as TWO_SHOT_MODEL_FILE
from wsi_autofocus.two_shot import UNKNOWN_CONDENSER, Condenser, depth_unit_um
from wsi_autofocus.two_shot_calibration import TwoShotCalibrationResult, calibrate_two_shot
from wsi_autofocus.training import (export, fit_uncertainty_calibration, focus_loss, load_checkpoint,
                                    save_checkpoint)
from wsi_common.focus_metrics import focus_tolerance_um

PATCHES_PER_IMAGE = 4


@dataclass(frozen=True)
class CalibrationResult:
    model_dir: Path
    stacks: int
    images: int
    fit_s: float
    held_back_mae_before_um: float      # shipped model on the held-back stacks' images
    held_back_mae_after_um: float       # calibrated head, fitted without them
    skipped: tuple[str, ...] = ()        # stacks left out, each with the reason (no focus inside the sweep, glass)


def _samples(model, stacks: list[ZStack], patch_px: int, condenser: Condenser) -> dict:
    """Frozen features of every patch of every image (with the 8 flips and turns of each; the optics with the
    scanner's declared `condenser`), its label, stack, image (a number per image) and the objective's NA."""
    features, labels, groups, images, apertures = [], [], [], [], []
    for index, stack in enumerate(stacks):
        focus = stack.focus_z_um()
        for image, z in zip(stack.images, stack.z_um):
            label = float(z) - focus
            if abs(label) > MAX_LABEL_UM:
                continue
            image_number = len(apertures)
            apertures.append(stack.numerical_aperture)
            selection = select_patches(np.ascontiguousarray(image), patch_px, PATCHES_PER_IMAGE)
            patches, context = torch.from_numpy(selection.patches), torch.from_numpy(selection.context)
            optics = torch.tensor([FocusEstimator.optics_row(stack.numerical_aperture, stack.pixel_size_um,
                                                             condenser)]).expand(len(patches), -1)
            # One model call for all eight views of the image: per view, the calls were too small to keep both
            # cores busy (the features are the same: the model runs in eval mode).
            turned = [(torch.rot90(patches, turn, dims=(2, 3)), torch.rot90(context, turn, dims=(2, 3)))
                      for turn in range(4)]
            views = [view for pair in turned for view in (pair, (pair[0].flip(3), pair[1].flip(3)))]
            with torch.inference_mode():
                features.append(torch.cat(model._views(torch.cat([patch for patch, _ in views]),
                                                       torch.cat([around for _, around in views]),
                                                       optics.repeat(len(views), 1)), dim=1))
            labels += [label] * (len(patches) * len(views))
            groups += [index] * (len(patches) * len(views))
            images += [image_number] * (len(patches) * len(views))
    return {"features": torch.cat(features), "labels": torch.tensor(labels, dtype=torch.float32),
            "groups": np.array(groups), "images": np.array(images), "numerical_apertures": np.array(apertures)}


def _fit_head(model, features: torch.Tensor, labels: torch.Tensor, steps: int, seed: int):
    """A copy of the model's head fitted to (features, labels), pulled towards the shipped head's weights
    (L2 towards the start point) so that a few sweeps adjust it rather than replace it."""
    torch.manual_seed(seed)
    head = copy.deepcopy(model.head)
    start = [p.detach().clone() for p in head.parameters()]
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (min(256, len(labels)),))
        optimizer.zero_grad()
        loss = focus_loss(model._estimate(head(features[batch])), labels[batch], 0.5)
        loss = loss + 1e-2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(head.parameters(), start))
        loss.backward()
        optimizer.step()
    return head.eval()


def _outputs(model, head, features: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model._estimate(head(features))


def _signed_mae(output: torch.Tensor, labels: torch.Tensor) -> float:
    signed = torch.where(output[:, 2] >= 0, output[:, 0], -output[:, 0])
    return float((signed - labels).abs().mean())


def no_sharper_than_base(fitted: dict, base: dict) -> dict:
    """The `fitted` temperatures (`uncertainty_scale`, `side_temperature`), each at least the `base` model's: a few
    held-back sweeps of one microscope are easier than every tile a scan will meet, so a calibration never makes the
    distance or the side more certain than training's validation did (the two-shot calibration's rule too). On the
    held-out microscopes a side temperature fitted down to 0.70 (base 1.25) left 4 confidently wrong tiles of other
    specimens, 3 at the base's."""
    return {name: max(float(value), float(base[name])) for name, value in fitted.items()}


def uncertainty_scale_without_confident_errors(output: np.ndarray, labels: np.ndarray, images: np.ndarray,
                                                numerical_apertures: np.ndarray, temperatures: dict) -> float:
    """The smallest uncertainty scale, at least the fitted one, at which no image is confidently wrong: its
    estimate as a scan reads it (`inference.aggregate` over its patches) off by more than `focus_tolerance_um`
    while its sigma is under that tolerance. The fitted scale makes errors one sigma on average and leaves a
    tail that a scan would act on. Scaling the patches' sigma leaves each image's distance and side as they
    are (the patches' relative weights do not change), so the scale a wrong image needs has a closed form."""
    scale = temperatures["uncertainty_scale"]
    for image in np.unique(images):
        rows = images == image
        estimate = aggregate(output[rows, 0], output[rows, 1], output[rows, 2] / temperatures["side_temperature"])
        tolerance = focus_tolerance_um(depth_unit_um(numerical_apertures[image]))
        if abs(estimate.defocus_um - labels[rows][0]) <= tolerance:
            continue
        model_variance = 1.0 / np.exp(-output[rows, 1].astype(np.float64)).mean()
        other_variance = estimate.uncertainty_um ** 2 - model_variance
        scale = max(scale, 1.01 * math.sqrt(max(tolerance ** 2 - other_variance, 0.0) / model_variance))
    return float(scale)


def calibrate(stacks: list[ZStack], output_dir: Path, base_model_dir: Path | None = None, steps: int = 600,
              seed: int = 0, scanner: dict | None = None, log=lambda line: None,
              condenser: Condenser = UNKNOWN_CONDENSER, left_out: tuple[str, ...] = (),
              scan_id: str = "") -> CalibrationResult:
    """Fine-tune the base model's head on `stacks` (imaged under the scanner's declared `condenser`, which places
    the specimen plane their labels count from: `stacks_with_focus`) and write a calibrated model directory to
    `output_dir`.

    A third of the stacks (at least one) is held back while the uncertainty's temperatures are fitted
    and the before/after errors measured; the head is then refitted on every stack. A fit that does not
    improve the held-back stacks raises `CalibrationError` and writes nothing. `left_out`: why stacks were left
    out before these (`calibrate_both`), recorded with the ones left out here. `scan_id`: the scan whose sweeps
    these are, recorded as the only one a `CalibrationStore` serves the model to (`CalibratedEstimators`)."""
    started = time.monotonic()
    check_stacks(stacks)
    stacks, skipped = stacks_with_focus(stacks, log, condenser)
    skipped = [*left_out, *skipped]
    base_model_dir = Path(base_model_dir) if base_model_dir else default_model_dir()
    metadata = read_model_metadata(base_model_dir)
    model = load_checkpoint(base_model_dir / "model.pt")
    torch.set_num_threads(2)
    samples = _samples(model, stacks, int(metadata["patch_px"]), condenser)
    if not len(samples["labels"]):
        raise CalibrationError(f"no image of the stacks lies within ±{MAX_LABEL_UM} µm of its best focus")
    held_back = np.isin(samples["groups"], held_back_stacks(len(stacks)))
    features, labels = samples["features"], samples["labels"]
    trial = _fit_head(model, features[~held_back], labels[~held_back], steps, seed)
    held_out_output = _outputs(model, trial, features[held_back])
    temperatures = no_sharper_than_base(fit_uncertainty_calibration(held_out_output, labels[held_back]), metadata)
    fitted_scale = temperatures["uncertainty_scale"]
    temperatures["uncertainty_scale"] = uncertainty_scale_without_confident_errors(
        held_out_output.numpy(), labels[held_back].numpy(), samples["images"][held_back],
        samples["numerical_apertures"], temperatures)
    if temperatures["uncertainty_scale"] > fitted_scale:
        log(f"uncertainty scale raised from {fitted_scale:.2f} to {temperatures['uncertainty_scale']:.2f}: "
            "no held-back image may be confidently wrong")
    before = _signed_mae(_outputs(model, model.head, features[held_back]), labels[held_back])
    after = _signed_mae(held_out_output, labels[held_back])
    log(f"held-back stacks: MAE {before:.3f} µm before, {after:.3f} µm after; {temperatures}")
    if after >= before:
        raise CalibrationError(f"calibration made the held-back stacks no better (MAE {before:.3f} µm before, "
                               f"{after:.3f} µm after): the model in use is kept; take more or sharper sweeps")
    model.head = _fit_head(model, features, labels, steps, seed)
    output_dir = Path(output_dir)
    staging = output_dir.with_name(f".{output_dir.name}.calibrating")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    calibrated = metadata | temperatures | {
        "calibration": {"base_model": f"{metadata['name']}@{metadata['version']}",
                        "base_model_dir": str(base_model_dir), "stacks": len(stacks),
                        "images": int(sum(len(s.images) for s in stacks)),
                        "held_back_mae_before_um": before, "held_back_mae_after_um": after,
                        "skipped_stacks": skipped, "created_unix_s": time.time(), "scanner": scanner or {},
                        "scan_id": scan_id}}
    save_checkpoint(model, staging / "model.pt", calibrated)
    export(model, staging, int(metadata["patch_px"]))
    (staging / "metadata.json").write_text(json.dumps(calibrated, indent=1))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return CalibrationResult(output_dir, len(stacks), int(sum(len(s.images) for s in stacks)),
                             time.monotonic() - started, before, after, tuple(skipped))


@dataclass(frozen=True)
class ScannerCalibration:
    """Both focus models calibrated on one scanner's sweeps, each on its own: a result, or None and the
    reason among `errors`."""
    single_shot: CalibrationResult | None
    two_shot: TwoShotCalibrationResult | None
    errors: tuple[str, ...]
    not_fitted: str = ""        # why the single-shot model was not fitted at all (not a failure: none was wanted)


def calibrate_both(stacks: list[ZStack], model_dir: Path, base_model_dir: Path | None = None,
                   base_two_shot: Path | None = None, scanner: dict | None = None,
                   log=lambda line: None, condenser: Condenser = UNKNOWN_CONDENSER,
                   scan_id: str = "", tiles_follow: bool = True) -> ScannerCalibration:
    """The single-shot model into `model_dir` (`calibrate`, for the scan `scan_id` the sweeps come from) and the
    two-shot model beside it (`calibrate_two_shot`), both under the scanner's declared `condenser`; one refused
    leaves the other. The single shot goes first: its calibration replaces the directory both live in. The stacks'
    specimen plane is found once for both (`stacks_with_focus`: seconds of a calibration's minute).

    Without `tiles_follow` (no tiles of that scan are still to be read: a calibration-only goal, a finished scan)
    the single-shot model is not fitted, and `not_fitted` says why: it would serve no scan (`CalibratedEstimators`),
    and its fit is about half the calibration's time."""
    not_fitted = "" if tiles_follow else (f"single-shot model not fitted: no tiles of scan {scan_id!r} follow its "
                                          "sweeps, and a single-shot calibration serves only the tiles of the scan "
                                          "it was fitted on")
    try:
        check_stacks(stacks)
        stacks, left_out = stacks_with_focus(stacks, log, condenser)
    except CalibrationError as error:
        models = ("single-shot", "two-shot") if tiles_follow else ("two-shot",)
        return ScannerCalibration(None, None, tuple(f"{model} model: {error}" for model in models), not_fitted)
    left_out = tuple(left_out)
    errors, single_shot = [], None
    if tiles_follow:
        try:
            single_shot = calibrate(stacks, model_dir, base_model_dir, scanner=scanner, log=log, condenser=condenser,
                                    left_out=left_out, scan_id=scan_id)
        except CalibrationError as error:
            errors.append(f"single-shot model: {error}")
    try:
        two_shot = calibrate_two_shot(stacks, Path(model_dir) / TWO_SHOT_MODEL_FILE, base_two_shot, scanner, log,
                                      condenser, left_out)
    except CalibrationError as error:
        two_shot = None
        errors.append(f"two-shot model: {error}")
    return ScannerCalibration(single_shot, two_shot, tuple(errors), not_fitted)
