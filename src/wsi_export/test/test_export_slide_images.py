"""The scan's photo of the whole slide is the OME-TIFF's "macro" (a label photo its "label"), beside the
thumbnail of the pyramid, found through the scan manifest."""
import json

import numpy as np
import ome_types
import pytest
import tifffile
import tiffslide

from wsi_export.errors import SlideImageError
from wsi_export.export import ExportOptions, export_slide
from wsi_export.scan_manifest import slide_images_from_manifest
from wsi_export.slide_images import SlideImage

OVERVIEW_PIXEL_SIZE_UM = 20.0
LABEL_PIXEL_SIZE_UM = 30.0


def _scan_dir(directory, label: bool = True):
    """A scan directory as wsi_acquisition leaves it: manifest.json beside overview.tif (and a label)."""
    rng = np.random.default_rng(7)
    overview = rng.integers(0, 256, (90, 270, 3), dtype=np.uint8)
    tifffile.imwrite(directory / "overview.tif", overview, photometric="rgb")
    manifest = {"format": "wsi-scan-manifest", "version": 1, "scan_id": "s", "tiles": [],
                "overview": {"image": "overview.tif", "pixel_size_um": OVERVIEW_PIXEL_SIZE_UM,
                             "origin_x_um": 0.0, "origin_y_um": 0.0}}
    photos = {"macro": overview}
    if label:
        photos["label"] = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        tifffile.imwrite(directory / "label.tif", photos["label"], photometric="rgb")
        manifest["label"] = {"image": "label.tif", "pixel_size_um": LABEL_PIXEL_SIZE_UM}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory / "manifest.json", photos


def test_manifest_gives_the_overview_as_macro_and_the_label(tmp_path):
    manifest, photos = _scan_dir(tmp_path)
    images = slide_images_from_manifest(manifest)
    assert list(images) == ["macro", "label"]
    for name, image in images.items():
        np.testing.assert_array_equal(image.pixels, photos[name])
    assert images["macro"].pixel_size_um == OVERVIEW_PIXEL_SIZE_UM
    assert images["label"].pixel_size_um == LABEL_PIXEL_SIZE_UM
    document = json.loads(manifest.read_text())
    document["overview"] = None  # a scan of a given region takes no overview
    del document["label"]
    manifest.write_text(json.dumps(document))
    assert slide_images_from_manifest(manifest) == {}
    manifest.write_text("{")
    with pytest.raises(SlideImageError, match="cannot read manifest"):
        slide_images_from_manifest(manifest)


@pytest.mark.parametrize("change, message", [
    (lambda m, d: d["overview"].update(image="gone.tif"), "gone.tif does not exist"),
    (lambda m, d: d["overview"].pop("pixel_size_um"), "expected keys image and pixel_size_um"),
    (lambda m, d: d["label"].update(pixel_size_um=-1), "pixel_size_um=-1.0; expected a positive number"),
    (lambda m, d: tifffile.imwrite(m.parent / "overview.tif", np.zeros((8, 8), np.uint8)),
     r"overview.tif: slide image pixels are \(8, 8\) uint8; expected .*RGB"),
    (lambda m, d: (m.parent / "label.tif").write_text("not a tiff"), "label image .* cannot be read"),
])
def test_unreadable_slide_photos_raise_a_slide_image_error(tmp_path, change, message):
    manifest, _ = _scan_dir(tmp_path)
    document = json.loads(manifest.read_text())
    change(manifest, document)
    manifest.write_text(json.dumps(document))
    with pytest.raises(SlideImageError, match=message):
        slide_images_from_manifest(manifest)


def test_slide_images_must_be_rgb_uint8_with_a_pixel_size():
    with pytest.raises(SlideImageError, match=r"\(4, 4, 3\) uint16"):
        SlideImage(np.zeros((4, 4, 3), np.uint16), 1.0)
    with pytest.raises(SlideImageError, match="pixel_size_um=0"):
        SlideImage(np.zeros((4, 4, 3), np.uint8), 0)


@pytest.fixture(scope="module")
def exported_with_photos(mosaic_path, tmp_path_factory):
    directory = tmp_path_factory.mktemp("photos")
    manifest, photos = _scan_dir(directory)
    result = export_slide(mosaic_path, directory, "slide", options=ExportOptions(compression="deflate"),
                          **slide_images_from_manifest(manifest))
    return result.output_paths[0], photos


def test_macro_and_label_are_series_with_their_own_pixel_size(exported_with_photos):
    path, photos = exported_with_photos
    with tifffile.TiffFile(path) as tiff:
        assert [s.name for s in tiff.series] == ["slide", "thumbnail", "macro", "label"]
        series = {s.name: s for s in tiff.series}
        for name in ("macro", "label"):
            np.testing.assert_array_equal(series[name].asarray(), photos[name])
        numerator, denominator = series["macro"].keyframe.tags["XResolution"].value
        assert 1e4 * denominator / numerator == pytest.approx(OVERVIEW_PIXEL_SIZE_UM)
        ome = ome_types.from_xml(tiff.pages[0].description, validate=True)
    images = {image.name: image.pixels for image in ome.images}
    assert images["macro"].physical_size_x == images["macro"].physical_size_y == OVERVIEW_PIXEL_SIZE_UM
    assert images["label"].physical_size_x == LABEL_PIXEL_SIZE_UM
    assert (images["macro"].size_y, images["macro"].size_x) == photos["macro"].shape[:2]


def test_tiffslide_lists_thumbnail_macro_and_label_as_associated_images(exported_with_photos):
    path, photos = exported_with_photos
    slide = tiffslide.TiffSlide(path)
    try:
        assert set(slide.associated_images) == {"thumbnail", "macro", "label"}
        for name in ("macro", "label"):
            np.testing.assert_array_equal(np.asarray(slide.associated_images[name]), photos[name])
    finally:
        slide.close()


def test_without_thumbnail_the_photos_still_follow_the_pyramid(mosaic_path, tmp_path):
    manifest, photos = _scan_dir(tmp_path, label=False)
    result = export_slide(mosaic_path, tmp_path, "slide", options=ExportOptions(write_thumbnail=False),
                          **slide_images_from_manifest(manifest))
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        assert [s.name for s in tiff.series] == ["slide", "macro"]
        ome = ome_types.from_xml(tiff.pages[0].description, validate=True)
    assert [image.pixels.tiff_data_blocks[0].ifd for image in ome.images] == [0, 1]
