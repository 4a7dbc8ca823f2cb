import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader
from ome_zarr_models.v05.image import Image as NgffImage

from wsi_export.export import ExportOptions, export_slide
from wsi_export.mosaic import mosaic_from_array, open_mosaic

PIXEL_SIZE_UM = 0.25


@pytest.fixture(scope="module")
def both_formats(mosaic_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("both")
    updates = []
    result = export_slide(mosaic_path, output_dir, "slide", ("ome-zarr", "ome-tiff"),
                          ExportOptions(compression="zstd", tile_size_px=256), progress=updates.append)
    return result, updates


def test_ome_zarr_opens_with_ome_zarr_py_with_micrometre_scales(both_formats):
    result, _ = both_formats
    zarr_path = result.output_paths[0]
    assert zarr_path.name == "slide.ome.zarr"
    nodes = list(Reader(parse_url(str(zarr_path)))())
    image = nodes[0]
    assert any(isinstance(spec, Multiscales) for spec in image.specs)
    assert [tuple(level.shape) for level in image.data] == [(3, h, w) for h, w in result.level_shapes]
    assert [axis["name"] for axis in image.metadata["axes"]] == ["c", "y", "x"]
    assert image.metadata["axes"][0]["type"] == "channel"
    assert all(axis["unit"] == "micrometer" for axis in image.metadata["axes"][1:])
    scales = [t[0]["scale"] for t in image.metadata["coordinateTransformations"]]
    assert scales == [[1.0, PIXEL_SIZE_UM * 2 ** k, PIXEL_SIZE_UM * 2 ** k] for k in range(result.levels)]
    assert image.metadata["channel_names"] == ["Red", "Green", "Blue"]


def test_ome_zarr_validates_as_ngff_0_5_image(both_formats):
    result, _ = both_formats
    group = zarr.open_group(str(result.output_paths[0]), mode="r")
    assert group.metadata.zarr_format == 3 and group.attrs["ome"]["version"] == "0.5"
    model = NgffImage.from_zarr(group)
    assert len(model.ome_attributes.multiscales[0].datasets) == result.levels
    assert group["0"].chunks == (1, 256, 256)
    assert group["0"].metadata.dimension_names == ("c", "y", "x")


def test_ome_zarr_pixels_equal_mosaic_and_tiff_levels(both_formats, mosaic_pixels, reference_pyramid):
    result, updates = both_formats
    group = zarr.open_group(str(result.output_paths[0]), mode="r")
    reference = reference_pyramid(mosaic_pixels, result.levels)
    with tifffile.TiffFile(result.output_paths[1]) as tiff:
        tiff_levels = [level.asarray() for level in tiff.series[0].levels]
    for k in range(result.levels):
        np.testing.assert_array_equal(np.moveaxis(group[str(k)][:], 0, 2), reference[k])
        np.testing.assert_array_equal(tiff_levels[k], reference[k])
    assert updates[-1].format == "ome-zarr,ome-tiff" and updates[-1].fraction_done == pytest.approx(1.0)


def test_ome_zarr_only_export_from_caller_array(mosaic_pixels, tmp_path, reference_pyramid):
    """A plain in-memory (H, W, 3) uint8 Zarr array with caller-given attributes is accepted."""
    image = zarr.create_array(zarr.storage.MemoryStore(), shape=mosaic_pixels.shape, dtype="uint8",
                              chunks=(300, 400, 3))
    image[:] = mosaic_pixels
    attributes = {"version": 1, "pixel_size_um": 0.5, "objective_magnification": 20.0,
                  "numerical_aperture": 0.75, "acquisition_datetime": "2026-02-01T08:00:00",
                  "scan_id": "caller", "complete": True}
    result = export_slide(mosaic_from_array(image, attributes, "caller"), tmp_path, formats=["ome-zarr"],
                          options=ExportOptions(tile_size_px=512))
    assert result.output_paths == [tmp_path / "caller.ome.zarr"]
    group = zarr.open_group(str(result.output_paths[0]), mode="r")
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"]
    assert scale == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(np.moveaxis(group["1"][:], 0, 2), reference_pyramid(mosaic_pixels, 2)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caller.ome.zarr"]


def test_default_name_comes_from_the_mosaic_directory(mosaic_path, tmp_path):
    result = export_slide(open_mosaic(mosaic_path), tmp_path, formats=["ome-zarr"])
    assert result.output_paths == [tmp_path / "slide-0001.ome.zarr"]
