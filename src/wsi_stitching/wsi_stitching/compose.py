"""Composition of mosaic chunks from placed tiles: flat-field correction and blending in overlaps.

Tiles are placed at integer positions (rounded from the sub-pixel solution: resampling every tile
would blur it for a gain below the 0.5 px rounding). Blending modes:
  "feather"   weight ramps linearly from the tile border to feather_px inside (default);
  "none"      each pixel from the tile whose border is farthest (hard cut mid-overlap);
  "sharpness" feather weight times the square of the tile's local sharpness, so a blurred tile
              gives way to its sharper neighbour inside the overlap.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import StitchingError
from .flatfield import THUMBNAIL_PX

BLENDING_MODES = ("feather", "none", "sharpness")
CHUNK_PX = 512
FILL_VALUE = 255


def check_blending(mode: str) -> str:
    if mode not in BLENDING_MODES:
        raise StitchingError(f"blending mode {mode!r} is unknown; expected one of {BLENDING_MODES}")
    return mode


def border_distance(length_px: int) -> np.ndarray:
    """Distance of each pixel centre from the nearer end of a 1-D extent, px (0.5 at the ends)."""
    index = np.arange(length_px, dtype=np.float32) + 0.5
    return np.minimum(index, length_px - index)


def sharpness_map(image: np.ndarray) -> np.ndarray:
    """(THUMBNAIL_PX, THUMBNAIL_PX) block means of the squared Laplacian of the tile's gray level."""
    gray = image.astype(np.float32).mean(axis=2) if image.ndim == 3 else image.astype(np.float32)
    energy = ndimage.laplace(gray) ** 2
    h, w = energy.shape
    ys = np.linspace(0, h, THUMBNAIL_PX + 1).astype(int)
    xs = np.linspace(0, w, THUMBNAIL_PX + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(energy, ys[:-1], axis=0), xs[:-1], axis=1)
    return (sums / (np.diff(ys)[:, None] * np.diff(xs)[None, :])).astype(np.float32)


@dataclass
class PlacedTile:
    """A tile ready to be composed: pixels, integer top-left in mosaic px, local sharpness."""
    image: np.ndarray        # (h, w, 3) uint8
    top_px: int
    left_px: int
    sharpness: np.ndarray | None = None


class ChunkComposer:
    """Composes mosaic chunks from tiles of one shape, with one flat-field gain (or None), blending mode
    and feather length. The per-pixel factors every tile shares (border weight, reciprocal gain and
    their product) are computed once, so a tile adds to a chunk with one multiply and one add per pixel."""

    def __init__(self, tile_shape: tuple[int, int], gain: np.ndarray | None, blending: str, feather_px: float):
        self.tile_shape = tuple(tile_shape)
        self.blending = check_blending(blending)
        dist_y, dist_x = border_distance(self.tile_shape[0])[:, None], border_distance(self.tile_shape[1])[None, :]
        if blending == "none":   # the tile whose border is farthest wins
            self._border_weight = np.minimum(dist_y, dist_x)
        else:
            self._border_weight = np.clip(dist_y / feather_px, 0.0, 1.0) * np.clip(dist_x / feather_px, 0.0, 1.0)
        self._inverse_gain = (np.ones(self.tile_shape + (1,), np.float32) if gain is None
                              else np.reciprocal(gain, dtype=np.float32))
        self._weighted_gain = self._inverse_gain * self._border_weight[..., None]

    def compose(self, y0: int, x0: int, height: int, width: int, tiles: list[PlacedTile]) -> np.ndarray:
        """One (height, width, 3) uint8 block of the mosaic at (y0, x0); uncovered pixels get FILL_VALUE."""
        accumulated = np.zeros((height, width, 3), dtype=np.float32)
        weight_sum = np.zeros((height, width), dtype=np.float32)
        best_weight = np.full((height, width), -1.0, dtype=np.float32) if self.blending == "none" else None
        for tile in tiles:
            th, tw = tile.image.shape[:2]
            if (th, tw) != self.tile_shape:
                raise StitchingError(f"tile of {th}x{tw} px in a mosaic of {self.tile_shape[0]}x{self.tile_shape[1]} "
                                     f"px tiles; expected every tile of the shape the composer was made for")
            cy0, cy1 = max(y0, tile.top_px), min(y0 + height, tile.top_px + th)
            cx0, cx1 = max(x0, tile.left_px), min(x0 + width, tile.left_px + tw)
            if cy1 <= cy0 or cx1 <= cx0:
                continue
            ty = slice(cy0 - tile.top_px, cy1 - tile.top_px)
            tx = slice(cx0 - tile.left_px, cx1 - tile.left_px)
            out = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
            weight = self._border_weight[ty, tx]
            if self.blending == "none":
                take = weight > best_weight[out]
                np.copyto(best_weight[out], weight, where=take)
                pixels = np.multiply(tile.image[ty, tx], self._inverse_gain[ty, tx], dtype=np.float32)
                np.copyto(accumulated[out], pixels, where=take[..., None])
                weight_sum[out] = 1.0
                continue
            if self.blending == "sharpness":
                rows = np.minimum((np.arange(ty.start, ty.stop) * THUMBNAIL_PX) // th, THUMBNAIL_PX - 1)
                cols = np.minimum((np.arange(tx.start, tx.stop) * THUMBNAIL_PX) // tw, THUMBNAIL_PX - 1)
                weight = weight * tile.sharpness[np.ix_(rows, cols)] ** 2
                weight = np.maximum(weight, 1e-12)  # a covered pixel always gets a value
                pixels = np.multiply(tile.image[ty, tx], self._inverse_gain[ty, tx], dtype=np.float32)
                pixels *= weight[..., None]
            else:
                pixels = np.multiply(tile.image[ty, tx], self._weighted_gain[ty, tx], dtype=np.float32)
            accumulated[out] += pixels
            weight_sum[out] += weight
        covered = weight_sum > 0
        accumulated *= np.divide(1.0, weight_sum, out=weight_sum, where=covered)[..., None]
        np.rint(accumulated, out=accumulated)
        np.clip(accumulated, 0, 255, out=accumulated)
        result = accumulated.astype(np.uint8)
        result[~covered] = FILL_VALUE
        return result


def compose_chunk(y0: int, x0: int, height: int, width: int, tiles: list[PlacedTile],
                  gain: np.ndarray | None, blending: str, feather_px: float) -> np.ndarray:
    """One (height, width, 3) uint8 block of the mosaic at (y0, x0) from tiles of one shape; uncovered
    pixels get FILL_VALUE."""
    if not tiles:
        return np.full((height, width, 3), FILL_VALUE, dtype=np.uint8)
    composer = ChunkComposer(tiles[0].image.shape[:2], gain, blending, feather_px)
    return composer.compose(y0, x0, height, width, tiles)
