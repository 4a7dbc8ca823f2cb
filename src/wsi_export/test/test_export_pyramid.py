import numpy as np
import pytest

from wsi_export.pyramid import downsample_2x_area, pyramid_level_shapes, shrink_to_fit
from wsi_export.scratch import ScratchLevel


@pytest.mark.parametrize("shape", [(8, 10), (7, 9), (1, 5), (33, 1)])
def test_downsample_matches_float_area_mean(shape, reference_pyramid):
    block = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = reference_pyramid(block, 2)[1]
    reduced = downsample_2x_area(block)
    assert reduced.shape == ((shape[0] + 1) // 2, (shape[1] + 1) // 2, 3)
    np.testing.assert_array_equal(reduced, expected)


def test_level_shapes_halve_until_within_limit():
    shapes = pyramid_level_shapes(2000, 3000, lowest_level_max_edge_px=1024)
    assert shapes == [(2000, 3000), (1000, 1500), (500, 750)]
    shapes = pyramid_level_shapes(50000, 50001)
    assert max(shapes[-1]) <= 1024 < max(shapes[-2])
    assert all(s[1] == -(-p[1] // 2) for p, s in zip(shapes, shapes[1:]))
    assert pyramid_level_shapes(800, 600) == [(800, 600)]


def test_shrink_to_fit_bounds_the_longest_edge():
    image = np.zeros((1000, 300, 3), dtype=np.uint8)
    assert shrink_to_fit(image, 256).shape == (250, 75, 3)


def test_scratch_level_round_trips_aligned_writes_and_any_read(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (100, 70, 3), dtype=np.uint8)
    level = ScratchLevel(tmp_path / "l.scratch", 100, 70, tile_px=32).create()
    level[0:64, 0:70] = image[0:64]
    level[64:100, 0:64] = image[64:100, 0:64]
    level[64:100, 64:70] = image[64:100, 64:70]
    np.testing.assert_array_equal(level[:, :], image)
    np.testing.assert_array_equal(level[5:77, 13:69], image[5:77, 13:69])


def test_scratch_level_rejects_writes_that_would_share_a_tile(tmp_path):
    level = ScratchLevel(tmp_path / "l.scratch", 100, 70, tile_px=32).create()
    with pytest.raises(ValueError, match="not aligned"):
        level[16:48, 0:32] = np.zeros((32, 32, 3), np.uint8)


@pytest.mark.parametrize("compressors", [None, "auto"])
def test_chunk_file_reader_matches_zarr_including_edges_and_unwritten_chunks(tmp_path, compressors):
    import zarr

    from wsi_export.region_reader import ChunkFileReader, region_reader

    array = zarr.create_array(str(tmp_path / "m.zarr"), shape=(100, 150, 3), dtype="uint8",
                              chunks=(32, 32, 3), fill_value=255, compressors=compressors)
    array[:64] = np.random.default_rng(4).integers(0, 255, (64, 150, 3), dtype=np.uint8)
    reader = region_reader(array)
    assert isinstance(reader, ChunkFileReader) and (reader.layout.zstd_level is not None) == (compressors == "auto")
    np.testing.assert_array_equal(reader[:, :], array[:])
    np.testing.assert_array_equal(reader[17:91, 33:149], array[17:91, 33:149])
    assert (reader[70:100, :] == 255).all()


def test_region_reader_falls_back_to_zarr_for_other_layouts():
    import zarr

    from wsi_export.region_reader import region_reader

    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 8, 3), dtype="uint8")
    assert region_reader(in_memory) is in_memory
