"""Pyramid building and OME-TIFF / OME-Zarr writers (ROS-free core), export node.

Core entry point for the export node::

    from wsi_export import ExportOptions, export_slide
    result = export_slide("/data/slide-0001.zarr", "/exports", "slide-0001", ("ome-tiff", "ome-zarr"),
                          ExportOptions(compression="jpeg", quality=90),
                          progress=on_progress, should_cancel=goal_is_cancelling)

The photos a scan took of the whole slide (and of its label) go beside the pyramid::

    from wsi_export.scan_manifest import slide_images_from_manifest
    export_slide(..., **slide_images_from_manifest("/data/slide-0001/manifest.json"))  # macro=, label=

Errors: ExportOptionsError (bad goal), MosaicInputError (unreadable mosaic), SlideImageError (unreadable
slide photo or manifest), ExportStorageError (output could not be written), ExportCancelled; all derive
from ExportError."""
__version__ = "0.1.0"

from .errors import (ExportCancelled, ExportError, ExportOptionsError, ExportStorageError,  # noqa: E402
                     MosaicInputError, SlideImageError)
from .export import ExportOptions, ExportProgress, ExportResult, export_slide  # noqa: E402
from .mosaic import Mosaic, MosaicMetadata, mosaic_from_array, open_mosaic  # noqa: E402
from .slide_images import SlideImage  # noqa: E402

__all__ = ["ExportCancelled", "ExportError", "ExportOptionsError", "ExportStorageError", "MosaicInputError",
           "SlideImageError", "ExportOptions", "ExportProgress", "ExportResult", "export_slide", "Mosaic",
           "MosaicMetadata", "mosaic_from_array", "open_mosaic", "SlideImage"]
