"""Fast reads of mosaic regions for the common on-disk layouts.

The shared mosaic is normally a local Zarr v3 array whose chunks are zstd-compressed or stored raw
(`wsi_stitching.chunk_files`). For those layouts, reading chunk files (and decoding them with imagecodecs)
in the calling thread costs much less than zarr's asynchronous pipeline and keeps the work on the export's
own threads. Any other layout (sharding, other codecs, remote stores) is read through zarr itself."""
from __future__ import annotations

import os
from dataclasses import dataclass

import imagecodecs
import numpy as np
import zarr

from wsi_stitching.chunk_files import ChunkFileLayout, chunk_file_layout

from .errors import UnreadableChunkError


@dataclass(frozen=True)
class ChunkFileReader:
    """(y, x, 3) uint8 regions of a local Zarr v3 array with raw or zstd-compressed chunk files."""
    layout: ChunkFileLayout

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        r0, r1, _ = rows.indices(self.layout.shape[0])
        c0, c1, _ = cols.indices(self.layout.shape[1])
        out = np.empty((r1 - r0, c1 - c0, 3), dtype=np.uint8)
        ch, cw, _ = self.layout.chunk_shape
        chunk = np.empty(self.layout.chunk_shape, dtype=np.uint8)
        for chunk_y in range(r0 // ch, -(-r1 // ch)):
            for chunk_x in range(c0 // cw, -(-c1 // cw)):
                y0, x0 = max(r0, chunk_y * ch), max(c0, chunk_x * cw)
                y1, x1 = min(r1, (chunk_y + 1) * ch), min(c1, (chunk_x + 1) * cw)
                target = out[y0 - r0:y1 - r0, x0 - c0:x1 - c0]
                chunk_path = self.layout.path(chunk_y, chunk_x)
                try:
                    with open(chunk_path, "rb") as handle:
                        if self.layout.zstd_level is not None:
                            decoded = imagecodecs.zstd_decode(handle.read(), out=chunk.reshape(-1)).nbytes
                        else:
                            decoded = os.fstat(handle.fileno()).st_size
                            if decoded == chunk.nbytes:
                                handle.readinto(chunk)
                except FileNotFoundError:
                    # Zarr semantics: a never-written chunk is fill value. Whether it should have been
                    # written is known before reading (mosaic.missing_regions).
                    target[...] = self.layout.fill_value
                    continue
                except imagecodecs.ZstdError as error:
                    raise UnreadableChunkError(self._chunk_region(chunk_y, chunk_x), str(chunk_path),
                                               str(error)) from error
                if decoded != chunk.nbytes:  # a valid but short zstd frame, or a cut raw file
                    raise UnreadableChunkError(self._chunk_region(chunk_y, chunk_x), str(chunk_path),
                                               f"it holds {decoded} bytes of pixels, expected {chunk.nbytes}")
                target[...] = chunk[y0 - chunk_y * ch:y1 - chunk_y * ch, x0 - chunk_x * cw:x1 - chunk_x * cw]
        return out

    def _chunk_region(self, chunk_y: int, chunk_x: int) -> tuple[int, int, int, int]:
        """(row0, col0, height, width) of the pixels a chunk holds."""
        ch, cw, _ = self.layout.chunk_shape
        return (chunk_y * ch, chunk_x * cw, min(ch, self.layout.shape[0] - chunk_y * ch),
                min(cw, self.layout.shape[1] - chunk_x * cw))


def region_reader(image: zarr.Array) -> ChunkFileReader | zarr.Array:
    """Something indexable as reader[rows, cols] -> (h, w, 3) uint8, as fast as the layout allows."""
    layout = chunk_file_layout(image) if image.ndim == 3 and image.shape[2] == 3 else None
    return image if layout is None else ChunkFileReader(layout)
