"""Pyramid geometry and the 2x area-averaging reduction."""
from __future__ import annotations

import numpy as np
from PIL import Image

LOWEST_LEVEL_MAX_EDGE_PX = 1024


def pyramid_level_shapes(height_px: int, width_px: int,
                         lowest_level_max_edge_px: int = LOWEST_LEVEL_MAX_EDGE_PX) -> list[tuple[int, int]]:
    """(height_px, width_px) of every level: halve (rounding up) until both edges fit the limit.

    Level k pixels cover 2**k full-resolution pixels, so the pixel size of level k is exactly
    2**k times the full-resolution pixel size (the last row/column may cover fewer pixels)."""
    shapes = [(height_px, width_px)]
    while max(shapes[-1]) > lowest_level_max_edge_px:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample_2x_area(block: np.ndarray) -> np.ndarray:
    """Average 2x2 pixel groups of a (h, w, 3) uint8 block, rounding half up; an odd last row or
    column averages the pixels that exist.

    Pillow's box reduction computes exactly this in C without the GIL, about twice as fast as the
    equivalent numpy expression (which needs uint16 temporaries of the whole block)."""
    return np.asarray(Image.fromarray(block).reduce(2))


def shrink_to_fit(image: np.ndarray, max_edge_px: int) -> np.ndarray:
    """Repeated 2x area reduction of a small in-memory image until both edges fit max_edge_px."""
    while max(image.shape[:2]) > max_edge_px:
        image = downsample_2x_area(image)
    return image
