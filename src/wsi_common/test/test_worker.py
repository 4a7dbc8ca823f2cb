import threading
import time

from wsi_common.diagnostics import ERROR, OK, worker_level
from wsi_common.worker import QueueWorker


def test_items_are_handled_in_order_and_batched_when_behind():
    batches, busy, release = [], threading.Event(), threading.Event()

    def handle(batch):
        busy.set()
        release.wait(5)
        batches.append(batch)

    worker = QueueWorker(handle, max_batch=3)
    worker.put(0)
    assert busy.wait(5)                       # the worker is busy with item 0 ...
    for item in range(1, 7):                  # ... while six more arrive
        worker.put(item)
    assert worker.qsize() == 6
    release.set()
    deadline = time.monotonic() + 5
    while sum(map(len, batches)) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop(timeout_s=2)
    assert batches == [[0], [1, 2, 3], [4, 5, 6]]


def test_a_failing_batch_is_counted_and_reported_and_the_worker_goes_on():
    handled, reported = [], []

    def handle(batch):
        if batch == ["bad"]:
            raise RuntimeError("decoder exploded on item 'bad'")
        handled.extend(batch)

    worker = QueueWorker(handle, on_error=lambda batch, error: reported.append((batch, str(error))))
    for item in ("a", "bad", "b"):
        worker.put(item)
    deadline = time.monotonic() + 5
    while len(handled) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop(timeout_s=2)
    assert handled == ["a", "b"]
    assert worker.failures == 1
    assert worker.last_error == "RuntimeError: decoder exploded on item 'bad'"
    assert reported == [(["bad"], "decoder exploded on item 'bad'")]


def test_diagnostics_turn_to_error_once_a_batch_failed():
    def handle(batch):
        raise ValueError(f"cannot handle {batch}")

    worker = QueueWorker(handle)
    assert worker_level(worker, "running") == (OK, "running")
    worker.put(1)
    deadline = time.monotonic() + 5
    while not worker.failures and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop(timeout_s=2)
    assert worker_level(worker, "running") == (ERROR, "1 batch(es) failed in the worker; last: ValueError: cannot handle [1]")
