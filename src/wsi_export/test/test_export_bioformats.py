"""Bio-Formats, the reader inside QuPath and OMERO, reads our OME-TIFF as tifffile does: every level of
every compression option, the associated images by name, and the OME-XML validates."""
import shutil

import imagecodecs
import numpy as np
import pytest
import tifffile

from wsi_export.codecs import COMPRESSIONS, JPEG_SUBSAMPLINGS
from wsi_export.export import ExportOptions, export_slide
from wsi_export.slide_images import SlideImage
from wsi_export.synthetic import write_synthetic_mosaic

# Every compression option of the exporter, each JPEG subsampling, the lossless variants.
VARIANTS = {
    "jpeg": dict(compression="jpeg"),  # the default: full-resolution colour, RGB JPEG
    "jpeg-422": dict(compression="jpeg", jpeg_subsampling=(2, 1)),
    "jpeg-420": dict(compression="jpeg", jpeg_subsampling=(2, 2)),
    "jpeg-lossless": dict(compression="jpeg", lossless=True),
    "deflate": dict(compression="deflate"),
    "zstd": dict(compression="zstd"),
    "jpeg2000": dict(compression="jpeg2000"),
    "jpeg2000-lossless": dict(compression="jpeg2000", lossless=True),
    "lzw": dict(compression="lzw"),
    "none": dict(compression="none"),
}
LOSSY = {"jpeg", "jpeg-422", "jpeg-420", "jpeg2000"}
# Two JPEG (or JPEG 2000) decoders may round the inverse transform differently, by a grey level or two.
DECODER_ROUNDING = 2


@pytest.fixture(scope="module")
def exports(tmp_path_factory, read_with_bioformats):
    """Each variant of a small slide with four levels, a thumbnail, a macro and a label, written and read
    with Bio-Formats in one JVM, with a copy whose OME-XML breaks the schema (the validation's control)."""
    directory = tmp_path_factory.mktemp("bioformats-exports")
    mosaic = write_synthetic_mosaic(directory / "small.zarr", 600, 900, pixel_size_um=0.5, seed=2)
    rng = np.random.default_rng(4)
    slide_images = {"macro": SlideImage(rng.integers(0, 256, (150, 420, 3), dtype=np.uint8), 20.0),
                    "label": SlideImage(rng.integers(0, 256, (100, 90, 3), dtype=np.uint8), 25.0)}
    paths = {}
    for variant, codec in VARIANTS.items():
        result = export_slide(directory / "small.zarr", directory, variant, options=ExportOptions(
            tile_size_px=128, lowest_level_max_edge_px=128, thumbnail_max_edge_px=64, **codec), **slide_images)
        paths[variant] = result.output_paths[0]
    broken = directory / "broken.ome.tif"
    shutil.copy(paths["none"], broken)
    with tifffile.TiffFile(broken) as tiff:
        xml = tiff.pages[0].description
    tifffile.tiffcomment(broken, comment=xml.replace("<Image ", '<Image Unknown="1" ', 1).encode())
    read = read_with_bioformats([*paths.values(), broken])
    return {variant: (paths[variant], read[i]) for i, variant in enumerate(VARIANTS)} | {
        "broken": (broken, read[-1])}, slide_images, mosaic[:]


def test_every_compression_option_and_jpeg_subsampling_is_read():
    assert {codec["compression"] for codec in VARIANTS.values()} == set(COMPRESSIONS)
    assert {codec.get("jpeg_subsampling", (1, 1)) for codec in VARIANTS.values()
            if codec["compression"] == "jpeg" and not codec.get("lossless")} == set(JPEG_SUBSAMPLINGS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bioformats_pixels_equal_tifffile_at_every_level_and_series(exports, variant):
    files, slide_images, mosaic = exports
    path, read = files[variant]
    tolerance = DECODER_ROUNDING if variant in LOSSY else 0
    with tifffile.TiffFile(path) as tiff:
        expected = [[level.asarray() for level in tiff.series[0].levels]] + [[s.asarray()] for s in tiff.series[1:]]
    assert read.format == "OME-TIFF"
    assert [s.name for s in read.series] == [variant, "thumbnail", "macro", "label"]
    assert [len(s.resolutions) for s in read.series] == [4, 1, 1, 1]
    for series, tifffile_series in zip(read.series, expected):
        for k, (ours, theirs) in enumerate(zip(series.resolutions, tifffile_series)):
            assert ours.shape == theirs.shape, f"{series.name} level {k}"
            difference = np.abs(ours.astype(np.int16) - theirs).max()
            assert difference <= tolerance, f"{series.name} level {k}: Bio-Formats differs by {difference}"
    if variant not in LOSSY:
        np.testing.assert_array_equal(read.series[0].resolutions[0], mosaic)
        np.testing.assert_array_equal(read.series[2].resolutions[0], slide_images["macro"].pixels)
        np.testing.assert_array_equal(read.series[3].resolutions[0], slide_images["label"].pixels)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ome_xml_validates_in_bioformats(exports, variant):
    _, read = exports[0][variant]
    assert read.stored_xml_valid and read.bioformats_xml_valid


def test_bioformats_validation_finds_a_schema_error(exports):
    _, read = exports[0]["broken"]
    assert read.format == "OME-TIFF" and not read.stored_xml_valid


def test_full_colour_jpeg_is_rgb_photometric_and_subsampled_jpeg_is_ycbcr(exports):
    files = exports[0]
    expected = {"jpeg": (tifffile.PHOTOMETRIC.RGB, None), "jpeg-422": (tifffile.PHOTOMETRIC.YCBCR, (2, 1)),
                "jpeg-420": (tifffile.PHOTOMETRIC.YCBCR, (2, 2))}
    for variant, (photometric, subsampling) in expected.items():
        with tifffile.TiffFile(files[variant][0]) as tiff:
            for series in tiff.series:
                for level in series.levels:
                    page = level.keyframe
                    assert page.compression == tifffile.COMPRESSION.JPEG and page.photometric == photometric
                    if subsampling is not None:
                        assert page.tags["YCbCrSubSampling"].value == subsampling


@pytest.mark.slow
def test_a_scan_exported_as_the_export_node_does_reads_right_in_bioformats(tmp_path, read_with_bioformats,
                                                                            psnr_db):
    """A virtual-microscope scan that skips empty tiles (so it takes the overview photo), stitched from its
    manifest (the layout the stitching node makes) and exported with the options and slide photos the
    export node derives from the orchestrator's goal."""
    from wsi_acquisition.hardware import SimulatedMicroscope
    from wsi_acquisition.optics import Camera
    from wsi_acquisition.scan import FocusStrategy, ScanRequest, ScanRunner
    from wsi_export.node import PARAMETERS, options_from_goal
    from wsi_export.scan_manifest import slide_images_from_manifest
    from wsi_interfaces.action import ExportSlide
    from wsi_stitching import stitch_manifest

    backend = SimulatedMicroscope.create(slide_seed=0, speedup=1000.0, camera=Camera(width_px=256, height_px=256))
    scan = ScanRunner(backend, ScanRequest(  # focus does not matter to a reader: no focus map, a faster test
        scan_id="scan", output_dir=tmp_path, region_um=(43_000.0, 12_000.0, 250.0, 250.0),
        objective_magnification=20.0, focus_strategy=FocusStrategy.NONE, skip_empty_tiles=True)).run()
    mosaic = stitch_manifest(scan.manifest_path, scan.scan_dir / "mosaic.zarr").mosaic_path
    goal = ExportSlide.Goal(output_name="scan", formats=["ome-tiff"], write_thumbnail=True)  # as the orchestrator
    result = export_slide(mosaic, scan.scan_dir, goal.output_name, tuple(goal.formats),
                          options_from_goal(goal, {name: default for name, (default, _) in PARAMETERS.items()}),
                          **slide_images_from_manifest(scan.manifest_path))
    read, = read_with_bioformats(result.output_paths)
    assert read.format == "OME-TIFF" and read.stored_xml_valid and read.bioformats_xml_valid
    assert [s.name for s in read.series] == ["scan", "thumbnail", "macro"]
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        assert tiff.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
        levels = [level.asarray() for level in tiff.series[0].levels]
        macro = tiff.series[2].asarray()
    assert len(levels) == len(read.series[0].resolutions) == result.levels
    for k, (ours, theirs) in enumerate(zip(read.series[0].resolutions, levels)):
        assert np.abs(ours.astype(np.int16) - theirs).max() <= DECODER_ROUNDING, f"level {k}"
    overview = tifffile.imread(scan.scan_dir / "overview.tif")
    assert read.series[2].resolutions[0].shape == overview.shape
    assert np.abs(read.series[2].resolutions[0].astype(np.int16) - macro).max() <= DECODER_ROUNDING
    # the overview photo itself, losing what JPEG Q90 loses on it
    jpeg_only = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(overview, level=90, outcolorspace="RGB"))
    assert psnr_db(macro, overview) >= psnr_db(jpeg_only, overview) - 0.5
