"""Run the tests against the working tree: every package's source directory goes first on the path,
for this process and for the node processes the tests start."""
import os
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parent / "src"
_PACKAGE_DIRS = [str(p) for p in sorted(_SRC.iterdir()) if (p / "setup.py").exists()]

sys.path[:0] = [d for d in _PACKAGE_DIRS if d not in sys.path]
os.environ["PYTHONPATH"] = os.pathsep.join(
    _PACKAGE_DIRS + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

# Keep this run's DDS traffic on this machine and away from other graphs running on it.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ["ROS_DOMAIN_ID"] = os.environ.get("WSI_TEST_DOMAIN_ID", str(1 + os.getpid() % 100))

import pytest  # noqa: E402  (after the environment above, which rclpy reads at init)


@pytest.fixture
def ros_node():
    """An rclpy node in the test process, for talking to node processes."""
    import rclpy
    from rclpy.node import Node

    from wsi_common.node_main import end_ros

    rclpy.init()
    node = Node("wsi_test_client")
    yield node
    end_ros([node], "test client")   # with the action clients a test made, which would keep the participant alive


@pytest.fixture
def run_nodes():
    """Start NodeSpecs as supervised processes; every one is stopped when the test ends."""
    from wsi_common.supervisor import Supervisor

    supervisors = []

    def start(specs, log=None):
        supervisor = Supervisor(specs, log=log or sys.stdout)
        supervisors.append(supervisor.start())
        return supervisor

    yield start
    for supervisor in supervisors:
        supervisor.stop()
