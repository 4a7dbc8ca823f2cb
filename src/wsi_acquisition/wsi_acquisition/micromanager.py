"""Micro-Manager backend (pymmcore-plus): a real microscope driven through its hardware config file.

MicroManagerMicroscope implements MicroscopeBackend over a loaded core using only standard core calls
(stage moves, device busy, snap, ROI, exposure, config groups), so any stage and camera with a
Micro-Manager device adapter works. What Micro-Manager does not standardise is given by the caller:
stage soft limits, each objective's numerical aperture, a timing model for move-time estimates, and
optionally a macro (overview) camera and a ground-truth source (simulation only).

Device errors arrive as RuntimeError from C++ adapters (CMMError) and as any exception from Python
devices, so every device call is wrapped and re-raised as CameraError or StageFault naming the device.
"""
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.experimental.unicore import UniMMCore

from wsi_acquisition.hardware import CameraError, Frame, ReadOut
from wsi_acquisition.microscope import Overview
from wsi_acquisition.optics import Objective, depth_of_field_um
from wsi_acquisition.stage import StageDynamics, StageFault, StageLimits, trapezoid_duration_s
from wsi_common.tile_grid import field_of_view_um


# Farther than this from the last commanded XY (backlash and repeatability are ~1 µm), the stage has
# been moved by something else and the XY target is sent again.
XY_RESEND_TOLERANCE_UM = 5.0


class MicroManagerConfigError(ValueError):
    """The Micro-Manager configuration or the backend's arguments do not describe a usable microscope."""


class ObjectiveChangeError(RuntimeError):
    """The objective turret did not switch."""


class MMObjective(NamedTuple):
    numerical_aperture: float
    pixel_size_um: float = 0.0        # 0: take the core's pixel-size configuration for this objective
    preset: str = ""                  # preset of the objective config group; "": objective is fixed
    immersion_index: float = 1.0


def objectives_from_lists(magnifications, numerical_apertures, pixel_sizes_um, presets) -> dict[float, MMObjective]:
    """Objectives from parallel lists (as ROS parameters give them); a pixel size of 0 means "from the
    core's pixel-size configuration"."""
    lengths = {len(magnifications), len(numerical_apertures), len(pixel_sizes_um), len(presets)}
    if len(lengths) != 1 or not magnifications:
        raise MicroManagerConfigError(
            f"objective lists of lengths magnifications={len(magnifications)}, numerical_apertures="
            f"{len(numerical_apertures)}, pixel_sizes_um={len(pixel_sizes_um)}, presets={len(presets)}; "
            "expected one entry per objective in each")
    return {float(m): MMObjective(float(na), float(p), str(preset))
            for m, na, p, preset in zip(magnifications, numerical_apertures, pixel_sizes_um, presets)}


def _device_call(error_type: type[Exception], device: str, action: str, call: Callable, *args):
    try:
        return call(*args)
    except Exception as error:  # noqa: BLE001 -- see module docstring: adapters raise anything
        raise error_type(f"{device}: {action} failed: {error}") from error


def load_micromanager(config_path: str | Path, adapter_dir: str | Path | None = None) -> UniMMCore:
    """A core with the hardware config file loaded. UniMMCore accepts the same files as Micro-Manager
    (plus `#py` lines for Python devices); adapter_dir is the Micro-Manager installation holding the
    device adapters (default: the one pymmcore-plus finds, e.g. installed with `mmcore install`)."""
    path = Path(config_path).expanduser()
    if not path.is_file():
        raise MicroManagerConfigError(f"Micro-Manager config {path} does not exist; expected a .cfg file")
    core = UniMMCore(mm_path=None if adapter_dir is None else str(adapter_dir))
    try:
        core.loadSystemConfiguration(str(path))
    except Exception as error:  # noqa: BLE001 -- adapter load errors are RuntimeError or OSError
        raise MicroManagerConfigError(f"cannot load Micro-Manager config {path}: {error}") from error
    return core


def mm_image_to_rgb8(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """A Micro-Manager camera image as (height, width, 3) uint8 RGB.

    Accepts packed RGB32 (uint32, BGRA bytes), 4-channel BGRA (Micro-Manager's byte order for colour
    cameras), 3-channel RGB (pymmcore-plus has already unpacked it) and mono images of any bit depth
    (shown as grey)."""
    if image.ndim == 2 and image.dtype == np.uint32:
        image = image.view(np.uint8).reshape(*image.shape, 4)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., 2::-1]
    elif image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise CameraError(f"camera image of shape {image.shape}; expected (h, w) mono, (h, w, 3) or (h, w, 4)")
    if not np.issubdtype(image.dtype, np.unsignedinteger):
        raise CameraError(f"camera image of dtype {image.dtype}; expected unsigned integers")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    shift = max(0, int(bit_depth) - 8)
    return np.minimum(image >> shift, 255).astype(np.uint8)


class MicroManagerStage:
    """StageBackend over a core's XY stage and focus drive. Soft limits are ours (Micro-Manager has no
    standard soft-limit API); `dynamics` only estimates move durations for timeouts."""

    def __init__(self, core: CMMCorePlus, limits: StageLimits, xy_stage_label: str = "",
                 focus_stage_label: str = "", dynamics: StageDynamics = StageDynamics()):
        self.core = core
        self.limits = limits
        self.dynamics = dynamics
        self.xy_label = xy_stage_label or core.getXYStageDevice()
        self.z_label = focus_stage_label or core.getFocusDevice()
        if not self.xy_label or not self.z_label:
            raise MicroManagerConfigError(f"XY stage {self.xy_label!r}, focus drive {self.z_label!r}: "
                                          "the config must define both (Core XYStage and Focus)")
        self._commanded_xy: tuple[float, float] | None = None

    def position_um(self) -> tuple[float, float, float]:
        x, y = _device_call(StageFault, self.xy_label, "reading the position", self.core.getXYPosition,
                            self.xy_label)
        z = _device_call(StageFault, self.z_label, "reading the position", self.core.getPosition, self.z_label)
        return float(x), float(y), float(z)

    def start_move(self, x_um: float, y_um: float, z_um: float, speed_um_s: float = 0.0) -> float:
        if speed_um_s != 0:
            raise StageFault(f"speed {speed_um_s} µm/s requested, but Micro-Manager has no standard stage "
                             "speed control; command speed 0 (the stage's configured speed)")
        self.limits.check(x_um, y_um, z_um)
        start = self.position_um()
        # A focus sweep commands the same XY many times; re-sending it would cost a settle each time.
        # It is re-sent when the stage is not near it (moved by a joystick or another program).
        stays = self._commanded_xy == (x_um, y_um) and \
            math.hypot(start[0] - x_um, start[1] - y_um) <= XY_RESEND_TOLERANCE_UM
        if not stays:
            self._commanded_xy = None
            _device_call(StageFault, self.xy_label, f"move to ({x_um:.2f}, {y_um:.2f}) µm",
                         self.core.setXYPosition, self.xy_label, x_um, y_um)
            self._commanded_xy = (x_um, y_um)
        _device_call(StageFault, self.z_label, f"move to z={z_um:.3f} µm", self.core.setPosition, self.z_label, z_um)
        dyn = self.dynamics
        xy_s = trapezoid_duration_s(math.hypot(x_um - start[0], y_um - start[1]), dyn.xy_speed_um_s,
                                    dyn.xy_accel_um_s2)
        z_s = trapezoid_duration_s(z_um - start[2], dyn.z_speed_um_s, dyn.z_accel_um_s2)
        return max(xy_s, z_s) + dyn.settle_s

    def is_moving(self) -> bool:
        return any(_device_call(StageFault, label, "busy query", self.core.deviceBusy, label)
                   for label in (self.xy_label, self.z_label))

    def stop(self) -> None:
        self._commanded_xy = None
        for label in (self.xy_label, self.z_label):
            _device_call(StageFault, label, "stop", self.core.stop, label)


class MicroManagerMicroscope:
    """MicroscopeBackend over a loaded Micro-Manager core.

    objectives: {magnification: MMObjective or (numerical_aperture, pixel_size_um[, preset, immersion])}.
    A preset selects the objective through `objective_group` (e.g. group "Objective", preset "20x").
    ground_truth: simulation only, returns Frame ground-truth fields of the image just snapped.
    overview: a macro camera's whole-slide image, if the scanner has one."""

    def __init__(self, core: CMMCorePlus, limits: StageLimits, objectives: Mapping[float, tuple],
                 objective_group: str = "", objective_magnification: float | None = None,
                 camera_label: str = "", xy_stage_label: str = "", focus_stage_label: str = "",
                 stage_dynamics: StageDynamics = StageDynamics(),
                 ground_truth: Callable[[], dict[str, float]] | None = None,
                 overview: Callable[[], Overview] | None = None):
        if not objectives:
            raise MicroManagerConfigError("no objectives given; expected {magnification: (NA, pixel_size_um)}")
        self.core = core
        self._objectives = {float(m): MMObjective(*spec) for m, spec in objectives.items()}
        presets = [o.preset for o in self._objectives.values() if o.preset]
        if presets and not objective_group:
            raise MicroManagerConfigError(f"objective presets {presets} given without an objective_group")
        if objective_group and set(presets) - set(core.getAvailableConfigs(objective_group)):
            raise MicroManagerConfigError(
                f"objective presets {sorted(set(presets))}; config group {objective_group!r} has "
                f"{list(core.getAvailableConfigs(objective_group))}")
        self.objective_group = objective_group
        self.camera_label = camera_label or core.getCameraDevice()
        if not self.camera_label:
            raise MicroManagerConfigError("the config defines no camera (Core Camera)")
        self.stage = MicroManagerStage(core, limits, xy_stage_label, focus_stage_label, stage_dynamics)
        self._ground_truth = ground_truth
        self._overview = overview
        _device_call(CameraError, self.camera_label, "clearing the ROI", core.clearROI)
        self._sensor_px = (int(core.getImageWidth()), int(core.getImageHeight()))
        self.set_objective(min(self._objectives) if objective_magnification is None else objective_magnification)

    # -- objective -----------------------------------------------------------------------------
    def objectives(self) -> list[float]:
        return sorted(self._objectives)

    def set_objective(self, magnification: float) -> None:
        spec = self._objectives.get(float(magnification))
        if spec is None:
            raise MicroManagerConfigError(f"no {magnification}x objective; available: {self.objectives()}")
        if spec.preset:
            try:
                self.core.setConfig(self.objective_group, spec.preset)
                self.core.waitForConfig(self.objective_group, spec.preset)
            except Exception as error:  # noqa: BLE001 -- see module docstring
                raise ObjectiveChangeError(f"{self.objective_group} = {spec.preset}: {error}") from error
        pixel_size_um = spec.pixel_size_um or float(self.core.getPixelSizeUm())
        if not pixel_size_um > 0:
            raise MicroManagerConfigError(f"no pixel size for the {magnification}x objective: give "
                                          "pixel_size_um or define a pixel size configuration for it")
        self.objective_magnification = float(magnification)
        self._pixel_size_um = pixel_size_um

    def numerical_aperture(self) -> float:
        return self._objectives[self.objective_magnification].numerical_aperture

    def pixel_size_um(self) -> float:
        return self._pixel_size_um

    def field_of_view_um(self) -> tuple[float, float]:
        return field_of_view_um(*self._sensor_px, self._pixel_size_um)

    def depth_of_field_um(self) -> float:
        spec = self._objectives[self.objective_magnification]
        optics = Objective(self.objective_magnification, spec.numerical_aperture, spec.immersion_index)
        return depth_of_field_um(optics, self._pixel_size_um * self.objective_magnification)

    def sensor_size_px(self) -> tuple[int, int]:
        return self._sensor_px

    # -- camera --------------------------------------------------------------------------------
    def expose(self, exposure_ms: float, gain: float = 1.0,
               roi: tuple[int, int, int, int] | None = None) -> ReadOut:
        # The camera is read out before this returns: Micro-Manager's ROI is cleared only after the image.
        core, camera = self.core, self.camera_label
        width, height = self._sensor_px
        if roi is not None:
            row, col, roi_height, roi_width = (int(v) for v in roi)
            if min(row, col) < 0 or roi_height < 1 or roi_width < 1 or row + roi_height > height \
                    or col + roi_width > width:
                raise CameraError(f"roi (row, col, height, width)={roi} is not inside the {height}x{width} px sensor")
        _device_call(CameraError, camera, f"setting exposure {exposure_ms} ms", core.setExposure, camera, exposure_ms)
        if core.hasProperty(camera, "Gain"):
            _device_call(CameraError, camera, f"setting gain {gain}", core.setProperty, camera, "Gain", gain)
        elif gain != 1.0:
            raise CameraError(f"{camera} has no Gain property; cannot apply gain {gain}")
        measured = self.stage.position_um()
        if roi is not None:
            # Cameras may refuse or round a hardware ROI; what they delivered is read back and cropped.
            try:
                core.setROI(camera, col, row, roi_width, roi_height)
            except Exception:  # noqa: BLE001 -- no hardware ROI: crop the full frame instead
                pass
        try:
            _device_call(CameraError, camera, "snap", core.snapImage)
            image = _device_call(CameraError, camera, "reading the image", core.getImage)
            delivered_x, delivered_y, _, _ = _device_call(CameraError, camera, "reading the ROI", core.getROI, camera)
            bit_depth = core.getImageBitDepth()
        finally:
            if roi is not None:
                _device_call(CameraError, camera, "clearing the ROI", core.clearROI)
        image_rgb8 = mm_image_to_rgb8(image, bit_depth)
        if roi is not None:
            top, left = row - delivered_y, col - delivered_x
            if top < 0 or left < 0 or top + roi_height > image_rgb8.shape[0] or left + roi_width > image_rgb8.shape[1]:
                raise CameraError(f"{camera} delivered a {image_rgb8.shape[1]}x{image_rgb8.shape[0]} px image at "
                                  f"x={delivered_x}, y={delivered_y}, which does not contain the requested roi {roi}")
            image_rgb8 = np.ascontiguousarray(image_rgb8[top:top + roi_height, left:left + roi_width])
        truth = self._ground_truth() if self._ground_truth is not None else {}
        frame = Frame(image_rgb8, self._pixel_size_um, float(exposure_ms), float(gain), *measured,
                      self.objective_magnification, self.numerical_aperture(), **truth)
        return lambda: frame

    def z_pass(self, x_um, y_um, z_values_um, exposure_ms, gain=1.0, roi=None) -> None:
        return None     # position-triggered flashes need hardware triggering this backend does not set up

    def has_overview(self) -> bool:
        return self._overview is not None

    def overview(self) -> Overview | None:
        return self._overview() if self._overview is not None else None

    def close(self) -> None:
        """Stop the stage and unload every device, so that the hardware can be connected again (by this
        process or another program). A faulted stage may refuse to stop; the devices are unloaded anyway."""
        try:
            self.stage.stop()
        except StageFault:
            pass
        _device_call(RuntimeError, "Micro-Manager core", "unloading the devices", self.core.unloadAllDevices)
