"""A whole scanner around a held-out microscope: the scan core runs on it as on any hardware backend.

`HeldOutScanner` implements `wsi_acquisition.hardware.MicroscopeBackend` with a simulated stage, a
tilted and warped specimen focal surface, and a camera that images through one of the held-out
microscopes of `heldout_imaging` (the optics the focus model never trained on). Evaluation only: it
answers whether a whole scan, focus map and inline autofocus together, stays in focus on a microscope
that is not the training simulator.
"""
from __future__ import annotations

import math

import numpy as np

from wsi_acquisition.hardware import CameraError, Frame, ReadOut
from wsi_acquisition.stage import SimulatedStage, StageDynamics, StageLimits
from wsi_autofocus import heldout_imaging
from wsi_common.objective import DEFAULT_OBJECTIVE_MAGNIFICATION
from wsi_common.tile_grid import field_of_view_um


class HeldOutScanner:
    def __init__(self, scope: heldout_imaging.HeldOutScope, specimen, sensor_px: int = 384,
                 objective_magnification: float = DEFAULT_OBJECTIVE_MAGNIFICATION, seed: int = 0,
                 speedup: float = 1000.0, tilt_um_per_mm: tuple[float, float] = (1.2, -0.8), warp_um: float = 2.0,
                 centre_um: tuple[float, float] | None = None):
        self.scope = scope
        self.specimen = specimen
        self.sensor_px = int(sensor_px)
        self.seed = int(seed)
        width, height = specimen.width_um, specimen.height_um
        self._centre = centre_um or (width / 2, height / 2)
        self._tilt = tilt_um_per_mm
        self._warp = warp_um
        limits = StageLimits(x_max_um=width, y_max_um=height)
        self.stage = SimulatedStage(limits, StageDynamics(), seed=seed, speedup=speedup,
                                    start_um=(*self._centre, 0.0))
        self._rng = np.random.default_rng([seed, 77])
        self.set_objective(objective_magnification)

    def focal_z_um(self, x_um, y_um):
        """The specimen's focal surface: a tilt and a smooth warp (µm)."""
        dx, dy = (np.asarray(x_um) - self._centre[0]) / 1000.0, (np.asarray(y_um) - self._centre[1]) / 1000.0
        return self._tilt[0] * dx + self._tilt[1] * dy + self._warp * np.sin(1.3 * dx + 0.4) * np.cos(0.9 * dy)

    def objectives(self) -> list[float]:
        return sorted(objective.magnification for objective in self.scope.objectives)

    def set_objective(self, magnification: float) -> None:
        self.scope.objective(magnification)
        self.objective_magnification = float(magnification)

    def numerical_aperture(self) -> float:
        return self.scope.objective(self.objective_magnification).numerical_aperture

    def pixel_size_um(self) -> float:
        return self.scope.pixel_size_um(self.objective_magnification)

    def field_of_view_um(self) -> tuple[float, float]:
        return field_of_view_um(self.sensor_px, self.sensor_px, self.pixel_size_um())

    def depth_of_field_um(self) -> float:
        na = self.numerical_aperture()
        return 0.55 / na ** 2 + self.scope.camera.pixel_size_um / (self.objective_magnification * na)

    def sensor_size_px(self) -> tuple[int, int]:
        return self.sensor_px, self.sensor_px

    def expose(self, exposure_ms: float, gain: float = 1.0, roi=None) -> ReadOut:
        true_x, true_y, true_z = self.stage.true_position_um()
        measured = self.stage.position_um()
        size = self.sensor_px if roi is None else int(roi[2])
        if roi is not None and int(roi[2]) != int(roi[3]):
            raise CameraError(f"held-out scanner renders square regions; got roi {roi}")
        self.stage.hold(exposure_ms / 1000.0)
        focal = float(self.focal_z_um(true_x, true_y))

        def read_out() -> Frame:
            capture = heldout_imaging.capture(self.scope, self.specimen, true_x, true_y, true_z - focal,
                                              self.objective_magnification, size, self._rng)
            return Frame(capture.image_rgb8, capture.pixel_size_um, exposure_ms, gain, *measured,
                         self.objective_magnification, capture.numerical_aperture,
                         ground_truth_defocus_um=true_z - focal, true_x_um=true_x, true_y_um=true_y,
                         true_z_um=true_z, focal_z_um=focal)
        return read_out

    def z_pass(self, x_um, y_um, z_values_um, exposure_ms, gain=1.0, roi=None) -> None:
        return None     # no position-triggered flash: the scan steps z, as in the evaluations measured so far

    def has_overview(self) -> bool:
        return False

    def overview(self):
        return None


def abs_defocus_first_and_final_um(records) -> tuple[np.ndarray, np.ndarray]:
    """Per tile of a scan: |true defocus| of its focus-map capture and of its final image."""
    first, final = {}, {}
    for record in records:
        first.setdefault((record.row, record.col), record)
        final[(record.row, record.col)] = record
    return (np.array([abs(first[c].ground_truth["defocus_um"]) for c in first]),
            np.array([abs(final[c].ground_truth["defocus_um"]) for c in first]))


def max_abs_defocus_gain_um(records) -> float:
    """Over the tiles of a scan: the largest increase of |true defocus| from a tile's focus-map capture to
    its final image (<= 0 when no tile ended less in focus than the focus map left it)."""
    first, final = abs_defocus_first_and_final_um(records)
    return float(np.max(final - first)) if len(first) else -math.inf
