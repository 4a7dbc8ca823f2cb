"""Stopping the graph the way a terminal and `ros2 launch` stop it.

A Ctrl-C in the terminal sends SIGINT to the whole foreground process group: launch and every node it
started. Launch then sends each node still running a SIGINT of its own, SIGTERM 5 s later and SIGKILL
5 s after that. Here the graph's node processes run in one process group, as under launch, and get the
same signals while the stage is moving; every node must exit with code 0 within 2 s, print no
traceback, stop the move (cancelled, not abandoned), and leave the recorder's bag closed (summary,
index, metadata.yaml) and readable by other tools.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rclpy
from rcl_interfaces.srv import ListParameters
from rosbags.highlevel import AnyReader

from wsi.bag_reader import BagReader
from wsi.graph import GraphConfig, scan_graph
from wsi_common.action_caller import ActionCaller
from wsi_common.ros_env import node_environment
from wsi_common.service_caller import query
from wsi_common.supervisor import write_params_file
from wsi_common.topics import MOVE_STAGE
from wsi_interfaces.action import MoveStage

pytestmark = [pytest.mark.ros, pytest.mark.slow]

EXIT_WITHIN_S = 2.0
SECOND_SIGNAL_AFTER_S = 0.2     # launch's own signal to each node, after the terminal's
LAUNCH_SIGTERM_AFTER_S = 5.0
LAUNCH_SIGKILL_AFTER_S = 10.0


class Graph:
    """The graph's nodes as processes of one process group, each logging to a file."""

    def __init__(self, specs, directory: Path):
        self.specs, self.logs, self.processes = specs, {}, {}
        group = 0                       # the first process leads a new group; the others join it
        for spec in specs:
            self.logs[spec.name] = directory / f"{spec.name}.log"
            command = [sys.executable, "-m", spec.module, *spec.ros_arguments(write_params_file(spec, directory))]
            with self.logs[spec.name].open("w") as log:
                process = subprocess.Popen(command, env=node_environment(), stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, process_group=group)
            group = group or process.pid
            self.processes[spec.name] = process
        self.group = group

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def running(self) -> dict[str, subprocess.Popen]:
        return {name: p for name, p in self.processes.items() if p.poll() is None}

    def kill(self) -> None:
        for process in self.running().values():
            process.kill()
            process.wait()


@pytest.fixture
def graph(tmp_path):
    specs = scan_graph(GraphConfig(record=True, output_dir=str(tmp_path / "out")))
    started = Graph(specs, tmp_path)
    yield started
    started.kill()


def wait_until_spinning(graph: Graph, ros_node, timeout_s: float = 180.0) -> None:
    """Every node process answers a parameter service (so its executor spins), and the recorder
    records the stage state."""
    deadline = time.monotonic() + timeout_s
    for spec in graph.specs:
        client = ros_node.create_client(ListParameters, f"/{spec.name}/list_parameters")
        while not client.wait_for_service(timeout_sec=0.5):
            assert graph.processes[spec.name].poll() is None, f"{spec.name} exited:\n{graph.log(spec.name)}"
            assert time.monotonic() < deadline, f"{spec.name} did not start:\n{graph.log(spec.name)}"
        answer = query(client, ListParameters.Request(), max(1.0, deadline - time.monotonic()), node=ros_node)
        assert answer is not None, f"{spec.name} does not answer:\n{graph.log(spec.name)}"
        ros_node.destroy_client(client)
    while "recorder" not in {info.node_name for info in ros_node.get_subscriptions_info_by_topic("/stage/state")}:
        assert time.monotonic() < deadline, f"the recorder does not record /stage/state:\n{graph.log('recorder')}"
        time.sleep(0.1)
    time.sleep(1.0)     # stage states (10 Hz) reach the bag once discovery has matched the recorder


def stop_like_launch(graph: Graph, first_signal, to_group: bool) -> dict[str, tuple[int, float]]:
    """Send `first_signal` (to the process group, or to each node), the same signal to each node still
    running 0.2 s later, then launch's SIGTERM and SIGKILL; return {node: (exit code, seconds)}."""
    started = time.monotonic()
    if to_group:
        os.killpg(graph.group, first_signal)
    else:
        for process in graph.running().values():
            process.send_signal(first_signal)
    exits, escalations = {}, [(SECOND_SIGNAL_AFTER_S, first_signal), (LAUNCH_SIGTERM_AFTER_S, signal.SIGTERM),
                              (LAUNCH_SIGKILL_AFTER_S, signal.SIGKILL)]
    while len(exits) < len(graph.processes):
        elapsed = time.monotonic() - started
        if escalations and elapsed >= escalations[0][0]:
            for process in graph.running().values():
                process.send_signal(escalations[0][1])
            escalations.pop(0)
        for name, process in graph.processes.items():
            if name not in exits and process.poll() is not None:
                exits[name] = (process.returncode, round(time.monotonic() - started, 2))
        time.sleep(0.01)
    return exits


def recorded_counts(recorder_log: str) -> dict[str, int]:
    """{topic: messages} from the line the recorder prints when it has closed its bag."""
    match = re.search(r"\[recorder\] bag .* closed \((.*)\); lost or dropped: none;", recorder_log)
    assert match, f"the recorder did not report a closed bag with nothing lost:\n{recorder_log}"
    return {topic: int(count) for topic, count in (item.rsplit(": ", 1) for item in match.group(1).split(", "))}


def assert_bag_closed_and_readable(directory: Path, recorder_log: str) -> None:
    """Other tools read every message the recorder received, and stage states are among them (how many
    depends on how fast discovery matched the recorder on a loaded machine)."""
    [bag] = (directory / "bags").iterdir()
    assert (bag / "metadata.yaml").exists()
    topics = []
    with AnyReader([bag]) as reader:
        for connection, _, raw in reader.messages():
            reader.deserialize(raw, connection.msgtype)
            topics.append(connection.topic)
    received = {topic: count for topic, count in recorded_counts(recorder_log).items() if count}
    assert {topic: topics.count(topic) for topic in set(topics)} == received
    assert topics.count("/stage/state") >= 1
    assert len(list(BagReader(bag).messages())) == len(topics)   # complete: the file ends with its summary


@pytest.mark.parametrize("first_signal, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c in the terminal", "sigterm to each node"])
def test_every_node_stops_cleanly_on_repeated_signals(graph, ros_node, tmp_path, first_signal, to_group):
    wait_until_spinning(graph, ros_node)
    stage = ActionCaller(ros_node, MOVE_STAGE)
    stage.wait_for_server(timeout_s=30)
    moves = []
    # A move of several minutes: the goal is still executing when the signals arrive.
    stage.send_goal(MoveStage.Goal(x_um=1000.0, axes=MoveStage.Goal.AXES_X, relative=True, speed_um_s=5.0),
                    timeout_s=30, on_feedback=moves.append)
    while not moves:
        rclpy.spin_once(ros_node, timeout_sec=0.1)
    exits = stop_like_launch(graph, first_signal, to_group)
    logs = "\n".join(f"--- {name} (exit code, s: {exits[name]})\n{graph.log(name)}" for name in graph.processes)
    assert {name: code for name, (code, _) in exits.items()} == dict.fromkeys(graph.processes, 0), logs
    assert max(seconds for _, seconds in exits.values()) < EXIT_WITHIN_S, logs
    assert "Traceback" not in logs, logs
    assert "still running" not in graph.log("microscope"), logs     # the move was cancelled, not abandoned
    assert_bag_closed_and_readable(tmp_path / "out", graph.log("recorder"))
