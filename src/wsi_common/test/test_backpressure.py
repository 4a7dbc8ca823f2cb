"""The credit window that bounds the tiles between the scan and its consumers (ROS-free)."""
import threading
import time

import pytest

from wsi_common.backpressure import CreditWindow
from wsi_common.worker import QueueWorker

TILE = 100


def publish_while_room(window: CreditWindow, consumers, tiles: int, done: list) -> threading.Thread:
    """A producer thread: each tile waits for room, then is sent."""
    def run():
        for _ in range(tiles):
            if not window.wait_for_room(TILE, lambda: consumers, poll_s=0.01):
                return
            window.sent(TILE)
            done.append(TILE)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_consumer_behind_by_the_ceiling_makes_the_producer_wait_until_it_handles_a_tile():
    window, sent = CreditWindow(3 * TILE), []
    producer = publish_while_room(window, ["stitching"], 5, sent)
    time.sleep(0.2)
    assert len(sent) == 3                       # three tiles fill the ceiling; the fourth waits
    assert window.stats(["stitching"]).bytes == 3 * TILE
    window.acknowledge("stitching", 1)
    time.sleep(0.2)
    assert len(sent) == 4
    window.acknowledge("stitching", 5)
    producer.join(2)
    assert len(sent) == 5
    stats = window.stats(["stitching"])
    assert stats.stalls == 2 and stats.stall_s >= 0.3 and stats.peak_bytes == 3 * TILE
    assert stats.tiles == 0 and stats.bytes == 0


def test_the_consumer_furthest_behind_sets_the_pace_and_one_that_leaves_is_no_longer_waited_for():
    window, consumers = CreditWindow(2 * TILE), ["autofocus", "stitching"]
    for _ in range(2):
        assert window.wait_for_room(TILE, lambda: consumers)
        window.sent(TILE)
    window.acknowledge("autofocus", 2)           # the autofocus keeps up; the stitching node does not
    assert window.stats(consumers).tiles == 2
    released = []
    producer = threading.Thread(target=lambda: released.append(window.wait_for_room(TILE, lambda: consumers,
                                                                                    poll_s=0.01)))
    producer.start()
    time.sleep(0.1)
    assert not released
    consumers.remove("stitching")                # its process went away
    producer.join(2)
    assert released == [True]


def test_a_tile_larger_than_the_ceiling_goes_alone_and_cancel_ends_the_wait():
    window = CreditWindow(TILE)
    assert window.wait_for_room(5 * TILE, lambda: ["stitching"])     # an empty buffer takes any one tile
    window.sent(5 * TILE)
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    assert not window.wait_for_room(TILE, lambda: ["stitching"], cancel.is_set, poll_s=0.01)


def test_a_new_scan_counts_its_tiles_from_zero():
    window = CreditWindow(2 * TILE)
    for _ in range(2):
        window.sent(TILE)
    window.start_scan()
    assert window.stats(["stitching"]).bytes == 0
    assert window.wait_for_room(TILE, lambda: ["stitching"], poll_s=0.01)


def test_the_ceiling_must_be_positive():
    with pytest.raises(ValueError, match="ceiling of 0 bytes"):
        CreditWindow(0)


def test_the_worker_reports_the_bytes_it_holds_and_the_most_it_held():
    release = threading.Event()
    worker = QueueWorker(lambda batch: release.wait(5), size_of=len)
    worker.put(b"x" * 10)                        # taken at once: the worker holds it while handling it
    time.sleep(0.1)
    worker.put(b"x" * 30)
    worker.put(b"x" * 20)
    assert worker.bytes_queued == 50 and worker.peak_bytes_queued == 50
    release.set()
    deadline = time.monotonic() + 5
    while worker.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop(timeout_s=2)
    assert worker.bytes_queued == 0 and worker.peak_bytes_queued == 50
