"""Open a stitched mosaic (the shared Zarr contract) and validate its pixels and metadata."""
from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import zarr
from zarr.core.sync import collect_aiterator

from wsi_stitching.stitcher import COMPOSED_TILES_KEY  # optional: older mosaics do not list their tiles

from .errors import MosaicInputError

MOSAIC_ATTRIBUTES_KEY = "wsi_mosaic"
MOSAIC_ARRAY_NAME = "image"
SUPPORTED_MOSAIC_VERSION = 1


Cell = tuple[int, int]  # (row, col) of a scan tile


@dataclass(frozen=True)
class ComposedTiles:
    """The scan tiles the stitcher composed into the mosaic, and where (wsi_stitching.stitcher's
    COMPOSED_TILES_KEY). Every chunk a tile overlaps is stored, even one that came out all fill colour."""
    height_px: int
    width_px: int
    top_left_px: dict[Cell, tuple[int, int]]  # (row, col) -> (y, x) in mosaic px; may lie partly outside

    def overlapping(self, row0_px: int, col0_px: int, height_px: int, width_px: int) -> tuple[Cell, ...]:
        return tuple(sorted(cell for cell, (y, x) in self.top_left_px.items()
                            if y < row0_px + height_px and row0_px < y + self.height_px
                            and x < col0_px + width_px and col0_px < x + self.width_px))


@dataclass(frozen=True)
class MosaicRegion:
    """A rectangle of the mosaic in full-resolution px, with the scan tiles composed into it."""
    row0_px: int
    col0_px: int
    height_px: int
    width_px: int
    tiles: tuple[Cell, ...]  # (row, col); empty when none, or when the mosaic does not list its tiles

    def __str__(self) -> str:
        text = (f"rows {self.row0_px}-{self.row0_px + self.height_px} x cols "
                f"{self.col0_px}-{self.col0_px + self.width_px} px")
        if self.tiles:
            text += " (tiles (row, col) " + ", ".join(f"({r}, {c})" for r, c in self.tiles) + ")"
        return text


@dataclass(frozen=True)
class MosaicMetadata:
    pixel_size_um: float
    objective_magnification: float
    numerical_aperture: float
    acquisition_datetime: dt.datetime
    scan_id: str
    complete: bool
    composed_tiles: ComposedTiles | None  # None: the mosaic does not say which tiles it holds


@dataclass(frozen=True)
class Mosaic:
    image: zarr.Array  # (height_px, width_px, 3) uint8, axes y, x, c (RGB)
    metadata: MosaicMetadata
    source_name: str  # stem used as the default output name

    @property
    def height_px(self) -> int:
        return int(self.image.shape[0])

    @property
    def width_px(self) -> int:
        return int(self.image.shape[1])

    def region(self, row0_px: int, col0_px: int, height_px: int, width_px: int) -> MosaicRegion:
        """A rectangle of the mosaic, with the tiles composed into it where the mosaic lists them."""
        tiles = self.metadata.composed_tiles
        return MosaicRegion(row0_px, col0_px, height_px, width_px,
                            tiles.overlapping(row0_px, col0_px, height_px, width_px) if tiles else ())


def _required(attributes: Mapping[str, Any], key: str, expected: type | tuple[type, ...]) -> Any:
    if key not in attributes:
        raise MosaicInputError(
            f"mosaic attribute {MOSAIC_ATTRIBUTES_KEY}.{key} is missing; "
            f"expected keys: version, pixel_size_um, objective_magnification, numerical_aperture, "
            f"acquisition_datetime, scan_id, complete")
    value = attributes[key]
    if isinstance(value, bool) and expected is not bool:
        raise MosaicInputError(f"mosaic attribute {key}={value!r} is a bool, expected {expected}")
    if not isinstance(value, expected):
        raise MosaicInputError(f"mosaic attribute {key}={value!r} has type {type(value).__name__}, "
                               f"expected {expected}")
    return value


def parse_mosaic_metadata(attributes: Mapping[str, Any]) -> MosaicMetadata:
    """Validate the "wsi_mosaic" attribute dictionary of the shared mosaic contract."""
    if not isinstance(attributes, Mapping):
        raise MosaicInputError(f"mosaic attributes must be a mapping, got {type(attributes).__name__}")
    version = _required(attributes, "version", int)
    if version != SUPPORTED_MOSAIC_VERSION:
        raise MosaicInputError(f"mosaic contract version {version} is not supported, "
                               f"expected {SUPPORTED_MOSAIC_VERSION}")
    pixel_size_um = float(_required(attributes, "pixel_size_um", (int, float)))
    if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise MosaicInputError(f"pixel_size_um={pixel_size_um} must be a finite value > 0")
    magnification = float(_required(attributes, "objective_magnification", (int, float)))
    if not (np.isfinite(magnification) and magnification > 0):
        raise MosaicInputError(f"objective_magnification={magnification} must be > 0")
    numerical_aperture = float(_required(attributes, "numerical_aperture", (int, float)))
    if not (np.isfinite(numerical_aperture) and 0 < numerical_aperture <= 2):
        raise MosaicInputError(f"numerical_aperture={numerical_aperture} must be in (0, 2]")
    datetime_text = _required(attributes, "acquisition_datetime", str)
    try:
        acquired = dt.datetime.fromisoformat(datetime_text)
    except ValueError as error:
        raise MosaicInputError(f"acquisition_datetime={datetime_text!r} is not ISO-8601") from error
    if acquired.tzinfo is None:
        acquired = acquired.replace(tzinfo=dt.timezone.utc)
    return MosaicMetadata(
        pixel_size_um=pixel_size_um,
        objective_magnification=magnification,
        numerical_aperture=numerical_aperture,
        acquisition_datetime=acquired,
        scan_id=_required(attributes, "scan_id", str),
        complete=_required(attributes, "complete", bool),
        composed_tiles=(_parse_composed_tiles(attributes[COMPOSED_TILES_KEY])
                        if COMPOSED_TILES_KEY in attributes else None),
    )


def _parse_composed_tiles(value: Any) -> ComposedTiles:
    expected = 'expected {"height_px": int > 0, "width_px": int > 0, "top_left_px": [[row, col, y_px, x_px], ...]}'
    if not isinstance(value, Mapping):
        raise MosaicInputError(f"mosaic attribute {COMPOSED_TILES_KEY}={value!r} is not a mapping; {expected}")
    height, width, placed = (value.get(key) for key in ("height_px", "width_px", "top_left_px"))
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0 and isinstance(placed, list)):
        raise MosaicInputError(f"mosaic attribute {COMPOSED_TILES_KEY} has height_px={height!r}, "
                               f"width_px={width!r}, top_left_px of type {type(placed).__name__}; {expected}")
    top_left = {}
    for entry in placed:
        if not (isinstance(entry, list) and len(entry) == 4 and all(map(_is_int, entry))):
            raise MosaicInputError(f"mosaic attribute {COMPOSED_TILES_KEY}.top_left_px has entry {entry!r}; "
                                   f"{expected}")
        top_left[(entry[0], entry[1])] = (entry[2], entry[3])
    return ComposedTiles(height, width, top_left)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_mosaic_array(image: Any) -> zarr.Array:
    if not isinstance(image, zarr.Array):
        raise MosaicInputError(f"mosaic image must be a zarr.Array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise MosaicInputError(f"mosaic image shape {image.shape} must be (height_px, width_px, 3)")
    if image.dtype != np.uint8:
        raise MosaicInputError(f"mosaic image dtype {image.dtype} must be uint8")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise MosaicInputError(f"mosaic image shape {image.shape} is empty")
    return image


def open_mosaic(mosaic_path: str | Path) -> Mosaic:
    """Open `<name>.zarr` (Zarr v3 group with array "image" and group attributes "wsi_mosaic")."""
    path = Path(mosaic_path)
    if not path.is_dir():
        raise MosaicInputError(f"mosaic {str(path)!r} does not exist or is not a Zarr directory")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # zarr raises several unrelated types for unreadable stores
        raise MosaicInputError(f"mosaic {str(path)!r} is not a readable Zarr group: {error}") from error
    if MOSAIC_ARRAY_NAME not in group:
        raise MosaicInputError(f"mosaic {str(path)!r} has no array {MOSAIC_ARRAY_NAME!r}; "
                               f"found {sorted(group.keys())}")
    if MOSAIC_ATTRIBUTES_KEY not in group.attrs:
        raise MosaicInputError(f"mosaic {str(path)!r} has no group attribute {MOSAIC_ATTRIBUTES_KEY!r}")
    image = validate_mosaic_array(group[MOSAIC_ARRAY_NAME])
    metadata = parse_mosaic_metadata(group.attrs[MOSAIC_ATTRIBUTES_KEY])
    stem = path.name[:-len(".zarr")] if path.name.endswith(".zarr") else path.name
    return Mosaic(image=image, metadata=metadata, source_name=stem)


def mosaic_from_array(image: zarr.Array, attributes: Mapping[str, Any], source_name: str) -> Mosaic:
    """Wrap a caller-provided (H, W, 3) uint8 Zarr array and its "wsi_mosaic" attribute values."""
    return Mosaic(image=validate_mosaic_array(image), metadata=parse_mosaic_metadata(attributes),
                  source_name=source_name)


def missing_regions(mosaic: Mosaic) -> list[MosaicRegion]:
    """Regions whose chunk (shard, for a sharded array) should hold data but has no object in the
    store. A mosaic that lists its composed tiles expects the chunks they overlap; one that does not
    (made before the list existed, or by another writer) expects every chunk. One listing of the
    store, no pixel read: data that is there but damaged shows when it is decoded (region_reader)."""
    image = mosaic.image
    unit = image.shards or image.chunks
    grid = [-(-size // step) for size, step in zip(image.shape, unit)]
    prefix = f"{image.path}/" if image.path else ""
    stored = {key[len(prefix):] for key in collect_aiterator(image.store.list_prefix(prefix))}
    missing = sorted(coords for coords in _expected_units(mosaic, unit, grid)
                     if image.metadata.encode_chunk_key(coords) not in stored)
    unit_y, unit_x = unit[0], unit[1]
    return [mosaic.region(y * unit_y, x * unit_x, min(unit_y, mosaic.height_px - y * unit_y),
                          min(unit_x, mosaic.width_px - x * unit_x))
            for y, x in dict.fromkeys((y, x) for y, x, _ in missing)]


def _expected_units(mosaic: Mosaic, unit: tuple[int, ...], grid: list[int]
                    ) -> Iterable[tuple[int, int, int]]:
    tiles = mosaic.metadata.composed_tiles
    if tiles is None:
        return itertools.product(*map(range, grid))
    expected = set()
    for y, x in tiles.top_left_px.values():
        y0, y1 = max(0, y), min(mosaic.height_px, y + tiles.height_px)
        x0, x1 = max(0, x), min(mosaic.width_px, x + tiles.width_px)
        if y0 < y1 and x0 < x1:
            expected.update(itertools.product(range(y0 // unit[0], (y1 - 1) // unit[0] + 1),
                                              range(x0 // unit[1], (x1 - 1) // unit[1] + 1), range(grid[2])))
    return expected


def describe_regions(regions: list[MosaicRegion], shown: int = 5) -> str:
    """The first `shown` regions, and how many more there are."""
    text = "; ".join(map(str, regions[:shown]))
    return text + (f"; and {len(regions) - shown} more" if len(regions) > shown else "")
