"""Python client of a WSI scanner, for lab automation: start a task, poll it, read its feedback, cancel it,
read its result (the style of nav2_simple_commander's BasicNavigator).

    rclpy.init()
    scanner = ScannerClient(namespace="scanner_a")
    scanner.scan(scan_goal("case-0001", region_um=(40_000, 11_000, 3_000, 3_000), output_formats=["ome-tiff"]))
    while not scanner.is_task_complete():
        feedback = scanner.feedback()            # the latest ScanSlide.Feedback, or None
    outcome = scanner.result()                   # TaskOutcome: status, error_code, error_message, result
    if outcome.status is TaskResult.SUCCEEDED:
        print(outcome.result.output_uris)
    end_ros([scanner], "robot")                  # wsi_common.node_main: destroy, shut down, no DDS hang

`scan`, `export` and `move_stage` send a goal and return once the scanner has answered it: True when it
runs it. A goal the scanner cannot run ends at once FAILED, with its `error_code` (ERROR_INVALID_GOAL,
ERROR_BUSY, ...) and the reason in `error_message`; a server that rejects goals outright (older servers
did) gives REJECTED; a task whose server leaves the graph before it ends (the scanner's process stopped, its
microscope went down) ends FAILED. A client follows one task at a time; one client per scanner (its
namespace) or per task that runs in parallel. The scanner's actions exist only while its microscope is active, so a server
not found within `server_timeout_s` raises ScannerUnavailable, naming why as far as the scanner's
bring-up manager knows.
"""
import enum
import time
from dataclasses import dataclass

import rclpy
from action_msgs.msg import GoalStatus
from rclpy.node import Node
from std_srvs.srv import Trigger

from wsi_common.action_caller import DISCOVERY_SETTLE_S, wait_for_action_server
from wsi_common.service_caller import query
from wsi_common.topics import EXPORT_SLIDE, MOVE_STAGE, SCAN_SLIDE
from wsi_interfaces.action import ExportSlide, MoveStage, ScanSlide

ACTIONS = {action.action_type: action for action in (SCAN_SLIDE, EXPORT_SLIDE, MOVE_STAGE)}
# A server that has been out of the graph this long while its task runs is taken as gone (its process
# stopped, or its microscope went down), not as a discovery hiccup; the task then ends FAILED.
SERVER_GONE_S = 2.0


class TaskResult(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"           # the scanner ended the task early: error_code and error_message say why
    CANCELED = "canceled"
    REJECTED = "rejected"       # the server refused the goal without running it


TASK_RESULTS = {GoalStatus.STATUS_SUCCEEDED: TaskResult.SUCCEEDED, GoalStatus.STATUS_ABORTED: TaskResult.FAILED,
                GoalStatus.STATUS_CANCELED: TaskResult.CANCELED}


@dataclass(frozen=True)
class TaskOutcome:
    status: TaskResult
    error_code: int             # the action's ERROR_*; ERROR_NONE (0) when it succeeded or there was no result
    error_message: str
    result: object = None       # the action's Result message (scan: manifest_uri, output_uris, ...); None if rejected


class ScannerUnavailable(RuntimeError):
    """The scanner's action server was not found, or did not answer, in time."""


def scan_goal(scan_id: str = "", region_um: tuple[float, float, float, float] | None = None,
              objective_magnification: float = 0.0, focus_strategy: int = ScanSlide.Goal.FOCUS_MAP_INLINE,
              output_formats=(), skip_empty_tiles: bool = True, calibrate_autofocus: bool = False,
              calibration_only: bool = False, focus_points: int = 0) -> ScanSlide.Goal:
    """A ScanSlide goal: the region (x, y, width, height) in stage µm, or the tissue the overview photo shows
    when `region_um` is None. 0 for the objective: the scanner's default one; 0 focus points: as many as the
    region needs."""
    goal = ScanSlide.Goal(scan_id=scan_id, auto_detect_tissue=region_um is None,
                          objective_magnification=float(objective_magnification), focus_strategy=focus_strategy,
                          focus_points=focus_points, skip_empty_tiles=skip_empty_tiles,
                          output_formats=list(output_formats), calibrate_autofocus=calibrate_autofocus,
                          calibration_only=calibration_only)
    if region_um is not None:
        goal.region_x_um, goal.region_y_um, goal.region_width_um, goal.region_height_um = map(float, region_um)
    return goal


class ScannerClient(Node):
    """A node that drives one scanner's actions; the caller spins nothing itself (the methods do)."""

    def __init__(self, namespace: str = "", node_name: str = "wsi_client", server_timeout_s: float = 60.0):
        super().__init__(node_name, namespace=namespace)
        self.server_timeout_s = server_timeout_s
        self._actions = {action_type: action.client(self) for action_type, action in ACTIONS.items()}
        self._settled: set = set()
        self._is_active = self.create_client(Trigger, "lifecycle_manager/is_active")
        self._task = ""
        self._action = None
        self._server_missing_since: float | None = None
        self._goal_handle = None
        self._result_future = None
        self._feedback = None
        self._outcome: TaskOutcome | None = None

    # -- tasks ---------------------------------------------------------------------------------
    def scan(self, goal: ScanSlide.Goal) -> bool:
        return self._send(ScanSlide, goal)

    def export(self, goal: ExportSlide.Goal) -> bool:
        return self._send(ExportSlide, goal)

    def move_stage(self, x_um: float, y_um: float, z_um: float, relative: bool = False,
                   axes: int = MoveStage.Goal.AXES_XYZ, speed_um_s: float = 0.0) -> bool:
        """Move to (x, y, z) µm, or by it with `relative`; `axes` selects which move; speed 0: the stage's."""
        return self._send(MoveStage, MoveStage.Goal(x_um=float(x_um), y_um=float(y_um), z_um=float(z_um),
                                                    relative=relative, axes=axes, speed_um_s=float(speed_um_s)))

    def is_task_complete(self) -> bool:
        """Spin briefly (feedback and the result arrive while spinning); True once the task has ended."""
        if self._result_future is None:
            return True
        rclpy.spin_until_future_complete(self, self._result_future, timeout_sec=0.1)
        if not self._result_future.done() and self._server_gone():
            self._outcome = TaskOutcome(TaskResult.FAILED, 0, f"{self._task}: the server left before the task "
                                        "ended (its process stopped, or the microscope went down)")
            self._result_future = None
            return True
        return self._result_future.done()

    def feedback(self):
        """The latest feedback of the task (ScanSlide/ExportSlide/MoveStage.Feedback), None before the first."""
        return self._feedback

    def cancel(self) -> None:
        """Ask the scanner to cancel the task (a scan stops after its current tile and keeps what it captured);
        it ends CANCELED, or otherwise if it was already ending. Poll is_task_complete for the end."""
        if self._result_future is None or self._result_future.done():
            return
        future = self._goal_handle.cancel_goal_async()
        rclpy.spin_until_future_complete(self, future, timeout_sec=self.server_timeout_s)
        if not future.done():
            raise ScannerUnavailable(f"{self._task}: no answer to the cancel request within "
                                     f"{self.server_timeout_s:g} s")

    def result(self) -> TaskOutcome:
        """How the task ended; raises RuntimeError while it runs (is_task_complete says when it has ended)."""
        if self._outcome is None:
            if self._result_future is None or not self._result_future.done():
                raise RuntimeError(f"no task has ended: {self._task or 'none was sent'}"
                                   f"{' is still running' if self._task else ''}")
            response = self._result_future.result()
            result, message = response.result, response.result.error_message
            if response.status not in TASK_RESULTS:
                message = f"{self._task} ended with goal status {response.status} (the server may have stopped)"
            self._outcome = TaskOutcome(TASK_RESULTS.get(response.status, TaskResult.FAILED), result.error_code,
                                        message, result)
        return self._outcome

    # -- sending -------------------------------------------------------------------------------
    def _send(self, action, goal) -> bool:
        if self._result_future is not None and not self._result_future.done():
            raise RuntimeError(f"{self._task} is still running: cancel it, or wait until is_task_complete()")
        client = self._actions[action]
        self._wait_for_server(action, client)
        self._task, self._action, self._goal_handle, self._result_future = self._name(action), action, None, None
        self._server_missing_since = None
        self._feedback, self._outcome = None, None
        future = client.send_goal_async(goal, feedback_callback=self._on_feedback)
        rclpy.spin_until_future_complete(self, future, timeout_sec=self.server_timeout_s)
        if not future.done():
            raise ScannerUnavailable(f"{self._task}: no answer to the goal within {self.server_timeout_s:g} s")
        handle = future.result()
        if not handle.accepted:
            self._outcome = TaskOutcome(TaskResult.REJECTED, 0, f"{self._task} rejected the goal without running "
                                        "it; the server's log says why")
            return False
        self._goal_handle, self._result_future = handle, handle.get_result_async()
        return True

    def _server_gone(self) -> bool:
        if self._actions[self._action].server_is_ready():
            self._server_missing_since = None
            return False
        if self._server_missing_since is None:
            self._server_missing_since = time.monotonic()
        return time.monotonic() - self._server_missing_since > SERVER_GONE_S

    def _on_feedback(self, message) -> None:
        self._feedback = message.feedback

    def _wait_for_server(self, action, client) -> None:
        """The first wait for a server lets discovery settle; later ones only check that it is still there."""
        settle_s = 0.0 if action in self._settled else DISCOVERY_SETTLE_S
        if not wait_for_action_server(self, client, self.server_timeout_s, settle_s):
            self._settled.discard(action)
            raise ScannerUnavailable(f"no {self._name(action)} action server after {self.server_timeout_s:g} s: "
                                     f"{self._why_unavailable()}")
        self._settled.add(action)

    def _name(self, action) -> str:
        """The action's name as the scanner offers it (in this client's namespace)."""
        return f"{self.get_namespace().rstrip('/')}/{ACTIONS[action].name}".lstrip("/")

    def _why_unavailable(self) -> str:
        """The bring-up manager's word on the scanner's state, where one answers."""
        if not self._is_active.wait_for_service(timeout_sec=2.0):
            return "no scanner answers here either (is its graph running, with this ROS_DOMAIN_ID and namespace?)"
        answer = query(self._is_active, Trigger.Request(), timeout_s=10.0, node=self)
        if answer is None:
            return "its lifecycle manager does not answer"
        return f"the scanner is up ({answer.message}) but does not offer this action" if answer.success \
            else f"the scanner is not active: {answer.message}"
