"""The graph is described once; the launch file and `wsi launch` are built from it."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from wsi.graph import LAUNCH_ARGUMENTS, GraphConfig, scan_graph
from wsi_common.ros_env import fastdds_profile_path
from wsi_common.supervisor import NodeSpec, write_params_file

# The launch file lives at the repository's top level; package wsi installs it from a symlink.
LAUNCH_FILE = Path(__file__).resolve().parents[3] / "launch" / "scan.launch.py"
PACKAGE_LAUNCH_FILE = Path(__file__).resolve().parents[1] / "launch" / "scan.launch.py"
EXAMPLE_PARAMS_FILE = Path(__file__).resolve().parents[1] / "config" / "micromanager_scanner.yaml"


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


def load_launch_file(monkeypatch):
    """The launch file's module, over stand-ins of launch and launch_ros that record their arguments."""
    launch = types.ModuleType("launch")
    launch.LaunchDescription = _Recorder
    actions = types.ModuleType("launch.actions")
    actions.DeclareLaunchArgument = actions.OpaqueFunction = _Recorder
    substitutions = types.ModuleType("launch.substitutions")

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
    return module


def launched(monkeypatch, **arguments) -> list:
    """The Node actions the launch file makes when given `arguments` (the others at their declared defaults)."""
    entities = load_launch_file(monkeypatch).generate_launch_description().args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if "default_value" in e.kwargs}
    opaque = next(e for e in entities if "function" in e.kwargs)
    return opaque.kwargs["function"](declared | arguments)


def launched_nodes(monkeypatch, **arguments) -> list[tuple]:
    """(package, executable, name, namespace, parameters) of every node the launch file starts."""
    return [(n.kwargs["package"], n.kwargs["executable"], n.kwargs["name"], n.kwargs["namespace"],
             n.kwargs["parameters"]) for n in launched(monkeypatch, **arguments)]


def expected_nodes(**arguments) -> list[tuple]:
    defaults = {name: default for name, (default, _) in LAUNCH_ARGUMENTS.items()}
    return [(s.package, s.executable, s.name if s.single_node else None, s.namespace or None,
             [*s.parameter_files, s.parameters]) for s in scan_graph(GraphConfig.from_strings(defaults | arguments))]


def test_launch_file_declares_every_launch_argument(monkeypatch):
    entities = load_launch_file(monkeypatch).generate_launch_description().args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if "default_value" in e.kwargs}
    assert declared == {name: default for name, (default, _) in LAUNCH_ARGUMENTS.items()}


def launched_environments(monkeypatch) -> dict[str, dict]:
    """{executable: the environment the launch file adds to its process}."""
    return {n.kwargs["executable"]: n.kwargs["additional_env"] for n in launched(monkeypatch)}


def test_only_the_process_that_sends_images_gets_the_large_shared_memory_segment(monkeypatch):
    monkeypatch.delenv("FASTDDS_DEFAULT_PROFILES_FILE", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    environments = launched_environments(monkeypatch)
    profiles = {name: env["FASTDDS_DEFAULT_PROFILES_FILE"] for name, env in environments.items()}
    assert profiles.pop("microscope_node") == str(fastdds_profile_path(sends_images=True))
    assert set(profiles.values()) == {str(fastdds_profile_path(sends_images=False))}
    assert {env["MALLOC_ARENA_MAX"] for env in environments.values()} == {"2"}


def test_the_launch_file_keeps_a_profile_the_user_chose(monkeypatch):
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", "/etc/my_profile.xml")
    assert all("FASTDDS_DEFAULT_PROFILES_FILE" not in env for env in launched_environments(monkeypatch).values())


def test_launch_file_builds_its_nodes_from_the_graph(monkeypatch):
    assert launched_nodes(monkeypatch, namespace="b") == expected_nodes(namespace="b")


def test_sim_false_launches_the_micromanager_backend(monkeypatch, tmp_path):
    params_file = tmp_path / "scanner.yaml"
    params_file.write_text("/**/microscope:\n  ros__parameters:\n    camera_width_px: 256\n")
    arguments = {"sim": "false", "backend": "micromanager-sim", "params_file": str(params_file)}
    nodes = launched_nodes(monkeypatch, **arguments)
    assert nodes == expected_nodes(**arguments)
    microscope = next(node for node in nodes if node[1] == "microscope_node")
    assert microscope[4] == [str(params_file), {"backend": "micromanager-sim", "sim_slide": "0", "sim_speedup": 1.0,
                                                "output_root": "out"}]
    assert all(node[4][0] == str(params_file) for node in nodes)     # the scanner's file reaches every node


def test_real_hardware_arguments_choose_the_backend_or_say_what_is_missing(tmp_path):
    def microscope(**arguments):
        specs = scan_graph(GraphConfig.from_strings(arguments))
        return next(spec for spec in specs if spec.name == "microscope")

    real = microscope(sim="false", mm_config="/etc/scope.cfg")
    assert real.parameters["backend"] == "micromanager" and real.parameters["mm_config"] == "/etc/scope.cfg"
    assert real.parameter_files == ()
    assert microscope().parameters["backend"] == "sim" and "mm_config" not in microscope().parameters
    with pytest.raises(ValueError, match="give mm_config:=<file.cfg>, or a params_file"):
        microscope(sim="false")
    with pytest.raises(ValueError, match="backend='micromanager' drives hardware, but sim=true"):
        microscope(backend="micromanager")
    with pytest.raises(ValueError, match="backend='sim' is the virtual microscope, but sim=false"):
        microscope(sim="false", backend="sim")
    with pytest.raises(ValueError, match="mm_config='s.cfg' is read only by backend micromanager"):
        microscope(sim="false", backend="micromanager-sim", mm_config="s.cfg")
    with pytest.raises(ValueError, match="params_file '.*missing.yaml' does not exist"):
        microscope(params_file=str(tmp_path / "missing.yaml"))


def test_the_graph_backends_are_the_microscope_nodes_backends():
    from wsi_acquisition.microscope_node import BACKENDS

    chosen = {GraphConfig.from_strings(arguments).hardware_backend() for arguments in (
        {}, {"sim": "false"}, {"sim": "false", "backend": "micromanager-sim"})}
    assert chosen == set(BACKENDS)


def test_the_example_scanner_parameters_are_parameters_of_the_nodes_they_name():
    from wsi_acquisition import camera_node, microscope_node, orchestrator_node, stage_node
    from wsi_autofocus import node as autofocus_node
    import yaml

    tables = {"microscope": microscope_node.PARAMETERS, "camera": camera_node.PARAMETERS,
              "stage": stage_node.PARAMETERS, "scan_orchestrator": orchestrator_node.PARAMETERS,
              "autofocus": autofocus_node.PARAMETERS}
    sections = yaml.safe_load(EXAMPLE_PARAMS_FILE.read_text())
    assert sections and set(sections) <= {f"/**/{name}" for name in tables}
    for key, section in sections.items():
        table = tables[key.removeprefix("/**/")]
        for name, value in section["ros__parameters"].items():
            assert name in table, f"{key}: {name} is not a parameter of that node"
            assert type(value) is type(table[name][0]), f"{key}: {name}={value!r} has another type than its default"


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


def test_the_autofocus_knows_the_virtual_microscopes_condenser_and_a_scanner_declares_its_own():
    from wsi_acquisition.optics import DEFAULT_CONDENSER_FILL
    import yaml

    def autofocus_parameters(arguments):
        spec, = [spec for spec in scan_graph(GraphConfig.from_strings(arguments)) if spec.name == "autofocus"]
        return spec.parameters

    assert autofocus_parameters({})["condenser_fill"] == DEFAULT_CONDENSER_FILL
    assert "condenser_fill" not in autofocus_parameters({"sim": "false", "backend": "micromanager-sim",
                                                         "params_file": str(EXAMPLE_PARAMS_FILE)})
    example = yaml.safe_load(EXAMPLE_PARAMS_FILE.read_text())["/**/autofocus"]["ros__parameters"]
    assert "condenser_fill" in example          # where a real scanner declares it
