"""Microscope hardware backends: one object owns the stage, the camera and the objective.

A real microscope is driven through one controller (Micro-Manager's core holds every device), so the
stage node, the camera node and the scan orchestrator share one backend object in one process.
The simulated backend images the virtual slide at the stage's true position.
"""
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from wsi_acquisition.microscope import CaptureError, Overview, VirtualMicroscope
from wsi_acquisition.scan_timing import SCMOS_FRAME_RATE_HZ
from wsi_acquisition.stage import SimulatedStage, StageBackend, StageDynamics, StageLimits, trapezoid_time_s
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
        a scanner reads an image out while the stage heads for the next field. Each read-out is called
        once. Raise CameraError when the camera cannot expose."""

    def z_pass(self, x_um: float, y_um: float, z_values_um, exposure_ms: float, gain: float = 1.0,
               roi: tuple[int, int, int, int] | None = None) -> list[tuple[float, ReadOut]] | None:
        """Images of (x, y) at each of the ascending `z_values_um`, taken in one constant-speed z move with a
        flash triggered as the stage passes each z (one camera frame per z at most), the stage still at the
        end: (z, read-out) per image, z in the frame of commanded positions (where a move to it from
        below puts the stage). None when the scanner has no position-triggered flash: the caller steps."""

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
        self.frame_rate_hz = SCMOS_FRAME_RATE_HZ

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
        self._check_roi(roi)
        read_out = self._read_out_at(self.stage.true_position_um(), self.stage.position_um(), exposure_ms, gain, roi)
        self.stage.hold(exposure_ms / 1000.0)
        return read_out

    def z_pass(self, x_um: float, y_um: float, z_values_um, exposure_ms: float, gain: float = 1.0,
               roi: tuple[int, int, int, int] | None = None) -> list[tuple[float, ReadOut]]:
        """The flash is triggered by the z encoder: at each z the stage carriage is exactly where the encoder
        threshold puts it, so each image is rendered at that pose (the stage moves in real time meanwhile)."""
        z_values = [float(z) for z in z_values_um]
        steps = np.diff(z_values)
        if len(z_values) < 2 or not np.all(steps > 0):
            raise CameraError(f"z pass over {z_values} µm; expected at least two ascending z values")
        self._check_roi(roi)
        stage, dynamics = self.stage, self.stage.dynamics
        speed = min(dynamics.z_speed_um_s, float(steps.min()) * self.frame_rate_hz)
        # Up to speed, and the backlash taken up, before the first image.
        run_up = speed ** 2 / (2 * dynamics.z_accel_um_s2) + dynamics.backlash_um
        z_min, z_max = stage.limits.bounds("z")
        start, end = max(z_values[0] - run_up, z_min), min(z_values[-1] + run_up, z_max)
        if stage.position_um()[2] > start:
            self._move_and_wait(x_um, y_um, max(start - dynamics.backlash_um, z_min))
        self._move_and_wait(x_um, y_um, start)
        true_x, true_y, _ = stage.true_position_um()
        measured_x, measured_y, measured_z = stage.position_um()
        encoder_offset = start - measured_z       # commanded minus encoder z, having moved up
        passing_started = time.monotonic()
        stage.start_move(x_um, y_um, end, z_speed_um_s=speed)
        frames = []
        for z in z_values:
            passes_s = trapezoid_time_s(z - start, end - start, speed, dynamics.z_accel_um_s2) / stage.speedup
            time.sleep(max(0.0, passing_started + passes_s - time.monotonic()))
            carriage_z = z - encoder_offset
            frames.append((z, self._read_out_at((true_x, true_y, carriage_z), (measured_x, measured_y, carriage_z),
                                                exposure_ms, gain, roi)))
        while stage.is_moving():
            time.sleep(0.001)
        return frames

    def _move_and_wait(self, x_um: float, y_um: float, z_um: float) -> None:
        time.sleep(self.stage.start_move(x_um, y_um, z_um))
        while self.stage.is_moving():
            time.sleep(0.001)

    def _check_roi(self, roi) -> None:
        try:
            self.microscope.check_roi(roi)
        except CaptureError as error:
            raise CameraError(str(error)) from error

    def _read_out_at(self, true_pose, measured_pose, exposure_ms: float, gain: float, roi) -> ReadOut:
        """The read-out of an image exposed with the stage at `true_pose` (its encoders reading `measured_pose`)."""
        true_x, true_y, true_z = true_pose
        rendering = self._read_out.submit(self.microscope.capture, true_x, true_y, true_z,
                                          self.objective_magnification, exposure_ms=exposure_ms, gain=gain, roi=roi)

        def read_out() -> Frame:
            try:
                capture = rendering.result()
            except CaptureError as error:
                raise CameraError(str(error)) from error
            return Frame(capture.image_rgb8, capture.pixel_size_um, exposure_ms, gain, *measured_pose,
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
