"""Process entry point shared by every WSI node: init, spin, clean shutdown on SIGINT or SIGTERM.

A node is asked to stop more than once. Under `ros2 launch`, a Ctrl-C in the terminal sends SIGINT to
the whole process group (launch and every node), launch then sends each node a SIGINT of its own, and
SIGTERM 5 s later if it is still running. Whichever of these signals arrives first, and whenever the
others arrive, the node stops the same way: the executor stops, goals being executed are cancelled
(a scan keeps the tiles it captured, as on a client's cancel), the callbacks still running finish,
the nodes are destroyed (a recorder closes its bag), the context is shut down, exit code 0. A process that
has not exited `STOP_DEADLINE_S` after the first signal prints every thread's stack and exits with code 1.
"""
import faulthandler
import os
import signal
import socket
import sys
import threading

import rclpy
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient, ActionServer
from rclpy.executors import SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future

from wsi_common.fastdds_teardown import DetachError, detach_discovery_listener

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long callbacks still running after the stop signal may take to finish (a cancelled scan ends
# after its current tile). Beyond it the process exits without them: launch escalates to SIGTERM at
# 5 s and SIGKILL at 10 s, and a node should be gone well before.
CALLBACK_GRACE_S = 1.5
# A process still running this long after the first stop signal is stuck (nodes stop in well under 2 s; a
# recorder with a full write queue on a slow disk may take seconds): it prints every thread's stack, so the hang
# can be found, and exits with code 1 before launch's SIGKILL would end it without a word.
STOP_DEADLINE_S = 8.0


class NodeConfigurationError(ValueError):
    """A node cannot start with the parameters it was given."""


def _python_handler(signum, frame) -> None:
    """Python's handler of the stop signals does nothing: `StopSignals` acts on them.

    A handler must be installed (Python writes to the wakeup fd only for signals it handles), and it
    must not be Python's default, which raises KeyboardInterrupt at whatever line the main thread is
    on (in the middle of closing a bag), nor SIGTERM's, which ends the process at once."""


class StopSignals:
    """The first SIGINT or SIGTERM completes `future`; later ones change nothing.

    Python's C-level signal handler writes each signal's number to the wakeup fd the moment the
    signal arrives, even while the main thread is blocked in the executor's wait; a thread of this
    class reads it and completes the future, whose done callback wakes the executor.

    rclpy's own signal handlers are not used: they shut the context down from their own thread while
    callbacks may still be running (whose publishers then fail), and they wake the executor before
    that shutdown, so a spin can miss it and wait on until the next message or timer.
    """

    def __init__(self):
        self.future = Future()
        self._receiver, sender = socket.socketpair()
        sender.setblocking(False)           # set_wakeup_fd requires it: a signal handler never blocks
        self._sender = sender
        for signum in STOP_SIGNALS:
            signal.signal(signum, _python_handler)
        signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._wait, name="stop-signals", daemon=True).start()

    def _wait(self) -> None:
        while not any(signum in STOP_SIGNALS for signum in self._receiver.recv(64)):
            pass
        faulthandler.dump_traceback_later(STOP_DEADLINE_S, exit=True)
        self.future.set_result(True)


def cancel_executing_goals(nodes) -> None:
    """Mark every goal the nodes' action servers are executing as cancel-requested, the state change
    rclpy's action server makes when a client cancels a goal (every WSI action server accepts
    cancels): a scan stops after its current tile and keeps what it captured, a stage move stops."""
    for node in nodes:
        for server in node.waitables:
            if not isinstance(server, ActionServer):
                continue
            for goal in list(server._goal_handles.values()):
                if goal.status == GoalStatus.STATUS_EXECUTING:
                    try:
                        goal._update_state(_rclpy.GoalEvent.CANCEL_GOAL)
                    except _rclpy.RCLError:
                        pass    # the goal ended in the meantime: nothing left to cancel


def destroy_node(node) -> None:
    """Destroy the node with its action servers and clients and, for a lifecycle node, its state machine.
    Node.destroy_node leaves those, and they keep the node, and with it the process's DDS participant, alive:
    a process that then exits (os._exit, below) leaves the participant's shared-memory segments in /dev/shm,
    128 MiB each with the large-image profile."""
    for action in [w for w in node.waitables if isinstance(w, (ActionServer, ActionClient))]:
        action.destroy()
    # rclpy's LifecycleNode holds its rcl state machine, which holds the node's handle, with no public way to let go.
    state_machine = getattr(node, "_state_machine", None)
    node.destroy_node()
    if state_machine is not None:
        state_machine.destroy_when_not_in_use()


def end_ros(nodes, name: str) -> None:
    """The process's last use of ROS: destroy `nodes` (as destroy_node does) and shut the context down. The DDS
    participant goes with the last node; its discovery listener is detached first (wsi_common.fastdds_teardown)."""
    if nodes:
        try:
            detach_discovery_listener(nodes[0])
        except DetachError as error:
            print(f"{name}: DDS discovery not detached before the teardown, which may hang: {error}",
                  file=sys.stderr)
    for node in reversed(nodes):
        destroy_node(node)
    rclpy.try_shutdown()


def spin_nodes(make_nodes, name: str, args=None, make_executor=SingleThreadedExecutor) -> None:
    """Run the nodes `make_nodes()` creates until SIGINT/SIGTERM; exit 0, or 2 with a one-line reason
    if they cannot start. A stop signal that arrives while the nodes are created stops them as soon
    as they exist."""
    stop = StopSignals()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    exit_code = 0
    nodes = []
    executor = None
    try:
        nodes = make_nodes()
        executor = make_executor()
        for node in nodes:
            executor.add_node(node)
        executor.spin_until_future_complete(stop.future)
    except NodeConfigurationError as error:
        print(f"{name}: cannot start: {error}", file=sys.stderr)
        exit_code = 2
    finally:
        callbacks_done = True
        if executor is not None:
            cancel_executing_goals(nodes)
            # A PoolExecutor's shutdown waits for the callbacks still running on its threads.
            stopping = threading.Thread(target=executor.shutdown, name="executor-shutdown", daemon=True)
            stopping.start()
            stopping.join(CALLBACK_GRACE_S)
            callbacks_done = not stopping.is_alive()
        if callbacks_done:
            end_ros(nodes, name)
        else:
            # Destroying a node under a running callback would make that callback fail with a traceback.
            print(f"{name}: a callback was still running {CALLBACK_GRACE_S} s after the stop signal "
                  f"(waiting on another node?); stopping without it", file=sys.stderr)
    # Everything the process holds is closed (or abandoned, above). Python's own teardown would only
    # free memory, and it is slow: full garbage collections over every module's objects take 0.5-1 s
    # once torch is imported, several seconds when all nodes stop at once on two cores.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def spin_node(node_class, args=None, make_executor=SingleThreadedExecutor) -> None:
    """Run one node of `node_class` (see spin_nodes)."""
    spin_nodes(lambda: [node_class()], node_class.__name__, args, make_executor)
