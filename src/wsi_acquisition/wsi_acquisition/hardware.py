"""Microscope hardware backends: one object owns the stage, the camera and the objective.

A real microscope is driven through one controller (Micro-Manager's core holds every device), so the
stage node, the camera node and the scan orchestrator share one backend object in one process.
The simulated backend images the virtual slide at the stage's true position.
"""
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from wsi_acquisition.microscope import CaptureError, Overview, VirtualMicroscope
from wsi_acquisition.stage import SimulatedStage, StageBackend, StageDynamics, StageLimits
from wsi_common.objective import DEFAULT_OBJECTIVE_MAGNIFICATION


class CameraError(RuntimeError):
    """The camera did not deliver an image (timeout, disconnected, bad settings)."""


@dataclass(frozen=True)
class Frame:
    image_rgb8: np.ndarray
    pixel_size_um: float
    exposure_ms: float
    gain: float
    measured_x_um: float
    measured_y_um: float
    measured_z_um: float
    objective_magnification: float
    numerical_aperture: float
    ground_truth_defocus_um: float = math.nan     # simulation only
    true_x_um: float = math.nan
    true_y_um: float = math.nan
    true_z_um: float = math.nan
    focal_z_um: float = math.nan


# Calling it delivers the exposed image (or raises CameraError).
ReadOut = Callable[[], Frame]


class MicroscopeBackend(Protocol):
    stage: StageBackend
    objective_magnification: float

    def objectives(self) -> list[float]: ...

    def set_objective(self, magnification: float) -> None: ...

    def numerical_aperture(self) -> float: ...

    def pixel_size_um(self) -> float: ...

    def field_of_view_um(self) -> tuple[float, float]: ...

    def depth_of_field_um(self) -> float: ...

    def sensor_size_px(self) -> tuple[int, int]:
        """(width, height) of a full frame."""

    def expose(self, exposure_ms: float, gain: float = 1.0,
               roi: tuple[int, int, int, int] | None = None) -> ReadOut:
        """Expose one image at the stage's current position, optionally only the sensor region
        roi=(row, col, height, width), and return its read-out. Once this returns the stage may move:
        a scanner reads an image out while the stage heads for the next field. Read-outs are called in
        the order of their exposures. Raise CameraError when the camera cannot expose."""

    def has_overview(self) -> bool:
        """Whether the scanner has a macro camera (answered without taking an image)."""

    def overview(self) -> Overview | None:
        """A whole-slide low-magnification image, or None where the scanner has no macro camera."""

    def close(self) -> None:
        """Release the hardware (stop the stage, let go of the devices); the backend is not used again."""


def snap(backend: MicroscopeBackend, exposure_ms: float, gain: float = 1.0,
         roi: tuple[int, int, int, int] | None = None) -> Frame:
    """Expose one image and read it out before anything moves."""
    return backend.expose(exposure_ms, gain, roi)()


# The simulated scanner renders each image on two threads: a scanner's computer has at least two cores.
DEFAULT_RENDER_THREADS = 2


class SimulatedMicroscope:
    """The virtual microscope behind a simulated stage: images follow the stage's true pose."""

    def __init__(self, microscope: VirtualMicroscope, stage: SimulatedStage,
                 objective_magnification: float = DEFAULT_OBJECTIVE_MAGNIFICATION):
        self.microscope = microscope
        self.stage = stage
        self.set_objective(objective_magnification)
        # Rendering stands in for the camera's read-out: one image after the other, while the stage moves.
        self._read_out = ThreadPoolExecutor(1, "camera-readout")

    @classmethod
    def create(cls, slide_seed: int = 0, specimen=None, stage_seed: int = 0, speedup: float = 1.0,
               objective_magnification: float = DEFAULT_OBJECTIVE_MAGNIFICATION, camera=None,
               render_threads: int = DEFAULT_RENDER_THREADS) -> "SimulatedMicroscope":
        microscope = VirtualMicroscope(specimen=specimen, seed=slide_seed, camera=camera,
                                       render_threads=render_threads)
        limits = StageLimits(x_max_um=microscope.specimen.width_um, y_max_um=microscope.specimen.height_um)
        start = (microscope.specimen.width_um / 2, microscope.specimen.height_um / 2, 0.0)
        stage = SimulatedStage(limits, StageDynamics(), seed=stage_seed, speedup=speedup, start_um=start)
        return cls(microscope, stage, objective_magnification)

    def objectives(self) -> list[float]:
        return sorted(self.microscope.objectives)

    def set_objective(self, magnification: float) -> None:
        self.microscope.objective(magnification)       # raises CaptureError for an unknown objective
        self.objective_magnification = float(magnification)

    def numerical_aperture(self) -> float:
        return self.microscope.objective(self.objective_magnification).numerical_aperture

    def pixel_size_um(self) -> float:
        return self.microscope.pixel_size_um(self.objective_magnification)

    def field_of_view_um(self) -> tuple[float, float]:
        return self.microscope.field_of_view_um(self.objective_magnification)

    def depth_of_field_um(self) -> float:
        return self.microscope.depth_of_field_um(self.objective_magnification)

    def sensor_size_px(self) -> tuple[int, int]:
        return self.microscope.camera.width_px, self.microscope.camera.height_px

    def expose(self, exposure_ms: float, gain: float = 1.0,
               roi: tuple[int, int, int, int] | None = None) -> ReadOut:
        true_x, true_y, true_z = self.stage.true_position_um()
        measured = self.stage.position_um()
        try:
            self.microscope.check_roi(roi)
        except CaptureError as error:
            raise CameraError(str(error)) from error
        self.stage.hold(exposure_ms / 1000.0)
        magnification = self.objective_magnification
        rendering = self._read_out.submit(self.microscope.capture, true_x, true_y, true_z, magnification,
                                          exposure_ms=exposure_ms, gain=gain, roi=roi)

        def read_out() -> Frame:
            try:
                capture = rendering.result()
            except CaptureError as error:
                raise CameraError(str(error)) from error
            return Frame(capture.image_rgb8, capture.pixel_size_um, exposure_ms, gain, *measured,
                         capture.objective_magnification, capture.numerical_aperture,
                         ground_truth_defocus_um=capture.defocus_um, true_x_um=true_x, true_y_um=true_y,
                         true_z_um=true_z, focal_z_um=capture.focal_z_um)
        return read_out

    def has_overview(self) -> bool:
        return True

    def overview(self) -> Overview:
        return self.microscope.capture_overview()

    def close(self) -> None:
        self.stage.stop()
        self._read_out.shutdown(wait=True)
