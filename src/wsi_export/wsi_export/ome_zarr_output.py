"""OME-Zarr output: OME-NGFF 0.5 on Zarr v3, axes (c, y, x), one scale per level in micrometres."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import zarr

NGFF_VERSION = "0.5"
RGB_CHANNELS = (("Red", "FF0000"), ("Green", "00FF00"), ("Blue", "0000FF"))


def ngff_attributes(name: str, level_count: int, pixel_size_um: float) -> dict[str, Any]:
    """The group's "ome" attribute: multiscales (level k pixel = 2**k pixel_size_um) + omero RGB."""
    datasets = [{"path": str(level), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, pixel_size_um * 2 ** level, pixel_size_um * 2 ** level]}]}
        for level in range(level_count)]
    channels = [{"label": label, "color": color, "active": True, "coefficient": 1.0,
                 "family": "linear", "inverted": False,
                 "window": {"min": 0, "max": 255, "start": 0, "end": 255}}
                for label, color in RGB_CHANNELS]
    return {"version": NGFF_VERSION,
            "multiscales": [{
                "name": name,
                "axes": [{"name": "c", "type": "channel"},
                         {"name": "y", "type": "space", "unit": "micrometer"},
                         {"name": "x", "type": "space", "unit": "micrometer"}],
                "datasets": datasets,
                "type": "mean",
                "metadata": {"description": "2x2 area averaging per level"}}],
            "omero": {"name": name, "channels": channels,
                      "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0}}}


def create_ome_zarr(path: Path, name: str, level_shapes: list[tuple[int, int]], pixel_size_um: float,
                    chunk_px: int) -> list[zarr.Array]:
    """Create the group and one empty (3, h, w) uint8 array per level, chunked (1, chunk_px, chunk_px)
    so a viewer fetches one tile-aligned chunk per channel."""
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.attrs["ome"] = ngff_attributes(name, len(level_shapes), pixel_size_um)
    return [group.create_array(str(level), shape=(3, h, w), dtype="uint8", chunks=(1, chunk_px, chunk_px),
                               fill_value=255, dimension_names=("c", "y", "x"))
            for level, (h, w) in enumerate(level_shapes)]
