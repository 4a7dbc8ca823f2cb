"""The foundation's round trips with real rclpy in separate processes."""
import json
import signal
import subprocess
import sys
import time

import pytest
import rclpy
from action_msgs.msg import GoalStatus

from wsi.graph import GraphConfig, scan_graph
from wsi_common.action_caller import ActionCaller
from wsi_common.ros_env import interruptible, node_environment
from wsi_common.topics import MOVE_STAGE
from wsi_interfaces.action import MoveStage

pytestmark = pytest.mark.ros


def probe(*args):
    return subprocess.Popen([sys.executable, "-m", "wsi.tile_probe", *args], env=node_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_json(process, timeout_s=60):
    out, err = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_tiles_cross_processes_intact():
    receiver = probe("receive", "--count", "5", "--duration", "40", "--checksums")
    assert json.loads(receiver.stdout.readline()) == {"ready": True}
    sender = probe("send", "--count", "5", "--size", "1024", "--rate", "20")
    sent = last_json(sender)
    received = last_json(receiver)
    assert sent["sent"] == received["count"] == 5
    assert [t["sequence"] for t in received["tiles"]] == list(range(5))
    assert [(t["row"], t["col"]) for t in received["tiles"]] == [divmod(i, 16) for i in range(5)]
    assert all(t["encoding"] == "rgb8" and t["shape"] == [1024, 1024, 3] for t in received["tiles"])
    assert [t["crc32"] for t in received["tiles"]] == sent["crc32"]


def test_a_probe_ends_at_once_on_sigterm():
    receiver = probe("receive", "--duration", "60")
    assert json.loads(receiver.stdout.readline()) == {"ready": True}
    receiver.send_signal(signal.SIGTERM)
    receiver.communicate(timeout=10)
    assert receiver.returncode == -signal.SIGTERM


@pytest.fixture
def stage(run_nodes, ros_node):
    run_nodes(scan_graph(GraphConfig(sim_speedup=1.0)))
    caller = ActionCaller(ros_node, MOVE_STAGE)
    caller.wait_for_server(timeout_s=30)
    return caller


def test_move_goal_is_fed_back_and_finishes_at_the_target(stage):
    outcome = stage.call(MoveStage.Goal(x_um=20_000.0, y_um=5_000.0, z_um=12.0), timeout_s=30)
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED
    assert outcome.result.error_code == MoveStage.Result.ERROR_NONE
    assert (outcome.result.x_um, outcome.result.y_um, outcome.result.z_um) == pytest.approx(
        (20_000.0, 5_000.0, 12.0), abs=2.0)
    assert len(outcome.feedback) >= 3
    remaining = [f.distance_remaining_um for f in outcome.feedback]
    assert remaining[0] > remaining[-1]


def start_long_move(stage, ros_node):
    """The handle of a move across the slide, once it is moving: an accepted goal may not have started yet."""
    stage.call(MoveStage.Goal(x_um=1_000.0, y_um=1_000.0, z_um=0.0), timeout_s=30)
    feedback = []
    handle = stage.send_goal(MoveStage.Goal(x_um=74_000.0, y_um=24_000.0, z_um=0.0), timeout_s=30,
                             on_feedback=feedback.append)
    deadline = time.monotonic() + 10
    while not feedback and time.monotonic() < deadline:
        rclpy.spin_once(ros_node, timeout_sec=0.05)
    return handle


def test_a_second_goal_is_cancelled_mid_move(stage, ros_node):
    handle = start_long_move(stage, ros_node)
    stage.cancel(handle)
    status, result = stage.wait_for_result(handle, timeout_s=30)
    assert status == GoalStatus.STATUS_CANCELED
    assert result.error_code == MoveStage.Result.ERROR_CANCELED
    assert 1_000.0 < result.x_um < 74_000.0 - 1.0   # stopped on the way, not at the target


@pytest.mark.parametrize("goal, code, reason", [
    (MoveStage.Goal(x_um=-5.0, y_um=0.0, z_um=0.0), MoveStage.Result.ERROR_OUT_OF_LIMITS, "x=-5.000 µm is outside"),
    (MoveStage.Goal(x_um=float("nan"), y_um=0.0, z_um=0.0), MoveStage.Result.ERROR_INVALID_GOAL,
     "x=nan is not a finite number"),
    (MoveStage.Goal(x_um=30_000.0, y_um=12_000.0, z_um=0.0, speed_um_s=1e-6), MoveStage.Result.ERROR_INVALID_GOAL,
     "more than the 600 s a move may take"),
])
def test_a_goal_that_cannot_be_run_ends_at_once_with_the_reason(stage, goal, code, reason):
    started = time.monotonic()
    outcome = stage.call(goal, timeout_s=30)
    assert outcome.status == GoalStatus.STATUS_ABORTED and outcome.result.error_code == code
    assert reason in outcome.result.error_message and time.monotonic() - started < 5


def test_a_goal_while_the_stage_moves_ends_as_busy(stage, ros_node):
    first = start_long_move(stage, ros_node)
    second = stage.call(MoveStage.Goal(x_um=2_000.0, y_um=2_000.0, z_um=0.0), timeout_s=30)
    assert second.status == GoalStatus.STATUS_ABORTED and second.result.error_code == MoveStage.Result.ERROR_BUSY
    assert "the stage is busy" in second.result.error_message
    stage.cancel(first)
    assert stage.wait_for_result(first, timeout_s=30)[0] == GoalStatus.STATUS_CANCELED


def run_cli(*args, timeout_s=90):
    return subprocess.run([sys.executable, "-m", "wsi.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=node_environment())


def test_wsi_smoke_runs_a_round_trip_through_a_fresh_graph():
    done = run_cli("smoke", "--sim-speedup", "4")
    assert done.returncode == 0, done.stderr
    assert "goal outside the stage limits refused: target outside the stage limits" in done.stdout
    assert "the graph answered end to end" in done.stdout


def test_wsi_launch_stops_cleanly_on_ctrl_c():
    launcher = subprocess.Popen([sys.executable, "-m", "wsi.cli", "launch"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=node_environment(),
                                preexec_fn=interruptible)
    for line in launcher.stdout:
        if "microscope ready" in line:
            break
    assert line.startswith("[microscope] ")
    launcher.send_signal(signal.SIGINT)
    rest, _ = launcher.communicate(timeout=30)
    assert launcher.returncode == 0, rest
    assert "wsi launch: stopping" in rest


def test_wsi_launch_fails_clearly_when_a_node_dies():
    done = run_cli("launch", "--autofocus-backend", "bogus", timeout_s=60)
    assert done.returncode == 1
    assert "unknown autofocus backend 'bogus'" in done.stdout
    assert "node process died: autofocus (exit code 2)" in done.stderr


def test_bad_launch_argument_is_a_usage_error():
    done = run_cli("launch", "--record", "maybe")
    assert done.returncode == 2
    assert "launch argument record='maybe' is not a boolean" in done.stderr
