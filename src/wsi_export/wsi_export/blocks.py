"""Block jobs: the unit of work that runs on a local thread or a dask.distributed worker.

A job takes a block of 2 tile rows x `block_width_tiles` tiles of one pyramid level, encodes its tiles
with each codec the outputs need (OME-TIFF tiles and DICOM frames share one when they can), writes it to
the OME-Zarr level, and writes its 2x reduction into the next level's scratch file. Block origins are
multiples of (2 tiles, block width), so every write covers whole chunks of its target and no two jobs
ever write the same chunk."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from .codecs import TileCodec
from .pyramid import downsample_2x_area
from .region_reader import ChunkFileReader
from .scratch import ScratchLevel

PixelSource = ChunkFileReader | zarr.Array | ScratchLevel  # indexable as source[rows, cols]


@dataclass(frozen=True)
class BlockJob:
    source: PixelSource  # this level's pixels, (y, x, c)
    row0_px: int
    col0_px: int
    height_px: int
    width_px: int
    tile_size_px: int
    codecs: tuple[TileCodec, ...]  # every tile is encoded with each; empty: no encoded output requested
    next_level: ScratchLevel | None  # receives the 2x reduction; None at the last level
    ome_zarr_level: zarr.Array | None  # (c, y, x) OME-Zarr array of this level


@dataclass(frozen=True)
class BlockResult:
    tile_rows: list[list[tuple[bytes, ...]]]  # per tile row, left to right: each tile's encoding by job.codecs
    pixel_count: int


def plan_level_blocks(height_px: int, width_px: int, tile_size_px: int,
                      block_width_tiles: int) -> list[list[tuple[int, int, int, int]]]:
    """Blocks (row0, col0, height, width) of one level, grouped by pairs of tile rows, left to right."""
    block_height_px = 2 * tile_size_px
    block_width_px = block_width_tiles * tile_size_px
    return [[(row0, col0, min(block_height_px, height_px - row0), min(block_width_px, width_px - col0))
             for col0 in range(0, width_px, block_width_px)]
            for row0 in range(0, height_px, block_height_px)]


def _pad_to_tile(tile: np.ndarray, tile_size_px: int) -> np.ndarray:
    """Edge tiles are padded by edge replication: smaller JPEGs and no dark seams when resampled."""
    missing_rows, missing_cols = tile_size_px - tile.shape[0], tile_size_px - tile.shape[1]
    if missing_rows == 0 and missing_cols == 0:
        return tile
    return np.pad(tile, ((0, missing_rows), (0, missing_cols), (0, 0)), mode="edge")


def run_block_job(job: BlockJob) -> BlockResult:
    rows = slice(job.row0_px, job.row0_px + job.height_px)
    cols = slice(job.col0_px, job.col0_px + job.width_px)
    block = np.ascontiguousarray(job.source[rows, cols])
    if job.ome_zarr_level is not None:
        job.ome_zarr_level[:, rows, cols] = np.moveaxis(block, 2, 0)
    if job.next_level is not None:
        reduced = downsample_2x_area(block)
        job.next_level[job.row0_px // 2:job.row0_px // 2 + reduced.shape[0],
                       job.col0_px // 2:job.col0_px // 2 + reduced.shape[1]] = reduced
    tile_rows: list[list[tuple[bytes, ...]]] = []
    if job.codecs:
        size = job.tile_size_px
        for y in range(0, job.height_px, size):
            tiles = (_pad_to_tile(block[y:y + size, x:x + size], size) for x in range(0, job.width_px, size))
            tile_rows.append([tuple(codec.encode(tile) for codec in job.codecs) for tile in tiles])
    return BlockResult(tile_rows=tile_rows, pixel_count=job.height_px * job.width_px)
