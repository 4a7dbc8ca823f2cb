"""Pyramid building and OME-TIFF / OME-Zarr / DICOM WSI writers (ROS-free core), export node.

Core entry point for the export node::

    from wsi_export import ExportOptions, export_slide
    result = export_slide("/data/slide-0001.zarr", "/exports", "slide-0001",
                          ("ome-tiff", "ome-zarr", "dicom"), ExportOptions(compression="jpeg", quality=90),
                          progress=on_progress, should_cancel=goal_is_cancelling)

"dicom" writes the directory slide-0001.dicom, a DICOM WSI series (dicom_output.py); the scanner it names
is ExportOptions(dicom_equipment=DicomEquipment(manufacturer, model_name, device_serial_number)).

The photos a scan took of the whole slide (and of its label) go beside the pyramid::

    from wsi_export.scan_manifest import slide_images_from_manifest
    export_slide(..., **slide_images_from_manifest("/data/slide-0001/manifest.json"))  # macro=, label=

Errors: ExportOptionsError (bad goal), MosaicInputError (unreadable mosaic; its MosaicDataError: pixels
missing or undecodable, naming the region and tiles), SlideImageError (unreadable slide photo or manifest),
ExportStorageError (output could not be written), ExportCancelled; all derive from ExportError.

A killed export leaves a hidden work directory beside its outputs; the next export of the same name
removes it, remove_stale_partials_under(root) every one under a directory."""
__version__ = "0.1.0"

from .dicom_output import DicomEquipment  # noqa: E402
from .errors import (ExportCancelled, ExportError, ExportOptionsError, ExportStorageError,  # noqa: E402
                     MosaicDataError, MosaicInputError, SlideImageError)
from .export import ExportOptions, ExportProgress, ExportResult, export_slide  # noqa: E402
from .mosaic import Mosaic, MosaicMetadata, MosaicRegion, mosaic_from_array, open_mosaic  # noqa: E402
from .slide_images import SlideImage  # noqa: E402
from .work_dir import remove_stale_partials_under  # noqa: E402

__all__ = ["DicomEquipment", "ExportCancelled", "ExportError", "ExportOptionsError", "ExportStorageError",
           "MosaicDataError", "MosaicInputError", "SlideImageError", "ExportOptions", "ExportProgress", "ExportResult",
           "export_slide", "remove_stale_partials_under", "Mosaic", "MosaicMetadata", "MosaicRegion",
           "mosaic_from_array", "open_mosaic", "SlideImage"]
