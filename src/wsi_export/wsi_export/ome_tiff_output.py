"""OME-TIFF output: one BigTIFF holding the pyramid and, after it, the thumbnail and slide photos.

The full-resolution level is the first page; the reduced levels are its SubIFDs, written tile by tile in
file order as the export's block jobs deliver them, so no level is held in memory. Every image after the
pyramid is a page (and an OME series) of its own. The OME-XML (ome_xml.py), in the first page's
ImageDescription, lists every series; each page carries its pixel size as TIFF resolution tags."""
from __future__ import annotations

import io
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

import numpy as np
import tifffile

from . import __version__
from .codecs import TileCodec
from .mosaic import MosaicMetadata
from .ome_xml import OmeSeries, build_ome_xml

MICROMETRES_PER_CENTIMETRE = 1e4


def _open_binary_output(path: Path) -> io.BufferedWriter:
    """The TIFF file handle; a seam so tests can simulate a full disk."""
    return open(path, "xb")


def _resolution_tags(pixel_size_um: float) -> dict[str, Any]:
    pixels_per_cm = MICROMETRES_PER_CENTIMETRE / pixel_size_um
    return {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}


class OmeTiffWriter:
    """The OME-TIFF of one export, created at `path` (its final name is `file_name`). `level_shapes` are the
    pyramid's (height_px, width_px), full resolution first, at metadata.pixel_size_um; `images` the
    (series name, (height_px, width_px), pixel size µm) of the images written after it, in that order."""

    def __init__(self, path: Path, file_name: str, file_uuid: str, name: str, metadata: MosaicMetadata,
                 level_shapes: list[tuple[int, int]], images: list[tuple[str, tuple[int, int], float]],
                 codec: TileCodec, tile_size_px: int, experimenter_name: str | None):
        series = [OmeSeries(name, *level_shapes[0], metadata.pixel_size_um, ifd=0)]
        for series_name, (height_px, width_px), pixel_size_um in images:
            series.append(OmeSeries(series_name, height_px, width_px, pixel_size_um, ifd=len(series)))
        self._description = build_ome_xml(file_name=file_name, file_uuid=file_uuid, metadata=metadata,
                                          series=series, experimenter_name=experimenter_name)
        self._reduced_levels = len(level_shapes) - 1
        self._page_arguments = dict(dtype=np.uint8, tile=(tile_size_px, tile_size_px), metadata=None,
                                    software=f"wsi_export {__version__}", **codec.tifffile_arguments())
        self._file = _open_binary_output(path)
        try:
            self._tiff = tifffile.TiffWriter(self._file, bigtiff=True, byteorder="<", ome=False)
        except BaseException:
            self._file.close()
            raise

    def write_level(self, level: int, height_px: int, width_px: int, pixel_size_um: float,
                    tiles: Iterable[bytes]) -> None:
        """One pyramid level from its encoded tiles, row by row from the top left; level 0 first."""
        placement = ({"subifds": self._reduced_levels, "description": self._description.encode()}
                     if level == 0 else {"subfiletype": 1})
        self._tiff.write(tiles, shape=(height_px, width_px, 3), **placement, **_resolution_tags(pixel_size_um),
                         **self._page_arguments)

    def write_image(self, pixels: np.ndarray, pixel_size_um: float) -> None:
        """The next image after the pyramid (thumbnail, slide photo), in the order `images` gave."""
        self._tiff.write(pixels, **_resolution_tags(pixel_size_um), **self._page_arguments)

    def close(self) -> None:
        try:
            self._tiff.close()
        finally:
            self._file.close()

    def __enter__(self) -> OmeTiffWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
