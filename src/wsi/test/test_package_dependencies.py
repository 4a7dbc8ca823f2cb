"""Every package.xml declares the workspace and ROS packages that its Python code imports, so that a package
built on its own (a Jetson: `colcon build --packages-up-to wsi_autofocus`) finds them at run time.

Imports are read from the source (ast), inside functions too. Code a package installs (its Python package,
launch files) needs <depend> or <exec_depend>; its tests may also use <test_depend>. Checked are workspace
packages (src/*/package.xml) and ROS packages: those in this environment's ament index, interface packages
by their name, and launch. Python libraries are not checked: their one home is requirements/python.txt,
which pip installs on every machine, a Jetson included (README).
"""
import ast
import os
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2]
RUN_DEPENDENCIES = ("depend", "exec_depend")
TEST_DEPENDENCIES = (*RUN_DEPENDENCIES, "test_depend")
# `ros2 launch` comes with a ROS install, not with this venv's wheels (test_graph.py loads the launch file
# over stand-ins), so the ament index here does not list it.
ROS_PACKAGES_NOT_INSTALLED_HERE = frozenset({"launch", "launch_ros"})
INTERFACE_PACKAGE_NAME = re.compile(r".+_(msgs|srvs|interfaces)$")
# wsi_autofocus's device side: the node and what it runs must not import the virtual microscope, which only
# training and evaluation use (wsi_autofocus/package.xml).
AUTOFOCUS_DEVICE_MODULES = ("node", "inference", "patches", "calibration", "model_io", "model")


def packages() -> dict[str, Path]:
    """name -> directory of every workspace package."""
    found = {}
    for manifest in sorted(SRC.glob("*/package.xml")):
        found[ElementTree.parse(manifest).getroot().findtext("name")] = manifest.parent
    return found


def declared(directory: Path, kinds) -> set[str]:
    root = ElementTree.parse(directory / "package.xml").getroot()
    return {element.text.strip() for kind in kinds for element in root.findall(kind)}


def ament_indexed_packages() -> set[str]:
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p] + [sys.prefix]
    return {entry.name for prefix in prefixes
            for entry in (Path(prefix) / "share/ament_index/resource_index/packages").glob("*")}


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the absolute imports of a file: `from a.b import c` gives a.b and a.b.c (c may be a
    module)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def python_files(directory: Path):
    """(path, is_test) of the package's Python files: its module, launch files, setup.py and tests."""
    for path in sorted(directory.rglob("*.py")):
        yield path, path.relative_to(directory).parts[0] == "test"


@pytest.fixture(scope="module")
def workspace() -> dict[str, Path]:
    return packages()


def test_every_imported_workspace_and_ros_package_is_declared(workspace):
    ros = workspace.keys() | ament_indexed_packages() | ROS_PACKAGES_NOT_INSTALLED_HERE
    missing = {}                # (package, tag, dependency) -> files importing it
    for name, directory in workspace.items():
        run, test = declared(directory, RUN_DEPENDENCIES), declared(directory, TEST_DEPENDENCIES)
        for path, is_test in python_files(directory):
            allowed = test if is_test else run
            for top in {module.split(".")[0] for module in imported_modules(path)}:
                if top != name and top not in allowed and (top in ros or INTERFACE_PACKAGE_NAME.match(top)):
                    key = (name, "test_depend" if is_test else "exec_depend", top)
                    missing.setdefault(key, []).append(str(path.relative_to(directory)))
    assert not missing, "\n".join(f"{name}/package.xml lacks <{tag}>{top}</{tag}>: {', '.join(files)}"
                                   for (name, tag, top), files in sorted(missing.items()))


def test_the_autofocus_device_side_does_not_import_the_simulator(workspace):
    """Follows wsi_autofocus's own imports from the node and the inference path; none reaches wsi_acquisition."""
    package = workspace["wsi_autofocus"] / "wsi_autofocus"
    seen, todo = set(), list(AUTOFOCUS_DEVICE_MODULES)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        imports = imported_modules(package / f"{module}.py")
        simulator = sorted(m for m in imports if m.split(".")[0] == "wsi_acquisition")
        assert not simulator, f"wsi_autofocus/{module}.py (reached from {AUTOFOCUS_DEVICE_MODULES}) imports {simulator}"
        todo += [m.split(".")[1] for m in imports
                 if m.startswith("wsi_autofocus.") and (package / f"{m.split('.')[1]}.py").exists()]
    assert {"node", "inference", "training"} <= seen      # the walk did follow the imports
