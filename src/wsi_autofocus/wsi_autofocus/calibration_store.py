"""What self-calibration reads and writes, without torch: z-stacks (from arrays or a scan's kept sweeps), the
store of calibrated models per scanner, and the estimators the autofocus node picks from it per tile.

Fitting (`wsi_autofocus.calibration.calibrate`) needs torch; loading and using a calibrated model needs only
the inference backend's runtime, so the autofocus node imports torch only when it calibrates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from wsi_autofocus.inference import default_model_dir, read_model_metadata
from wsi_autofocus.specimen_plane import plane_offset_um
from wsi_autofocus.two_shot import MODEL_FILE as TWO_SHOT_MODEL_FILE
from wsi_autofocus.two_shot import UNKNOWN_CONDENSER, Condenser, TwoShotModel
from wsi_autofocus.two_shot import default_model_path as default_two_shot_path
from wsi_common.focus_metrics import brenner, refine_peak, unclear_peak, unstained_at_focus
from wsi_common.scan_files import MANIFEST_NAME, Manifest


# Fewest images a stack must have for its best focus to be found, and the fewest stacks to calibrate on.
MIN_STACK_IMAGES = 5
MIN_STACKS = 2
# Calibration uses images within this distance of best focus: the models' range.
MAX_LABEL_UM = 20.0


class CalibrationError(ValueError):
    """The z-stacks cannot calibrate a model (too few, no clear focus, inconsistent optics)."""


@dataclass(frozen=True)
class ZStack:
    """Images of one field at known stage z (µm), with the optics they were taken with."""
    images: np.ndarray                 # (N, H, W, 3) uint8
    z_um: np.ndarray                   # (N,)
    pixel_size_um: float
    numerical_aperture: float
    best_focus_z_um: float | None = None   # None: the sharpness peak; a calibration's labels: `stacks_with_focus`

    def focus_z_um(self) -> float:
        """Best-focus z: given, or the refined Brenner peak of the stack (`refine_peak`), which must be a clear
        peak by the rule of a scan's focus map (`unclear_peak`)."""
        if self.best_focus_z_um is not None:
            return float(self.best_focus_z_um)
        order = np.argsort(self.z_um)
        z = np.asarray(self.z_um, float)[order]
        scores = np.array([brenner(image) for image in self.images[order]])
        reason = unclear_peak(z, scores)
        if reason is not None:
            raise CalibrationError(reason)
        return refine_peak(z, scores)


def check_stacks(stacks: list[ZStack]) -> None:
    """Raise `CalibrationError` naming the first stack that cannot be calibrated on, and why."""
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


def _with_focus_on_tissue(stack: ZStack) -> ZStack:
    """`stack` with its best focus fixed; `CalibrationError` when it has none inside the sweep or its image there
    shows no tissue (`unstained_at_focus`): the labels of a field of glass teach the model nothing of this
    microscope's defocus (one such sweep made a calibration's tiles worse)."""
    focused = replace(stack, best_focus_z_um=stack.focus_z_um())
    reason = unstained_at_focus(focused.images, focused.z_um, focused.best_focus_z_um)
    if reason is not None:
        raise CalibrationError(f"{reason} (z {focused.best_focus_z_um:.1f} µm)")
    return focused


def stacks_with_focus(stacks: list[ZStack], log, condenser: Condenser = UNKNOWN_CONDENSER
                      ) -> tuple[list[ZStack], list[str]]:
    """The stacks that show tissue at a best focus inside their sweep, that focus fixed; and why the others were
    left out. A field of glass or a fold has no focus to learn: one such sweep must not stop a calibration.
    A best focus the caller gave is kept. One found from the images' sharpness is moved to the specimen plane by
    how far the sharpest images of these sweeps lie above it under the scanner's declared `condenser`
    (`specimen_plane.plane_offset_um`): the plane the shipped models read defocus from."""
    usable, focus_found, skipped = [], [], []
    for index, stack in enumerate(stacks):
        try:
            usable.append(_with_focus_on_tissue(stack))
        except CalibrationError as error:
            skipped.append(f"stack {index}: {error}")
            log(f"left out {skipped[-1]}")
        else:
            focus_found.append(stack.best_focus_z_um is None)
    if len(usable) < MIN_STACKS:
        raise CalibrationError(f"{len(usable)} of {len(stacks)} z-stacks show tissue at a focus inside the sweep; "
                               f"calibration needs at least {MIN_STACKS} ({'; '.join(skipped)})")
    if any(focus_found):
        offset = plane_offset_um([stack for stack, found in zip(usable, focus_found) if found], condenser)
        log(f"the sweeps' sharpest images lie {offset:+.2f} µm from the specimen plane: labelled from the plane")
        usable = [replace(stack, best_focus_z_um=stack.best_focus_z_um - offset) if found else stack
                  for stack, found in zip(usable, focus_found)]
    return usable, skipped


def held_back_stacks(count: int) -> np.ndarray:
    """Indices of the stacks a calibration holds back from its fit to judge it: every third, at least one."""
    return np.arange(count)[::3] if count >= 3 else np.array([count - 1])


def _key_part(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


class CalibrationStore:
    """Calibrated models under `root`, one per scanner, objective and camera pixel:
    <root>/<scanner>/<magnification>x_na<NA>_px<pixel size µm>/ (a model directory)."""

    def __init__(self, root: Path, scanner: str = "default"):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", scanner):
            raise CalibrationError(f"scanner name {scanner!r}; expected letters, digits, '.', '_' or '-'")
        self.root = Path(root).absolute()    # answers name where the models are, whatever the cwd
        self.scanner = scanner

    def model_dir(self, magnification: float, numerical_aperture: float, pixel_size_um: float) -> Path:
        return self.root / self.scanner / (f"{_key_part(magnification)}x_na{_key_part(numerical_aperture)}"
                                           f"_px{_key_part(pixel_size_um)}")

    def find(self, magnification: float, numerical_aperture: float, pixel_size_um: float) -> Path | None:
        directory = self.model_dir(magnification, numerical_aperture, pixel_size_um)
        return directory if (directory / "metadata.json").exists() else None

    def two_shot_path(self, magnification: float, numerical_aperture: float, pixel_size_um: float) -> Path:
        """Where the calibrated two-shot model of these optics lives: in the same directory."""
        return self.model_dir(magnification, numerical_aperture, pixel_size_um) / TWO_SHOT_MODEL_FILE

    def find_two_shot(self, magnification: float, numerical_aperture: float, pixel_size_um: float) -> Path | None:
        path = self.two_shot_path(magnification, numerical_aperture, pixel_size_um)
        return path if path.exists() else None


class ScanSweeps(NamedTuple):
    """What a scan's manifest gives a calibration: its focus-map sweeps, optics and scan id, and whether tiles of
    the scan are still to be read (`tiles_follow`): only then does a single-shot calibration serve anything."""
    stacks: list[ZStack]
    optics: dict                # objective_magnification, numerical_aperture, pixel_size_um
    scan_id: str
    tiles_follow: bool          # the scan is running and takes tiles after its calibration


def stacks_from_scan(scan_dir: Path) -> ScanSweeps:
    """The focus-map sweeps a scan kept on disk (its manifest's "focus_map"), as z-stacks, with the scan's optics,
    id, and whether its tiles follow: the manifest says the scan is running and not calibration-only (a scan that
    was killed still says running)."""
    import tifffile

    manifest = Manifest.read(Path(scan_dir) / MANIFEST_NAME)
    document = manifest.document
    focus_map = document.get("focus_map") or {}
    sweeps = focus_map.get("sweeps") or []
    if not sweeps:
        raise CalibrationError(f"{manifest.path} keeps no focus-map sweeps (scan with a focus map)")
    # The focus the scan found is the label's zero: the tiles were taken there.
    stacks = [ZStack(tifffile.imread(manifest.resolve(sweep["images"])), np.asarray(sweep["z_um"], float),
                     document["pixel_size_um"], document["numerical_aperture"], sweep["best_z_um"])
              for sweep in sweeps]
    optics = {key: document[key] for key in ("objective_magnification", "numerical_aperture", "pixel_size_um")}
    tiles_follow = document.get("status") == "running" and not document.get("calibration_only", False)
    return ScanSweeps(stacks, optics, document["scan_id"], tiles_follow)


class CalibratedEstimators:
    """The estimator for each tile's optics and scan, and the two-shot model for each pair's optics: this
    scanner's calibrated model where the store has one, the base model otherwise. A calibrated single-shot model
    serves only the scan whose sweeps it was fitted on: it learns the side cue of that slide's tissue, which need
    not carry over to the next slide's (`bench/calibrated_scan_outcome.py`: with both models fitted on one slide's
    sweeps, a scan of other specimens under a ring-lit microscope left its tiles 0.67 µm from focus, with the
    calibrated two-shot model beside the shipped single-shot one 0.50). The two-shot model reads the optics, not
    the specimen, and serves every scan. Loaded once per model; `forget` drops a directory's models after a new
    calibration."""

    def __init__(self, store: CalibrationStore, backend_name: str = "auto", base_model_dir: Path | None = None,
                 threads: int = 2, base_two_shot_path: Path | None = None):
        from wsi_autofocus.inference import FocusEstimator, load_backend

        self.store = store
        self.backend_name = backend_name
        self.threads = threads
        self.base_model_dir = Path(base_model_dir) if base_model_dir else default_model_dir()
        self._load = lambda directory: FocusEstimator(load_backend(backend_name, directory, threads)[0], directory)
        self.base = self._load(self.base_model_dir)
        self._calibrated: dict[Path, object] = {}
        self._fitted_on_scan: dict[Path, str] = {}
        self.base_two_shot = TwoShotModel.load(base_two_shot_path or default_two_shot_path())
        self._calibrated_two_shot: dict[Path, TwoShotModel] = {}

    def model_dir_for(self, magnification: float, numerical_aperture: float, pixel_size_um: float,
                      scan_id: str) -> Path:
        if magnification > 0 and numerical_aperture > 0 and pixel_size_um > 0:
            found = self.store.find(magnification, numerical_aperture, pixel_size_um)
            if found is not None and scan_id and self._scan_fitted_on(found) == scan_id:
                return found
        return self.base_model_dir

    def _scan_fitted_on(self, model_dir: Path) -> str:
        if model_dir not in self._fitted_on_scan:
            calibration = read_model_metadata(model_dir).get("calibration") or {}
            self._fitted_on_scan[model_dir] = calibration.get("scan_id", "")
        return self._fitted_on_scan[model_dir]

    def for_optics(self, magnification: float, numerical_aperture: float, pixel_size_um: float, scan_id: str = ""):
        """The estimator for a tile of `scan_id` (empty: of no scan) under these optics."""
        directory = self.model_dir_for(magnification, numerical_aperture, pixel_size_um, scan_id)
        if directory == self.base_model_dir:
            return self.base
        if directory not in self._calibrated:
            self._calibrated[directory] = self._load(directory)
        return self._calibrated[directory]

    def two_shot_for(self, magnification: float, numerical_aperture: float, pixel_size_um: float) -> TwoShotModel:
        found = (self.store.find_two_shot(magnification, numerical_aperture, pixel_size_um)
                 if magnification > 0 and numerical_aperture > 0 and pixel_size_um > 0 else None)
        if found is None:
            return self.base_two_shot
        if found not in self._calibrated_two_shot:
            self._calibrated_two_shot[found] = TwoShotModel.load(found)
        return self._calibrated_two_shot[found]

    def forget(self, model_dir: Path) -> None:
        self._calibrated.pop(Path(model_dir), None)
        self._fitted_on_scan.pop(Path(model_dir), None)
        self._calibrated_two_shot.pop(Path(model_dir) / TWO_SHOT_MODEL_FILE, None)
