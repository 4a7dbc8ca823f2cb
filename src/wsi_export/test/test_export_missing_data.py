"""A mosaic whose pixels are missing from its store or do not decode is refused, naming the region and the
tiles there, unless a partial export is asked for; glass the stitcher never wrote is not lost data."""
import shutil

import imagecodecs
import numpy as np
import pytest
import zarr

from wsi_export.errors import MosaicDataError, MosaicInputError
from wsi_export.export import ExportOptions, export_slide
from wsi_export.mosaic import MosaicRegion, open_mosaic
from wsi_export.synthetic import synthetic_tissue, write_synthetic_mosaic
from wsi_stitching.layout import TileGridLayout
from wsi_stitching.stitcher import MosaicStitcher, StitchParameters

CHUNK_PX = 512
SMALL = ExportOptions(tile_size_px=256, write_thumbnail=False)


def chunk_file(mosaic, row, col):
    return mosaic / "image" / "c" / str(row) / str(col) / "0"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """1100 x 1600 px: 3 x 4 chunks of 512 px, every one stored; it lists no tiles."""
    path = tmp_path_factory.mktemp("pristine") / "slide.zarr"
    write_synthetic_mosaic(path, 1100, 1600, pixel_size_um=0.5, seed=1, chunk_px=CHUNK_PX)
    return path


@pytest.fixture
def mosaic(pristine, tmp_path):
    path = tmp_path / "in" / pristine.name
    shutil.copytree(pristine, path)
    return path


@pytest.fixture
def out(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def test_a_missing_chunk_fails_naming_its_region_and_leaves_nothing(mosaic, out):
    chunk_file(mosaic, 1, 2).unlink()
    with pytest.raises(MosaicDataError) as raised:
        export_slide(mosaic, out, "slide", ("ome-tiff", "ome-zarr"), SMALL)
    message = str(raised.value)
    assert "1 region(s): rows 512-1024 x cols 1024-1536 px;" in message
    assert "does not list the tiles" in message and "allow_partial_mosaic=True" in message
    assert list(out.iterdir()) == []


def test_a_partial_export_on_request_fills_and_lists_the_missing_region(mosaic, out):
    expected = zarr.open_group(str(mosaic), mode="r")["image"][:]
    chunk_file(mosaic, 2, 3).unlink()
    result = export_slide(mosaic, out, "slide", ("ome-zarr",),
                          ExportOptions(tile_size_px=256, allow_partial_mosaic=True))
    assert result.missing_regions == [MosaicRegion(1024, 1536, 76, 64, ())]
    expected[1024:, 1536:] = 255
    np.testing.assert_array_equal(np.moveaxis(zarr.open_group(str(out / "slide.ome.zarr"), mode="r")["0"][:], 0, 2),
                                  expected)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _short_frame(path):
    """A valid zstd frame of too few pixels: decoding it alone would leave stale pixels in the buffer."""
    path.write_bytes(imagecodecs.zstd_encode(np.zeros(1000, np.uint8).tobytes()))


@pytest.mark.parametrize("damage", [_truncate, _short_frame])
@pytest.mark.parametrize("allow_partial_mosaic", [False, True])
def test_a_damaged_chunk_fails_naming_its_region_even_for_a_partial_export(mosaic, out, damage,
                                                                            allow_partial_mosaic):
    damage(chunk_file(mosaic, 2, 1))
    with pytest.raises(MosaicDataError) as raised:
        export_slide(mosaic, out, "slide", ("ome-tiff", "ome-zarr"),
                     ExportOptions(tile_size_px=256, allow_partial_mosaic=allow_partial_mosaic))
    message = str(raised.value)
    assert "rows 1024-1100 x cols 512-1024 px cannot be read" in message, message
    assert str(chunk_file(mosaic, 2, 1)) in message and "512x512x3 uint8" in message
    assert list(out.iterdir()) == []


def test_a_cut_uncompressed_chunk_fails_naming_its_region(pristine, tmp_path, out):
    group = zarr.open_group(str(tmp_path / "raw.zarr"), mode="w", zarr_format=3)
    image = group.create_array("image", shape=(600, 700, 3), chunks=(CHUNK_PX, CHUNK_PX, 3), dtype="uint8",
                               compressors=None, fill_value=255)
    image[:] = synthetic_tissue(0, 0, 600, 700, seed=1)
    group.attrs["wsi_mosaic"] = zarr.open_group(str(pristine), mode="r").attrs["wsi_mosaic"]
    chunk = chunk_file(tmp_path / "raw.zarr", 1, 1)
    chunk.write_bytes(chunk.read_bytes()[:1000])
    with pytest.raises(MosaicDataError, match=r"rows 512-600 x cols 512-700 px cannot be read: .* it holds 1000 "
                                              r"bytes of pixels, expected 786432"):
        export_slide(tmp_path / "raw.zarr", out, "raw", ("ome-zarr",), SMALL)


# A sparse scan, as skip_empty_tiles leaves it: two tiles of one row with five skipped between them, so
# the chunk between them is glass the stitcher never wrote.
SPARSE_CELLS = [(0, 0), (0, 6)]
TILE_PX = 256


def stitch_sparse(path, tile_image):
    layout = TileGridLayout.regular("sparse", 1, 7, TILE_PX, TILE_PX, 0.5, 0.1, cells=SPARSE_CELLS,
                                    objective_magnification=20.0, numerical_aperture=0.75,
                                    acquisition_datetime="2026-01-01T00:00:00+00:00")
    stitcher = MosaicStitcher(layout, path, StitchParameters(flat_field="none"))
    for cell in layout.cells:
        x_um, y_um = layout.nominal_positions_um[cell]
        stitcher.add_tile(*cell, tile_image(cell), x_um, y_um)
    stitcher.finish()
    return path


def textured(cell):
    return synthetic_tissue(0, cell[1] * TILE_PX, TILE_PX, TILE_PX, seed=2)


def test_a_stitched_sparse_mosaic_exports_and_a_lost_chunk_names_its_tile(tmp_path, out):
    path = stitch_sparse(tmp_path / "sparse.zarr", textured)
    tiles = open_mosaic(path).metadata.composed_tiles
    assert sorted(tiles.top_left_px) == SPARSE_CELLS and (tiles.height_px, tiles.width_px) == (TILE_PX, TILE_PX)
    assert not chunk_file(path, 0, 1).exists()   # only glass there: never written
    assert export_slide(path, out, "whole", ("ome-zarr",), SMALL).missing_regions == []

    y, x = tiles.top_left_px[(0, 6)]
    row, col = (y + TILE_PX // 2) // CHUNK_PX, (x + TILE_PX // 2) // CHUNK_PX
    chunk_file(path, row, col).unlink()
    with pytest.raises(MosaicDataError, match=rf"rows {row * CHUNK_PX}-\d+ x cols {col * CHUNK_PX}-\d+ px "
                                              rf"\(tiles \(row, col\) \(0, 6\)\); expected a chunk under every"):
        export_slide(path, out, "lost", ("ome-zarr",), SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["whole.ome.zarr"]


def test_tiles_of_saturated_glass_are_not_taken_for_lost_data(tmp_path, out):
    """Chunks composed all in the fill colour are stored too, so they are told apart from lost ones."""
    path = stitch_sparse(tmp_path / "white.zarr", lambda cell: np.full((TILE_PX, TILE_PX, 3), 255, np.uint8))
    result = export_slide(path, out, "white", ("ome-zarr",), SMALL)
    assert result.missing_regions == []
    assert (zarr.open_group(str(out / "white.ome.zarr"), mode="r")["0"][:] == 255).all()


@pytest.mark.parametrize("value, message", [
    ([], "is not a mapping"),
    ({"height_px": 0, "width_px": 256, "top_left_px": []}, "height_px=0"),
    ({"height_px": 256, "width_px": 256, "top_left_px": [[0, 0, 1.5, 0]]}, r"entry \[0, 0, 1.5, 0\]"),
])
def test_a_malformed_tile_list_is_an_input_error(mosaic, value, message):
    group = zarr.open_group(str(mosaic), mode="r+")
    group.attrs["wsi_mosaic"] = {**group.attrs["wsi_mosaic"], "composed_tiles": value}
    with pytest.raises(MosaicInputError, match=message):
        open_mosaic(mosaic)
