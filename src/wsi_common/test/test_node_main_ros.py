"""A node process that stops cleanly leaves nothing of its DDS participant behind: Fast DDS's shared-memory
segments in /dev/shm (128 MiB each with the large-image profile) outlive a process that exits without
deleting its participant, and fill the machine's memory one stopped node at a time; the supervisor frees those
a killed node leaves. One that cannot stop says where it is stuck and exits before launch would kill it."""
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wsi_common.fastdds_shm import ZOMBIE_MIN_AGE_S, fast_dds_segments, participant_segments, remove_zombie_segments
from wsi_common.node_main import STOP_DEADLINE_S
from wsi_common.ros_env import node_environment
from wsi_common.supervisor import NodeSpec, Supervisor

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


def test_the_supervisor_frees_the_shared_memory_of_a_killed_node_and_keeps_a_living_ones(tmp_path):
    """A node killed (by the out-of-memory killer, say) leaves its participant's segment; the next graph the
    supervisor starts removes it, and says so, while a node still running elsewhere keeps its own."""
    (tmp_path / "stopping_node.py").write_text(NODE_WITH_ACTIONS)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    existing = fast_dds_segments()
    graphs, segments = {}, {}
    try:
        # One graph after the other: a participant also maps the segments of the participants it discovers, so the
        # living node's own segments are told apart only before the other node starts.
        for name in ("living", "killed"):
            log = io.StringIO()
            graphs[name] = Supervisor([NodeSpec(name=name, package="p", executable="e", module="stopping_node")],
                                      env=env, log=log).start()
            process = graphs[name].processes[name]
            deadline = time.monotonic() + 60
            while not (owned := participant_segments(process.pid, existing)):
                assert process.poll() is None and time.monotonic() < deadline, log.getvalue()
                time.sleep(0.2)
            segments[name] = owned
            existing |= owned
        os.killpg(graphs["killed"].processes["killed"].pid, signal.SIGKILL)
        graphs["killed"].processes["killed"].wait()
        assert all(Path(segment).exists() for segment in segments["killed"])
        time.sleep(ZOMBIE_MIN_AGE_S)
        log = io.StringIO()
        Supervisor([], log=log).start().stop()
        assert re.search(r"^wsi: removed \d+ Fast DDS shared-memory segment", log.getvalue(), re.MULTILINE)
        assert not any(Path(segment).exists() for segment in segments["killed"])
        assert all(Path(segment).exists() for segment in segments["living"])
    finally:
        codes = {name: graph.stop()[name] for name, graph in graphs.items()}
    assert codes == {"living": 0, "killed": -signal.SIGKILL}


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


# Ends its ROS use when a file appears: with end_ros, or with rclpy's own destroy_node and shutdown.
PARTICIPANT_SUBJECT = """
import sys
import time
from pathlib import Path

import rclpy
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from std_msgs.msg import Empty

from wsi_common.node_main import end_ros

rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
node = Node("teardown_subject")
node.create_subscription(Empty, "/teardown_probe", lambda message: None, 10)
print("ready", flush=True)
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
if sys.argv[2] == "end_ros":
    end_ros([node], "subject")
else:
    node.destroy_node()
    rclpy.try_shutdown()
print("stopped", flush=True)
"""
JOINING_PARTICIPANT = """
import time
import rclpy
rclpy.init()
rclpy.create_node("joining")
time.sleep(60)
"""


class Gdb:
    """gdb attached to a process in non-stop mode: a thread that hits a breakpoint waits, the others run."""

    def __init__(self, pid: int):
        self.process = subprocess.Popen(["gdb", "-q", "-nx"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.output = queue.Queue()
        self.transcript = []
        threading.Thread(target=self._read, daemon=True).start()
        threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
        self.send("set pagination off", "set confirm off", "set non-stop on", f"attach {pid}")
        # Each thread but the main one is reported as it stops; one resumed before its report stays stopped.
        for _ in range(threads - 1):
            self.wait_for(" stopped.")

    def _read(self) -> None:
        for line in self.process.stdout:
            self.transcript.append(line)
            self.output.put(line)

    def send(self, *commands: str) -> None:
        self.process.stdin.write("".join(f"{command}\n" for command in commands))
        self.process.stdin.flush()

    def wait_for(self, text: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.output.get(timeout=0.2)
            except queue.Empty:
                continue
            if text in line:
                return line
        raise AssertionError(f"gdb never printed {text!r}; it printed:\n{''.join(self.transcript[-40:])}")

    def settle(self) -> None:
        """Wait until gdb has read every command sent so far (an attach reports each thread it stopped)."""
        self.send("echo settled\\n")
        self.wait_for("settled")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.mark.parametrize("teardown, stops", [("end_ros", True), ("rclpy", False)],
                         ids=["end_ros stops", "rclpy alone spins forever"])
def test_a_participant_deleted_while_a_discovery_callback_runs(tmp_path, teardown, stops):
    """Fast DDS 3.2.3 livelocks when a discovery callback runs as the process detaches its participant's listener
    (wsi_common.fastdds_teardown). gdb makes that moment certain: it stops the main thread where the listener is
    about to be detached (end_ros's own call; rmw's, within rclpy's node destruction), then a receive thread in
    rmw's discovery callback (another participant joining), lets the main thread run 2 s while the callback
    waits, then lets it end. end_ros must stop; rclpy alone must not, or the test did not make the moment happen
    (and a Fast DDS without the bug would let end_ros's workaround go)."""
    (tmp_path / "subject.py").write_text(PARTICIPANT_SUBJECT)
    trigger = tmp_path / "stop"
    subject = subprocess.Popen([sys.executable, str(tmp_path / "subject.py"), str(trigger), teardown],
                               env=node_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gdb = joining = None
    try:
        assert subject.stdout.readline().strip() == "ready", subject.stdout.read()
        gdb = Gdb(subject.pid)
        gdb.send("break eprosima::fastdds::dds::DomainParticipant::set_listener",
                 "break rmw_fastrtps_shared_cpp::destroy_participant")
        gdb.settle()
        gdb.send("continue -a &")
        gdb.wait_for("Continuing.")
        trigger.touch()
        assert "Thread 1 " in gdb.wait_for("hit Breakpoint")
        gdb.send("delete", "break ParticipantListener::on_participant_discovery",
                 "break ParticipantListener::on_data_reader_discovery",
                 "break ParticipantListener::on_data_writer_discovery")
        gdb.settle()
        joining = subprocess.Popen([sys.executable, "-c", JOINING_PARTICIPANT], env=node_environment())
        assert "ParticipantListener::on_" in gdb.wait_for("hit Breakpoint")
        gdb.send("thread 1", "continue &")
        time.sleep(2.0)
        gdb.send("delete", "continue -a &", "detach")
        gdb.settle()
        try:
            subject.wait(timeout=10)
        except subprocess.TimeoutExpired:
            subject.kill()
            subject.wait()
            remove_zombie_segments()        # a killed participant's shared memory stays unless removed
        output = subject.stdout.read()
    finally:
        for process in (subject, joining):
            if process is not None:
                process.kill()
        if gdb is not None:
            gdb.close()
    if stops:
        assert subject.returncode == 0 and "stopped" in output and "not detached" not in output, output
    else:
        assert subject.returncode == -signal.SIGKILL, output


def end_ros_in_a_script(tmp_path: Path, before: str, after_init: str) -> subprocess.CompletedProcess:
    """Run a script that makes a node, ends ROS with end_ros and prints 'ended'; `before` runs after the imports,
    `after_init` once the node exists."""
    script = tmp_path / "end_ros_script.py"
    script.write_text(f"import rclpy\nfrom rclpy.node import Node\nfrom wsi_common.node_main import end_ros\n"
                      f"{before}\nrclpy.init()\nnode = Node('end_ros_script')\n{after_init}\n"
                      f"end_ros([node], 'script')\nprint('ended', flush=True)\n")
    return subprocess.run([sys.executable, str(script)], env=node_environment(), capture_output=True, text=True,
                          timeout=60)


def test_end_ros_after_the_context_was_shut_down(tmp_path):
    """rclpy's own Ctrl-C handler shuts the context down, which destroys its nodes; a script's `finally: end_ros`
    then has no participant to detach (reading the destroyed node's handle would crash the process)."""
    done = end_ros_in_a_script(tmp_path, "", "rclpy.shutdown()")
    assert (done.returncode, done.stdout.strip()) == (0, "ended"), done.stderr


def test_end_ros_says_so_when_it_cannot_detach_and_stops_all_the_same(tmp_path):
    """Another Fast DDS build (ROS 2 from apt on a Jetson) may lack the symbol the detach calls."""
    done = end_ros_in_a_script(tmp_path, "from wsi_common import fastdds_teardown\nfastdds_teardown._SET_LISTENER = "
                                         "('libfastdds.so.3.2', 'set_listener_of_another_build')", "")
    assert (done.returncode, done.stdout.strip()) == (0, "ended"), done.stderr
    assert "script: DDS discovery not detached before the teardown, which may hang: set_listener_of_another_build " \
           "is not in the loaded libfastdds.so.3.2" in done.stderr, done.stderr
