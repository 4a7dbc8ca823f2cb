"""Synthetic tissue-like mosaics in the shared Zarr contract, generated chunk by chunk (for tests,
benchmarks and demos): smooth value noise colours eosin-pink tissue on white glass, and hashed cells
carry dark haematoxylin nuclei. Every pixel is a pure function of its global coordinates and the seed,
so chunks join seamlessly and any region can be regenerated."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from .mosaic import MOSAIC_ARRAY_NAME, MOSAIC_ATTRIBUTES_KEY

NUCLEUS_CELL_PX = 32  # one candidate nucleus per cell; radius + margin keeps it inside its cell
GLASS_RGB = np.array([242.0, 240.0, 244.0], dtype=np.float32)
EOSIN_RGB = np.array([232.0, 150.0, 190.0], dtype=np.float32)
STROMA_RGB = np.array([205.0, 110.0, 160.0], dtype=np.float32)
HAEMATOXYLIN_RGB = np.array([80.0, 50.0, 130.0], dtype=np.float32)


def _hash_unit(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) from integer grid coordinates."""
    h = (a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
        b.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)) ^ np.uint64(seed * 0x165667B19E3779F9 + 1)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    return (h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)


def _value_noise(rows: np.ndarray, cols: np.ndarray, period_px: int, seed: int) -> np.ndarray:
    """Smoothly interpolated lattice noise in [0, 1) over global pixel coordinates; the lattice is
    hashed once per lattice point, then gathered per pixel."""
    y, x = rows / period_px, cols / period_px
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = (y - y0).astype(np.float32)[:, None], (x - x0).astype(np.float32)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    lattice_y = np.arange(y0[0], y0[-1] + 2)
    lattice_x = np.arange(x0[0], x0[-1] + 2)
    lattice = _hash_unit(lattice_y[:, None], lattice_x[None, :], seed)
    iy, ix = (y0 - y0[0])[:, None], (x0 - x0[0])[None, :]
    v00, v01 = lattice[iy, ix], lattice[iy, ix + 1]
    v10, v11 = lattice[iy + 1, ix], lattice[iy + 1, ix + 1]
    return (v00 * (1 - fx) + v01 * fx) * (1 - fy) + (v10 * (1 - fx) + v11 * fx) * fy


def synthetic_tissue(row0_px: int, col0_px: int, height_px: int, width_px: int, seed: int = 0) -> np.ndarray:
    """(height_px, width_px, 3) uint8 RGB region of the infinite synthetic slide."""
    rows = np.arange(row0_px, row0_px + height_px, dtype=np.int64)
    cols = np.arange(col0_px, col0_px + width_px, dtype=np.int64)
    tissue = 0.65 * _value_noise(rows, cols, 2048, seed) + 0.35 * _value_noise(rows, cols, 300, seed + 1)
    tissue = np.clip((tissue - 0.5) * 12.0, 0.0, 1.0)[..., None]
    texture = (0.6 * _value_noise(rows, cols, 40, seed + 2)
               + 0.4 * _value_noise(rows, cols, 9, seed + 3))[..., None]
    stained = EOSIN_RGB * (1 - texture) + STROMA_RGB * texture
    rgb = GLASS_RGB * (1 - tissue) + stained * tissue

    cell_y, cell_x = rows // NUCLEUS_CELL_PX, cols // NUCLEUS_CELL_PX
    cells_y = np.arange(cell_y[0], cell_y[-1] + 1)[:, None]
    cells_x = np.arange(cell_x[0], cell_x[-1] + 1)[None, :]
    margin = 8.0
    span = NUCLEUS_CELL_PX - 2 * margin
    per_cell = {
        "present": _hash_unit(cells_y, cells_x, seed + 4) < 0.55,
        "radius": 3.0 + 4.0 * _hash_unit(cells_y, cells_x, seed + 5),
        "centre_y": cells_y * NUCLEUS_CELL_PX + margin + span * _hash_unit(cells_y, cells_x, seed + 6),
        "centre_x": cells_x * NUCLEUS_CELL_PX + margin + span * _hash_unit(cells_y, cells_x, seed + 7),
    }
    iy, ix = (cell_y - cell_y[0])[:, None], (cell_x - cell_x[0])[None, :]
    present, radius, centre_y, centre_x = (per_cell[key][iy, ix] for key in per_cell)
    distance = np.hypot(rows[:, None] - centre_y, cols[None, :] - centre_x)
    nucleus = np.clip(radius + 0.5 - distance, 0.0, 1.0) * present * tissue[..., 0]
    rgb = rgb * (1 - nucleus[..., None]) + HAEMATOXYLIN_RGB * nucleus[..., None]

    grain = _hash_unit(rows[:, None], cols[None, :], seed + 8) - 0.5
    rgb += (4.0 * grain)[..., None]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def write_synthetic_mosaic(path: str | Path, height_px: int, width_px: int, *, pixel_size_um: float = 0.25,
                           seed: int = 0, chunk_px: int = 512, workers: int = 2) -> zarr.Array:
    """Write a complete mosaic `<name>.zarr` following the shared contract; memory ~ a few chunks."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    image = group.create_array(MOSAIC_ARRAY_NAME, shape=(height_px, width_px, 3), dtype="uint8",
                               chunks=(chunk_px, chunk_px, 3), fill_value=255)

    def write_chunk(origin: tuple[int, int]) -> None:
        r0, c0 = origin
        h, w = min(chunk_px, height_px - r0), min(chunk_px, width_px - c0)
        image[r0:r0 + h, c0:c0 + w] = synthetic_tissue(r0, c0, h, w, seed)

    origins = [(r, c) for r in range(0, height_px, chunk_px) for c in range(0, width_px, chunk_px)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(write_chunk, origins))
    group.attrs[MOSAIC_ATTRIBUTES_KEY] = {
        "version": 1, "pixel_size_um": pixel_size_um, "objective_magnification": 40.0,
        "numerical_aperture": 0.95, "acquisition_datetime": "2026-01-15T10:30:00+00:00",
        "scan_id": f"synthetic-{seed}", "complete": True}
    return image
