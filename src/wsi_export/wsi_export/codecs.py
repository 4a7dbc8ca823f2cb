"""Tile codecs: encode RGB tiles exactly as TIFF readers expect them for each TIFF compression."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np

from .errors import ExportOptionsError

COMPRESSIONS = ("jpeg", "deflate", "zstd", "jpeg2000", "lzw", "none")
# JPEG chroma subsampling (horizontal, vertical) -> how the tiles are stored. (1, 1), full colour
# resolution, is stored as RGB components (TIFF Photometric RGB, what libvips writes at Q >= 90), never as
# YCbCr 4:4:4: Bio-Formats 7 (QuPath, OMERO) converts YCbCr 4:4:4 JPEG tiles to RGB twice and shows false
# colours. Subsampled chroma needs YCbCr (Photometric YCbCr), which Bio-Formats, libvips and tifffile read right.
JPEG_SUBSAMPLINGS = {(1, 1): ("RGB", "444"), (2, 1): ("YCBCR", "422"), (2, 2): ("YCBCR", "420")}
DEFLATE_LEVEL = 6
ZSTD_LEVEL = 3


def jpeg2000_target_psnr_db(quality: int) -> float:
    """Map the shared 1..100 quality scale to OpenJPEG's fixed-quality target (PSNR, dB)."""
    return 25.0 + 0.25 * quality


@dataclass(frozen=True)
class TileCodec:
    """One TIFF compression with its parameters; `compression` is the codec actually written."""
    compression: str
    quality: int = 90
    jpeg_subsampling: tuple[int, int] = (1, 1)

    @property
    def jpeg_colorspace(self) -> str:
        """Colour space of the JPEG components and TIFF Photometric: "RGB" or "YCBCR"."""
        return JPEG_SUBSAMPLINGS[self.jpeg_subsampling][0]

    @property
    def is_lossless(self) -> bool:
        return self.compression in ("deflate", "zstd", "lzw", "none", "jpeg2000-lossless")

    @property
    def uses_predictor(self) -> bool:
        return self.compression in ("deflate", "zstd", "lzw")

    def encode(self, tile: np.ndarray) -> bytes:
        """Encode one full (tile_px, tile_px, 3) uint8 tile to the bytes of one TIFF segment."""
        if self.uses_predictor:
            tile = imagecodecs.delta_encode(tile, axis=1)  # TIFF horizontal predictor, per sample
        if self.compression == "jpeg":
            outcolorspace, subsampling = JPEG_SUBSAMPLINGS[self.jpeg_subsampling]
            return imagecodecs.jpeg8_encode(tile, level=self.quality, colorspace="RGB",
                                            outcolorspace=outcolorspace, subsampling=subsampling)
        if self.compression == "deflate":
            return imagecodecs.deflate_encode(tile, level=DEFLATE_LEVEL)  # libdeflate, zlib stream
        if self.compression == "zstd":
            return imagecodecs.zstd_encode(tile, level=ZSTD_LEVEL)
        if self.compression == "lzw":
            return imagecodecs.lzw_encode(tile)
        if self.compression == "jpeg2000":
            return imagecodecs.jpeg2k_encode(tile, level=jpeg2000_target_psnr_db(self.quality),
                                             codecformat="j2k")
        if self.compression == "jpeg2000-lossless":
            return imagecodecs.jpeg2k_encode(tile, reversible=True, codecformat="j2k")
        return np.ascontiguousarray(tile).tobytes()

    def tifffile_arguments(self) -> dict[str, Any]:
        """Arguments for tifffile.TiffWriter.write that declare (or, for arrays, apply) this codec."""
        arguments: dict[str, Any] = {"photometric": "rgb", "planarconfig": "contig"}
        if self.compression == "jpeg":
            # tifffile sets Photometric from outcolorspace (and encodes arrays, such as the thumbnail, with it)
            arguments.update(compression="jpeg", subsampling=self.jpeg_subsampling,
                             compressionargs={"level": self.quality, "outcolorspace": self.jpeg_colorspace})
        elif self.compression == "deflate":
            arguments.update(compression="adobe_deflate", compressionargs={"level": DEFLATE_LEVEL})
        elif self.compression == "zstd":
            arguments.update(compression="zstd", compressionargs={"level": ZSTD_LEVEL})
        elif self.compression == "lzw":
            arguments.update(compression="lzw")
        elif self.compression == "jpeg2000":
            arguments.update(compression="jpeg2000",
                             compressionargs={"level": jpeg2000_target_psnr_db(self.quality),
                                              "codecformat": "j2k"})
        elif self.compression == "jpeg2000-lossless":
            arguments.update(compression="jpeg2000",
                             compressionargs={"reversible": True, "codecformat": "j2k"})
        if self.uses_predictor:
            arguments["predictor"] = "horizontal"
        return arguments


def resolve_codec(compression: str, quality: int = 90, lossless: bool = False,
                  jpeg_subsampling: tuple[int, int] = (1, 1)) -> TileCodec:
    """Validate the user's codec choice; `lossless` turns jpeg into deflate and jpeg2000 reversible."""
    if compression not in COMPRESSIONS:
        raise ExportOptionsError(f"compression {compression!r} is not supported; expected one of "
                                 f"{', '.join(COMPRESSIONS)}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ExportOptionsError(f"quality={quality!r} must be an integer in 1..100")
    jpeg_subsampling = tuple(jpeg_subsampling)
    if jpeg_subsampling not in JPEG_SUBSAMPLINGS:
        raise ExportOptionsError(f"jpeg_subsampling={jpeg_subsampling} must be one of "
                                 f"{sorted(JPEG_SUBSAMPLINGS)}")
    if lossless and compression == "jpeg":
        compression = "deflate"
    elif lossless and compression == "jpeg2000":
        compression = "jpeg2000-lossless"
    return TileCodec(compression=compression, quality=int(quality), jpeg_subsampling=jpeg_subsampling)
