import threading
import time

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
