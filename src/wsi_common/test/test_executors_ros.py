"""PoolExecutor: callbacks on a pool of threads, and a spin thread that waits while they are queued."""
import threading
import time

import pytest
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.task import Future
from std_msgs.msg import String

from wsi_common.executors import PoolExecutor

pytestmark = pytest.mark.ros

BUSY_CALLBACK_S = 0.01
MESSAGES = 20


class CountsPasses:
    """An executor class that counts its spin thread's passes for work."""

    def __init__(self, executor_class):
        outer = self
        self.passes = 0

        class Counting(executor_class):
            def wait_for_ready_callbacks(self, *args, **kwargs):
                outer.passes += 1
                return super().wait_for_ready_callbacks(*args, **kwargs)

        self.executor_class = Counting


def spin_in_thread(executor, node) -> None:
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()


def passes_for_messages_to_a_busy_subscription(ros_node, executor_class) -> tuple[int, list[str]]:
    """MESSAGES messages, BUSY_CALLBACK_S apart, to a subscription whose callback computes (holds the GIL)
    for BUSY_CALLBACK_S, on a two-thread pool."""
    counting = CountsPasses(executor_class)
    node = Node("busy_listener", context=ros_node.context)
    heard, all_heard = [], threading.Event()

    def busy(message):
        done = time.monotonic() + BUSY_CALLBACK_S
        while time.monotonic() < done:
            pass
        heard.append(message.data)
        if len(heard) == MESSAGES:
            all_heard.set()

    node.create_subscription(String, "pool_executor_test", busy, MESSAGES, callback_group=ReentrantCallbackGroup())
    publisher = ros_node.create_publisher(String, "pool_executor_test", MESSAGES)
    executor = counting.executor_class(num_threads=2, context=ros_node.context)
    spin_in_thread(executor, node)
    deadline = time.monotonic() + 10
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    for number in range(MESSAGES):
        publisher.publish(String(data=str(number)))
        time.sleep(BUSY_CALLBACK_S)
    assert all_heard.wait(10), f"heard only {heard}"
    executor.shutdown()
    node.destroy_node()
    ros_node.destroy_publisher(publisher)
    return counting.passes, heard


def test_the_spin_thread_waits_while_callbacks_are_queued(ros_node):
    passes, heard = passes_for_messages_to_a_busy_subscription(ros_node, PoolExecutor)
    assert sorted(heard, key=int) == [str(number) for number in range(MESSAGES)]
    # A message wakes the spin thread when it arrives, when a thread has taken it and when its callback ends.
    assert passes < 5 * MESSAGES, f"{passes} passes for {MESSAGES} messages"


def test_rclpys_multi_threaded_executor_spins_meanwhile(ros_node):
    """Why PoolExecutor exists: when this fails, rclpy's executor has been fixed and can be used again."""
    passes, _ = passes_for_messages_to_a_busy_subscription(ros_node, MultiThreadedExecutor)
    assert passes > 20 * MESSAGES, f"{passes} passes for {MESSAGES} messages"


def test_callbacks_run_side_by_side_on_the_pool(ros_node):
    node = Node("two_timers", context=ros_node.context)
    both_running = threading.Barrier(2, timeout=5)
    met = []

    def meet():
        both_running.wait()     # breaks (raises in the callback) unless the other callback runs meanwhile
        met.append(threading.current_thread().name)

    group = ReentrantCallbackGroup()
    timers = [node.create_timer(0.05, meet, callback_group=group) for _ in range(2)]
    executor = PoolExecutor(num_threads=2, context=ros_node.context, name="side_by_side")
    spin_in_thread(executor, node)
    deadline = time.monotonic() + 10
    while len(met) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    for timer in timers:
        timer.cancel()
    executor.shutdown()
    node.destroy_node()
    assert len(met) >= 2 and not both_running.broken
    assert all(name.startswith("side_by_side") for name in met)


def test_a_coroutine_callback_resumes_when_the_future_it_awaits_is_done(ros_node):
    node = Node("awaiting", context=ros_node.context)
    answer, got = Future(), []

    async def wait_for_answer():
        timer.cancel()
        got.append(await answer)

    timer = node.create_timer(0.01, wait_for_answer)
    executor = PoolExecutor(num_threads=2, context=ros_node.context)
    spin_in_thread(executor, node)
    time.sleep(0.3)
    threading.Thread(target=answer.set_result, args=(42,)).start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    executor.shutdown()
    node.destroy_node()
    assert got == [42]


def test_spin_once_returns_after_its_timeout_when_nothing_is_ready(ros_node):
    executor = PoolExecutor(num_threads=1, context=ros_node.context)
    node = Node("idle", context=ros_node.context)
    executor.add_node(node)
    started = time.monotonic()
    executor.spin_once(timeout_sec=0.2)
    waited = time.monotonic() - started
    executor.shutdown()
    node.destroy_node()
    assert 0.15 < waited < 2.0
