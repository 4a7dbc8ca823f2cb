"""Run the tests against the working tree: every package's source directory goes first on the path,
for this process and for the node processes the tests start. The fixtures here serve several packages' tests."""
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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A focus model trained for one epoch on a tiny rendered set: enough to test export, backends and the nodes."""
    from wsi_autofocus.data import DatasetSpec, render_specimen
    from wsi_autofocus.training import TrainingConfig, train

    directory = tmp_path_factory.mktemp("model")
    train_data = render_specimen((DatasetSpec((1,), 48, patch_px=64, seed=1), 1))
    val_data = render_specimen((DatasetSpec((101,), 16, patch_px=64, seed=2), 101))
    train(train_data, val_data, TrainingConfig(epochs=1, batch_size=16, patch_px=64, patches_per_tile=4),
          directory, log=lambda line: None)
    return directory


@pytest.fixture(scope="session")
def mismatched_two_shot_model(tmp_path_factory):
    """The shipped two-shot model reading every defocus 40 % short and a depth of focus high: as if a
    microscope's optics mapped onto defocus otherwise than the training simulators' (a model to calibrate)."""
    from wsi_autofocus.two_shot import TwoShotModel, default_model_path

    model = TwoShotModel.load(default_model_path())
    for member in model.members:
        model.arrays[f"m{member}_w_out"][:, 0] *= 0.6
        model.arrays[f"m{member}_b_out"][0] = model.arrays[f"m{member}_b_out"][0] * 0.6 + 1.0
    return model.save(tmp_path_factory.mktemp("two-shot") / "mismatched.npz")


def pytest_sessionfinish(session, exitstatus):
    """Free the shared memory of DDS participants whose processes a test killed: a test run leaves none of it in
    the machine's memory (a run left about 1 GB in /dev/shm before, and repeated runs filled the memory)."""
    from wsi_common.fastdds_shm import remove_zombie_segments

    remove_zombie_segments()
