"""Back-pressure between the scan and the nodes that consume its tiles: a credit window in bytes.

The producer (the scan orchestrator) counts the bytes of every tile it publishes; each consumer says how many
of the scan's tiles it has taken off its buffer and handled. What lies between the two, in transit or queued
in a consumer, is that consumer's buffer. Before publishing a tile the producer waits until the tile fits
under the ceiling of every consumer taking part, so a consumer that falls behind slows the scan down instead
of growing its memory, and no tile is dropped to make room. ROS-free: the node feeds it acknowledgements from
its subscriptions and asks it for room before each publish.
"""
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MB = 1_000_000


@dataclass(frozen=True)
class WindowStats:
    tiles: int              # tiles published and not yet handled by the consumer furthest behind
    bytes: int              # their bytes
    peak_bytes: int         # the most bytes ever in a consumer's buffer since the window was made
    stalls: int             # publishes that had to wait for room
    stall_s: float          # time spent waiting for room


class CreditWindow:
    """At most `max_bytes` of tiles published but not yet handled, per consumer.

    A single tile larger than the ceiling is let through once the consumer's buffer is empty: the ceiling
    bounds memory, it cannot forbid the scan's own tile size.
    """

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        if max_bytes <= 0:
            raise ValueError(f"a tile buffer ceiling of {max_bytes} bytes; expected more than 0")
        self.max_bytes = max_bytes
        self._clock = clock
        self._changed = threading.Condition()
        self._sizes: list[int] = []             # bytes of every tile published in this scan, in order
        self._handled: dict[str, int] = {}      # consumer -> tiles of this scan it has handled
        self._peak_bytes = self._stalls = 0
        self._stall_s = 0.0

    def start_scan(self) -> None:
        """A new scan: its tiles are counted from 0 again, and no consumer has handled any."""
        with self._changed:
            self._sizes.clear()
            self._handled.clear()
            self._changed.notify_all()

    def sent(self, nbytes: int) -> None:
        with self._changed:
            self._sizes.append(nbytes)

    def acknowledge(self, consumer: str, handled: int) -> None:
        """`consumer` has handled the first `handled` tiles of this scan (a count never goes back)."""
        with self._changed:
            self._handled[consumer] = max(handled, self._handled.get(consumer, 0))
            self._changed.notify_all()

    def _bytes(self, consumer: str) -> int:
        return sum(self._sizes[self._handled.get(consumer, 0):])

    def wait_for_room(self, nbytes: int, consumers: Callable[[], Iterable[str]],
                      should_cancel: Callable[[], bool] = lambda: False, poll_s: float = 0.1) -> bool:
        """Block until a tile of `nbytes` fits under the ceiling of every consumer `consumers()` names (asked
        again at each poll: a consumer that leaves the graph is no longer waited for). False if cancelled."""
        started = None
        with self._changed:
            try:
                while True:
                    buffered = [self._bytes(c) for c in consumers()]
                    if not any(0 < b and b + nbytes > self.max_bytes for b in buffered):
                        self._peak_bytes = max([self._peak_bytes] + [b + nbytes for b in buffered])
                        return True
                    if should_cancel():
                        return False
                    if started is None:
                        started = self._clock()
                        self._stalls += 1
                    self._changed.wait(poll_s)
            finally:
                if started is not None:
                    self._stall_s += self._clock() - started

    def stats(self, consumers: Iterable[str]) -> WindowStats:
        """The buffer of the consumer furthest behind among `consumers`, and the stalls so far."""
        with self._changed:
            behind = max(consumers, key=lambda c: self._bytes(c), default=None)
            tiles = len(self._sizes) - self._handled.get(behind, 0) if behind is not None else 0
            return WindowStats(max(tiles, 0), self._bytes(behind) if behind is not None else 0, self._peak_bytes,
                               self._stalls, self._stall_s)
