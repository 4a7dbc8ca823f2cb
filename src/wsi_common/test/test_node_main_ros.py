"""A node process that stops cleanly leaves nothing of its DDS participant behind: Fast DDS's shared-memory
segments in /dev/shm (128 MiB each with the large-image profile) outlive a process that exits without
deleting its participant, and fill the machine's memory one stopped node at a time. One that cannot stop says
where it is stuck and exits before launch would kill it."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsi_common.node_main import STOP_DEADLINE_S
from wsi_common.ros_env import node_environment

pytestmark = pytest.mark.ros

# Action servers and clients are what Node.destroy_node leaves behind.
NODE_WITH_ACTIONS = """
from rclpy.node import Node
from wsi_common.node_main import spin_node
from wsi_common.topics import EXPORT_SLIDE


class WithActions(Node):
    def __init__(self):
        super().__init__("with_actions")
        self.server = EXPORT_SLIDE.server(self, lambda goal_handle: None)
        self.client = EXPORT_SLIDE.client(self)


spin_node(WithActions)
"""
# A lifecycle node's state machine holds the node's handle, as actions do.
LIFECYCLE_NODE = """
from rclpy.lifecycle import LifecycleNode
from wsi_common.node_main import spin_node


class Managed(LifecycleNode):
    def __init__(self):
        super().__init__("managed")


spin_node(Managed)
"""

# A node whose teardown never returns, as one waiting on a device that does not answer.
NODE_STUCK_ON_DESTROY = """
import time
from rclpy.node import Node
from wsi_common.node_main import spin_node


class StuckOnDestroy(Node):
    def __init__(self):
        super().__init__("stuck_on_destroy")
        print("spinning", flush=True)

    def destroy_node(self):
        time.sleep(3600)


spin_node(StuckOnDestroy)
"""


def start_node(tmp_path: Path, node_script: str) -> subprocess.Popen:
    (tmp_path / "stopping_node.py").write_text(node_script)
    env = node_environment()
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    return subprocess.Popen([sys.executable, "-m", "wsi_common.run_node", "stopping_node", "--ros-args"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def fast_dds_segments() -> set[str]:
    return {str(path) for path in Path("/dev/shm").glob("fastdds_*")}


def participant_segments(pid: int, existing: set[str]) -> set[str]:
    """The Fast DDS segments in /dev/shm that the process's participant owns: those it maps that were not
    there before it started (it also maps the segments of other participants on the machine, to write to
    them). The port files (fastdds_port<N>, 52 kB) are not among them: every participant on the port shares
    one, and Fast DDS keeps it while any process of the domain may still use it."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    mapped = {line.split()[-1] for line in maps if "/dev/shm/fastdds_" in line}
    return {path for path in mapped - existing if not Path(path).name.startswith("fastdds_port")}


@pytest.mark.parametrize("node_script", [NODE_WITH_ACTIONS, LIFECYCLE_NODE], ids=["actions", "lifecycle"])
def test_a_stopped_node_removes_its_shared_memory(tmp_path, node_script):
    existing = fast_dds_segments()
    process = start_node(tmp_path, node_script)
    try:
        deadline = time.monotonic() + 60
        while not (files := participant_segments(process.pid, existing)) and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.2)
        assert files, "the node never mapped a Fast DDS shared-memory segment"
        time.sleep(1.0)     # past start-up: the stop signal finds the node spinning
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, process.stdout.read()
    finally:
        process.kill()
    assert sorted(f for f in files if Path(f).exists()) == []


def test_a_node_stuck_in_its_teardown_prints_where_and_exits_before_launch_kills_it(tmp_path):
    process = start_node(tmp_path, NODE_STUCK_ON_DESTROY)
    try:
        assert process.stdout.readline().strip() == "spinning", process.stdout.read()
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        exit_code = process.wait(timeout=30)
        seconds = time.monotonic() - stopped
        output = process.stdout.read()
    finally:
        process.kill()
    assert exit_code == 1, output
    assert STOP_DEADLINE_S <= seconds < 10.0, output        # launch sends SIGKILL at 10 s
    assert "in destroy_node" in output and "stopping_node.py" in output, output
