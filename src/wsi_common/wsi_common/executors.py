"""An rclpy executor that runs callbacks on a pool of threads and waits while they are queued for one.

rclpy 9's MultiThreadedExecutor hands a ready callback to its pool and looks for work again at once. Until a pool
thread has taken a subscription's message, that look returns at once, for two reasons: the queued callback is
still ready work to it, so it queues it again (ros2/rclpy#1452; fixed by #1547, after the Kilted wheels), and the
message keeps the DDS wait returning with nothing ready (the subscription is out of the wait set, but its QoS
event handlers attach the same reader). Every pass rebuilds the wait set of all the process's entities in
Python while holding the GIL the pool thread needs to start the callback. In the pipeline bench the microscope
process's spin thread made about 60 passes per tile and took 13 ms of CPU per tile (the graph's whole CPU per
tile was 131-139 ms); with this executor 1.6 ms (graph 100 ms).
"""
import threading
from concurrent.futures import Future as PoolFuture
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from rclpy.executors import ConditionReachedException, Executor, ExternalShutdownException, ShutdownException, \
    TimeoutException
from rclpy.task import Task

# The longest the spin thread waits for a queued callback to start before it looks for other work again (a stop,
# a timeout of spin_once).
QUEUED_WAIT_S = 0.05
_NO_WORK = (ConditionReachedException, ExternalShutdownException, ShutdownException, TimeoutException)


class PoolExecutor(Executor):
    """Runs callbacks in a pool of `num_threads` threads, as rclpy's MultiThreadedExecutor does; a callback it
    finds ready again while it is still queued for a thread is not queued again: the spin thread waits for
    that callback to start. As there, a callback's exception stays in its task (rclpy prints it when the task
    is collected)."""

    def __init__(self, num_threads: int, *, context=None, name: str = "executor"):
        super().__init__(context=context)
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix=name)
        self._queued: set[Task] = set()
        self._queued_changed = threading.Condition()
        self._runs: list[PoolFuture] = []

    def _spin_once_impl(self, timeout_sec=None, wait_condition: Callable[[], bool] = lambda: False) -> None:
        # The same arguments resume the same generator of ready work, so its timeout stays the first call's.
        while True:
            try:
                task, _, _ = self.wait_for_ready_callbacks(timeout_sec, None, wait_condition)
            except _NO_WORK:
                return
            with self._queued_changed:
                if task not in self._queued:
                    self._queued.add(task)
                    break
                # Until a thread takes a subscription's message, the message keeps the DDS wait returning at
                # once (the reader's condition is attached for the subscription's QoS events), so passing
                # again would spin: wait for a thread to start the task instead.
                self._queued_changed.wait_for(lambda: task not in self._queued or self._is_shutdown,
                                              timeout=QUEUED_WAIT_S)
        self._runs.append(self._pool.submit(self._run, task))
        # What fails here is _run itself, not a callback (see the class): raised from spin, as rclpy does.
        for run in [r for r in self._runs if r.done()]:
            self._runs.remove(run)
            run.result()

    def _run(self, task: Task) -> None:
        with self._queued_changed:
            self._queued.discard(task)
            self._queued_changed.notify_all()
        task()
        if not task.done():
            # A coroutine waiting for a future is resumed by the executor's next pass: make it come.
            self.wake()

    def spin_once(self, timeout_sec: float | None = None) -> None:
        self._spin_once_impl(timeout_sec)

    def _spin_once_until_future_complete(self, future, timeout_sec=None) -> None:
        self._spin_once_impl(timeout_sec, future.done)

    def spin_once_until_future_complete(self, future, timeout_sec=None) -> None:
        future.add_done_callback(lambda _: self.wake())
        self._spin_once_until_future_complete(future, timeout_sec)

    def shutdown(self, timeout_sec: float | None = None, *, wait_for_threads: bool = True) -> bool:
        """Stop taking work, wait up to `timeout_sec` for the callbacks running (rclpy's meaning), then for
        the pool's threads when `wait_for_threads`."""
        stopped = super().shutdown(timeout_sec)
        self._pool.shutdown(wait=wait_for_threads)
        return stopped
