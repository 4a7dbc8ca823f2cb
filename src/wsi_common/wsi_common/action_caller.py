"""Blocking calls of a WSI action (wsi_common.topics) for tests, which look at every feedback message and at raw
goal statuses; the node is spun while waiting. Applications drive a scanner through wsi.client, which waits for
its servers with the same wait_for_action_server."""
import time
from dataclasses import dataclass, field

import rclpy

from wsi_common.topics import Action

# Discovery is not symmetric: a goal sent as soon as the server is seen can go unanswered, because the server
# has not yet matched the client's reply readers (Fast DDS: "failed to send response (timeout)"; seen in CI).
DISCOVERY_SETTLE_S = 0.5


def wait_for_action_server(node, client, timeout_s: float, settle_s: float = DISCOVERY_SETTLE_S) -> bool:
    """Spin `node` until the server of `client` (an rclpy ActionClient) is discovered, then `settle_s` more;
    False if it was not discovered within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not client.server_is_ready():
        if time.monotonic() > deadline:
            return False
        rclpy.spin_once(node, timeout_sec=0.1)
    settled = time.monotonic() + settle_s
    while time.monotonic() < settled:
        rclpy.spin_once(node, timeout_sec=0.05)
    return True


class ActionCallError(RuntimeError):
    """An action server could not be reached, refused the goal, or did not answer in time."""


@dataclass
class ActionOutcome:
    status: int                    # action_msgs/GoalStatus.STATUS_*
    result: object
    feedback: list = field(default_factory=list)


class ActionCaller:
    def __init__(self, node, action: Action):
        self.node = node
        self.name = action.name
        self.client = action.client(node)

    def _spin_until(self, future, timeout_s: float, what: str):
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout_s)
        if not future.done():
            raise ActionCallError(f"{self.name}: no answer to {what} within {timeout_s:.0f} s")
        return future.result()

    def wait_for_server(self, timeout_s: float) -> None:
        if not wait_for_action_server(self.node, self.client, timeout_s):
            raise ActionCallError(f"action server {self.name!r} not available after {timeout_s:.0f} s")

    def send_goal(self, goal, timeout_s: float, on_feedback=None):
        """Send a goal and return its handle once accepted; raise ActionCallError if rejected."""
        feedback_cb = None if on_feedback is None else (lambda msg: on_feedback(msg.feedback))
        handle = self._spin_until(self.client.send_goal_async(goal, feedback_callback=feedback_cb),
                                  timeout_s, "the goal")
        if not handle.accepted:
            raise ActionCallError(f"goal rejected by {self.name!r} (the server's log says why)")
        return handle

    def wait_for_result(self, handle, timeout_s: float) -> tuple[int, object]:
        response = self._spin_until(handle.get_result_async(), timeout_s, "the result request")
        return response.status, response.result

    def call(self, goal, timeout_s: float) -> ActionOutcome:
        """Send a goal, collect its feedback, and return the final status and result."""
        feedback = []
        handle = self.send_goal(goal, timeout_s, on_feedback=feedback.append)
        status, result = self.wait_for_result(handle, timeout_s)
        return ActionOutcome(status, result, feedback)

    def cancel(self, handle, timeout_s: float = 10.0) -> None:
        self._spin_until(handle.cancel_goal_async(), timeout_s, "the cancel request")
