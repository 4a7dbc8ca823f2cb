"""The slide photos a scan took, read through the scan-manifest reader (`wsi_common.scan_files`, the one
home of the manifest format)."""
from __future__ import annotations

from pathlib import Path

import tifffile
from wsi_common.scan_files import Manifest, ManifestError

from .errors import SlideImageError
from .slide_images import SlideImage

# OME-TIFF series name -> the scan manifest's key for that image.
MANIFEST_KEYS = {"macro": "overview", "label": "label"}


def slide_images_from_manifest(manifest_path: str | Path) -> dict[str, SlideImage]:
    """The slide photos a scan took, by series name ("macro", "label"), as its manifest lists them;
    empty if it took none (e.g. a scan of a given region without tissue detection)."""
    try:
        entries = Manifest.read(manifest_path).slide_images()
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
