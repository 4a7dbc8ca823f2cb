"""Self-calibration of the focus model on the user's microscope, from z-stacks it took itself.

Every focus-map z-sweep is labelled data: each image's defocus is its z minus the sweep's best focus,
found from the images' sharpness (`wsi_common.focus_metrics`). `calibrate` fine-tunes the shipped model's
head on such stacks (the ResNet and spectral features stay frozen, so a few sweeps cannot undo what
training taught and the fit takes seconds on a CPU), refits the uncertainty's temperatures on sweeps
held back from the fit, and writes a complete model directory (checkpoint, ONNX, TorchScript,
metadata) that every inference backend loads like the shipped one.

    from wsi_autofocus.calibration import ZStack, calibrate
    stacks = [ZStack(images, z_um, pixel_size_um=0.325, numerical_aperture=0.75), ...]
    result = calibrate(stacks, Path("calibration/my-scanner/20x"))
    FocusEstimator(load_backend("onnxruntime", result.model_dir)[0], result.model_dir)

`CalibrationStore` keeps one calibrated model per (scanner, objective, camera pixel) and is what the
autofocus node consults for every tile.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from wsi_autofocus.inference import default_model_dir, read_model_metadata
from wsi_autofocus.patches import select_patches
from wsi_autofocus.training import (export, fit_uncertainty_calibration, focus_loss, load_checkpoint,
                                    save_checkpoint)
from wsi_common.focus_metrics import brenner, refine_peak

# Fewest images a stack must have for its best focus to be found, and the fewest stacks to calibrate on.
MIN_STACK_IMAGES = 5
MIN_STACKS = 2
# Calibration uses images within this distance of best focus: the model's range.
MAX_LABEL_UM = 20.0
PATCHES_PER_IMAGE = 4


class CalibrationError(ValueError):
    """The z-stacks cannot calibrate a model (too few, no clear focus, inconsistent optics)."""


@dataclass(frozen=True)
class ZStack:
    """Images of one field at known stage z (µm), with the optics they were taken with."""
    images: np.ndarray                 # (N, H, W, 3) uint8
    z_um: np.ndarray                   # (N,)
    pixel_size_um: float
    numerical_aperture: float
    best_focus_z_um: float | None = None   # None: the sharpness peak of the images

    def focus_z_um(self) -> float:
        """Best-focus z: given, or the refined Brenner peak of the stack (`refine_peak`)."""
        if self.best_focus_z_um is not None:
            return float(self.best_focus_z_um)
        order = np.argsort(self.z_um)
        z = np.asarray(self.z_um, float)[order]
        scores = np.array([brenner(image) for image in self.images[order]])
        best = int(np.argmax(scores))
        if best in (0, len(z) - 1):
            raise CalibrationError(f"stack over z {z[0]:.1f}..{z[-1]:.1f} µm is sharpest at its end "
                                   f"({z[best]:.1f} µm): its focus is not inside the sweep")
        return refine_peak(z, scores)


@dataclass(frozen=True)
class CalibrationResult:
    model_dir: Path
    stacks: int
    images: int
    fit_s: float
    held_back_mae_before_um: float      # shipped model on the held-back stacks' images
    held_back_mae_after_um: float       # calibrated head, fitted without them
    skipped: tuple[str, ...] = ()        # stacks left out, each with the reason (no focus inside the sweep)


def _check(stacks: list[ZStack]) -> None:
    if len(stacks) < MIN_STACKS:
        raise CalibrationError(f"{len(stacks)} z-stacks; calibration needs at least {MIN_STACKS}")
    for index, stack in enumerate(stacks):
        images = np.asarray(stack.images)
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise CalibrationError(f"stack {index}: images of shape {images.shape} and dtype {images.dtype}; "
                                   "expected (N, H, W, 3) uint8")
        if len(images) < MIN_STACK_IMAGES or len(stack.z_um) != len(images):
            raise CalibrationError(f"stack {index}: {len(images)} images and {len(stack.z_um)} z values; "
                                   f"expected at least {MIN_STACK_IMAGES} of each, one z per image")
        if not (stack.pixel_size_um > 0 and 0 < stack.numerical_aperture < 1.6):
            raise CalibrationError(f"stack {index}: pixel_size_um={stack.pixel_size_um}, "
                                   f"numerical_aperture={stack.numerical_aperture}; expected > 0 and 0 < NA < 1.6")


def _with_focus(stacks: list[ZStack], log) -> tuple[list[ZStack], list[str]]:
    """The stacks whose best focus lies inside their sweep, that focus fixed; and why the others were left
    out. A field of glass or a fold has no focus peak: one such sweep must not stop a calibration."""
    usable, skipped = [], []
    for index, stack in enumerate(stacks):
        try:
            usable.append(replace(stack, best_focus_z_um=stack.focus_z_um()))
        except CalibrationError as error:
            skipped.append(f"stack {index}: {error}")
            log(f"left out {skipped[-1]}")
    if len(usable) < MIN_STACKS:
        raise CalibrationError(f"{len(usable)} of {len(stacks)} z-stacks have their focus inside the sweep; "
                               f"calibration needs at least {MIN_STACKS} ({'; '.join(skipped)})")
    return usable, skipped


def _samples(model, stacks: list[ZStack], patch_px: int) -> dict:
    """Frozen features of every patch of every image (with the 8 flips and turns of each), its label and stack."""
    features, labels, groups = [], [], []
    for index, stack in enumerate(stacks):
        focus = stack.focus_z_um()
        for image, z in zip(stack.images, stack.z_um):
            label = float(z) - focus
            if abs(label) > MAX_LABEL_UM:
                continue
            selection = select_patches(np.ascontiguousarray(image), patch_px, PATCHES_PER_IMAGE)
            patches, context = torch.from_numpy(selection.patches), torch.from_numpy(selection.context)
            optics = torch.tensor([[stack.numerical_aperture, stack.pixel_size_um]]).expand(len(patches), 2)
            for turn in range(4):
                for flip in (False, True):
                    views = [torch.rot90(v, turn, dims=(2, 3)) for v in (patches, context)]
                    if flip:
                        views = [v.flip(3) for v in views]
                    with torch.inference_mode():
                        features.append(torch.cat(model._views(*views, optics), dim=1))
                    labels += [label] * len(patches)
                    groups += [index] * len(patches)
    return {"features": torch.cat(features), "labels": torch.tensor(labels, dtype=torch.float32),
            "groups": np.array(groups)}


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


def calibrate(stacks: list[ZStack], output_dir: Path, base_model_dir: Path | None = None, steps: int = 600,
              seed: int = 0, scanner: dict | None = None, log=lambda line: None) -> CalibrationResult:
    """Fine-tune the base model's head on `stacks` and write a calibrated model directory to `output_dir`.

    A third of the stacks (at least one) is held back while the uncertainty's temperatures are fitted
    and the before/after errors measured; the head is then refitted on every stack. A fit that does not
    improve the held-back stacks raises `CalibrationError` and writes nothing."""
    started = time.monotonic()
    _check(stacks)
    stacks, skipped = _with_focus(stacks, log)
    base_model_dir = Path(base_model_dir) if base_model_dir else default_model_dir()
    metadata = read_model_metadata(base_model_dir)
    model = load_checkpoint(base_model_dir / "model.pt")
    torch.set_num_threads(2)
    samples = _samples(model, stacks, int(metadata["patch_px"]))
    if not len(samples["labels"]):
        raise CalibrationError(f"no image of the stacks lies within ±{MAX_LABEL_UM} µm of its best focus")
    held_back_stacks = np.arange(len(stacks))[::3] if len(stacks) >= 3 else np.array([len(stacks) - 1])
    held_back = np.isin(samples["groups"], held_back_stacks)
    features, labels = samples["features"], samples["labels"]
    trial = _fit_head(model, features[~held_back], labels[~held_back], steps, seed)
    held_out_output = _outputs(model, trial, features[held_back])
    temperatures = fit_uncertainty_calibration(held_out_output, labels[held_back])
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
                        "skipped_stacks": skipped, "created_unix_s": time.time(), "scanner": scanner or {}}}
    save_checkpoint(model, staging / "model.pt", calibrated)
    export(model, staging, int(metadata["patch_px"]))
    (staging / "metadata.json").write_text(json.dumps(calibrated, indent=1))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return CalibrationResult(output_dir, len(stacks), int(sum(len(s.images) for s in stacks)),
                             time.monotonic() - started, before, after, tuple(skipped))


def _key_part(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


class CalibrationStore:
    """Calibrated models under `root`, one per scanner, objective and camera pixel:
    <root>/<scanner>/<magnification>x_na<NA>_px<pixel size µm>/ (a model directory)."""

    def __init__(self, root: Path, scanner: str = "default"):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", scanner):
            raise CalibrationError(f"scanner name {scanner!r}; expected letters, digits, '.', '_' or '-'")
        self.root = Path(root)
        self.scanner = scanner

    def model_dir(self, magnification: float, numerical_aperture: float, pixel_size_um: float) -> Path:
        return self.root / self.scanner / (f"{_key_part(magnification)}x_na{_key_part(numerical_aperture)}"
                                           f"_px{_key_part(pixel_size_um)}")

    def find(self, magnification: float, numerical_aperture: float, pixel_size_um: float) -> Path | None:
        directory = self.model_dir(magnification, numerical_aperture, pixel_size_um)
        return directory if (directory / "metadata.json").exists() else None


def stacks_from_scan(scan_dir: Path) -> tuple[list[ZStack], dict]:
    """The focus-map sweeps a scan kept on disk (`manifest.json` "focus_map"), as z-stacks, and the
    scan's optics (magnification, NA, pixel size)."""
    import tifffile

    scan_dir = Path(scan_dir)
    manifest = json.loads((scan_dir / "manifest.json").read_text())
    focus_map = manifest.get("focus_map") or {}
    sweeps = focus_map.get("sweeps") or []
    if not sweeps:
        raise CalibrationError(f"{scan_dir / 'manifest.json'} keeps no focus-map sweeps (scan with a focus map)")
    # The focus the scan found is the label's zero: the tiles were taken there.
    stacks = [ZStack(tifffile.imread(scan_dir / sweep["images"]), np.asarray(sweep["z_um"], float),
                     manifest["pixel_size_um"], manifest["numerical_aperture"], sweep["best_z_um"])
              for sweep in sweeps]
    optics = {key: manifest[key] for key in ("objective_magnification", "numerical_aperture", "pixel_size_um")}
    return stacks, optics


class CalibratedEstimators:
    """The estimator for each tile's optics: this scanner's calibrated model where the store has one,
    the base model otherwise. Loaded once per model; `forget` drops one after a new calibration."""

    def __init__(self, store: CalibrationStore, backend_name: str = "auto", base_model_dir: Path | None = None,
                 threads: int = 2):
        from wsi_autofocus.inference import FocusEstimator, load_backend

        self.store = store
        self.backend_name = backend_name
        self.threads = threads
        self.base_model_dir = Path(base_model_dir) if base_model_dir else default_model_dir()
        self._load = lambda directory: FocusEstimator(load_backend(backend_name, directory, threads)[0], directory)
        self.base = self._load(self.base_model_dir)
        self._calibrated: dict[Path, object] = {}

    def model_dir_for(self, magnification: float, numerical_aperture: float, pixel_size_um: float) -> Path:
        if magnification > 0 and numerical_aperture > 0 and pixel_size_um > 0:
            found = self.store.find(magnification, numerical_aperture, pixel_size_um)
            if found is not None:
                return found
        return self.base_model_dir

    def for_optics(self, magnification: float, numerical_aperture: float, pixel_size_um: float):
        directory = self.model_dir_for(magnification, numerical_aperture, pixel_size_um)
        if directory == self.base_model_dir:
            return self.base
        if directory not in self._calibrated:
            self._calibrated[directory] = self._load(directory)
        return self._calibrated[directory]

    def forget(self, model_dir: Path) -> None:
        self._calibrated.pop(Path(model_dir), None)
