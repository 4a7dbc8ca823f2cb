"""The microscope process: one hardware backend shared by the stage, camera and scan orchestrator nodes.

Micro-Manager and most microscope controllers drive every device through one connection, so the
nodes that use the hardware live in one process and take turns through one lock.
"""
import threading
from pathlib import Path

import numpy as np
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node

from wsi_acquisition.camera_node import CameraNode
from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.orchestrator_node import ScanOrchestratorNode
from wsi_acquisition.specimen import ImageSpecimen, SpecimenError
from wsi_acquisition.stage import StageFault, StageLimits
from wsi_acquisition.stage_node import StageNode
from wsi_common.diagnostics import ERROR, OK, DiagnosticsPublisher
from wsi_common.node_main import NodeConfigurationError, spin_nodes
from wsi_common.params import declare_parameters

# 'sim': the virtual microscope; 'micromanager': the microscope of mm_config; 'micromanager-sim': the virtual
# microscope as Micro-Manager devices, driven through the same code as real hardware.
BACKENDS = ("sim", "micromanager", "micromanager-sim")

PARAMETERS = {
    "backend": ("sim", "hardware backend: 'sim' (virtual microscope), 'micromanager' (load mm_config), "
                       "'micromanager-sim' (the virtual microscope as Micro-Manager devices)"),
    "mm_config": ("", "Micro-Manager hardware config file (.cfg) for backend 'micromanager'"),
    "mm_adapter_dir": ("", "Micro-Manager installation with the device adapters; '': the one pymmcore-plus finds"),
    "mm_stage_limits_um": ([0.0, 75_000.0, 0.0, 25_000.0, -500.0, 500.0],
                           "stage soft limits x_min, x_max, y_min, y_max, z_min, z_max (µm)"),
    "mm_objective_magnifications": ([20.0], "magnification of each objective"),
    "mm_objective_numerical_apertures": ([0.75], "numerical aperture of each objective"),
    "mm_objective_pixel_sizes_um": ([0.0], "image pixel size of each objective; 0: the config's pixel size"),
    "mm_objective_presets": ([""], "preset of mm_objective_group selecting each objective; '': fixed objective"),
    "mm_objective_group": ("", "Micro-Manager config group that switches objectives"),
    "sim_slide": ("0", "virtual slide: an integer seed, or the path of an RGB image used as the specimen"),
    "sim_image_pixel_size_um": (0.25, "pixel size of an image given as sim_slide, µm"),
    "sim_stage_seed": (0, "seed of the simulated stage's positioning jitter"),
    "sim_speedup": (1.0, "simulated stage moves take 1/sim_speedup of their physical time"),
    "camera_width_px": (1024, "simulated sensor width"),
    "camera_height_px": (1024, "simulated sensor height"),
    "objective_magnification": (20.0, "objective in place at start"),
    "diagnostics_period_s": (2.0, "period of /diagnostics messages"),
}


def load_specimen(slide: str, pixel_size_um: float):
    """None (the seeded synthetic slide) for an integer, else the image file as specimen."""
    if slide.strip().lstrip("-").isdigit():
        return None
    path = Path(slide).expanduser()
    if not path.is_file():
        raise NodeConfigurationError(f"sim_slide {slide!r} is neither an integer seed nor an image file")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile
        image = tifffile.imread(path)
    else:
        from PIL import Image
        image = np.asarray(Image.open(path).convert("RGB"))
    try:
        return ImageSpecimen(image[..., :3], pixel_size_um)
    except SpecimenError as error:
        raise NodeConfigurationError(f"sim_slide {slide}: {error}") from error


def build_backend(p: dict):
    """The hardware backend named by the parameters. pymmcore-plus is imported only by the
    Micro-Manager backends, so the plain simulator starts without it."""
    if p["backend"] == "micromanager":
        from wsi_acquisition.micromanager import MicroManagerMicroscope, load_micromanager, objectives_from_lists
        core = load_micromanager(p["mm_config"], p["mm_adapter_dir"] or None)
        objectives = objectives_from_lists(p["mm_objective_magnifications"], p["mm_objective_numerical_apertures"],
                                           p["mm_objective_pixel_sizes_um"], p["mm_objective_presets"])
        return MicroManagerMicroscope(core, StageLimits(*p["mm_stage_limits_um"]), objectives,
                                      objective_group=p["mm_objective_group"],
                                      objective_magnification=p["objective_magnification"])
    if p["backend"] not in BACKENDS:
        raise NodeConfigurationError(f"unknown hardware backend {p['backend']!r}; expected one of {BACKENDS}")
    specimen = load_specimen(p["sim_slide"], p["sim_image_pixel_size_um"])
    sim = SimulatedMicroscope.create(
        slide_seed=int(p["sim_slide"]) if specimen is None else 0, specimen=specimen,
        stage_seed=p["sim_stage_seed"], speedup=p["sim_speedup"], objective_magnification=p["objective_magnification"],
        camera=Camera(width_px=p["camera_width_px"], height_px=p["camera_height_px"]))
    if p["backend"] == "sim":
        return sim
    from wsi_acquisition.mm_sim_devices import simulated_micromanager
    return simulated_micromanager(sim)


class MicroscopeNode(Node):
    """Owns the hardware backend and reports its health on /diagnostics."""

    def __init__(self):
        super().__init__("microscope")
        self.params = p = declare_parameters(self, PARAMETERS)
        try:
            self.backend = build_backend(p)
        except (ValueError, RuntimeError) as error:     # bad parameters, or hardware failing at start-up
            raise NodeConfigurationError(str(error)) from error
        self.hardware_lock = threading.Lock()
        DiagnosticsPublisher(self, "microscope", p["diagnostics_period_s"], self._diagnostics)
        width, height = self.backend.sensor_size_px()
        self.get_logger().info(f"microscope ready: backend {p['backend']}, "
                               f"{self.backend.objective_magnification:g}x, {width}x{height} px")

    def _diagnostics(self):
        fault = getattr(self.backend.stage, "fault", "")
        try:
            position = ", ".join(f"{v:.2f}" for v in self.backend.stage.position_um())
        except StageFault as error:       # a real stage that stopped answering is reported, not fatal
            fault, position = str(error), "unknown"
        values = {"backend": self.params["backend"], "connected": "false" if position == "unknown" else "true",
                  "busy": str(self.hardware_lock.locked()),
                  "objective": f"{self.backend.objective_magnification:g}x", "stage_position_um": position}
        return (ERROR if fault else OK), fault or "connected", values


def make_nodes() -> list[Node]:
    microscope = MicroscopeNode()
    backend, lock = microscope.backend, microscope.hardware_lock
    return [microscope, StageNode(backend.stage, lock), CameraNode(backend, lock), ScanOrchestratorNode(backend, lock)]


def main(args=None):
    spin_nodes(make_nodes, "microscope", args, make_executor=lambda: MultiThreadedExecutor(num_threads=6))


if __name__ == "__main__":
    main()
