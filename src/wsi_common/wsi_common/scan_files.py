"""The files a scan leaves in its directory, read in one place: the manifest, the tile images and the slide
photos it lists.

The scan core (`wsi_acquisition.scan`) writes them; stitching, export, the QC report and the autofocus
calibration read them through `Manifest`. The manifest is one JSON object: "scan_id", "status",
"pixel_size_um", "tile_width_px", "tile_height_px", "plan" (`plan_record`), "tiles" (every capture in the
order taken: "row", "col", "measured_x_um", "measured_y_um", "image", ...), the slide photos
(`SLIDE_IMAGE_KEYS`) and what else the scan recorded. Paths in it are relative to the manifest. Every
ManifestError names the manifest and what was expected.

While a scan runs, rewriting the whole manifest after every tile would cost time growing with the tiles
taken (86 ms per tile at 2500 tiles). Its captures are therefore appended to a journal beside it, one JSON
line per tile (`JOURNAL_NAME`: `JOURNAL_LISTS` to extend, `JOURNAL_VALUES` to replace), and the manifest's
"journal" entry says how many of those lines it already holds. `Manifest.read` adds the lines after those,
so a scan killed mid-way reads as every tile whose line was written. The manifest written at the end holds
everything and has no "journal".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np

from wsi_common.tile_grid import Cell, TileGrid, field_of_view_um

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "manifest.journal.jsonl"
# What one journal line may add, as lists appended to the manifest's lists, and values that replace its own.
JOURNAL_LISTS = ("tiles", "focus_checks")
JOURNAL_VALUES = ("refocus_count", "duration_s")
# The whole-slide photos a manifest may list. The scan writes "overview" when the scanner has a macro camera;
# "label" is for scanners with a label camera (none of ours has one yet).
SLIDE_IMAGE_KEYS = ("overview", "label")
TILE_KEYS = ("row", "col", "measured_x_um", "measured_y_um", "image")

Capture = TypeVar("Capture")


class ManifestError(ValueError):
    """A scan manifest cannot be read, is malformed, or refers to files that are missing."""


def last_capture_per_cell(captures: Iterable[Capture], cell_of: Callable[[Capture], Cell]) -> dict[Cell, Capture]:
    """The capture kept for each grid cell: the last one. A refocused re-capture follows its cell's first
    capture, in the manifest as on the tile stream, and replaces it."""
    kept = {}
    for capture in captures:
        kept[cell_of(capture)] = capture
    return kept


def plan_record(grid: TileGrid, tiles: Iterable[Cell], skipped_empty: Iterable[Cell]) -> dict:
    """The manifest's "plan" of a tile grid, the cells to capture in order and those left out as empty glass:
    what `Manifest.plan` reads back."""
    return {"rows": grid.rows, "cols": grid.cols, "step_x_um": grid.step_x_um, "step_y_um": grid.step_y_um,
            "origin_x_um": grid.origin_x_um, "origin_y_um": grid.origin_y_um,
            "tiles": [list(cell) for cell in tiles], "skipped_empty": [list(cell) for cell in skipped_empty]}


@dataclass(frozen=True)
class RecordedPlan:
    grid: TileGrid
    tiles: list[Cell]               # the cells to capture, in acquisition order
    skipped_empty: list[Cell]       # cells of the grid left out as empty glass


@dataclass(frozen=True)
class ManifestTile:
    row: int
    col: int
    x_um: float                     # measured stage pose
    y_um: float
    image_path: Path


@dataclass(frozen=True)
class SlideImageEntry:
    """A whole-slide photo a scan took beside its tiles: the macro camera's overview, or a label photo."""
    image_path: Path
    pixel_size_um: float            # on the slide


class Manifest:
    """A scan manifest as read from disk: its JSON document and where it lies."""

    def __init__(self, path: Path, document: dict):
        self.path = path
        self.document = document

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        path = Path(path)
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as error:     # ValueError: not JSON, or not text
            raise ManifestError(f"cannot read manifest {path}: {error}") from error
        if not isinstance(document, dict):
            raise ManifestError(f"manifest {path} holds a JSON {type(document).__name__}; expected an object")
        manifest = cls(path, document)
        manifest._add_journal()
        return manifest

    def _add_journal(self) -> None:
        """Add the journal lines written after the manifest (see the module's docstring). A last line without
        its newline is a write the scan did not finish (killed, or a full disk) and is left out."""
        journal = self.document.pop("journal", None)
        if journal is None:
            return
        try:
            lines_included = int(journal["lines_included"])
            path = self.resolve(journal["path"])
        except (KeyError, TypeError, ValueError) as error:
            raise self.error(f"journal entry {journal!r} is malformed ({error!r}); expected keys path and "
                             "lines_included") from error
        try:
            lines = path.read_text().split("\n")[lines_included:-1]
        except FileNotFoundError:
            return      # the scan ended between writing its last manifest and removing the journal
        except (OSError, ValueError) as error:
            raise self.error(f"cannot read its journal {path}: {error}") from error
        for number, line in enumerate(lines, start=lines_included + 1):
            try:
                entry = json.loads(line)
                for key in JOURNAL_LISTS:
                    self.document.setdefault(key, []).extend(entry.get(key, []))
                self.document.update({key: entry[key] for key in JOURNAL_VALUES if key in entry})
            except (ValueError, TypeError, AttributeError) as error:
                raise self.error(f"journal {path} line {number} is malformed ({error}); expected a JSON object "
                                 f"of lists {JOURNAL_LISTS} and values {JOURNAL_VALUES}") from error

    def error(self, problem: str) -> ManifestError:
        return ManifestError(f"manifest {self.path} {problem}")

    def resolve(self, relative: str) -> Path:
        """A path the manifest lists."""
        return self.path.parent / relative

    @property
    def status(self) -> str:
        """"running" until the scan ends, then "complete", "failed" or "canceled"."""
        return self.document.get("status", "running")

    def require(self, keys: tuple[str, ...]) -> None:
        missing = [key for key in keys if key not in self.document]
        if missing:
            raise self.error(f"lacks keys {missing}; expected all of {list(keys)}")

    def final_captures(self) -> dict[Cell, dict]:
        """The "tiles" entry kept for every grid cell (`last_capture_per_cell`), as recorded."""
        try:
            return last_capture_per_cell(self.document.get("tiles", []), lambda entry: (entry["row"], entry["col"]))
        except (KeyError, TypeError) as error:
            raise self.error(f"lists a tile without its grid cell ({error!r}); expected keys row and col") from error

    def tiles(self) -> list[ManifestTile]:
        """The capture kept for every grid cell, each checked (every entry, kept or not, must be complete and
        its image on disk)."""
        tiles = []
        for index, entry in enumerate(self.document.get("tiles", [])):
            try:
                tile = ManifestTile(int(entry["row"]), int(entry["col"]), float(entry["measured_x_um"]),
                                    float(entry["measured_y_um"]), self.resolve(entry["image"]))
            except (KeyError, TypeError, ValueError) as error:
                raise self.error(f"tile #{index} is malformed ({error}); expected keys {', '.join(TILE_KEYS)}") \
                    from error
            if not tile.image_path.is_file():
                raise self.error(f"tile #{index} image {tile.image_path} does not exist")
            tiles.append(tile)
        return list(last_capture_per_cell(tiles, lambda tile: (tile.row, tile.col)).values())

    def plan(self) -> RecordedPlan | None:
        """The tile plan the scan recorded (`plan_record`); None when it records none (e.g. it failed before)."""
        plan = self.document.get("plan")
        if not plan:
            return None
        try:
            fov = field_of_view_um(int(self.document["tile_width_px"]), int(self.document["tile_height_px"]),
                                   float(self.document["pixel_size_um"]))
            grid = TileGrid(int(plan["rows"]), int(plan["cols"]), float(plan["origin_x_um"]),
                            float(plan["origin_y_um"]), float(plan["step_x_um"]), float(plan["step_y_um"]), *fov)
            return RecordedPlan(grid, [(int(r), int(c)) for r, c in plan["tiles"]],
                                [(int(r), int(c)) for r, c in plan.get("skipped_empty", [])])
        except (KeyError, TypeError, ValueError) as error:
            raise self.error(f"plan is malformed ({error!r}); expected rows, cols, tiles, step_x_um, step_y_um, "
                             "origin_x_um, origin_y_um, and the tile_width_px, tile_height_px and pixel_size_um "
                             "of its tiles") from error

    def slide_images(self) -> dict[str, SlideImageEntry]:
        """The whole-slide photos the manifest lists, by key (absent or null: not taken). Each is {"image",
        "pixel_size_um", ...}; the tiles need not be on disk."""
        images = {}
        for key in SLIDE_IMAGE_KEYS:
            entry = self.document.get(key)
            if entry is None:
                continue
            try:
                image = SlideImageEntry(self.resolve(entry["image"]), float(entry["pixel_size_um"]))
            except (KeyError, TypeError, ValueError) as error:
                raise self.error(f"{key!r} entry {entry!r} is malformed ({error}); expected keys image and "
                                 "pixel_size_um") from error
            if not (math.isfinite(image.pixel_size_um) and image.pixel_size_um > 0):
                raise self.error(f"{key!r} pixel_size_um={image.pixel_size_um}; expected a positive number")
            if not image.image_path.is_file():
                raise self.error(f"{key!r} image {image.image_path} does not exist")
            images[key] = image
        return images


def ended_scan_status(manifest_path: str | Path) -> str | None:
    """How a scan ended ("complete", "failed", "canceled"), as its manifest records; None while it runs or
    before its first manifest is written (overview, planning, focus map)."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        return None
    status = Manifest.read(manifest_path).status
    return None if status == "running" else status


def load_tile_image(image_path: Path) -> np.ndarray:
    """Pixels of one tile file a manifest lists (.npy or .tif/.tiff)."""
    suffix = image_path.suffix.lower()
    if suffix == ".npy":
        return np.load(image_path)
    if suffix in (".tif", ".tiff"):
        import tifffile
        return tifffile.imread(image_path)
    raise ManifestError(f"tile image {image_path} has unsupported type {suffix!r}; expected .npy or .tif")
