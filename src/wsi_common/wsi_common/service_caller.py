"""Queries by ROS service that survive a lost answer.

A service's answer can be lost, not late: while a loaded machine is still discovering the client's reply
reader, the server gives up sending it (Fast DDS: "failed to send response (timeout)"), and the caller would
wait for nothing. A query (asking twice does no harm: a state, a parameter list, is-active) is therefore
asked again after ANSWER_WAIT_S without an answer. Requests that change something are not for this module.
"""
import threading
import time

import rclpy

ANSWER_WAIT_S = 5.0


def answered_by_another_thread(future, timeout_s: float) -> bool:
    """Whether `future`, completed by another thread's executor, is done within `timeout_s`."""
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    return done.wait(timeout_s)


def query(client, request, timeout_s: float, node=None, answer_wait_s: float = ANSWER_WAIT_S):
    """The answer of `client`'s service to `request`, asked again every `answer_wait_s` without one; None when
    the service is not there or nothing answered within `timeout_s`. `node`: spin it while waiting (a caller
    without an executor); None: the answer arrives on another thread's executor."""
    deadline = time.monotonic() + timeout_s
    if not client.wait_for_service(timeout_sec=timeout_s):
        return None
    while (remaining := deadline - time.monotonic()) > 0:
        future = client.call_async(request)
        wait_s = min(answer_wait_s, remaining)
        if node is None:
            answered = answered_by_another_thread(future, wait_s)
        else:
            rclpy.spin_until_future_complete(node, future, timeout_sec=wait_s)
            answered = future.done()
        if answered:
            return future.result()
        client.remove_pending_request(future)
    return None
