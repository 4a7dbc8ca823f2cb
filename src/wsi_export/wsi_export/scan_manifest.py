"""The slide photos a scan took, read through the scan-manifest reader (wsi_stitching.layout, the one home
of the manifest format). A module of its own so that the export core imports without the stitching package
(dask workers, benchmarks)."""
from __future__ import annotations

from pathlib import Path

import tifffile
from wsi_stitching.errors import ManifestError
from wsi_stitching.layout import read_slide_images

from .errors import SlideImageError
from .slide_images import SlideImage

# OME-TIFF series name -> the scan manifest's key for that image.
MANIFEST_KEYS = {"macro": "overview", "label": "label"}


def slide_images_from_manifest(manifest_path: str | Path) -> dict[str, SlideImage]:
    """The slide photos a scan took, by series name ("macro", "label"), as its manifest lists them;
    empty if it took none (e.g. a scan of a given region without tissue detection)."""
    try:
        entries = read_slide_images(manifest_path)
    except ManifestError as error:
        raise SlideImageError(str(error)) from error
    images = {}
    for name, key in MANIFEST_KEYS.items():
        if key not in entries:
            continue
        entry = entries[key]
        try:
            pixels = tifffile.imread(entry.image_path)
        except (OSError, ValueError) as error:  # tifffile.TiffFileError is a ValueError
            raise SlideImageError(f"{key} image {entry.image_path} of manifest {manifest_path} cannot be "
                                  f"read: {error}") from error
        try:
            images[name] = SlideImage(pixels, entry.pixel_size_um)
        except SlideImageError as error:
            raise SlideImageError(f"{key} image {entry.image_path}: {error}") from error
    return images
