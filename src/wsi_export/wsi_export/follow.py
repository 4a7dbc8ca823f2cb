"""Export a mosaic while it is being stitched: each region is read once the stitcher has stored it.

The stitcher composes a chunk once, when every tile that can touch it is placed, stores it, and only
then journals it (wsi_stitching.journal, beside the mosaic); at the end it marks the mosaic complete and
journals that it finished. So a journaled chunk is final and may be read at once, and after "finished"
every chunk is what it will stay. A scan in serpentine rows completes the mosaic's chunk rows from the
top, which is the order the export writes the full-resolution level in: most of the slide is encoded
while the stage still moves, and what is left when it stops is the last rows and the reduced levels.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from wsi_stitching.journal import JournalTail
from wsi_stitching.stitcher import journal_path

from .errors import MosaicInputError
from .executors import check_not_cancelled

POLL_S = 0.2    # how often a waiting read looks at the journal (and at cancel)


class StitchingStalledError(MosaicInputError):
    """The stitcher of a mosaic being followed stored nothing for longer than the export may wait."""


class StitchingProgress:
    """What the stitcher of the mosaic at `mosaic_path` has stored so far, read from its journal.
    Safe to share between the export's worker threads."""

    def __init__(self, mosaic_path: str | Path, chunk_shape: tuple[int, int], stall_timeout_s: float,
                 should_cancel: Callable[[], bool] | None = None, clock: Callable[[], float] = time.monotonic):
        self.journal_path = journal_path(mosaic_path)
        self._tail = JournalTail(self.journal_path)
        self._chunk_shape = chunk_shape
        self._stall_timeout_s = stall_timeout_s
        self._should_cancel = should_cancel
        self._clock = clock
        self._lock = threading.Lock()
        self._stored: set[tuple[int, int]] = set()
        self._finished = False
        self._last_news = clock()
        self._aborted = threading.Event()

    def abort(self) -> None:
        """Make every waiting read end (ExportCancelled): the export failed elsewhere and is being torn down."""
        self._aborted.set()

    def wait_for_region(self, row0_px: int, col0_px: int, height_px: int, width_px: int) -> None:
        """Return once every chunk under the region is stored (or the stitcher has finished)."""
        chunk_h, chunk_w = self._chunk_shape
        self._wait({(y, x) for y in range(row0_px // chunk_h, -(-(row0_px + height_px) // chunk_h))
                    for x in range(col0_px // chunk_w, -(-(col0_px + width_px) // chunk_w))})

    def wait_until_finished(self) -> None:
        """Return once the stitcher has journaled that the mosaic is finished (complete, its tiles listed)."""
        self._wait(None)

    def _wait(self, chunks: set[tuple[int, int]] | None) -> None:
        while True:
            with self._lock:
                self._read_news()
                if self._finished or (chunks is not None and chunks <= self._stored):
                    return
                quiet_s = self._clock() - self._last_news
            check_not_cancelled(self._should_cancel)
            check_not_cancelled(self._aborted.is_set)
            if quiet_s > self._stall_timeout_s:
                raise StitchingStalledError(
                    f"the stitcher of the mosaic being exported has stored nothing for {quiet_s:.0f} s (journal "
                    f"{str(self.journal_path)!r}, {len(self._stored)} chunks so far); expected new chunks or the "
                    f"end of stitching within {self._stall_timeout_s:g} s")
            time.sleep(POLL_S)

    def _read_news(self) -> None:
        events = self._tail.new_events()
        if events:
            self._last_news = self._clock()
        for event in events:
            if event["type"] == "chunks":
                self._stored.update(tuple(index) for index in event["indices"])
            elif event["type"] == "finished":
                self._finished = True


class FollowingReader:
    """The mosaic's pixels as a block job reads them (source[rows, cols]), each read held back until the
    stitcher has stored the region."""

    def __init__(self, reader, progress: StitchingProgress, shape: tuple[int, ...]):
        self._reader = reader
        self._progress = progress
        self.shape = shape

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        row0, row1, _ = rows.indices(self.shape[0])
        col0, col1, _ = cols.indices(self.shape[1])
        self._progress.wait_for_region(row0, col0, row1 - row0, col1 - col0)
        return self._reader[key]
