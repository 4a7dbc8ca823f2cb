import getpass
import socket
import uuid

import imagecodecs
import numpy as np
import ome_types
import pytest
import tifffile
import tiffslide

from wsi_export.export import ExportOptions, export_slide
from wsi_export.pyramid import pyramid_level_shapes

PIXEL_SIZE_UM = 0.25


def _expected_shapes(mosaic_pixels):
    return pyramid_level_shapes(*mosaic_pixels.shape[:2], lowest_level_max_edge_px=1024)


@pytest.fixture(scope="module")
def jpeg_export(mosaic_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("jpeg")
    updates = []
    result = export_slide(mosaic_path, output_dir, "slide", ("ome-tiff",),
                          ExportOptions(compression="jpeg", quality=90), progress=updates.append)
    return result, updates


def test_tifffile_reads_every_level_with_shapes_tiles_and_resolution(jpeg_export, mosaic_pixels):
    result, _ = jpeg_export
    expected = _expected_shapes(mosaic_pixels)
    assert len(expected) == 3 and result.level_shapes == expected
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        assert tiff.is_bigtiff and tiff.is_ome
        levels = tiff.series[0].levels
        assert [level.shape for level in levels] == [(h, w, 3) for h, w in expected]
        assert len(tiff.pages[0].subifds) == len(expected) - 1
        for k, level in enumerate(levels):
            page = level.keyframe
            assert page.tile == (512, 512)
            assert page.samplesperpixel == 3 and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.photometric == tifffile.PHOTOMETRIC.RGB  # full-resolution colour as RGB JPEG
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            numerator, denominator = page.tags["XResolution"].value
            assert 1e4 / (numerator / denominator) == pytest.approx(PIXEL_SIZE_UM * 2 ** k, rel=1e-6)
            assert (page.subfiletype == 1) == (k > 0)


def test_jpeg_q90_pixels_match_mosaic_and_reference_pyramid(jpeg_export, mosaic_pixels, reference_pyramid,
                                                             psnr_db):
    result, _ = jpeg_export
    reference = reference_pyramid(mosaic_pixels, result.levels)
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        levels = [level.asarray() for level in tiff.series[0].levels]
    assert psnr_db(levels[0], mosaic_pixels) >= 40.0
    for k in range(1, len(levels)):
        # reduced levels pack more detail per pixel, so JPEG loses more there: the bar is what JPEG
        # q90 itself loses on the exact reduction
        jpeg_only = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(
            reference[k], level=90, colorspace="RGB", outcolorspace="RGB"))
        assert psnr_db(levels[k], reference[k]) >= psnr_db(jpeg_only, reference[k]) - 0.5, f"level {k}"


def test_ome_xml_validates_and_carries_acquisition_metadata(jpeg_export, mosaic_pixels):
    result, _ = jpeg_export
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        description = tiff.pages[0].description
        other_descriptions = [p.description for p in tiff.pages[1:]] + [
            p.description for level in tiff.series[0].levels[1:] for p in level.pages]
        series = {s.name: s.shape for s in tiff.series}
    assert not any(other_descriptions), "OME-XML must be in the first IFD only"
    ome = ome_types.from_xml(description, validate=True)
    assert ome.uuid.startswith("urn:uuid:") and uuid.UUID(ome.uuid[len("urn:uuid:"):])
    main = ome.images[0]
    pixels = main.pixels
    assert (pixels.size_y, pixels.size_x, pixels.size_c) == (*mosaic_pixels.shape[:2], 3)
    assert pixels.physical_size_x == pytest.approx(PIXEL_SIZE_UM)
    assert pixels.physical_size_y == pytest.approx(PIXEL_SIZE_UM)
    assert pixels.physical_size_x_unit.value == "µm"
    assert pixels.channels[0].samples_per_pixel == 3 and pixels.interleaved
    assert pixels.tiff_data_blocks[0].ifd == 0
    assert pixels.tiff_data_blocks[0].uuid.file_name == "slide.ome.tif"
    assert pixels.tiff_data_blocks[0].uuid.value == ome.uuid
    objective = ome.instruments[0].objectives[0]
    assert objective.nominal_magnification == 40.0 and objective.lens_na == pytest.approx(0.95)
    assert main.objective_settings.id == objective.id
    assert main.acquisition_date.isoformat().startswith("2026-01-15T10:30:00")
    names = [image.name for image in ome.images]
    assert names == ["slide", "thumbnail"]  # no slide photos were given
    thumbnail = ome.images[1].pixels
    assert series["thumbnail"] == (thumbnail.size_y, thumbnail.size_x, 3) and max(series["thumbnail"][:2]) <= 256
    assert thumbnail.physical_size_x == pytest.approx(PIXEL_SIZE_UM * mosaic_pixels.shape[1] / thumbnail.size_x)


def test_metadata_is_deidentified_unless_an_experimenter_is_passed(jpeg_export, mosaic_path, tmp_path):
    result, _ = jpeg_export
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        text = " ".join(str(tag.value) for page in tiff.pages for tag in page.tags
                        if isinstance(tag.value, str))
    for personal in {getpass.getuser(), socket.gethostname()}:
        assert personal not in text
    assert "Experimenter" not in text
    named = export_slide(mosaic_path, tmp_path, "named", options=ExportOptions(
        experimenter_name="dr-who", write_thumbnail=False))
    with tifffile.TiffFile(named.output_paths[0]) as tiff:
        ome = ome_types.from_xml(tiff.pages[0].description, validate=True)
        assert len(tiff.series) == 1
    assert ome.experimenters[0].user_name == "dr-who"
    assert ome.images[0].experimenter_ref.id == ome.experimenters[0].id


def test_tiffslide_opens_levels_dimensions_and_mpp(jpeg_export, mosaic_pixels, psnr_db):
    result, _ = jpeg_export
    slide = tiffslide.TiffSlide(result.output_paths[0])
    try:
        assert slide.level_count == result.levels
        assert slide.level_dimensions == tuple((w, h) for h, w in result.level_shapes)
        assert slide.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(PIXEL_SIZE_UM)
        assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(PIXEL_SIZE_UM)
        region = np.asarray(slide.read_region((700, 300), 0, (600, 400)))[..., :3]
        assert psnr_db(region, mosaic_pixels[300:700, 700:1300]) >= 40.0
    finally:
        slide.close()


def test_progress_is_reported_per_level_and_reaches_one(jpeg_export):
    result, updates = jpeg_export
    fractions = [u.fraction_done for u in updates]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert sorted({u.level for u in updates}) == list(range(result.levels))
    assert all(u.levels_total == result.levels and u.format == "ome-tiff" for u in updates)
    assert updates[-1].bytes_written <= result.output_sizes_bytes[0]
    assert updates[-1].bytes_written > 0.5 * result.output_sizes_bytes[0]


@pytest.mark.parametrize("compression, lossless, expected_tag", [
    ("deflate", False, tifffile.COMPRESSION.ADOBE_DEFLATE),
    ("zstd", False, tifffile.COMPRESSION.ZSTD),
    ("lzw", False, tifffile.COMPRESSION.LZW),
    ("none", False, tifffile.COMPRESSION.NONE),
    ("jpeg", True, tifffile.COMPRESSION.ADOBE_DEFLATE),
    ("jpeg2000", True, tifffile.COMPRESSION.JPEG2000),
])
def test_lossless_codecs_read_back_bit_exact(mosaic_path, mosaic_pixels, reference_pyramid, tmp_path,
                                             compression, lossless, expected_tag):
    result = export_slide(mosaic_path, tmp_path, "lossless", options=ExportOptions(
        compression=compression, lossless=lossless, tile_size_px=256, write_thumbnail=False))
    reference = reference_pyramid(mosaic_pixels, result.levels)
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        assert tiff.pages[0].compression == expected_tag
        assert tiff.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
        assert tiff.pages[0].tile == (256, 256)
        for k, level in enumerate(tiff.series[0].levels):
            np.testing.assert_array_equal(level.asarray(), reference[k], err_msg=f"level {k}")


def test_lossy_jpeg2000_reaches_40_db(mosaic_path, mosaic_pixels, tmp_path, psnr_db):
    result = export_slide(mosaic_path, tmp_path, "j2k", options=ExportOptions(
        compression="jpeg2000", quality=90, write_thumbnail=False))
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        assert tiff.pages[0].compression == tifffile.COMPRESSION.JPEG2000
        assert psnr_db(tiff.series[0].levels[0].asarray(), mosaic_pixels) >= 40.0
    assert result.output_sizes_bytes[0] < mosaic_pixels.nbytes / 3


def test_libvips_opens_every_subifd_level_with_its_resolution(jpeg_export):
    pyvips = pytest.importorskip("pyvips")
    result, _ = jpeg_export
    for k, (h, w) in enumerate(result.level_shapes):
        image = pyvips.Image.new_from_file(str(result.output_paths[0]), subifd=k - 1)
        assert (image.height, image.width, image.bands) == (h, w, 3)
        assert 1e3 / image.xres == pytest.approx(PIXEL_SIZE_UM * 2 ** k, rel=1e-6)  # xres: px per mm
