"""Chunk files written without zarr-python read back through zarr-python exactly as its own writes do."""
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from wsi_stitching.chunk_files import ChunkFileWriter
from wsi_stitching.errors import StitchingError

SHAPE, CHUNKS = (1100, 700, 3), (512, 512, 3)   # edge chunks on both axes


def _array(path, **codecs):
    return zarr.open_group(str(path), mode="w").create_array(
        "image", shape=SHAPE, chunks=CHUNKS, dtype="uint8", fill_value=255,
        **(codecs or {"compressors": ZstdCodec(level=1)}))


def test_chunks_read_back_through_zarr_as_its_own_writes(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    ours, theirs = _array(tmp_path / "ours.zarr"), _array(tmp_path / "theirs.zarr")
    files = ChunkFileWriter(ours)
    for row in range(3):
        for col in range(2):
            block = image[row * 512:(row + 1) * 512, col * 512:(col + 1) * 512]
            files.write(row, col, block)
            theirs[row * 512:row * 512 + block.shape[0], col * 512:col * 512 + block.shape[1]] = block
    reopened = zarr.open_group(str(tmp_path / "ours.zarr"), mode="r")["image"]
    np.testing.assert_array_equal(reopened[:], image)
    np.testing.assert_array_equal(reopened[:], theirs[:])
    assert reopened.nchunks_initialized == 6


def test_a_chunk_not_written_reads_as_fill(tmp_path):
    array = _array(tmp_path / "partial.zarr")
    ChunkFileWriter(array).write(0, 0, np.zeros((512, 512, 3), np.uint8))
    assert (array[600:, :] == 255).all() and (array[:512, :512] == 0).all()


def test_arrays_stored_otherwise_are_refused(tmp_path):
    with pytest.raises(StitchingError, match="bytes then Zstandard"):
        ChunkFileWriter(_array(tmp_path / "blosc.zarr", compressors=BloscCodec()))
