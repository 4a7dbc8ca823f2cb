"""Tile-grid layout of a scan and the scan-manifest reader (tiles, and the whole-slide images).

Stage positions are in µm and refer to the centre of a tile's field of view, like the stage poses in
Tile messages and scan manifests; only differences between positions matter to the mosaic. Stage x
runs with image columns, stage y with rows. A scan's nominal layout comes from its plan, through
`PlannedScan` only: the stitching node reads the plan from the ScanPlan message, a re-stitch from the
plan the manifest records, and both must make the same layout so that either can resume the other.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import LayoutError, ManifestError

Cell = tuple[int, int]
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
        """Layout of a regular raster with the given nominal overlap (what a ScanPlan describes)."""
        if not 0.0 <= overlap_fraction < 0.5:
            raise LayoutError(f"overlap_fraction must be in [0, 0.5), got {overlap_fraction}")
        step_x_um = tile_width_px * (1 - overlap_fraction) * pixel_size_um
        step_y_um = tile_height_px * (1 - overlap_fraction) * pixel_size_um
        chosen = cells if cells is not None else [(r, c) for r in range(rows) for c in range(cols)]
        positions = {(r, c): (origin_x_um + c * step_x_um, origin_y_um + r * step_y_um) for r, c in chosen}
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
    rows: int
    cols: int
    cells: list[tuple[int, int]]
    tile_width_px: int
    tile_height_px: int
    pixel_size_um: float
    origin_x_um: float          # left edge of column 0
    origin_y_um: float          # top edge of row 0
    step_x_um: float
    step_y_um: float
    objective_magnification: float = 0.0
    numerical_aperture: float = 0.0
    acquisition_datetime: str = ""      # ISO 8601, when the scan started

    def _half_field_um(self) -> tuple[float, float]:
        """From a field's top-left edge to its centre, (x, y) µm."""
        return self.tile_width_px * self.pixel_size_um / 2, self.tile_height_px * self.pixel_size_um / 2

    def layout(self) -> TileGridLayout:
        """Nominal positions are field-of-view centres, like the tiles' stage poses."""
        half_w, half_h = self._half_field_um()
        positions = {(r, c): (self.origin_x_um + half_w + c * self.step_x_um,
                              self.origin_y_um + half_h + r * self.step_y_um) for r, c in self.cells}
        return TileGridLayout(self.scan_id, self.rows, self.cols, self.tile_height_px, self.tile_width_px,
                              self.pixel_size_um, positions, self.objective_magnification, self.numerical_aperture,
                              self.acquisition_datetime)

    @classmethod
    def from_manifest(cls, doc: dict) -> "PlannedScan":
        """The plan a wsi_acquisition scan manifest records ("plan": rows, cols, tiles, step_x_um,
        step_y_um and origin_x_um/origin_y_um, which there are the centre of cell (0, 0))."""
        plan = doc["plan"]
        centred = cls(str(doc["scan_id"]), int(plan["rows"]), int(plan["cols"]),
                      [(int(r), int(c)) for r, c in plan["tiles"]], int(doc["tile_width_px"]),
                      int(doc["tile_height_px"]), float(doc["pixel_size_um"]), float(plan["origin_x_um"]),
                      float(plan["origin_y_um"]), float(plan["step_x_um"]), float(plan["step_y_um"]),
                      float(doc.get("objective_magnification", 0.0)), float(doc.get("numerical_aperture", 0.0)),
                      _manifest_datetime(doc))
        half_w, half_h = centred._half_field_um()
        return replace(centred, origin_x_um=centred.origin_x_um - half_w, origin_y_um=centred.origin_y_um - half_h)


def _manifest_datetime(doc: dict) -> str:
    if "acquisition_datetime" in doc:
        return str(doc["acquisition_datetime"])
    return iso_utc(float(doc["started_unix_s"])) if "started_unix_s" in doc else ""


@dataclass(frozen=True)
class ManifestTile:
    row: int
    col: int
    x_um: float
    y_um: float
    image_path: Path


@dataclass(frozen=True)
class ScanManifest:
    layout: TileGridLayout
    tiles: list[ManifestTile] = field(default_factory=list)


@dataclass(frozen=True)
class SlideImageEntry:
    """A whole-slide image a scan took beside its tiles: the macro camera's overview, or a label photo."""
    image_path: Path
    pixel_size_um: float  # on the slide


# Manifest keys of the whole-slide images. wsi_acquisition writes "overview" when the scanner has a
# macro camera; "label" is for scanners with a label camera (none of ours has one yet).
SLIDE_IMAGE_KEYS = ("overview", "label")


def _read_manifest_document(manifest_path: Path) -> dict:
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {manifest_path}: {exc}") from exc


def ended_scan_status(manifest_path: str | Path) -> str | None:
    """How a scan ended ("complete", "failed", "canceled"), as its manifest records; None while it runs
    ("running") or before its first manifest is written (overview, planning, focus map)."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        return None
    status = _read_manifest_document(manifest_path).get("status", "running")
    return None if status == "running" else status


def read_slide_images(manifest_path: str | Path) -> dict[str, SlideImageEntry]:
    """The whole-slide images a scan manifest lists, by key ("overview", "label"; absent or null: not
    taken). Each is {"image": path relative to the manifest, "pixel_size_um", ...}; the tiles need not
    be on disk."""
    manifest_path = Path(manifest_path)
    doc = _read_manifest_document(manifest_path)
    images = {}
    for key in SLIDE_IMAGE_KEYS:
        entry = doc.get(key)
        if entry is None:
            continue
        try:
            image = SlideImageEntry(manifest_path.parent / entry["image"], float(entry["pixel_size_um"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest {manifest_path} {key!r} entry {entry!r} is malformed ({exc}); "
                                f"expected keys image and pixel_size_um") from exc
        if not (math.isfinite(image.pixel_size_um) and image.pixel_size_um > 0):
            raise ManifestError(f"manifest {manifest_path} {key!r} pixel_size_um={image.pixel_size_um}; "
                                f"expected a positive number")
        if not image.image_path.is_file():
            raise ManifestError(f"manifest {manifest_path} {key!r} image {image.image_path} does not exist")
        images[key] = image
    return images


def read_manifest(manifest_path: str | Path) -> ScanManifest:
    """Read a scan manifest as wsi_acquisition writes it: {"scan_id", "pixel_size_um", "tile_width_px",
    "tile_height_px", "tiles": [{"row", "col", "measured_x_um", "measured_y_um", "image": path relative
    to the manifest (.npy/.tif)}, ...]}. Optional: "objective_magnification", "numerical_aperture",
    "acquisition_datetime" (else from "started_unix_s"), and "plan" (as `PlannedScan.from_manifest`
    reads it), which gives the nominal layout exactly as the stitching node had it; without a plan the
    measured tile poses double as the nominal positions. A cell listed again (a re-capture) replaces
    the earlier entry."""
    manifest_path = Path(manifest_path)
    doc = _read_manifest_document(manifest_path)
    required = ("scan_id", "pixel_size_um", "tile_width_px", "tile_height_px", "tiles")
    missing = [key for key in required if key not in doc]
    if missing:
        raise ManifestError(f"manifest {manifest_path} lacks keys {missing}; expected all of {list(required)}")
    tiles = []
    for index, entry in enumerate(doc["tiles"]):
        try:
            tile = ManifestTile(int(entry["row"]), int(entry["col"]), float(entry["measured_x_um"]),
                                float(entry["measured_y_um"]), manifest_path.parent / entry["image"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest tile #{index} is malformed ({exc}); expected keys "
                                f"row, col, measured_x_um, measured_y_um, image") from exc
        if not tile.image_path.is_file():
            raise ManifestError(f"manifest tile #{index} image {tile.image_path} does not exist")
        tiles.append(tile)
    tiles = list({(t.row, t.col): t for t in tiles}.values())
    cells = [(t.row, t.col) for t in tiles]
    if not tiles:
        raise ManifestError(f"manifest {manifest_path} lists no tiles")
    if doc.get("plan"):
        try:
            layout = PlannedScan.from_manifest(doc).layout()
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest {manifest_path} plan is malformed ({exc!r}); expected rows, cols, "
                                f"tiles, step_x_um, step_y_um, origin_x_um, origin_y_um") from exc
        unplanned = sorted(set(cells) - set(layout.nominal_positions_um))
        if unplanned:
            raise ManifestError(f"manifest {manifest_path} has tiles at cells {unplanned[:5]} that its plan "
                                f"does not list; expected only planned cells")
        return ScanManifest(layout, tiles)
    layout = TileGridLayout(
        scan_id=str(doc["scan_id"]), rows=max(r for r, _ in cells) + 1, cols=max(c for _, c in cells) + 1,
        tile_height_px=int(doc["tile_height_px"]), tile_width_px=int(doc["tile_width_px"]),
        pixel_size_um=float(doc["pixel_size_um"]),
        nominal_positions_um={(t.row, t.col): (t.x_um, t.y_um) for t in tiles},
        objective_magnification=float(doc.get("objective_magnification", 0.0)),
        numerical_aperture=float(doc.get("numerical_aperture", 0.0)),
        acquisition_datetime=_manifest_datetime(doc))
    return ScanManifest(layout, tiles)


def load_tile_image(image_path: Path) -> np.ndarray:
    """Pixels of one manifest tile (.npy or .tif/.tiff)."""
    suffix = image_path.suffix.lower()
    if suffix == ".npy":
        return np.load(image_path)
    if suffix in (".tif", ".tiff"):
        import tifffile
        return tifffile.imread(image_path)
    raise ManifestError(f"tile image {image_path} has unsupported type {suffix!r}; expected .npy or .tif")
