"""Photos of the whole slide that go beside the pyramid: the macro camera's overview ("macro") and the
slide label ("label"), under the names QuPath, OpenSlide and tiffslide give a slide's associated images.
scan_manifest.slide_images_from_manifest finds a scan's own."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SlideImageError


@dataclass(frozen=True)
class SlideImage:
    pixels: np.ndarray  # (height_px, width_px, 3) uint8 RGB
    pixel_size_um: float  # on the slide

    def __post_init__(self):
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.shape[2] != 3 \
                or pixels.dtype != np.uint8 or 0 in pixels.shape:
            described = (f"{pixels.shape} {pixels.dtype}" if isinstance(pixels, np.ndarray)
                         else type(pixels).__name__)
            raise SlideImageError(f"slide image pixels are {described}; expected a non-empty "
                                  f"(height_px, width_px, 3) uint8 RGB array")
        if not (isinstance(self.pixel_size_um, (int, float)) and math.isfinite(self.pixel_size_um)
                and self.pixel_size_um > 0):
            raise SlideImageError(f"slide image pixel_size_um={self.pixel_size_um!r}; expected a positive number")
