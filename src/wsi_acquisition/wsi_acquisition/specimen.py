"""Virtual specimens described as absorbance (optical density per R, G, B channel) and optical path.

A specimen answers one question: what are the optical density and the optical path difference of the
region whose top-left corner is (x0_um, y0_um), sampled on a grid of `width_px` x `height_px` pixels
of `pixel_size_um`? The optical path difference (µm) is (n_tissue - n_mountant) x thickness, the
phase the section adds to the light (2 pi OPD / lambda radians), which defocus turns into contrast.
Pixel (row, col)
covers the slide point (x0_um + (col + 0.5) * pixel_size_um, y0_um + (row + 0.5) * pixel_size_um).
Slide coordinates: x to the right along the 75 mm edge, y down along the 25 mm edge, origin at the
top-left corner of the glass.

`SyntheticSlide` is procedural: every value is a function of the slide position and the seed only, so
overlapping regions agree exactly (tiles stitch) and nothing at full resolution is ever held in memory.
`ImageSpecimen` places a user RGB image on the glass.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

import numpy as np

SLIDE_WIDTH_UM = 75_000.0
SLIDE_HEIGHT_UM = 25_000.0

# Optical density of a unit amount of each stain in the R, G, B channels (Ruifrok & Johnston 2001).
HEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286], dtype=np.float32)
EOSIN_OD = np.array([0.072, 0.990, 0.105], dtype=np.float32)
DAB_OD = np.array([0.268, 0.570, 0.776], dtype=np.float32)
# Bare glass, mounting medium and coverslip absorb a little and not quite neutrally.
GLASS_OD = np.array([0.012, 0.010, 0.016], dtype=np.float32)

STAINS = ("he", "ihc")

# Optical path difference (µm) of a ~4 µm section against its mounting medium (n about 1.52). Dehydrated,
# mounted tissue nearly matches the medium: the refractive index excess of cytoplasm and stroma is about
# 0.005-0.01, of collagen fibres and chromatin up to 0.01 more (refractive index follows dry mass,
# whatever the stain). Phases of 0.2-0.5 rad: weak, nearly invisible in focus, visible through defocus.
CYTOPLASM_OPD_UM = 0.030
CELLULAR_OPD_UM = 0.018         # extra in cellular (epithelial / tumour) areas
FIBRE_OPD_UM = 0.030
NUCLEUS_OPD_UM = 0.036          # per unit of nuclear (hematoxylin) stain amount
UNSTAINED_TEXTURE_OPD_UM = 0.012  # structure no stain shows: membranes, vacuoles, lipid

# Below this pixel size individual nuclei and fibres are drawn; above it they are replaced by their
# area average, which is what a coarse pixel integrates anyway (and avoids aliasing).
_DETAIL_MAX_PIXEL_UM = 2.0


class SpecimenError(ValueError):
    """A specimen was configured or queried with invalid values."""


class Specimen(Protocol):
    width_um: float
    height_um: float

    def optical_density(self, x0_um: float, y0_um: float, width_px: int, height_px: int,
                        pixel_size_um: float) -> np.ndarray:
        """(height_px, width_px, 3) float32 optical density of the region."""

    def optical_density_and_path(self, x0_um: float, y0_um: float, width_px: int, height_px: int,
                                 pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        """The optical density and the (height_px, width_px) float32 optical path difference (µm)
        relative to the mounting medium, of the region."""

    def tissue_bounds_um(self) -> list[tuple[float, float, float, float]]:
        """(left, top, right, bottom) of each piece of specimen, µm: where scans should look."""


def _check_region(width_px: int, height_px: int, pixel_size_um: float) -> None:
    if width_px < 1 or height_px < 1:
        raise SpecimenError(f"region size {width_px}x{height_px} px; expected at least 1x1")
    if not pixel_size_um > 0:
        raise SpecimenError(f"pixel_size_um={pixel_size_um}; expected > 0")


def pixel_centres_um(origin_um: float, count_px: int, pixel_size_um: float) -> np.ndarray:
    return origin_um + (np.arange(count_px, dtype=np.float64) + 0.5) * pixel_size_um


# ---------------------------------------------------------------------------------------------------
# Hashed value noise, defined on the whole slide plane.

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def noise_key(seed: int, stream: int) -> int:
    """Independent 64-bit hash key for one noise field of one seed."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (stream * 0xD1B54A32D192ED03 & _MASK64))


def hash_uniform(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Uniform [0, 1) float64 per integer lattice point (ix, iy broadcast together)."""
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        h = (np.asarray(ix, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            np.asarray(iy, dtype=np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
        h = h ^ np.uint64(key)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _smoothstep(t):
    return t * t * (3.0 - 2.0 * t)


def value_noise_grid(xs_um: np.ndarray, ys_um: np.ndarray, lattice_um: float, key: int) -> np.ndarray:
    """Value noise in [-1, 1] on the grid xs_um (ascending, W) x ys_um (ascending, H) -> (H, W) float32."""
    return _sum_of_octaves(len(ys_um), [(1.0, *_octave_along_x(xs_um, ys_um, lattice_um, key))])


def _octave_along_x(xs_um, ys_um, lattice_um: float, key: int):
    """One octave of value noise, interpolated along x for the few lattice rows the grid needs:
    (lattice rows x W values, lattice row below each pixel row, smoothstep weight of the row above)."""
    gx = xs_um / lattice_um
    gy = ys_um / lattice_um
    ix0 = np.floor(gx).astype(np.int64)
    iy0 = np.floor(gy).astype(np.int64)
    tx = _smoothstep(gx - ix0).astype(np.float32)
    ty = _smoothstep(gy - iy0).astype(np.float32)
    lattice_x = np.arange(ix0[0], ix0[-1] + 2)
    lattice_y = np.arange(iy0[0], iy0[-1] + 2)
    values = (hash_uniform(lattice_x[None, :], lattice_y[:, None], key) * 2.0 - 1.0).astype(np.float32)
    cols = ix0 - ix0[0]
    along_x = values[:, cols] * (1.0 - tx) + values[:, cols + 1] * tx
    return along_x, iy0 - iy0[0], ty


# Pixel rows per matrix product in `_sum_of_octaves`: a block touches only its own lattice rows, so the
# product does not multiply the zeros of the far lattice rows.
_ROW_BLOCK = 128


def _sum_of_octaves(height: int, octaves) -> np.ndarray:
    """Sum of amplitude x octave over the (amplitude, along_x, rows, ty) of `_octave_along_x` (at least
    one), (height, W) float32.

    The interpolation along y of every octave at once is one matrix product per block of rows:
    (rows x lattice rows of all octaves, two weights per octave and row) @ (lattice rows x W). That
    writes the output once, where interpolating and adding octave by octave passed over it about
    seven times per octave (measured 10x faster for coarse lattices, 3x for the finest)."""
    total = np.empty((height, octaves[0][1].shape[1]), dtype=np.float32)
    pixel_rows = np.arange(height)
    weights = []
    for amplitude, along_x, rows, ty in octaves:
        weight = np.zeros((height, along_x.shape[0]), dtype=np.float32)
        weight[pixel_rows, rows] = (1.0 - ty) * np.float32(amplitude)
        weight[pixel_rows, rows + 1] = ty * np.float32(amplitude)
        weights.append(weight)
    for start in range(0, height, _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, height)
        block_weights, block_values = [], []
        for (_, along_x, rows, _), weight in zip(octaves, weights):
            first, last = rows[start], rows[stop - 1] + 2
            block_weights.append(weight[start:stop, first:last])
            block_values.append(along_x[first:last])
        np.matmul(np.hstack(block_weights), np.vstack(block_values), out=total[start:stop])
    return total


def value_noise_points(x_um, y_um, lattice_um: float, key: int) -> np.ndarray:
    """The same noise as `value_noise_grid`, at arbitrary points (float64, shape of the inputs)."""
    gx = np.asarray(x_um, dtype=np.float64) / lattice_um
    gy = np.asarray(y_um, dtype=np.float64) / lattice_um
    ix0 = np.floor(gx).astype(np.int64)
    iy0 = np.floor(gy).astype(np.int64)
    tx = _smoothstep(gx - ix0)
    ty = _smoothstep(gy - iy0)

    def corner(dx, dy):
        return hash_uniform(ix0 + dx, iy0 + dy, key) * 2.0 - 1.0

    top = corner(0, 0) * (1.0 - tx) + corner(1, 0) * tx
    bottom = corner(0, 1) * (1.0 - tx) + corner(1, 1) * tx
    return top * (1.0 - ty) + bottom * ty


def fractal_noise_grid(xs_um, ys_um, lattice_um: float, octaves: int, key: int,
                       pixel_size_um: float) -> np.ndarray:
    """Sum of `octaves` value-noise octaves (spacing halving, amplitude halving), normalised so the
    amplitude sum is 1. Octaves finer than two pixels are left out: a pixel averages them to their
    mean, zero."""
    amplitude_sum = sum(0.5 ** octave for octave in range(octaves))
    kept = []
    for octave in range(octaves):
        spacing = lattice_um / 2 ** octave
        if spacing >= 2.0 * pixel_size_um:
            kept.append((0.5 ** octave / amplitude_sum, *_octave_along_x(xs_um, ys_um, spacing, key + octave)))
    if not kept:
        return np.zeros((len(ys_um), len(xs_um)), dtype=np.float32)
    return _sum_of_octaves(len(ys_um), kept)


def fractal_noise_points(x_um, y_um, lattice_um: float, octaves: int, key: int) -> np.ndarray:
    total = 0.0
    amplitude_sum = 0.0
    for octave in range(octaves):
        amplitude = 0.5 ** octave
        amplitude_sum += amplitude
        total = total + amplitude * value_noise_points(x_um, y_um, lattice_um / 2 ** octave, key + octave)
    return total / amplitude_sum


def _ramp(values, low: float, high: float):
    """0 below `low`, 1 above `high`, linear in between (float32)."""
    return np.clip((values - np.float32(low)) * np.float32(1.0 / (high - low)), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Procedural tissue


@dataclass(frozen=True)
class TissueSection:
    """One tissue section on the slide: a rounded rectangle with a ragged edge."""
    center_x_um: float
    center_y_um: float
    width_um: float = 15_000.0
    height_um: float = 15_000.0
    stain: str = "he"

    def __post_init__(self):
        if self.stain not in STAINS:
            raise SpecimenError(f"stain {self.stain!r}; expected one of {STAINS}")
        if not (self.width_um > 0 and self.height_um > 0):
            raise SpecimenError(f"section size {self.width_um}x{self.height_um} um; expected > 0")


@dataclass(frozen=True)
class _Fold:
    point_x_um: float
    point_y_um: float
    direction_x: float
    direction_y: float
    width_um: float
    length_um: float


@dataclass(frozen=True)
class _NucleusLayer:
    """Nuclei on a hashed grid of cells: at most one nucleus per cell, kept inside its cell, so every
    pixel only looks at the cell it falls in. Two layers of different cell size hide the grid."""
    stream: int
    cell_um: float
    radius_um: float
    elongation: float          # major/minor axis ratio, upper bound
    intensity: float           # stain amount in the nucleus
    cellular: bool             # presence follows cellularity (True) or its complement (False)


_NUCLEUS_LAYERS = (
    _NucleusLayer(stream=40, cell_um=11.0, radius_um=2.5, elongation=1.6, intensity=0.85, cellular=True),
    _NucleusLayer(stream=50, cell_um=14.0, radius_um=2.2, elongation=3.2, intensity=1.1, cellular=False),
)

# Raggedness of the section edge, as a fraction of the section half size.
_EDGE_NOISE = 0.10


class SyntheticSlide:
    """Procedural stained tissue on a 25 x 75 mm glass slide, rendered lazily for any region.

    Content per section: ragged outline, holes (tears, lumens) of several sizes, cellular (epithelium /
    tumour) and stromal areas, wavy eosinophilic fibres, two populations of nuclei with chromatin
    texture, tissue folds (doubled thickness); H&E or IHC (DAB brown + hematoxylin counterstain)."""

    def __init__(self, seed: int = 0, sections: tuple[TissueSection, ...] | None = None,
                 width_um: float = SLIDE_WIDTH_UM, height_um: float = SLIDE_HEIGHT_UM):
        if sections is None:
            sections = (TissueSection(center_x_um=width_um * 0.58, center_y_um=height_um / 2),)
        if not sections:
            raise SpecimenError("sections is empty; expected at least one TissueSection (or None)")
        for section in sections:
            left, top, right, bottom = _section_bounds(section)
            if left < 0 or top < 0 or right > width_um or bottom > height_um:
                raise SpecimenError(
                    f"section {section} extends outside the {width_um} x {height_um} um slide")
        self.seed = int(seed)
        self.width_um = float(width_um)
        self.height_um = float(height_um)
        self.sections = tuple(sections)
        self._folds = tuple(self._make_folds(index, s) for index, s in enumerate(self.sections))

    def _make_folds(self, index: int, section: TissueSection) -> tuple[_Fold, ...]:
        rng = random.Random(noise_key(self.seed, 1000 + index))
        folds = []
        for _ in range(rng.choice((0, 1, 1, 2))):
            angle = rng.uniform(0.0, math.pi)
            folds.append(_Fold(
                point_x_um=section.center_x_um + rng.uniform(-0.35, 0.35) * section.width_um,
                point_y_um=section.center_y_um + rng.uniform(-0.35, 0.35) * section.height_um,
                direction_x=math.cos(angle), direction_y=math.sin(angle),
                width_um=rng.uniform(60.0, 220.0),
                length_um=rng.uniform(0.2, 0.6) * max(section.width_um, section.height_um)))
        return tuple(folds)

    def tissue_bounds_um(self) -> list[tuple[float, float, float, float]]:
        """(left, top, right, bottom) of each section's extent (the ragged edge stays inside)."""
        return [_section_bounds(s) for s in self.sections]

    def optical_density(self, x0_um: float, y0_um: float, width_px: int, height_px: int,
                        pixel_size_um: float) -> np.ndarray:
        return self.optical_density_and_path(x0_um, y0_um, width_px, height_px, pixel_size_um)[0]

    def optical_density_and_path(self, x0_um: float, y0_um: float, width_px: int, height_px: int,
                                 pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        _check_region(width_px, height_px, pixel_size_um)
        xs = pixel_centres_um(x0_um, width_px, pixel_size_um)
        ys = pixel_centres_um(y0_um, height_px, pixel_size_um)
        # Built as channel planes, so every pass over a channel is contiguous (and the microscope's
        # per-channel FFTs read them directly); returned as the (height, width, 3) view of them.
        od_planes = np.empty((3, height_px, width_px), dtype=np.float32)
        for channel in range(3):
            od_planes[channel] = GLASS_OD[channel]
        path_um = np.zeros((height_px, width_px), dtype=np.float32)
        for index, section in enumerate(self.sections):
            left, top, right, bottom = _section_bounds(section)
            if xs[-1] < left or xs[0] > right or ys[-1] < top or ys[0] > bottom:
                continue
            self._add_section(od_planes, path_um, xs, ys, pixel_size_um, index, section)
        return od_planes.transpose(1, 2, 0), path_um

    def _add_section(self, od_planes, path_um, xs, ys, pixel_size_um, index, section):
        key = noise_key(self.seed, index)
        p = pixel_size_um
        detailed = p <= _DETAIL_MAX_PIXEL_UM

        def noise(lattice_um, octaves, stream):
            return fractal_noise_grid(xs, ys, lattice_um, octaves, key + 100 * stream, p)

        presence = self._section_presence(xs, ys, p, section, noise)
        if not presence.any():
            return
        holes = np.maximum(_ramp(noise(420.0, 3, 2), 0.36, 0.365),
                           _ramp(noise(45.0, 2, 3), 0.58, 0.59))
        presence *= 1.0 - holes
        folded = self._fold_thickness(xs, ys, p, index, noise)
        if folded is not None:
            presence *= 1.0 + folded

        cellularity = _ramp(noise(700.0, 3, 4), -0.1, 0.25)
        texture = noise(3.0, 2, 5) if p <= 1.0 else np.float32(0.0)

        if detailed:
            phase = noise(220.0, 3, 6) * np.float32(2 * math.pi * 220.0 / 7.0)
            continuity = _ramp(noise(25.0, 2, 9), -0.35, 0.25)
            fibres = np.square(np.square(0.5 + 0.5 * np.sin(phase))) * continuity
        else:
            fibres = np.float32(35.0 / 128.0 * 0.6)  # mean of ((1 + sin) / 2) ** 4 times continuity
        nuclei = [self._nuclei(xs, ys, p, key, layer, cellularity, texture, detailed)
                  for layer in _NUCLEUS_LAYERS]
        nuclear_stain = nuclei[0] + nuclei[1]
        unstained = noise(1.6, 2, 10)
        path_um += presence * (CYTOPLASM_OPD_UM + CELLULAR_OPD_UM * cellularity + FIBRE_OPD_UM * fibres
                               + NUCLEUS_OPD_UM * nuclear_stain + UNSTAINED_TEXTURE_OPD_UM * unstained)

        if section.stain == "he":
            eosin = ((1.0 - cellularity) * (0.12 + 0.55 * fibres)
                     + cellularity * (0.28 + 0.12 * texture))
            hematoxylin = 0.04 + 0.05 * cellularity + nuclear_stain
            stains = ((hematoxylin, HEMATOXYLIN_OD), (eosin, EOSIN_OD))
        else:
            positive = _ramp(noise(500.0, 2, 7), 0.05, 0.15) * cellularity
            nucleus_positive = self._nucleus_positive(xs, ys, key, detailed)
            dab = positive * (0.12 + 0.05 * texture + 0.9 * nuclear_stain * nucleus_positive)
            hematoxylin = 0.03 + 0.05 * fibres + 0.55 * nuclear_stain * (1.0 - positive * nucleus_positive)
            stains = ((hematoxylin, HEMATOXYLIN_OD), (dab, DAB_OD))
        for channel in range(3):
            (first, first_od), (second, second_od) = stains
            channel_od = first * first_od[channel]
            channel_od += second * second_od[channel]
            channel_od *= presence
            od_planes[channel] += channel_od

    def _section_presence(self, xs, ys, p, section, noise):
        half_w = section.width_um / 2
        half_h = section.height_um / 2
        u = ((xs - section.center_x_um) / half_w).astype(np.float32)
        v = ((ys - section.center_y_um) / half_h).astype(np.float32)
        edge_um = max(p, 1.0)
        # The edge noise is within +-1, so a region whose farthest corner is inside by more than the
        # noise's reach (and half the edge, plus 1 µm for rounding) is all tissue: the clip below gives 1.
        farthest = (max(abs(u[0]), abs(u[-1])) ** 4 + max(abs(v[0]), abs(v[-1])) ** 4) ** 0.25
        if (1.0 - 2 * _EDGE_NOISE - farthest) * min(half_w, half_h) >= edge_um / 2 + 1.0:
            return np.ones((len(ys), len(xs)), dtype=np.float32)
        radius = (u[None, :] ** 4 + v[:, None] ** 4) ** 0.25
        inside_um = (1.0 - _EDGE_NOISE - radius + np.float32(_EDGE_NOISE) * noise(1800.0, 4, 1)) * min(
            half_w, half_h)
        return np.clip(inside_um / np.float32(edge_um) + 0.5, 0.0, 1.0)

    def _fold_thickness(self, xs, ys, p, index, noise):
        """Extra thickness (0..1 section) where the section folded over itself; None where no fold
        reaches the region."""
        edge_um = max(p, 2.0)
        folds = [fold for fold in self._folds[index] if _fold_may_reach(fold, xs, ys, edge_um)]
        if not folds:
            return None
        extra = np.zeros((len(ys), len(xs)), dtype=np.float32)
        wobble = noise(900.0, 2, 8) * np.float32(_FOLD_WOBBLE_UM)
        for fold in folds:
            dx = (xs - fold.point_x_um).astype(np.float32)[None, :]
            dy = (ys - fold.point_y_um).astype(np.float32)[:, None]
            across = np.abs(dx * fold.direction_y - dy * fold.direction_x + wobble)
            along = np.abs(dx * fold.direction_x + dy * fold.direction_y)
            inside = np.minimum(fold.width_um / 2 - across, fold.length_um / 2 - along)
            extra = np.maximum(extra, np.clip(inside / np.float32(edge_um) + 0.5, 0.0, 1.0))
        return extra

    def _cell_grid(self, xs, ys, cell_um):
        col_cells = np.floor(xs / cell_um).astype(np.int64)
        row_cells = np.floor(ys / cell_um).astype(np.int64)
        cell_x = np.arange(col_cells[0], col_cells[-1] + 1)
        cell_y = np.arange(row_cells[0], row_cells[-1] + 1)
        return cell_x, cell_y, col_cells - col_cells[0], row_cells - row_cells[0]

    def _nuclei(self, xs, ys, p, key, layer: _NucleusLayer, cellularity, texture, detailed):
        """Hematoxylin amount of one nucleus layer."""
        cell = layer.cell_um
        base_probability = 0.75 if layer.cellular else 0.35
        if not detailed:
            mean_area = math.pi * layer.radius_um ** 2 * (1 + layer.elongation) / 2 / cell ** 2
            weight = cellularity if layer.cellular else 1.0 - cellularity
            return weight * np.float32(base_probability * mean_area * layer.intensity)
        cell_x, cell_y, cols, rows = self._cell_grid(xs, ys, cell)
        layer_key = key + 100 * layer.stream

        def uniform(stream):
            return hash_uniform(cell_x[None, :], cell_y[:, None], layer_key + stream)

        centre_x = (cell_x[None, :] + 0.5) * cell
        centre_y = (cell_y[:, None] + 0.5) * cell
        cell_cellularity = np.clip(
            (fractal_noise_points(centre_x, centre_y, 700.0, 3, key + 400) + 0.1) / 0.35, 0.0, 1.0)
        weight = cell_cellularity if layer.cellular else 1.0 - cell_cellularity
        present = uniform(1) < base_probability * weight
        minor = layer.radius_um * (0.7 + 0.6 * uniform(2))
        major = np.minimum(minor * (1.0 + (layer.elongation - 1.0) * uniform(3)), 0.46 * cell)
        angle = math.pi * uniform(4)
        slack = np.maximum(cell / 2 - major, 0.0)
        nucleus_x = centre_x + (uniform(5) * 2 - 1) * slack
        nucleus_y = centre_y + (uniform(6) * 2 - 1) * slack
        cos, sin = np.cos(angle), np.sin(angle)
        # Quadratic form of the ellipse: q <= 1 inside.
        qa = (cos / major) ** 2 + (sin / minor) ** 2
        qb = cos * sin * (1 / major ** 2 - 1 / minor ** 2)
        qc = (sin / major) ** 2 + (cos / minor) ** 2
        strength = np.where(present, layer.intensity * (0.75 + 0.5 * uniform(7)), 0.0)

        # A nucleus stays inside its cell, so the pixel rows of one cell row only see that row's nuclei:
        # per cell row, every per-nucleus value is a vector over the pixel columns, and only the pixels
        # within reach of a present nucleus are computed (the rest is exactly 0, as the formula gives
        # there). Nuclei cover a few per cent of the pixels: this made a layer about 4x faster (measured).
        def per_column(values):
            return values.astype(np.float32)[:, cols]

        edge_um = np.float32(max(p, 0.3))
        # Beyond sqrt(q) = reach the body (and with it the rim) is 0; one pixel more for rounding.
        reach = 1.0 + float(edge_um) / (2.0 * layer.radius_um)
        determinant = qa * qc - qb * qb
        reach_x = per_column(reach * np.sqrt(qc / determinant) + p)
        reach_y_um = reach * np.sqrt(qa / determinant) + p
        dx = xs.astype(np.float32)[None, :] - per_column(nucleus_x)
        qa_dx_dx = per_column(qa) * dx * dx
        two_qb_dx = 2 * per_column(qb) * dx
        qc_columns = per_column(qc)
        nucleus_y_columns = per_column(nucleus_y)
        strength_columns = per_column(strength)
        near = (strength_columns > 0) & (np.abs(dx) <= reach_x)
        ys32 = ys.astype(np.float32)
        amount = np.zeros((len(ys), len(xs)), dtype=np.float32)
        for cell_row in range(len(cell_y)):
            columns = np.flatnonzero(near[cell_row])
            if len(columns) == 0:
                continue
            band = np.flatnonzero(rows == cell_row)
            top_um = (nucleus_y[cell_row] - reach_y_um[cell_row])[present[cell_row]].min()
            bottom_um = (nucleus_y[cell_row] + reach_y_um[cell_row])[present[cell_row]].max()
            band = band[(ys[band] >= top_um) & (ys[band] <= bottom_um)]
            if len(band) == 0:
                continue
            block = (slice(band[0], band[-1] + 1), columns)
            at = (cell_row, columns)
            dy = ys32[block[0], None] - nucleus_y_columns[at]
            q = qa_dx_dx[at] + two_qb_dx[at] * dy + qc_columns[at] * dy * dy
            inset_um = (1.0 - np.sqrt(q)) * np.float32(layer.radius_um)
            body = np.clip(inset_um / edge_um + 0.5, 0.0, 1.0)
            # Chromatin condenses at the nuclear membrane and in granules.
            rim = np.clip(1.0 - inset_um * np.float32(1 / 0.7), 0.0, 1.0) ** 2 * body
            block_texture = texture[block] if np.ndim(texture) else texture
            amount[block] = strength_columns[at] * (body * (0.8 + 0.35 * block_texture) + 0.35 * rim)
        return amount

    def _nucleus_positive(self, xs, ys, key, detailed):
        """1 where the nucleus of the cellular layer is DAB positive (IHC), area fraction otherwise."""
        if not detailed:
            return np.float32(0.6)
        cell_x, cell_y, cols, rows = self._cell_grid(xs, ys, _NUCLEUS_LAYERS[0].cell_um)
        positive = hash_uniform(cell_x[None, :], cell_y[:, None], key + 100 * 60) < 0.6
        return positive.astype(np.float32)[:, cols][rows]


# The fold band's centre line wobbles by up to this much either way.
_FOLD_WOBBLE_UM = 120.0


def _fold_may_reach(fold: _Fold, xs, ys, edge_um: float) -> bool:
    """Whether the fold band (with its wobble and soft edge, plus 1 µm for rounding) can touch the region
    spanned by the pixel centres xs, ys: the distances across and along the fold are linear in position,
    so their extremes over the region are at its corners."""
    corners_x = np.array([xs[0], xs[-1], xs[0], xs[-1]]) - fold.point_x_um
    corners_y = np.array([ys[0], ys[0], ys[-1], ys[-1]]) - fold.point_y_um

    def nearest(distance):      # of a linear function over the region: 0 where it changes sign
        return 0.0 if distance.min() <= 0.0 <= distance.max() else float(np.abs(distance).min())

    across = nearest(corners_x * fold.direction_y - corners_y * fold.direction_x)
    along = nearest(corners_x * fold.direction_x + corners_y * fold.direction_y)
    slack = edge_um / 2 + 1.0
    return across - _FOLD_WOBBLE_UM < fold.width_um / 2 + slack and along < fold.length_um / 2 + slack


def _section_bounds(section: TissueSection) -> tuple[float, float, float, float]:
    half_w = section.width_um / 2
    half_h = section.height_um / 2
    return (section.center_x_um - half_w, section.center_y_um - half_h,
            section.center_x_um + half_w, section.center_y_um + half_h)


# ---------------------------------------------------------------------------------------------------
# User image as specimen


class ImageSpecimen:
    """Any RGB image (H, W, 3; uint8, uint16 or float in 0..1) placed on the glass with its pixel size.

    Intensities are read as transmission relative to `white_level` (the dtype maximum by default) and
    converted to optical density; outside the image is bare glass. An RGB image carries no phase: the
    optical path is taken proportional to the stain's mean optical density (`path_um_per_od`, since
    both follow the tissue's dry mass); 0 makes a pure absorber. The image is kept once in its own
    dtype plus a 2x mean pyramid, so coarse renders are area-averaged instead of aliased."""

    def __init__(self, image: np.ndarray, pixel_size_um: float, origin_x_um: float | None = None,
                 origin_y_um: float | None = None, white_level: float | None = None,
                 width_um: float = SLIDE_WIDTH_UM, height_um: float = SLIDE_HEIGHT_UM,
                 path_um_per_od: float = 0.03):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise SpecimenError(f"image shape {image.shape}; expected (height, width, 3)")
        if not pixel_size_um > 0:
            raise SpecimenError(f"pixel_size_um={pixel_size_um}; expected > 0")
        if image.dtype == np.uint8 or image.dtype == np.uint16:
            levels = np.iinfo(image.dtype).max
        elif np.issubdtype(image.dtype, np.floating):
            if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
                raise SpecimenError("float image has values outside 0..1 (or NaN); expected 0..1")
            image = np.round(image * 65535).astype(np.uint16)
            levels = 65535
        else:
            raise SpecimenError(f"image dtype {image.dtype}; expected uint8, uint16 or float")
        white = float(levels if white_level is None else white_level)
        if not white > 0:
            raise SpecimenError(f"white_level={white_level}; expected > 0")
        if not path_um_per_od >= 0:
            raise SpecimenError(f"path_um_per_od={path_um_per_od}; expected >= 0")
        self.path_um_per_od = float(path_um_per_od)
        self.width_um = float(width_um)
        self.height_um = float(height_um)
        self.pixel_size_um = float(pixel_size_um)
        image_width_um = image.shape[1] * pixel_size_um
        image_height_um = image.shape[0] * pixel_size_um
        self.origin_x_um = (width_um - image_width_um) / 2 if origin_x_um is None else float(origin_x_um)
        self.origin_y_um = (height_um - image_height_um) / 2 if origin_y_um is None else float(origin_y_um)
        if (self.origin_x_um < 0 or self.origin_y_um < 0 or self.origin_x_um + image_width_um > width_um
                or self.origin_y_um + image_height_um > height_um):
            raise SpecimenError(
                f"image of {image_width_um:.0f} x {image_height_um:.0f} um at ({self.origin_x_um:.0f}, "
                f"{self.origin_y_um:.0f}) um does not fit on the {width_um} x {height_um} um slide")
        transmission = np.arange(levels + 1, dtype=np.float64) / white
        self._od_lookup = (-np.log10(np.clip(transmission, 1.0 / 4096, None))).astype(np.float32)
        self._pyramid = [image]
        while min(self._pyramid[-1].shape[:2]) >= 4:
            level = self._pyramid[-1]
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            mean = level[:h:2, :w:2].astype(np.float32) + level[1:h:2, :w:2] + level[:h:2, 1:w:2] + level[
                1:h:2, 1:w:2]
            self._pyramid.append(np.round(mean / 4).astype(image.dtype))

    def tissue_bounds_um(self) -> list[tuple[float, float, float, float]]:
        image = self._pyramid[0]
        return [(self.origin_x_um, self.origin_y_um, self.origin_x_um + image.shape[1] * self.pixel_size_um,
                 self.origin_y_um + image.shape[0] * self.pixel_size_um)]

    def optical_density_and_path(self, x0_um: float, y0_um: float, width_px: int, height_px: int,
                                 pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        od = self.optical_density(x0_um, y0_um, width_px, height_px, pixel_size_um)
        stain_od = np.clip((od - GLASS_OD).mean(axis=2), 0.0, None)
        return od, stain_od * np.float32(self.path_um_per_od)

    def optical_density(self, x0_um: float, y0_um: float, width_px: int, height_px: int,
                        pixel_size_um: float) -> np.ndarray:
        _check_region(width_px, height_px, pixel_size_um)
        level_index = 0
        while (level_index + 1 < len(self._pyramid)
               and self.pixel_size_um * 2 ** (level_index + 1) <= pixel_size_um):
            level_index += 1
        level = self._pyramid[level_index]
        level_pixel_um = self.pixel_size_um * 2 ** level_index
        # Fractional source coordinates of the target pixel centres (source pixel centres at k + 0.5).
        src_x = (pixel_centres_um(x0_um, width_px, pixel_size_um) - self.origin_x_um) / level_pixel_um - 0.5
        src_y = (pixel_centres_um(y0_um, height_px, pixel_size_um) - self.origin_y_um) / level_pixel_um - 0.5
        od = np.empty((height_px, width_px, 3), dtype=np.float32)
        od[:] = GLASS_OD
        inside_x = (src_x > -1.0) & (src_x < level.shape[1])
        inside_y = (src_y > -1.0) & (src_y < level.shape[0])
        if not inside_x.any() or not inside_y.any():
            return od
        col0, col1 = np.flatnonzero(inside_x)[[0, -1]]
        row0, row1 = np.flatnonzero(inside_y)[[0, -1]]
        sx = np.clip(src_x[col0:col1 + 1], 0.0, level.shape[1] - 1.0)
        sy = np.clip(src_y[row0:row1 + 1], 0.0, level.shape[0] - 1.0)
        x_low = np.minimum(np.floor(sx).astype(np.int64), level.shape[1] - 2) if level.shape[1] > 1 else \
            np.zeros(len(sx), dtype=np.int64)
        y_low = np.minimum(np.floor(sy).astype(np.int64), level.shape[0] - 2) if level.shape[0] > 1 else \
            np.zeros(len(sy), dtype=np.int64)
        x_high = np.minimum(x_low + 1, level.shape[1] - 1)
        y_high = np.minimum(y_low + 1, level.shape[0] - 1)
        tx = (sx - x_low).astype(np.float32)[None, :, None]
        ty = (sy - y_low).astype(np.float32)[:, None, None]
        # Crop the source window first, then look up optical density: interpolation happens in
        # absorbance, where stain amounts add.
        window_rows = np.arange(y_low.min(), y_high.max() + 1)
        window_cols = np.arange(x_low.min(), x_high.max() + 1)
        window = self._od_lookup[level[window_rows[0]:window_rows[-1] + 1,
                                       window_cols[0]:window_cols[-1] + 1]]
        x_low -= window_cols[0]
        x_high -= window_cols[0]
        y_low -= window_rows[0]
        y_high -= window_rows[0]
        top = window[y_low][:, x_low] * (1 - tx) + window[y_low][:, x_high] * tx
        bottom = window[y_high][:, x_low] * (1 - tx) + window[y_high][:, x_high] * tx
        od[row0:row1 + 1, col0:col1 + 1] = top * (1 - ty) + bottom * ty
        return od
