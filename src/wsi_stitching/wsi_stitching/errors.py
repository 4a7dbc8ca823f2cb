"""Exceptions raised by the stitching core; each message names the wrong value and what was expected."""


class StitchingError(ValueError):
    """Base class of every error the stitching core raises on purpose."""


class BadTileError(StitchingError):
    """A tile cannot be used (wrong shape, dtype, grid cell or pose); the caller may report and skip it."""


class DuplicateTileError(BadTileError):
    """A tile arrived for a grid cell that has already been received."""


class LayoutError(StitchingError):
    """A tile-grid layout is inconsistent (sizes, pixel size, grid cells)."""


class ResumeError(StitchingError):
    """An existing mosaic or journal cannot be resumed with the given inputs."""
