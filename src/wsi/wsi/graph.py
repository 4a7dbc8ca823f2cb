"""The WSI node graph, described once. `launch/scan.launch.py` and `wsi launch` both build from it."""
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path, PurePath

from wsi_acquisition.optics import DEFAULT_CONDENSER_FILL
from wsi_common.supervisor import NodeSpec

# Launch arguments: name -> (default as a string, description). Shared by the launch file and the CLI.
LAUNCH_ARGUMENTS = {
    "sim": ("true", "use the virtual microscope instead of real hardware"),
    "backend": ("", "with sim:=false, how the hardware is driven: micromanager (the microscope of mm_config, the "
                    "default) or micromanager-sim (the virtual microscope through the same Micro-Manager code)"),
    "mm_config": ("", "Micro-Manager hardware configuration (.cfg) of the microscope, for backend micromanager"),
    "params_file": ("", "YAML ROS parameters file of this scanner (objectives, stage limits, camera, ...), given "
                        "to every node; the other launch arguments override what it sets"),
    "slide": ("0", "virtual slide: an integer seed, or the path of an RGB image to use as specimen"),
    "output_dir": ("out", "directory for scan manifests, mosaics and exports"),
    "record": ("false", "record every tile, estimate and status into a rosbag2 (MCAP) bag"),
    "autofocus_backend": ("auto", "autofocus inference backend: auto, torch, onnxruntime, tensorrt"),
    "namespace": ("", "ROS namespace of this scanner, so that two scanners can share one ROS graph"),
    "sim_speedup": ("1.0", "simulated stage moves run this many times faster than physical time"),
}


def _parse_bool(text: str, name: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"launch argument {name}={text!r} is not a boolean; expected true or false")


@dataclass(frozen=True)
class GraphConfig:
    sim: bool = True
    backend: str = ""
    mm_config: str = ""
    params_file: str = ""
    slide: str = "0"
    output_dir: str = "out"
    record: bool = False
    autofocus_backend: str = "auto"
    namespace: str = ""
    sim_speedup: float = 1.0

    @classmethod
    def from_strings(cls, values: dict) -> "GraphConfig":
        """Build from launch-argument strings (missing ones take their defaults)."""
        kwargs = {}
        for f in fields(cls):
            text = values.get(f.name, LAUNCH_ARGUMENTS[f.name][0])
            if f.type is bool:
                kwargs[f.name] = _parse_bool(text, f.name)
            elif f.type is float:
                try:
                    kwargs[f.name] = float(text)
                except ValueError:
                    raise ValueError(f"launch argument {f.name}={text!r} is not a number") from None
            else:
                kwargs[f.name] = text
        return cls(**kwargs)

    def hardware_backend(self) -> str:
        """The microscope node's `backend`: the virtual microscope with sim, else the hardware driver
        (Micro-Manager unless `backend` names another)."""
        if self.sim:
            if self.backend not in ("", "sim"):
                raise ValueError(f"backend={self.backend!r} drives hardware, but sim=true runs the virtual "
                                 "microscope; give sim:=false with it")
            return "sim"
        if self.backend == "sim":
            raise ValueError("backend='sim' is the virtual microscope, but sim=false asks for hardware; give "
                             "sim:=true, or a hardware backend such as micromanager")
        return self.backend or "micromanager"


def _microscope_parameters(config: GraphConfig) -> dict:
    backend = config.hardware_backend()
    if config.mm_config and backend != "micromanager":
        raise ValueError(f"mm_config={config.mm_config!r} is read only by backend micromanager, "
                         f"and this graph's backend is {backend!r}")
    if backend == "micromanager" and not (config.mm_config or config.params_file):
        raise ValueError("sim=false drives a Micro-Manager microscope: give mm_config:=<file.cfg>, or a "
                         "params_file that sets the microscope's mm_config")
    parameters = {"backend": backend, "sim_slide": config.slide, "sim_speedup": config.sim_speedup,
                  "output_root": config.output_dir}
    if config.mm_config:
        parameters["mm_config"] = config.mm_config
    return parameters


def _autofocus_parameters(config: GraphConfig) -> dict:
    """The virtual microscope's condenser is known; a real scanner declares its own (params_file)."""
    parameters = {"backend": config.autofocus_backend}
    if config.hardware_backend() == "sim":
        parameters["condenser_fill"] = DEFAULT_CONDENSER_FILL
    return parameters


def _parameter_files(config: GraphConfig) -> tuple[str, ...]:
    if not config.params_file:
        return ()
    path = Path(config.params_file).expanduser()
    if not path.is_file():
        raise ValueError(f"params_file {config.params_file!r} does not exist; expected a YAML ROS parameters file")
    return (str(path),)


def scan_graph(config: GraphConfig) -> list[NodeSpec]:
    """Every node of one scanner, with its parameters and remappings."""
    namespace, output, files = config.namespace, config.output_dir, _parameter_files(config)
    specs = [
        NodeSpec(name="microscope", package="wsi_acquisition", executable="microscope_node",
                 module="wsi_acquisition.microscope_node", namespace=namespace, single_node=False,
                 parameters=_microscope_parameters(config), parameter_files=files, lifecycle_nodes=("microscope",),
                 sends_images=True),
        NodeSpec(name="autofocus", package="wsi_autofocus", executable="autofocus_node",
                 module="wsi_autofocus.node", namespace=namespace,
                 parameters=_autofocus_parameters(config), parameter_files=files),
        NodeSpec(name="stitching", package="wsi_stitching", executable="stitching_node",
                 module="wsi_stitching.node", namespace=namespace, parameters={"output_root": output},
                 parameter_files=files),
        NodeSpec(name="export", package="wsi_export", executable="export_node", module="wsi_export.node",
                 namespace=namespace, parameters={"output_root": output, "mosaic_root": output},
                 parameter_files=files),
    ]
    if config.record:
        specs.append(NodeSpec(name="recorder", package="wsi", executable="recorder_node",
                              module="wsi.recorder_node", namespace=config.namespace,
                              parameters={"bag_path": bag_path(config)}, parameter_files=files))
    specs.append(lifecycle_manager_spec(namespace, [name for spec in specs for name in spec.lifecycle_nodes], files))
    return specs


def lifecycle_manager_spec(namespace: str, node_names, parameter_files: tuple[str, ...] = ()) -> NodeSpec:
    """The bring-up manager (wsi.lifecycle_manager) of the managed nodes `node_names`, in bring-up order."""
    return NodeSpec(name="lifecycle_manager", package="wsi", executable="lifecycle_manager",
                    module="wsi.lifecycle_manager", namespace=namespace, parameters={"node_names": list(node_names)},
                    parameter_files=parameter_files)


def bag_path(config: GraphConfig, now: datetime | None = None) -> str:
    """`<output_dir>/bags/<UTC time>[_<namespace>]`: a new directory per run and per scanner."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    suffix = f"_{config.namespace.strip('/').replace('/', '_')}" if config.namespace.strip("/") else ""
    return str(PurePath(config.output_dir) / "bags" / f"{stamp}{suffix}")
