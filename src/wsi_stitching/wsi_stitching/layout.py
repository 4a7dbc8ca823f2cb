"""Tile-grid layout of a scan: from its plan (the ScanPlan message, or the plan its manifest records) or,
for a manifest without a plan, from the tiles' measured poses.

Stage positions are in µm and refer to the centre of a tile's field of view (`wsi_common.tile_grid`);
only differences between positions matter to the mosaic. A scan's nominal layout comes from its plan,
through `PlannedScan` only: the stitching node reads the plan from the ScanPlan message, a re-stitch from
the plan the manifest records, and both must make the same layout so that either can resume the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from wsi_common.scan_files import Manifest, ManifestTile
from wsi_common.tile_grid import Cell, TileGrid, field_of_view_um

from .errors import LayoutError

POSITION_TOLERANCE_UM = 1e-6  # far below a pixel, far above float rounding of stage coordinates


@dataclass(frozen=True)
class TileGridLayout:
    """What the stitcher must know before the first tile: grid size, tile size, optics and the
    nominal stage position of every grid cell that will be captured (uncaptured cells are absent)."""
    scan_id: str
    rows: int
    cols: int
    tile_height_px: int
    tile_width_px: int
    pixel_size_um: float
    nominal_positions_um: dict[Cell, tuple[float, float]]  # cell -> (x_um, y_um)
    objective_magnification: float = 0.0  # 0.0: unknown
    numerical_aperture: float = 0.0  # 0.0: unknown
    acquisition_datetime: str = ""

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise LayoutError(f"grid must have at least 1 row and column, got {self.rows}x{self.cols}")
        if self.tile_height_px < 16 or self.tile_width_px < 16:
            raise LayoutError(f"tile size must be at least 16x16 px, got "
                              f"{self.tile_height_px}x{self.tile_width_px}")
        if not (math.isfinite(self.pixel_size_um) and self.pixel_size_um > 0):
            raise LayoutError(f"pixel_size_um must be a positive number, got {self.pixel_size_um}")
        if not self.nominal_positions_um:
            raise LayoutError("layout lists no captured grid cells")
        for (row, col), (x_um, y_um) in self.nominal_positions_um.items():
            if not (0 <= row < self.rows and 0 <= col < self.cols):
                raise LayoutError(f"grid cell ({row}, {col}) is outside the {self.rows}x{self.cols} grid")
            if not (math.isfinite(x_um) and math.isfinite(y_um)):
                raise LayoutError(f"nominal position of cell ({row}, {col}) is not finite: {(x_um, y_um)}")

    @property
    def cells(self) -> list[Cell]:
        return sorted(self.nominal_positions_um)

    def fingerprint(self) -> dict:
        """JSON-able identity of the layout, used to refuse resuming with different inputs."""
        return {
            "scan_id": self.scan_id, "rows": self.rows, "cols": self.cols,
            "tile_height_px": self.tile_height_px, "tile_width_px": self.tile_width_px,
            "pixel_size_um": self.pixel_size_um,
            "nominal_positions_um": [[r, c, x, y] for (r, c), (x, y) in sorted(self.nominal_positions_um.items())],
        }

    @classmethod
    def regular(cls, scan_id: str, rows: int, cols: int, tile_height_px: int, tile_width_px: int,
                pixel_size_um: float, overlap_fraction: float, origin_x_um: float = 0.0,
                origin_y_um: float = 0.0, cells: list[Cell] | None = None, **optics) -> "TileGridLayout":
        """Layout of a regular raster with the given nominal overlap (what a ScanPlan describes); the origin
        is the centre of cell (0, 0)."""
        if not 0.0 <= overlap_fraction < 0.5:
            raise LayoutError(f"overlap_fraction must be in [0, 0.5), got {overlap_fraction}")
        grid = TileGrid(rows, cols, origin_x_um, origin_y_um, tile_width_px * (1 - overlap_fraction) * pixel_size_um,
                        tile_height_px * (1 - overlap_fraction) * pixel_size_um,
                        *field_of_view_um(tile_width_px, tile_height_px, pixel_size_um))
        chosen = cells if cells is not None else [(r, c) for r in range(rows) for c in range(cols)]
        positions = {cell: grid.centre_um(*cell) for cell in chosen}
        return cls(scan_id, rows, cols, tile_height_px, tile_width_px, pixel_size_um, positions, **optics)

    def differences_from(self, fingerprint: dict) -> list[str]:
        """How this layout differs from a fingerprint() (e.g. a journaled one), in words; empty when
        they are the same. Positions agree within POSITION_TOLERANCE_UM: the node and a re-stitch derive
        them from the same plan by different float operations."""
        mine = self.fingerprint()
        differences = [f"{key} {fingerprint.get(key)!r}, now {mine[key]!r}"
                       for key in ("scan_id", "rows", "cols", "tile_height_px", "tile_width_px")
                       if fingerprint.get(key) != mine[key]]
        if not math.isclose(fingerprint.get("pixel_size_um", math.nan), self.pixel_size_um, rel_tol=1e-12):
            differences.append(f"pixel_size_um {fingerprint.get('pixel_size_um')!r}, now {self.pixel_size_um!r}")
        journaled = {(r, c): (x, y) for r, c, x, y in fingerprint.get("nominal_positions_um", [])}
        if set(journaled) != set(self.nominal_positions_um):
            differences.append(f"grid cells: {len(journaled)} journaled, {len(self.nominal_positions_um)} now, "
                               f"{len(set(journaled) ^ set(self.nominal_positions_um))} not in both")
        else:
            moved = [cell for cell, position in sorted(self.nominal_positions_um.items())
                     if max(abs(a - b) for a, b in zip(journaled[cell], position)) > POSITION_TOLERANCE_UM]
            if moved:
                cell = moved[0]
                differences.append(f"nominal positions of {len(moved)} cells, e.g. {cell}: {journaled[cell]} µm, "
                                   f"now {self.nominal_positions_um[cell]} µm")
        return differences


def iso_utc(unix_s: float) -> str:
    """The acquisition time as the mosaic contract writes it: ISO 8601, UTC, whole seconds."""
    return datetime.fromtimestamp(unix_s, tz=timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class PlannedScan:
    """What a ScanPlan message says, in plain values."""
    scan_id: str
    grid: TileGrid
    cells: list[Cell]                   # the cells that will be captured
    tile_width_px: int
    tile_height_px: int
    pixel_size_um: float
    objective_magnification: float = 0.0
    numerical_aperture: float = 0.0
    acquisition_datetime: str = ""      # ISO 8601, when the scan started

    def layout(self) -> TileGridLayout:
        """Nominal positions are field-of-view centres, like the tiles' stage poses."""
        positions = {cell: self.grid.centre_um(*cell) for cell in self.cells}
        return TileGridLayout(self.scan_id, self.grid.rows, self.grid.cols, self.tile_height_px, self.tile_width_px,
                              self.pixel_size_um, positions, self.objective_magnification, self.numerical_aperture,
                              self.acquisition_datetime)


def _manifest_datetime(doc: dict) -> str:
    if "acquisition_datetime" in doc:
        return str(doc["acquisition_datetime"])
    return iso_utc(float(doc["started_unix_s"])) if "started_unix_s" in doc else ""


def _optics(doc: dict) -> dict:
    return {"objective_magnification": float(doc.get("objective_magnification", 0.0)),
            "numerical_aperture": float(doc.get("numerical_aperture", 0.0)),
            "acquisition_datetime": _manifest_datetime(doc)}


@dataclass(frozen=True)
class ScanManifest:
    layout: TileGridLayout
    tiles: list[ManifestTile] = field(default_factory=list)


def read_manifest(manifest_path: str | Path) -> ScanManifest:
    """Read a scan manifest (`wsi_common.scan_files`) for stitching: it needs "scan_id", "pixel_size_um",
    "tile_width_px", "tile_height_px" and "tiles" (the capture kept for each cell); optional are
    "objective_magnification", "numerical_aperture", "acquisition_datetime" (else from "started_unix_s"),
    and "plan", which gives the nominal layout exactly as the stitching node had it; without a plan the
    measured tile poses double as the nominal positions."""
    manifest = Manifest.read(manifest_path)
    manifest.require(("scan_id", "pixel_size_um", "tile_width_px", "tile_height_px", "tiles"))
    doc = manifest.document
    tiles = manifest.tiles()
    if not tiles:
        raise manifest.error("lists no tiles")
    cells = [(t.row, t.col) for t in tiles]
    tile_size = {"tile_width_px": int(doc["tile_width_px"]), "tile_height_px": int(doc["tile_height_px"]),
                 "pixel_size_um": float(doc["pixel_size_um"])}
    plan = manifest.plan()
    if plan is not None:
        layout = PlannedScan(str(doc["scan_id"]), plan.grid, plan.tiles, **tile_size, **_optics(doc)).layout()
        unplanned = sorted(set(cells) - set(layout.nominal_positions_um))
        if unplanned:
            raise manifest.error(f"has tiles at cells {unplanned[:5]} that its plan does not list; expected only "
                                 "planned cells")
        return ScanManifest(layout, tiles)
    layout = TileGridLayout(
        scan_id=str(doc["scan_id"]), rows=max(r for r, _ in cells) + 1, cols=max(c for _, c in cells) + 1,
        nominal_positions_um={(t.row, t.col): (t.x_um, t.y_um) for t in tiles}, **tile_size, **_optics(doc))
    return ScanManifest(layout, tiles)
