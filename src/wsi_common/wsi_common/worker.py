"""One background thread per node for slow work, so subscription callbacks only enqueue."""
import queue
import threading
import traceback


class QueueWorker:
    """Hands the items `put` from callbacks to `handle(batch)` on one thread, in arrival order.

    A batch is every item waiting, up to `max_batch`: a node that falls behind catches up in
    larger batches instead of falling further behind.

    A batch whose `handle` raises is counted in `failures`, reported to `on_error(batch, error)`
    and kept in `last_error`, and the worker goes on with the next one: an unexpected exception
    must show on the node's diagnostics instead of silently stopping the thread.

    `size_of(item)` (bytes; 0 without it) feeds `bytes_queued` and `peak_bytes_queued`, the memory the queue
    holds now and at most, for the node's diagnostics. The queue itself is not bounded here: the producer
    bounds it (wsi_common.backpressure), as a callback that blocked would only move the backlog into DDS.
    """

    _STOP = object()

    def __init__(self, handle, max_batch: int = 1, on_error=None, size_of=lambda item: 0):
        self._handle = handle
        self._max_batch = max_batch
        self._on_error = on_error
        self._size_of = size_of
        self._bytes_lock = threading.Lock()
        self.bytes_queued = self.peak_bytes_queued = 0
        self.failures = 0
        self.last_error = ""
        self._items: queue.Queue = queue.Queue()
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, item) -> None:
        with self._bytes_lock:
            self.bytes_queued += self._size_of(item)
            self.peak_bytes_queued = max(self.peak_bytes_queued, self.bytes_queued)
        self._items.put(item)

    def qsize(self) -> int:
        return self._items.qsize()

    def _run(self) -> None:
        while True:
            batch = [self._items.get()]
            while len(batch) < self._max_batch and not self._items.empty():
                batch.append(self._items.get_nowait())
            if not self._running:       # stop() was called (and put _STOP to wake this thread)
                return
            with self._bytes_lock:
                self.bytes_queued -= sum(map(self._size_of, batch))
            try:
                self._handle(batch)
            except Exception as error:      # noqa: BLE001 - any handler bug must be reported, not kill the thread
                self.failures += 1
                self.last_error = "".join(traceback.format_exception_only(error)).strip()
                if self._on_error is not None:
                    self._on_error(batch, error)

    def stop(self, timeout_s: float) -> None:
        """Finish the batch being handled and end the thread; items still queued are not handled."""
        self._running = False
        self._items.put(self._STOP)     # wakes the thread if it is waiting for an item
        self._thread.join(timeout=timeout_s)
