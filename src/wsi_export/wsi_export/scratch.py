"""Uncompressed tile-major scratch file for one reduced pyramid level.

Reduced levels are written once by the jobs of the level above and read once by their own jobs. A raw
file with one fixed-size slot per tile makes both a handful of positional reads/writes (os.pread /
os.pwrite: thread-safe, and usable by dask workers on a shared filesystem), much cheaper than a
chunked array library for data that is never kept."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ScratchLevel:
    path: Path
    height_px: int
    width_px: int
    tile_px: int

    @property
    def tiles_x(self) -> int:
        return -(-self.width_px // self.tile_px)

    @property
    def tiles_y(self) -> int:
        return -(-self.height_px // self.tile_px)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height_px, self.width_px, 3

    @property
    def _tile_bytes(self) -> int:
        return self.tile_px * self.tile_px * 3

    def create(self) -> "ScratchLevel":
        with open(self.path, "xb") as handle:
            handle.truncate(self.tiles_y * self.tiles_x * self._tile_bytes)
        return self

    def _offset(self, tile_y: int, tile_x: int) -> int:
        return (tile_y * self.tiles_x + tile_x) * self._tile_bytes

    def _bounds(self, key: tuple[slice, slice]) -> tuple[int, int, int, int]:
        rows, cols = key
        r0, r1, _ = rows.indices(self.height_px)
        c0, c1, _ = cols.indices(self.width_px)
        return r0, r1, c0, c1

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        r0, r1, c0, c1 = self._bounds(key)
        out = np.empty((r1 - r0, c1 - c0, 3), dtype=np.uint8)
        t = self.tile_px
        tile = np.empty((t, t, 3), dtype=np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for tile_y in range(r0 // t, -(-r1 // t)):
                for tile_x in range(c0 // t, -(-c1 // t)):
                    if os.preadv(fd, [tile], self._offset(tile_y, tile_x)) != tile.nbytes:
                        raise OSError(f"short read from scratch file {self.path}")
                    y0, x0 = max(r0, tile_y * t), max(c0, tile_x * t)
                    y1, x1 = min(r1, (tile_y + 1) * t), min(c1, (tile_x + 1) * t)
                    out[y0 - r0:y1 - r0, x0 - c0:x1 - c0] = tile[y0 - tile_y * t:y1 - tile_y * t,
                                                                 x0 - tile_x * t:x1 - tile_x * t]
        finally:
            os.close(fd)
        return out

    def __setitem__(self, key: tuple[slice, slice], block: np.ndarray) -> None:
        """Write a block whose origin is tile-aligned and which covers whole tiles (or reaches the
        level's edge), so no tile is ever shared between two writers."""
        r0, r1, c0, c1 = self._bounds(key)
        t = self.tile_px
        if r0 % t or c0 % t or (r1 % t and r1 != self.height_px) or (c1 % t and c1 != self.width_px):
            raise ValueError(f"scratch write [{r0}:{r1}, {c0}:{c1}] is not aligned to {t} px tiles")
        tile = np.zeros((t, t, 3), dtype=np.uint8)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for y in range(r0, r1, t):
                for x in range(c0, c1, t):
                    h, w = min(t, r1 - y), min(t, c1 - x)
                    tile[:h, :w] = block[y - r0:y - r0 + h, x - c0:x - c0 + w]
                    if os.pwritev(fd, [tile], self._offset(y // t, x // t)) != tile.nbytes:
                        raise OSError(f"short write to scratch file {self.path}")
        finally:
            os.close(fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
