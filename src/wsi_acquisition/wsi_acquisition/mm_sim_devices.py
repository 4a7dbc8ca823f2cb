"""The simulated microscope as Micro-Manager devices, so tests and demos run the real Micro-Manager path.

Our SimulatedStage and VirtualMicroscope are wrapped as pymmcore-plus Python devices (XY stage, Z stage,
objective turret, colour camera) loaded into a `UniMMCore`. MicroManagerMicroscope then drives them
only through core calls (setXYPosition, deviceBusy, snapImage, getImage, setROI ...), exactly as it
drives a microscope loaded from a hardware config file.

The camera delivers what a Micro-Manager colour camera delivers: 8-bit BGRA (RGB32) frames. It renders
at the stage's true pose and keeps the ground truth of its last image for `last_ground_truth()`.
"""
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from pymmcore_plus.experimental.unicore import CameraDevice, StageDevice, StateDevice, UniMMCore, XYStageDevice

from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.micromanager import MicroManagerMicroscope, MMObjective
from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.stage import SimulatedStage

XY_STAGE_LABEL = "SimXYStage"
Z_STAGE_LABEL = "SimZStage"
CAMERA_LABEL = "SimCamera"
TURRET_LABEL = "SimObjectiveTurret"
OBJECTIVE_GROUP = "Objective"


def objective_preset(magnification: float) -> str:
    return f"{magnification:g}x"


class _SharedStage:
    """One XYZ SimulatedStage behind two Micro-Manager devices: each device commands its own axes and
    keeps the other axes at their last commanded target."""

    def __init__(self, stage: SimulatedStage):
        self.stage = stage
        self.target_um = list(stage.true_position_um())

    def move(self, **axes_um: float) -> None:
        target = list(self.target_um)
        for axis, value in axes_um.items():
            target["xyz".index(axis)] = float(value)
        self.stage.start_move(*target)          # raises before anything moves: the old target stays
        self.target_um = target

    def stop(self) -> None:
        self.stage.stop()
        self.target_um = list(self.stage.true_position_um())


class SimXYStage(XYStageDevice):
    def __init__(self, shared: _SharedStage):
        super().__init__()
        self._shared = shared

    def set_position_um(self, x: float, y: float) -> None:
        self._shared.move(x=x, y=y)

    def get_position_um(self) -> tuple[float, float]:
        x, y, _ = self._shared.stage.position_um()
        return x, y

    def busy(self) -> bool:
        return self._shared.stage.is_moving()

    def stop(self) -> None:
        self._shared.stop()

    def home(self) -> None:
        raise RuntimeError("the simulated stage has no home switches; its coordinates are slide coordinates")

    def set_origin(self) -> None:
        raise RuntimeError("the simulated stage keeps slide coordinates; its origin cannot be moved")

    set_origin_x = set_origin_y = set_origin


class SimZStage(StageDevice):
    def __init__(self, shared: _SharedStage):
        super().__init__()
        self._shared = shared

    def set_position_um(self, val: float) -> None:
        self._shared.move(z=val)

    def get_position_um(self) -> float:
        return self._shared.stage.position_um()[2]

    def busy(self) -> bool:
        return self._shared.stage.is_moving()

    def stop(self) -> None:
        self._shared.stop()

    def home(self) -> None:
        raise RuntimeError("the simulated focus drive has no home switch")

    def set_origin(self) -> None:
        raise RuntimeError("the simulated focus drive keeps its origin")


class SimObjectiveTurret(StateDevice):
    def __init__(self, magnifications: Sequence[float]):
        self.magnifications = sorted(float(m) for m in magnifications)
        super().__init__({i: objective_preset(m) for i, m in enumerate(self.magnifications)})
        self._state = 0

    def get_state(self) -> int:
        return self._state

    def set_state(self, position: int) -> None:
        self._state = int(position)

    def magnification(self) -> float:
        return self.magnifications[self._state]


class SimCamera(CameraDevice):
    """Colour camera imaging the virtual slide at the stage's true pose; 8-bit BGRA frames."""

    def __init__(self, microscope: VirtualMicroscope, stage: SimulatedStage, turret: SimObjectiveTurret):
        self._microscope, self._stage, self._turret = microscope, stage, turret
        self._exposure_ms, self._gain = 10.0, 1.0
        self._roi: tuple[int, int, int, int] | None = None     # (x, y, width, height), Micro-Manager order
        self.fault = ""                                        # set to make every snap fail with it
        self.last_capture = None
        super().__init__()

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._exposure_ms = float(exposure)

    def get_gain(self) -> float:
        return self._gain

    def set_gain(self, value: float) -> None:
        self._gain = float(value)

    def _sensor_shape(self) -> tuple[int, int]:
        return self._microscope.camera.height_px, self._microscope.camera.width_px

    def shape(self) -> tuple[int, int, int]:
        _, _, width, height = self.get_roi()
        return height, width, 4

    def dtype(self):
        return np.uint8

    def get_roi(self) -> tuple[int, int, int, int]:
        height, width = self._sensor_shape()
        return self._roi if self._roi is not None else (0, 0, width, height)

    def set_roi(self, x: int, y: int, width: int, height: int) -> None:
        sensor_height, sensor_width = self._sensor_shape()
        if min(x, y) < 0 or width < 1 or height < 1 or x + width > sensor_width or y + height > sensor_height:
            raise ValueError(f"ROI x={x}, y={y}, {width}x{height} px is not inside the "
                             f"{sensor_width}x{sensor_height} px sensor")
        self._roi = (int(x), int(y), int(width), int(height))

    def clear_roi(self) -> None:
        self._roi = None

    def start_sequence(self, n: int | None,
                       get_buffer: Callable[[Sequence[int], np.dtype], np.ndarray]) -> Iterator[Mapping]:
        count = 0
        while n is None or count < n:
            if self.fault:
                raise RuntimeError(self.fault)
            x, y, width, height = self.get_roi()
            true_x, true_y, true_z = self._stage.true_position_um()
            capture = self._microscope.capture(true_x, true_y, true_z, self._turret.magnification(),
                                               exposure_ms=self._exposure_ms, gain=self._gain,
                                               roi=(y, x, height, width))
            buffer = get_buffer((height, width, 4), np.uint8)
            buffer[..., :3] = capture.image_rgb8[..., ::-1]
            buffer[..., 3] = 255
            self.last_capture = capture
            count += 1
            yield {"CaptureIndex": str(capture.capture_index)}

    def last_ground_truth(self) -> dict[str, float]:
        """Frame fields of the last image's ground truth (true pose, focal z, defocus)."""
        capture = self.last_capture
        if capture is None:
            return {}
        return {"true_x_um": capture.stage_x_um, "true_y_um": capture.stage_y_um, "true_z_um": capture.stage_z_um,
                "focal_z_um": capture.focal_z_um, "ground_truth_defocus_um": capture.defocus_um}


def simulated_core(sim: SimulatedMicroscope) -> tuple[UniMMCore, SimCamera]:
    """A UniMMCore holding the simulated microscope's stage, focus drive, turret and camera."""
    # Only Python devices here: the C++ adapter search would log a misleading "no Micro-Manager
    # installation found" error on machines without Micro-Manager.
    pymmcore_logger = logging.getLogger("pymmcore-plus")
    level = pymmcore_logger.level
    pymmcore_logger.setLevel(logging.CRITICAL)
    try:
        core = UniMMCore()
    finally:
        pymmcore_logger.setLevel(level)
    shared = _SharedStage(sim.stage)
    turret = SimObjectiveTurret(sim.objectives())
    camera = SimCamera(sim.microscope, sim.stage, turret)
    for label, device in ((XY_STAGE_LABEL, SimXYStage(shared)), (Z_STAGE_LABEL, SimZStage(shared)),
                          (TURRET_LABEL, turret), (CAMERA_LABEL, camera)):
        core.loadPyDevice(label, device)
    core.initializeAllDevices()
    core.setXYStageDevice(XY_STAGE_LABEL)
    core.setFocusDevice(Z_STAGE_LABEL)
    core.setCameraDevice(CAMERA_LABEL)
    for magnification in turret.magnifications:
        core.defineConfig(OBJECTIVE_GROUP, objective_preset(magnification), TURRET_LABEL, "Label",
                          objective_preset(magnification))
    return core, camera


def simulated_micromanager(sim: SimulatedMicroscope) -> MicroManagerMicroscope:
    """MicroManagerMicroscope over the simulated devices, with the simulator's ground truth and macro
    camera attached. Pixel sizes are given per objective because pymmcore-plus does not evaluate
    pixel-size configurations on Python devices."""
    core, camera = simulated_core(sim)
    objectives = {}
    for magnification in sim.objectives():
        optics = sim.microscope.objective(magnification)
        objectives[magnification] = MMObjective(optics.numerical_aperture, sim.microscope.pixel_size_um(magnification),
                                                objective_preset(magnification), optics.immersion_index)
    return MicroManagerMicroscope(core, sim.stage.limits, objectives, objective_group=OBJECTIVE_GROUP,
                                  objective_magnification=sim.objective_magnification,
                                  stage_dynamics=sim.stage.dynamics, ground_truth=camera.last_ground_truth,
                                  overview=sim.microscope.capture_overview)
