"""Tile registration, global alignment and blending into a chunked Zarr mosaic (ROS-free core).

Inline use (a node feeding tiles as they arrive)::

    stitcher = MosaicStitcher(TileGridLayout.regular(...), "scan.zarr")
    stitcher.add_tile(row, col, rgb_uint8, stage_x_um, stage_y_um)   # BadTileError: report, skip
    result = stitcher.finish()                                        # StitchResult + QC report JSON

Finished scan: ``stitch_manifest("manifest.json", "scan.zarr")`` (a manifest it cannot use raises
`wsi_common.scan_files.ManifestError`).
"""
from .errors import BadTileError, DuplicateTileError, LayoutError, ResumeError, StitchingError
from .layout import TileGridLayout, read_manifest
from .stitcher import MosaicStitcher, StitchParameters, StitchResult, remove_mosaic, stitch_manifest

__all__ = ["BadTileError", "DuplicateTileError", "LayoutError", "ResumeError", "StitchingError", "TileGridLayout",
           "read_manifest", "MosaicStitcher", "StitchParameters", "StitchResult", "remove_mosaic",
           "stitch_manifest"]
