"""Node start-up through run_node: a Ctrl-C during imports is a clean stop, other failures keep their code."""
import os
import signal
import subprocess
import sys

import pytest

MODULES = {
    # What an interrupted C-extension import looks like: an ImportError raised from the KeyboardInterrupt.
    "interrupted_import": "try:\n    raise KeyboardInterrupt\nexcept KeyboardInterrupt as e:\n"
                          "    raise ImportError('extension load interrupted') from e\n",
    "broken_import": "raise ImportError('no module named missing_dependency')\n",
    "configuration_error": "import sys\nsys.exit(2)\n",
    "runs": "import sys\nprint('argv', sys.argv[1:])\n",
}


@pytest.fixture
def node_modules(tmp_path):
    for name, source in MODULES.items():
        (tmp_path / f"{name}.py").write_text(source)
    return tmp_path


def run(node_modules, module, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(node_modules), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "wsi_common.run_node", module, *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("module, code", [("interrupted_import", -signal.SIGINT), ("broken_import", 1),
                                          ("configuration_error", 2), ("runs", 0)])
def test_exit_codes(node_modules, module, code):
    assert run(node_modules, module, "--ros-args").returncode == code


def test_the_module_gets_its_arguments(node_modules):
    assert "argv ['--ros-args', '-p', 'x:=1']" in run(node_modules, "runs", "--ros-args", "-p", "x:=1").stdout
