"""The graph is described once; the launch file and `wsi launch` are built from it."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from wsi.graph import LAUNCH_ARGUMENTS, GraphConfig, scan_graph
from wsi_common.supervisor import NodeSpec, write_params_file

# The launch file lives at the repository's top level; package wsi installs it from a symlink.
LAUNCH_FILE = Path(__file__).resolve().parents[3] / "launch" / "scan.launch.py"
PACKAGE_LAUNCH_FILE = Path(__file__).resolve().parents[1] / "launch" / "scan.launch.py"


def test_config_from_launch_argument_strings():
    config = GraphConfig.from_strings({"record": "true", "namespace": "scanner_b", "sim_speedup": "8"})
    assert config.record is True and config.namespace == "scanner_b" and config.sim_speedup == 8.0
    assert GraphConfig.from_strings({}) == GraphConfig()
    with pytest.raises(ValueError, match="sim_speedup='fast' is not a number"):
        GraphConfig.from_strings({"sim_speedup": "fast"})


def test_every_config_field_is_a_launch_argument_and_back():
    assert set(GraphConfig.__dataclass_fields__) == set(LAUNCH_ARGUMENTS)


def test_namespace_applies_to_every_node():
    specs = scan_graph(GraphConfig(namespace="scanner_b"))
    assert specs and all(spec.namespace == "scanner_b" for spec in specs)


def test_node_arguments_and_params_file(tmp_path):
    spec = NodeSpec(name="stage", package="p", executable="e", module="m", namespace="ns",
                    parameters={"backend": "sim", "seed": 3, "label": "007"}, remappings=(("a", "b"),))
    params = write_params_file(spec, tmp_path)
    assert spec.ros_arguments(params) == ["--ros-args", "-r", "__node:=stage", "--params-file",
                                          str(params), "-r", "__ns:=/ns", "-r", "a:=b"]
    several = NodeSpec(name="microscope", package="p", executable="e", module="m", single_node=False)
    assert "__node:=microscope" not in several.ros_arguments(params)
    import yaml
    assert yaml.safe_load(params.read_text()) == {"/**": {"ros__parameters": {
        "backend": "sim", "seed": 3, "label": "007"}}}   # "007" stays a string


class _Recorder:
    """Stands in for one launch/launch_ros class and records how it was constructed."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def test_launch_file_builds_its_nodes_from_the_graph(monkeypatch):
    launch = types.ModuleType("launch")
    launch.LaunchDescription = _Recorder
    actions = types.ModuleType("launch.actions")
    actions.DeclareLaunchArgument = actions.OpaqueFunction = actions.SetEnvironmentVariable = _Recorder
    substitutions = types.ModuleType("launch.substitutions")
    substitutions.EnvironmentVariable = _Recorder

    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context[self.name]

    substitutions.LaunchConfiguration = LaunchConfiguration
    launch_ros = types.ModuleType("launch_ros")
    launch_ros_actions = types.ModuleType("launch_ros.actions")
    launch_ros_actions.Node = _Recorder
    for name, module in {"launch": launch, "launch.actions": actions, "launch.substitutions": substitutions,
                         "launch_ros": launch_ros, "launch_ros.actions": launch_ros_actions}.items():
        monkeypatch.setitem(sys.modules, name, module)

    spec = importlib.util.spec_from_file_location("scan_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if "default_value" in e.kwargs}
    assert declared == {name: default for name, (default, _) in LAUNCH_ARGUMENTS.items()}
    opaque = next(e for e in entities if "function" in e.kwargs)
    context = {name: default for name, (default, _) in LAUNCH_ARGUMENTS.items()} | {"namespace": "b"}
    nodes = opaque.kwargs["function"](context)
    expected = scan_graph(GraphConfig.from_strings(context))
    assert [(n.kwargs["package"], n.kwargs["executable"], n.kwargs["name"], n.kwargs["namespace"],
             n.kwargs["parameters"]) for n in nodes] == [
        (s.package, s.executable, s.name if s.single_node else None, s.namespace, [s.parameters])
        for s in expected]


def test_the_package_installs_the_top_level_launch_file_not_a_copy():
    assert PACKAGE_LAUNCH_FILE.is_symlink() and PACKAGE_LAUNCH_FILE.resolve() == LAUNCH_FILE


def test_colcon_installed_the_launch_file_and_the_node_executables(monkeypatch):
    prefix = Path(sys.prefix)
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(prefix))
    from ament_index_python.packages import get_package_share_directory

    share = Path(get_package_share_directory("wsi"))
    assert (share / "launch" / "scan.launch.py").read_text() == LAUNCH_FILE.read_text()
    for spec in scan_graph(GraphConfig()):
        assert (prefix / "lib" / spec.package / spec.executable).exists(), spec
