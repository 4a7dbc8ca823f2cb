"""Stage node: the MoveStage action server and the StageState publisher over a stage backend.

Every goal is accepted; one that cannot be run ends at once, aborted with its error code and the reason
(ERROR_INVALID_GOAL, ERROR_OUT_OF_LIMITS, ERROR_BUSY), so that the caller learns why.
"""
import math
import threading
import time

from rclpy.action import CancelResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from wsi_acquisition.stage import AXES, MoveGoalError, StageFault, StageLimitError, move_target
from wsi_common.params import declare_parameters
from wsi_common.topics import MOVE_STAGE, STAGE_STATE
from wsi_interfaces.action import MoveStage
from wsi_interfaces.msg import StageState

PARAMETERS = {
    "state_rate_hz": (10.0, "StageState publishing rate"),
    "feedback_rate_hz": (20.0, "MoveStage feedback rate"),
    "move_timeout_margin_s": (2.0, "a move that takes this much longer than expected fails"),
    "max_move_duration_s": (600.0, "a goal whose speed would make the move take longer than this is refused"),
}


class StageNode(Node):
    """`hardware_lock` is held during a move, so a scan and a manual move never drive the stage together."""

    def __init__(self, stage, hardware_lock: threading.Lock):
        super().__init__("stage")
        self.params = declare_parameters(self, PARAMETERS)
        self.stage = stage
        self._lock = hardware_lock
        group = ReentrantCallbackGroup()
        self._state_pub = STAGE_STATE.publisher(self)
        self.create_timer(1.0 / self.params["state_rate_hz"], self._publish_state, callback_group=group)
        self._server = MOVE_STAGE.server(self, self._execute, cancel_callback=lambda _: CancelResponse.ACCEPT,
                                         callback_group=group)

    def _target(self, goal) -> tuple[float, float, float]:
        return move_target(self.stage.limits, self.stage.position_um(), (goal.x_um, goal.y_um, goal.z_um),
                           goal.axes, goal.relative, goal.speed_um_s, self.params["max_move_duration_s"])

    def _result(self, goal_handle, code: int, message: str, started: float):
        result = MoveStage.Result(error_code=code, error_message=message,
                                  duration_s=time.monotonic() - started)
        result.x_um, result.y_um, result.z_um = self.stage.position_um()
        if code == MoveStage.Result.ERROR_NONE:
            goal_handle.succeed()
        elif code == MoveStage.Result.ERROR_CANCELED:
            goal_handle.canceled()
        else:
            self.get_logger().error(message)
            goal_handle.abort()
        return result

    def _execute(self, goal_handle):
        started = time.monotonic()
        try:
            # Judged before the lock, so a goal that cannot be run learns why even while the stage is busy;
            # the target is taken again under the lock, from the position the move will start at.
            self._target(goal_handle.request)
            if not self._lock.acquire(blocking=False):
                return self._result(goal_handle, MoveStage.Result.ERROR_BUSY, "the stage is busy: a scan or "
                                    "another move is running; send the goal again when it is idle", started)
            try:
                return self._move(goal_handle, self._target(goal_handle.request), started)
            finally:
                self._lock.release()
        except StageLimitError as error:
            return self._result(goal_handle, MoveStage.Result.ERROR_OUT_OF_LIMITS, str(error), started)
        except MoveGoalError as error:
            return self._result(goal_handle, MoveStage.Result.ERROR_INVALID_GOAL, str(error), started)

    def _move(self, goal_handle, target: tuple[float, float, float], started: float):
        try:
            expected_s = self.stage.start_move(*target, speed_um_s=goal_handle.request.speed_um_s)
        except StageFault as error:
            return self._result(goal_handle, MoveStage.Result.ERROR_FAULT, str(error), started)
        deadline = started + expected_s + self.params["move_timeout_margin_s"]
        period = 1.0 / self.params["feedback_rate_hz"]
        while self.stage.is_moving():
            if goal_handle.is_cancel_requested:
                self.stage.stop()
                return self._result(goal_handle, MoveStage.Result.ERROR_CANCELED, "canceled", started)
            if time.monotonic() > deadline:
                self.stage.stop()
                return self._result(goal_handle, MoveStage.Result.ERROR_TIMEOUT,
                                    f"move did not finish within {expected_s:.2f} s "
                                    f"+ {self.params['move_timeout_margin_s']} s", started)
            position = self.stage.position_um()
            goal_handle.publish_feedback(MoveStage.Feedback(
                x_um=position[0], y_um=position[1], z_um=position[2],
                distance_remaining_um=math.dist(position, target)))
            time.sleep(period)
        return self._result(goal_handle, MoveStage.Result.ERROR_NONE, "", started)

    def _publish_state(self):
        limits = self.stage.limits
        msg = StageState(moving=self.stage.is_moving(), connected=True, fault=getattr(self.stage, "fault", ""))
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.x_um, msg.y_um, msg.z_um = self.stage.position_um()
        for axis in AXES:
            low, high = limits.bounds(axis)
            setattr(msg, f"{axis}_min_um", low)
            setattr(msg, f"{axis}_max_um", high)
        self._state_pub.publish(msg)
