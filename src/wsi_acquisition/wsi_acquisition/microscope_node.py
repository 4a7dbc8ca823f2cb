"""The microscope process: one hardware backend shared by the stage, camera and scan orchestrator nodes.

Micro-Manager and most microscope controllers drive every device through one connection, so the
nodes that use the hardware live in one process and take turns through one lock.
"""
import threading
from pathlib import Path

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node

from wsi_acquisition.camera_node import CameraNode
from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.orchestrator_node import ScanOrchestratorNode
from wsi_acquisition.specimen import ImageSpecimen, SpecimenError
from wsi_acquisition.stage_node import StageNode
from wsi_common.node_main import NodeConfigurationError, spin_nodes
from wsi_common.params import declare_parameters
from wsi_common.qos import EVENT_QOS

PARAMETERS = {
    "backend": ("sim", "hardware backend: 'sim' (virtual microscope)"),
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


class MicroscopeNode(Node):
    """Owns the hardware backend and reports its health on /diagnostics."""

    def __init__(self):
        super().__init__("microscope")
        self.params = p = declare_parameters(self, PARAMETERS)
        if p["backend"] != "sim":
            raise NodeConfigurationError(f"unknown hardware backend {p['backend']!r}; expected 'sim'")
        specimen = load_specimen(p["sim_slide"], p["sim_image_pixel_size_um"])
        seed = int(p["sim_slide"]) if specimen is None else 0
        try:
            self.backend = SimulatedMicroscope.create(
                slide_seed=seed, specimen=specimen, stage_seed=p["sim_stage_seed"], speedup=p["sim_speedup"],
                objective_magnification=p["objective_magnification"],
                camera=Camera(width_px=p["camera_width_px"], height_px=p["camera_height_px"]))
        except ValueError as error:
            raise NodeConfigurationError(str(error)) from error
        self.hardware_lock = threading.Lock()
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", EVENT_QOS)
        self.create_timer(p["diagnostics_period_s"], self._publish_diagnostics)
        self.get_logger().info(f"microscope ready: simulated, slide {p['sim_slide']}, "
                               f"{p['objective_magnification']:g}x, {p['camera_width_px']}x{p['camera_height_px']} px")

    def _publish_diagnostics(self) -> None:
        fault = getattr(self.backend.stage, "fault", "")
        values = {"backend": self.params["backend"], "connected": "true", "busy": str(self.hardware_lock.locked()),
                  "objective": f"{self.backend.objective_magnification:g}x",
                  "stage_position_um": ", ".join(f"{v:.2f}" for v in self.backend.stage.position_um())}
        status = DiagnosticStatus(level=DiagnosticStatus.ERROR if fault else DiagnosticStatus.OK,
                                  name=self.get_fully_qualified_name(), hardware_id="microscope",
                                  message=fault or "connected",
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics.publish(array)


def make_nodes() -> list[Node]:
    microscope = MicroscopeNode()
    backend, lock = microscope.backend, microscope.hardware_lock
    return [microscope, StageNode(backend.stage, lock), CameraNode(backend, lock), ScanOrchestratorNode(backend, lock)]


def main(args=None):
    spin_nodes(make_nodes, "microscope", args, make_executor=lambda: MultiThreadedExecutor(num_threads=6))


if __name__ == "__main__":
    main()
