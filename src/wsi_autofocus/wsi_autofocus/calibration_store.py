"""What self-calibration reads and writes, without torch: z-stacks (from arrays or a scan's kept sweeps), the
store of calibrated models per scanner, and the estimators the autofocus node picks from it per tile.

Fitting (`wsi_autofocus.calibration.calibrate`) needs torch; loading and using a calibrated model needs only
the inference backend's runtime, so the autofocus node imports torch only when it calibrates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_autofocus.inference import default_model_dir
from wsi_common.focus_metrics import brenner, refine_peak
from wsi_common.scan_files import MANIFEST_NAME, Manifest


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
    """The focus-map sweeps a scan kept on disk (its manifest's "focus_map"), as z-stacks, and the
    scan's optics (magnification, NA, pixel size)."""
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
