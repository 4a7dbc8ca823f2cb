"""Pyramid building and OME-TIFF / OME-Zarr writers (ROS-free core), export node.

Core entry point for the export node::

    from wsi_export import ExportOptions, export_slide
    result = export_slide("/data/slide-0001.zarr", "/exports", "slide-0001", ("ome-tiff", "ome-zarr"),
                          ExportOptions(compression="jpeg", quality=90),
                          progress=on_progress, should_cancel=goal_is_cancelling)

Errors: ExportOptionsError (bad goal), MosaicInputError (unreadable mosaic), ExportStorageError
(output could not be written), ExportCancelled; all derive from ExportError."""
__version__ = "0.1.0"

from .errors import (ExportCancelled, ExportError, ExportOptionsError, ExportStorageError,  # noqa: E402
                     MosaicInputError)
from .export import ExportOptions, ExportProgress, ExportResult, export_slide  # noqa: E402
from .mosaic import Mosaic, MosaicMetadata, mosaic_from_array, open_mosaic  # noqa: E402

__all__ = ["ExportCancelled", "ExportError", "ExportOptionsError", "ExportStorageError", "MosaicInputError",
           "ExportOptions", "ExportProgress", "ExportResult", "export_slide", "Mosaic", "MosaicMetadata",
           "mosaic_from_array", "open_mosaic"]
