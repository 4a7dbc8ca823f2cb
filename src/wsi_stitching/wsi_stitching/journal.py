"""Append-only progress journal (JSON lines) kept beside the mosaic so an interrupted run resumes.

Order of writes makes it safe: a tile's frozen position is journaled before any chunk using it is
written, and a chunk is journaled only after its pixels are in the Zarr store; a crash in between
merely recomposes that chunk. A torn last line (crash mid-write) is ignored on reading. Another
process may follow a journal while it is written (`JournalTail`): an export that runs while the mosaic
is stitched reads each region once its chunks are journaled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def _complete_events(data: bytes) -> tuple[list[dict], int]:
    """The events of the complete lines at the start of `data`, and how many bytes they take; reading
    stops at a line that is cut short (still being written, or torn by a crash)."""
    events, length = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break
        length += len(line)
    return events, length


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def read_and_repair(self) -> list[dict]:
        """All complete events; a torn tail (crash mid-write) is cut off so appending continues cleanly."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        events, valid_length = _complete_events(data)
        if valid_length < len(data):
            with open(self.path, "r+b") as file:
                file.truncate(valid_length)
        return events

    def append(self, event: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


class JournalTail:
    """Follows a journal another process appends to: each call returns the events completed since the last."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0

    def new_events(self) -> list[dict]:
        """Events whose line is complete; a line still being written is read by a later call."""
        try:
            with open(self.path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return []
        events, length = _complete_events(data)
        self._offset += length
        return events
