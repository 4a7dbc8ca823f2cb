"""Stitching a scan while it runs, from its tile stream, with the scan manifest as the last word.

A re-captured tile (refocused) follows its first capture immediately, so each tile is held back
until a tile of another grid cell arrives: the re-capture then replaces it before it is used.
Published captures are numbered without gaps, so a gap after the held tile means a capture was lost,
perhaps the held cell's re-capture: that cell is then left to the end, where the scan's own record
decides. At the end of the scan the manifest says which capture of each cell was kept; any of those that
did not arrive over the network (a dropped message, a late subscriber) is read from the tile file
the scan saved, so the mosaic is complete whenever the scan's own record is.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_common.scan_files import Manifest, load_tile_image
from wsi_stitching.errors import BadTileError
from wsi_stitching.layout import PlannedScan
from wsi_stitching.stitcher import MosaicStitcher, StitchParameters, StitchResult


@dataclass
class _Held:
    sequence: int
    row: int
    col: int
    image: np.ndarray
    x_um: float
    y_um: float


@dataclass
class InlineStitch:
    plan: PlannedScan
    mosaic_path: Path
    parameters: StitchParameters = field(default_factory=StitchParameters)

    def __post_init__(self):
        self.stitcher = MosaicStitcher(self.plan.layout(), self.mosaic_path, self.parameters, resume=True)
        self._held: _Held | None = None
        self.used_sequences: dict[tuple[int, int], int] = {}
        self.rejected: list[str] = []
        self.read_from_disk = 0

    def offer(self, sequence: int, row: int, col: int, image: np.ndarray, x_um: float, y_um: float) -> None:
        """Take a tile from the stream. A bad tile is recorded in `rejected` and skipped. The image is kept
        as given, not copied: the node's view of a message keeps that message's buffer, which rclpy never
        reuses, alive for as long as the tile is held."""
        if self._held is not None and (self._held.row, self._held.col) != (row, col):
            if sequence <= self._held.sequence + 1:
                self._use(self._held)
        self._held = _Held(sequence, row, col, image, x_um, y_um)

    def _use(self, tile: _Held) -> None:
        try:
            self.stitcher.add_tile(tile.row, tile.col, tile.image, tile.x_um, tile.y_um)
        except BadTileError as error:
            self.rejected.append(f"tile #{tile.sequence} ({tile.row}, {tile.col}): {error}")
        else:
            self.used_sequences[(tile.row, tile.col)] = tile.sequence

    def finish(self, manifest_path: Path) -> StitchResult:
        """Use the held tile, fetch kept captures that never arrived from disk, and finalise."""
        manifest = Manifest.read(manifest_path)
        kept = manifest.final_captures()
        if self._held is not None:
            cell = (self._held.row, self._held.col)
            if cell not in kept or kept[cell]["sequence"] == self._held.sequence:
                self._use(self._held)
            self._held = None
        for cell, entry in sorted(kept.items()):
            if cell in self.used_sequences or not entry.get("image"):
                continue
            tile = _Held(entry["sequence"], cell[0], cell[1], load_tile_image(manifest.resolve(entry["image"])),
                         entry["measured_x_um"], entry["measured_y_um"])
            self._use(tile)
            self.read_from_disk += 1
        return self.stitcher.finish()

