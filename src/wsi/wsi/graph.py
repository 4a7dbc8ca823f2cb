"""The WSI node graph, described once. `launch/scan.launch.py` and `wsi launch` both build from it."""
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import PurePath

from wsi_common.supervisor import NodeSpec

# Launch arguments: name -> (default as a string, description). Shared by the launch file and the CLI.
LAUNCH_ARGUMENTS = {
    "sim": ("true", "use the virtual microscope instead of real hardware"),
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


def scan_graph(config: GraphConfig) -> list[NodeSpec]:
    """Every node of one scanner, with its parameters and remappings."""
    if not config.sim:
        raise ValueError("sim=false: the graph has no launch arguments for a Micro-Manager configuration yet; "
                         "run the microscope node with backend:=micromanager mm_config:=<file.cfg> (see README)")
    namespace, output = config.namespace, config.output_dir
    specs = [
        NodeSpec(name="microscope", package="wsi_acquisition", executable="microscope_node",
                 module="wsi_acquisition.microscope_node", namespace=namespace, single_node=False,
                 parameters={"backend": "sim", "sim_slide": config.slide, "sim_speedup": config.sim_speedup,
                             "output_root": output}),
        NodeSpec(name="autofocus", package="wsi_autofocus", executable="autofocus_node",
                 module="wsi_autofocus.node", namespace=namespace,
                 parameters={"backend": config.autofocus_backend}),
        NodeSpec(name="stitching", package="wsi_stitching", executable="stitching_node",
                 module="wsi_stitching.node", namespace=namespace, parameters={"output_root": output}),
        NodeSpec(name="export", package="wsi_export", executable="export_node", module="wsi_export.node",
                 namespace=namespace, parameters={"output_root": output, "mosaic_root": output}),
    ]
    if config.record:
        specs.append(NodeSpec(name="recorder", package="wsi", executable="recorder_node",
                              module="wsi.recorder_node", namespace=config.namespace,
                              parameters={"bag_path": bag_path(config)}))
    return specs


def bag_path(config: GraphConfig, now: datetime | None = None) -> str:
    """`<output_dir>/bags/<UTC time>[_<namespace>]`: a new directory per run and per scanner."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    suffix = f"_{config.namespace.strip('/').replace('/', '_')}" if config.namespace.strip("/") else ""
    return str(PurePath(config.output_dir) / "bags" / f"{stamp}{suffix}")
