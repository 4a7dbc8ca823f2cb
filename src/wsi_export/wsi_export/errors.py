"""Exceptions raised by the export core; the export node maps each to an ExportSlide error code."""


class ExportError(Exception):
    """Base class of every error the export core raises on purpose."""


class ExportOptionsError(ExportError, ValueError):
    """An export option (format, codec, quality, tile size, name) has an invalid value."""


class MosaicInputError(ExportError, ValueError):
    """The mosaic cannot be read: missing, wrong shape/dtype, or missing/invalid attributes."""


class ExportStorageError(ExportError, OSError):
    """The output could not be written (bad directory, permissions, disk full, existing output)."""


class ExportCancelled(ExportError):
    """The caller's should_cancel() returned True; no output is left under the final name."""


class SlideImageError(ExportError, ValueError):
    """A whole-slide photo (macro, label), or the scan manifest that lists it, cannot be read or is not RGB."""
