"""Flat-field (vignetting) correction estimated from the scan's own tiles.

Model: camera image = gain(y, x) * specimen, with a smooth gain per colour channel, a 2-D polynomial
in log space over normalised field coordinates. The gain is scaled to a maximum of 1, so glass keeps
the brightness it has at the optical centre.

The estimate works on thumbnails: per block of a tile, the mean colour and the spread of the gray
level. In bright-field, empty glass is the brightest thing on a slide and has no texture, so the gain's
shape is the upper envelope of the flat blocks: a polynomial is fitted to every flat block, then blocks
darker than the fit (tissue) are dropped with a tolerance that halves at every step down to
GLASS_TOLERANCE, until the selection stops changing. Those glass blocks measure the gain directly. Tissue
blocks do not: how much light tissue absorbs varies by more than the shading itself, which is why the
former estimate (median over tiles of mean-normalised thumbnails) left 3-4 % ripple on glass. Only when
the glass found does not cover the field (a scan with no glass in it) is the gain fitted to that median
instead, approximately.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import StitchingError

THUMBNAIL_PX = 32
# Degree 4 follows strong, off-centre vignetting: on the bench's 36 % fall-off degree 2 leaves 3.7 %
# error in the corners, degree 4 0.3 %.
POLYNOMIAL_DEGREE = 4
# A block is flat when its gray spread is within this factor of the flattest blocks' (camera noise).
FLAT_SPREAD_FACTOR = 3.0
# Glass blocks lie within this (log) fraction below the envelope: pixel noise averaged over a block and
# the polynomial's own error are far below it, lightly stained tissue mostly above it.
GLASS_TOLERANCE = 0.01
# Halvings of the tolerance down to GLASS_TOLERANCE take 6 steps; the selection settles in a few more.
ENVELOPE_STEPS = 30
# Glass must reach every cell of a COVERAGE_GRID x COVERAGE_GRID division of the field, with at least
# MIN_GLASS_BLOCKS_PER_CELL blocks, for the polynomial not to extrapolate.
COVERAGE_GRID = 4
MIN_GLASS_BLOCKS_PER_CELL = 4


@dataclass(frozen=True)
class TileThumbnail:
    """(THUMBNAIL_PX, THUMBNAIL_PX) blocks of a tile: mean RGB and the standard deviation of gray."""
    mean_rgb: np.ndarray   # (t, t, 3) float32
    gray_std: np.ndarray   # (t, t) float32


def _block_edges(length_px: int) -> np.ndarray:
    return np.linspace(0, length_px, THUMBNAIL_PX + 1).astype(int)


def tile_thumbnail(image: np.ndarray) -> TileThumbnail:
    """Block statistics from exact integer sums: per channel, and of the squared channel sum (gray
    times 3), which keeps the variance free of float cancellation without float64 copies of the tile."""
    h, w = image.shape[:2]
    rgb = image if image.ndim == 3 else image[..., None].repeat(3, axis=2)
    ys, xs = _block_edges(h), _block_edges(w)
    areas = np.diff(ys)[:, None] * np.diff(xs)[None, :]

    def block_sums(values, dtype):
        # Rows of blocks as whole-slab sums (contiguous, vectorised along the row); reduceat down the
        # rows of a whole tile takes several times longer.
        rows = np.stack([values[y0:y1].sum(axis=0, dtype=dtype) for y0, y1 in zip(ys[:-1], ys[1:])])
        return np.add.reduceat(rows, xs[:-1], axis=1)

    channel_sums = block_sums(rgb, np.uint64)
    gray_squares = rgb[..., 0].astype(np.uint32)   # becomes (3 gray)^2 in place
    gray_squares += rgb[..., 1]
    gray_squares += rgb[..., 2]
    gray_squares *= gray_squares
    mean_gray = channel_sums.sum(axis=2) / (3.0 * areas)
    variance = np.maximum(block_sums(gray_squares, np.uint64) / (9.0 * areas) - mean_gray ** 2, 0.0)
    return TileThumbnail((channel_sums / areas[..., None]).astype(np.float32), np.sqrt(variance).astype(np.float32))


def _design(y: np.ndarray, x: np.ndarray, degree: int) -> np.ndarray:
    return np.stack([(x ** i) * (y ** j) for i in range(degree + 1) for j in range(degree + 1 - i)], axis=-1)


def _block_coordinates() -> tuple[np.ndarray, np.ndarray]:
    """Normalised (-1..1) field coordinates of the block centres, (y, x) each (t, t)."""
    centres = (np.arange(THUMBNAIL_PX) + 0.5) / THUMBNAIL_PX * 2 - 1
    return np.meshgrid(centres, centres, indexing="ij")


@dataclass(frozen=True)
class FlatField:
    """Smooth per-channel gain; coefficients of a polynomial in normalised coords (-1..1), log domain."""
    coefficients: tuple[tuple[float, ...], ...]  # one tuple per channel
    degree: int = POLYNOMIAL_DEGREE
    log_offset: tuple[float, ...] = (0.0, 0.0, 0.0)  # subtracted so that the maximum gain is 1
    method: str = ""   # "glass" or "tissue_median" (estimate_flat_field), "" when given
    blocks: int = 0    # thumbnail blocks the estimate rests on

    def gain(self, height_px: int, width_px: int) -> np.ndarray:
        """(height_px, width_px, 3) float32 gain, max 1."""
        y = np.linspace(-1, 1, height_px)
        x = np.linspace(-1, 1, width_px)
        result = np.empty((height_px, width_px, 3), dtype=np.float32)
        basis_x = np.stack([x ** i for i in range(self.degree + 1)])
        basis_y = np.stack([y ** j for j in range(self.degree + 1)])
        for channel, coefficients in enumerate(self.coefficients):
            terms = np.zeros((self.degree + 1, self.degree + 1))  # [i (x power), j (y power)]
            k = 0
            for i in range(self.degree + 1):
                for j in range(self.degree + 1 - i):
                    terms[i, j] = coefficients[k]
                    k += 1
            log_gain = basis_y.T @ terms.T @ basis_x  # (H, W)
            result[..., channel] = np.exp(log_gain - self.log_offset[channel])
        return result

    def to_json(self) -> dict:
        return {"coefficients": [list(c) for c in self.coefficients], "degree": self.degree,
                "log_offset": list(self.log_offset), "method": self.method, "blocks": self.blocks}

    @classmethod
    def from_json(cls, doc: dict) -> "FlatField":
        return cls(tuple(tuple(c) for c in doc["coefficients"]), int(doc["degree"]), tuple(doc["log_offset"]),
                   str(doc["method"]), int(doc["blocks"]))


def _glass_blocks(thumbnails: list[TileThumbnail], degree: int) -> np.ndarray:
    """(n, t, t) mask of the blocks on the glass envelope (see the module docstring)."""
    spread = np.stack([t.gray_std for t in thumbnails])
    log_gray = np.log(np.maximum(np.stack([t.mean_rgb.mean(axis=2) for t in thumbnails]), 1.0))
    flat = spread <= FLAT_SPREAD_FACTOR * np.percentile(spread, 1)
    y, x = (np.broadcast_to(c, flat.shape)[flat] for c in _block_coordinates())
    design, values = _design(y, x, degree), log_gray[flat]
    kept = np.ones(values.shape, dtype=bool)
    tolerance = 0.5  # first steps: anything within a factor 1.6 of the fit (all but the darkest tissue)
    for _ in range(ENVELOPE_STEPS):
        if kept.sum() <= design.shape[1]:
            break
        fitted, *_ = np.linalg.lstsq(design[kept], values[kept], rcond=None)
        selection = values - design @ fitted >= -tolerance
        if tolerance == GLASS_TOLERANCE and (selection == kept).all():
            break
        kept = selection
        tolerance = max(tolerance / 2, GLASS_TOLERANCE)
    glass = np.zeros(flat.shape, dtype=bool)
    glass[flat] = kept
    return glass


def _covers_field(glass: np.ndarray) -> bool:
    cells = glass.sum(axis=0).reshape(COVERAGE_GRID, THUMBNAIL_PX // COVERAGE_GRID,
                                      COVERAGE_GRID, THUMBNAIL_PX // COVERAGE_GRID).sum(axis=(1, 3))
    return bool((cells >= MIN_GLASS_BLOCKS_PER_CELL).all())


def estimate_flat_field(thumbnails: list[TileThumbnail], degree: int = POLYNOMIAL_DEGREE) -> FlatField:
    """Fit the shading from tile thumbnails (from tile_thumbnail); needs at least 3 tiles."""
    if len(thumbnails) < 3:
        raise StitchingError(f"flat-field estimation needs at least 3 tiles, got {len(thumbnails)}")
    log_rgb = np.log(np.maximum(np.stack([t.mean_rgb for t in thumbnails]).astype(np.float64), 1.0))
    block_y, block_x = _block_coordinates()
    glass = _glass_blocks(thumbnails, degree)
    if _covers_field(glass):
        method, samples = "glass", log_rgb[glass]                                     # (m, 3)
        y, x = (np.broadcast_to(c, glass.shape)[glass] for c in (block_y, block_x))
    else:
        normalised = log_rgb - log_rgb.mean(axis=(1, 2), keepdims=True)
        method, samples = "tissue_median", np.median(normalised, axis=0).reshape(-1, 3)
        y, x = block_y.ravel(), block_x.ravel()
    fitted, *_ = np.linalg.lstsq(_design(y, x, degree), samples, rcond=None)            # (terms, 3)
    coefficients = tuple(tuple(float(v) for v in fitted[:, channel]) for channel in range(3))
    unscaled = FlatField(coefficients, degree).gain(256, 256)
    offsets = tuple(float(np.log(unscaled[..., c].max())) for c in range(3))
    return FlatField(coefficients, degree, offsets, method, len(samples))
