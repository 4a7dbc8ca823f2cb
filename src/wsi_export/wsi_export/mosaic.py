"""Open a stitched mosaic (the shared Zarr contract) and validate its pixels and metadata."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import zarr

from .errors import MosaicInputError

MOSAIC_ATTRIBUTES_KEY = "wsi_mosaic"
MOSAIC_ARRAY_NAME = "image"
SUPPORTED_MOSAIC_VERSION = 1


@dataclass(frozen=True)
class MosaicMetadata:
    pixel_size_um: float
    objective_magnification: float
    numerical_aperture: float
    acquisition_datetime: dt.datetime
    scan_id: str
    complete: bool


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
    )


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
