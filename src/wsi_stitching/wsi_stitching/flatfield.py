"""Flat-field (vignetting) correction estimated from the scan's own tiles.

Model: camera image = gain(y, x) * specimen, with a smooth gain per colour channel. Each tile is
reduced to a small thumbnail normalised by its own mean (removes tissue-vs-glass brightness), the
per-pixel median over tiles estimates the gain's shape (the specimen varies from tile to tile, the
shading does not), and a low-order 2-D polynomial fitted in log space keeps only the smooth part.
The gain is scaled to a maximum of 1, so glass keeps the brightness it has at the optical centre.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import StitchingError

THUMBNAIL_PX = 32
POLYNOMIAL_DEGREE = 2


def tile_thumbnail(image: np.ndarray) -> np.ndarray:
    """(THUMBNAIL_PX, THUMBNAIL_PX, 3) block means of a tile, float32."""
    h, w = image.shape[:2]
    rgb = image if image.ndim == 3 else image[..., None].repeat(3, axis=2)
    ys = np.linspace(0, h, THUMBNAIL_PX + 1).astype(int)
    xs = np.linspace(0, w, THUMBNAIL_PX + 1).astype(int)
    row_sums = np.add.reduceat(rgb.astype(np.float32), ys[:-1], axis=0)
    block_sums = np.add.reduceat(row_sums, xs[:-1], axis=1)
    areas = np.diff(ys)[:, None, None] * np.diff(xs)[None, :, None]
    return (block_sums / areas).astype(np.float32)


def _design(y: np.ndarray, x: np.ndarray, degree: int) -> np.ndarray:
    return np.stack([(x ** i) * (y ** j) for i in range(degree + 1) for j in range(degree + 1 - i)], axis=-1)


@dataclass(frozen=True)
class FlatField:
    """Smooth per-channel gain; coefficients of a polynomial in normalised coords (-1..1), log domain."""
    coefficients: tuple[tuple[float, ...], ...]  # one tuple per channel
    degree: int = POLYNOMIAL_DEGREE
    log_offset: tuple[float, ...] = (0.0, 0.0, 0.0)  # subtracted so that the maximum gain is 1

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
                "log_offset": list(self.log_offset)}

    @classmethod
    def from_json(cls, doc: dict) -> "FlatField":
        return cls(tuple(tuple(c) for c in doc["coefficients"]), int(doc["degree"]), tuple(doc["log_offset"]))


def estimate_flat_field(thumbnails: list[np.ndarray], degree: int = POLYNOMIAL_DEGREE) -> FlatField:
    """Fit the shading from tile thumbnails (from tile_thumbnail); needs at least 3 tiles."""
    if len(thumbnails) < 3:
        raise StitchingError(f"flat-field estimation needs at least 3 tiles, got {len(thumbnails)}")
    stack = np.stack(thumbnails).astype(np.float64)                     # (n, t, t, 3)
    stack = np.maximum(stack, 1.0)
    log_stack = np.log(stack) - np.log(stack).mean(axis=(1, 2), keepdims=True)
    log_shape = np.median(log_stack, axis=0)                             # (t, t, 3)
    size = log_shape.shape[0]
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    design = _design(y.ravel(), x.ravel(), degree)
    coefficients = []
    for channel in range(3):
        fitted, *_ = np.linalg.lstsq(design, log_shape[..., channel].ravel(), rcond=None)
        coefficients.append(tuple(float(v) for v in fitted))
    unscaled = FlatField(tuple(coefficients), degree).gain(256, 256)
    offsets = tuple(float(np.log(unscaled[..., c].max())) for c in range(3))
    return FlatField(tuple(coefficients), degree, offsets)
