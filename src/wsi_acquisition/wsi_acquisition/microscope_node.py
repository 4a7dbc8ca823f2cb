"""The microscope process: one hardware connection, a managed (lifecycle) node that owns it, and the stage,
camera and scan orchestrator nodes that use it.

Micro-Manager and most microscope controllers drive every device through one connection, so the
nodes that use the hardware live in one process and take turns through one lock.

The microscope node follows the ROS 2 node lifecycle, driven by the bring-up manager (wsi.lifecycle_manager):
configure connects to the hardware (the backend is built, Micro-Manager loads its configuration) and
checks that it answers; activate starts the stage, camera and scan orchestrator nodes over it, so that
their actions, services and topics exist exactly while the hardware can be used (a client's wait for
the `scan_slide` or `stage/move` server is its wait for the scanner to be up); deactivate stops them,
cancelling the goals they run (a scan keeps what it captured); cleanup disconnects.

A hardware fault found while active (the stage reports one, or does not answer) deactivates the node with
an error: error processing disconnects and the node rests unconfigured, its /diagnostics at ERROR naming
the fault, until a configure and an activate succeed again (the manager's `startup` does both).
"""
import functools
import threading
import time
from pathlib import Path

import numpy as np
from rclpy.action import ActionServer
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rcl_interfaces.msg import SetParametersResult

from wsi_acquisition.camera_node import CameraNode
from wsi_acquisition.hardware import DEFAULT_RENDER_THREADS, SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.orchestrator_node import ScanOrchestratorNode
from wsi_acquisition.specimen import ImageSpecimen, SpecimenError
from wsi_acquisition.stage import StageFault, StageLimits
from wsi_acquisition.stage_node import StageNode
from wsi_common.diagnostics import ERROR, OK, WARN, DiagnosticsPublisher
from wsi_common.executors import PoolExecutor
from wsi_common.heap import keep_freed_memory
from wsi_common.node_main import (CALLBACK_GRACE_S, NodeConfigurationError, cancel_executing_goals, destroy_node,
                                  spin_nodes)
from wsi_common.objective import DEFAULT_OBJECTIVE_MAGNIFICATION
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
    "mm_objective_magnifications": ([DEFAULT_OBJECTIVE_MAGNIFICATION], "magnification of each objective"),
    "mm_objective_numerical_apertures": ([0.75], "numerical aperture of each objective"),
    "mm_objective_pixel_sizes_um": ([0.0], "image pixel size of each objective; 0: the config's pixel size"),
    "mm_objective_presets": ([""], "preset of mm_objective_group selecting each objective; '': fixed objective"),
    "mm_objective_group": ("", "Micro-Manager config group that switches objectives"),
    "sim_slide": ("0", "virtual slide: an integer seed, or the path of an RGB image used as the specimen"),
    "sim_image_pixel_size_um": (0.25, "pixel size of an image given as sim_slide, µm"),
    "sim_stage_seed": (0, "seed of the simulated stage's positioning jitter"),
    "sim_speedup": (1.0, "simulated stage moves take 1/sim_speedup of their physical time"),
    "sim_render_threads": (DEFAULT_RENDER_THREADS, "threads rendering each simulated image (same image for any)"),
    "camera_width_px": (1024, "simulated sensor width"),
    "camera_height_px": (1024, "simulated sensor height"),
    "objective_magnification": (DEFAULT_OBJECTIVE_MAGNIFICATION, "objective in place at start"),
    "diagnostics_period_s": (2.0, "period of /diagnostics messages"),
    "fault_check_period_s": (0.5, "while active, the hardware is checked for a fault this often"),
    "deactivate_timeout_s": (30.0, "how long deactivating waits for the goals it cancelled to end"),
    "device_threads": (6, "threads serving the stage, camera and scan orchestrator nodes"),
    "sim_stage_fault": ("", "backend 'sim': a fault the simulated stage reports ('' = none), as a real controller "
                            "reports a following error; settable at run time, to try out fault handling"),
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
    keep_freed_memory()     # the renderer's frame-sized temporaries: 20 % of a tile's time in page faults
    sim = SimulatedMicroscope.create(
        slide_seed=int(p["sim_slide"]) if specimen is None else 0, specimen=specimen,
        stage_seed=p["sim_stage_seed"], speedup=p["sim_speedup"], objective_magnification=p["objective_magnification"],
        camera=Camera(width_px=p["camera_width_px"], height_px=p["camera_height_px"]),
        render_threads=p["sim_render_threads"])
    if p["backend"] == "sim":
        sim.stage.fault = p["sim_stage_fault"]
        return sim
    from wsi_acquisition.mm_sim_devices import simulated_micromanager
    return simulated_micromanager(sim)


def hardware_fault(backend) -> str:
    """What is wrong with the connected hardware: the fault the stage reports (where it reports faults),
    or its failure to give its position; '' when nothing is."""
    try:
        backend.stage.position_um()
    except StageFault as error:
        return str(error)
    return getattr(backend.stage, "fault", "")


class DeviceNodes:
    """The nodes that use the hardware, served by an executor of their own and stopped together: stopping
    cancels the goals they execute and lets those end (their clients get the results) before the nodes go."""

    # The result of a goal is sent to its client by a task that the executor runs just after the goal's
    # execute callback returns; the executor spins this much longer so that those tasks run.
    RESULT_SEND_S = 0.2

    def __init__(self, nodes: list, threads: int):
        self.nodes = nodes
        self._executor = PoolExecutor(num_threads=threads)
        for node in nodes:
            self._executor.add_node(node)
        threading.Thread(target=self._executor.spin, name="device-nodes", daemon=True).start()

    def goals_running(self) -> int:
        """Goals accepted by the nodes' action servers whose execute callbacks have not returned."""
        return sum(not result.done() for node in self.nodes for server in node.waitables
                   if isinstance(server, ActionServer) for result in server._result_futures.values())

    def stop(self, timeout_s: float, abandon: bool) -> bool:
        """Cancel the goals being executed, wait up to `timeout_s` for them to end, then stop the executor and
        destroy the nodes. Goals still running after `timeout_s` are abandoned (their clients get no
        result) if `abandon`; otherwise everything is left running and False returned."""
        cancel_executing_goals(self.nodes)
        deadline = time.monotonic() + timeout_s
        while self.goals_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = not self.goals_running()
        if not ended and not abandon:
            return False
        if ended:
            time.sleep(self.RESULT_SEND_S)
        # Waiting for the executor's threads waits for the callbacks still running (a timer, a frame).
        self._executor.shutdown(timeout_sec=timeout_s, wait_for_threads=ended)
        for node in self.nodes:
            destroy_node(node)
        return ended


def _transition(callback):
    """A lifecycle transition callback that logs what went wrong: rclpy turns an exception into ERROR silently."""
    @functools.wraps(callback)
    def logged(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            return callback(self, state)
        except Exception as error:  # noqa: BLE001 -- any failure must reach the log and the diagnostics
            self.transition_error = f"{callback.__name__.removeprefix('on_')} failed: {type(error).__name__}: {error}"
            self.get_logger().error(self.transition_error)
            return TransitionCallbackReturn.ERROR
        finally:
            self._diagnostics_publisher.publish()      # the new state at once, not at the next period
    return logged


class MicroscopeNode(LifecycleNode):
    """Owns the hardware connection under the node lifecycle (module docstring) and reports its state and
    health on /diagnostics in every state."""

    def __init__(self):
        super().__init__("microscope")
        self.params = p = declare_parameters(self, PARAMETERS)
        self.backend = None
        self.hardware_lock = threading.Lock()
        self.fault = ""                 # the hardware fault found while active; cleared when the hardware connects
        self.transition_error = ""      # why the last transition failed; cleared by the next one that succeeds
        self._devices: DeviceNodes | None = None
        self.add_on_set_parameters_callback(self._on_parameters)
        self._diagnostics_publisher = DiagnosticsPublisher(self, "microscope", p["diagnostics_period_s"],
                                                           self._diagnostics)
        self.create_timer(p["fault_check_period_s"], self._check_for_fault)

    # -- lifecycle -----------------------------------------------------------------------------
    @_transition
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            backend = build_backend(self.params)
        except (ValueError, RuntimeError) as error:     # bad parameters, or hardware that does not connect
            return self._failed("configure", str(error))
        fault = hardware_fault(backend)
        if fault:
            backend.close()
            return self._failed("configure", fault)
        self.backend, self.fault, self.transition_error = backend, "", ""
        # A new lock per connection: a callback abandoned with the last one may still hold its lock.
        self.hardware_lock = threading.Lock()
        width, height = backend.sensor_size_px()
        self.get_logger().info(f"microscope connected: backend {self.params['backend']}, "
                               f"{backend.objective_magnification:g}x, {width}x{height} px")
        return TransitionCallbackReturn.SUCCESS

    @_transition
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        fault = hardware_fault(self.backend)
        if fault:
            return self._failed("activate", fault)
        backend, lock = self.backend, self.hardware_lock
        self._devices = DeviceNodes([StageNode(backend.stage, lock), CameraNode(backend, lock),
                                     ScanOrchestratorNode(backend, lock)], self.params["device_threads"])
        self.transition_error = ""
        self.get_logger().info(f"microscope ready: backend {self.params['backend']}; stage, camera and "
                               "scan_slide are up")
        return TransitionCallbackReturn.SUCCESS

    @_transition
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        faulted = bool(self.fault)
        if not self._stop_devices(self.params["deactivate_timeout_s"], abandon=faulted):
            return self._failed("deactivate", f"{self._devices.goals_running()} goal(s) still running "
                                f"{self.params['deactivate_timeout_s']:g} s after they were cancelled (a scan "
                                "that is exporting ends when its export does); deactivate again later")
        if faulted:     # error processing disconnects the faulted hardware
            return TransitionCallbackReturn.ERROR
        self.transition_error = ""
        self.get_logger().info("microscope inactive: stage, camera and scan_slide are down")
        return TransitionCallbackReturn.SUCCESS

    @_transition
    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._disconnect()
        self.transition_error = ""
        return TransitionCallbackReturn.SUCCESS

    @_transition
    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_devices(self.params["deactivate_timeout_s"], abandon=True)
        self._disconnect()
        return TransitionCallbackReturn.SUCCESS

    @_transition
    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_devices(self.params["deactivate_timeout_s"], abandon=True)
        self._disconnect()
        self.get_logger().error(f"microscope disconnected after an error while {state.label}: "
                                f"{self.fault or self.transition_error}; configure and activate it to reconnect")
        return TransitionCallbackReturn.SUCCESS

    def _failed(self, transition: str, reason: str) -> TransitionCallbackReturn:
        self.transition_error = f"{transition} failed: {reason}"
        self.get_logger().error(self.transition_error)
        return TransitionCallbackReturn.FAILURE

    def _stop_devices(self, timeout_s: float, abandon: bool) -> bool:
        if self._devices is None:
            return True
        if not self._devices.stop(timeout_s, abandon):
            return False
        self._devices = None
        return True

    def _disconnect(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                backend.close()
            except (StageFault, RuntimeError) as error:     # faulted hardware may not let go cleanly
                self.get_logger().warning(f"disconnecting: {error}")

    def _check_for_fault(self) -> None:
        if self._devices is None:
            return
        fault = hardware_fault(self.backend)
        if fault:
            self.fault = f"hardware fault: {fault}"
            self.get_logger().error(f"{self.fault}; deactivating")
            self.trigger_deactivate()

    def destroy_node(self) -> None:
        # The process is stopping (node_main): the goals get the grace every node's callbacks get.
        self._stop_devices(CALLBACK_GRACE_S, abandon=True)
        self._disconnect()
        super().destroy_node()

    # -- parameters and diagnostics ------------------------------------------------------------
    def _on_parameters(self, parameters) -> SetParametersResult:
        for parameter in parameters:
            if parameter.name == "sim_stage_fault":
                if self.params["backend"] != "sim":
                    return SetParametersResult(successful=False, reason="sim_stage_fault needs backend 'sim'")
                self.params["sim_stage_fault"] = parameter.value
                if self.backend is not None:
                    self.backend.stage.fault = parameter.value
        return SetParametersResult(successful=True)

    def _diagnostics(self):
        state = self._state_machine.current_state[1]     # rclpy has no public accessor of the node's own state
        values = {"lifecycle_state": state, "backend": self.params["backend"], "busy": str(self.hardware_lock.locked())}
        position = "unknown"
        if self.backend is not None:
            values["objective"] = f"{self.backend.objective_magnification:g}x"
            try:
                position = ", ".join(f"{v:.2f}" for v in self.backend.stage.position_um())
            except StageFault as error:
                values["stage_error"] = str(error)
        values |= {"connected": str(position != "unknown").lower(), "stage_position_um": position}
        if self.fault or self.transition_error:     # the failed transition is the newer news
            return ERROR, self.transition_error or self.fault, values
        if state == "active":
            return OK, "active", values
        return WARN, f"{state}: the hardware is not in use (the bring-up manager's startup activates it)", values


def main(args=None):
    spin_nodes(lambda: [MicroscopeNode()], "microscope", args)


if __name__ == "__main__":
    main()
