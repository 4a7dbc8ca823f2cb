"""Exceptions raised by the export core; the export node maps each to an ExportSlide error code."""


class ExportError(Exception):
    """Base class of every error the export core raises on purpose."""


class ExportOptionsError(ExportError, ValueError):
    """An export option (format, codec, quality, tile size, name) has an invalid value."""


class MosaicInputError(ExportError, ValueError):
    """The mosaic cannot be read: missing, wrong shape/dtype, or missing/invalid attributes."""


class MosaicDataError(MosaicInputError):
    """Pixels of the mosaic are missing from its store or cannot be decoded; the message names where."""


class UnreadableChunkError(MosaicDataError):
    """A chunk of the mosaic cannot be decoded. region_px = (row0, col0, height, width) of the pixels it
    holds, for the caller to name the tiles there; file names the chunk's file where there is one."""

    def __init__(self, region_px: tuple[int, int, int, int], file: str, detail: str):
        super().__init__(region_px, file, detail)  # args as given: the error pickles (dask workers)
        self.region_px, self.file, self.detail = region_px, file, detail

    def __str__(self) -> str:
        return f"mosaic chunk {self.file} cannot be decoded: {self.detail}"


class ExportStorageError(ExportError, OSError):
    """The output could not be written (bad directory, permissions, disk full, existing output)."""


class ExportCancelled(ExportError):
    """The caller's should_cancel() returned True; no output is left under the final name."""


class SlideImageError(ExportError, ValueError):
    """A whole-slide photo (macro, label), or the scan manifest that lists it, cannot be read or is not RGB."""
