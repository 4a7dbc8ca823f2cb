"""Scan planning: tissue detection on the overview, serpentine tile plan, focus points and focus map.

All positions are slide/stage coordinates in µm (x right, y down); tile positions are field-of-view
centres, which is where the stage is sent (`wsi_common.tile_grid`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import interpolate, ndimage

from wsi_common.tile_grid import TileGrid


class PlanningError(ValueError):
    """A planning input is out of range or inconsistent."""


class NoTissueError(PlanningError):
    """Nothing to scan: no tissue found, or no planned tile contains tissue."""


# ---------------------------------------------------------------------------------------------------
# Tissue detection


@dataclass(frozen=True)
class TissueDetection:
    mask: np.ndarray                # (H, W) bool on the overview pixel grid
    pixel_size_um: float
    origin_x_um: float              # slide position of the mask's top-left corner
    origin_y_um: float
    od_threshold: float

    @property
    def tissue_area_mm2(self) -> float:
        return float(self.mask.sum()) * self.pixel_size_um ** 2 / 1e6

    @property
    def bounding_box_um(self) -> tuple[float, float, float, float] | None:
        """(x, y, width, height) enclosing all tissue, or None when there is none."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        if len(rows) == 0:
            return None
        p = self.pixel_size_um
        return (self.origin_x_um + cols[0] * p, self.origin_y_um + rows[0] * p,
                (cols[-1] + 1 - cols[0]) * p, (rows[-1] + 1 - rows[0]) * p)

    def tissue_fraction(self, x_um: float, y_um: float, width_um: float, height_um: float) -> float:
        """Fraction of the rectangle (top-left x, y) covered by tissue; outside the mask counts as glass."""
        p = self.pixel_size_um
        col0 = math.floor((x_um - self.origin_x_um) / p)
        col1 = math.ceil((x_um + width_um - self.origin_x_um) / p)
        row0 = math.floor((y_um - self.origin_y_um) / p)
        row1 = math.ceil((y_um + height_um - self.origin_y_um) / p)
        total = max(1, (col1 - col0) * (row1 - row0))
        window = self.mask[max(row0, 0):max(row1, 0), max(col0, 0):max(col1, 0)]
        return float(window.sum()) / total


def optical_density_rgb8(image_rgb8: np.ndarray, white_rgb: np.ndarray | None = None) -> np.ndarray:
    """Per-channel optical density of an 8-bit bright-field image; white = the 99th percentile per
    channel (bare glass) unless given."""
    image = np.asarray(image_rgb8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PlanningError(f"image {image.shape} {image.dtype}; expected (height, width, 3) uint8")
    if white_rgb is None:
        white_rgb = np.percentile(image.reshape(-1, 3), 99, axis=0)
    white = np.maximum(np.asarray(white_rgb, dtype=np.float32), 1.0)
    return -np.log10(np.maximum(image.astype(np.float32), 0.5) / white)


def _glass_background(image_rgb8: np.ndarray, od_threshold: float) -> np.ndarray:
    """(H, W, 3) brightness of bare glass: per channel a quadratic surface in the image position,
    fitted to the pixels that do not absorb (alternately classifying pixels and refitting)."""
    height, width = image_rgb8.shape[:2]
    stride = max(1, int(math.sqrt(height * width / 40_000)))
    sample = image_rgb8[::stride, ::stride].astype(np.float64).reshape(-1, 3)
    rows, cols = np.mgrid[0:height:stride, 0:width:stride]
    design = np.stack(np.broadcast_arrays(*_quadratic_terms(cols.ravel() / width - 0.5,
                                                            rows.ravel() / height - 0.5)))
    coefficients = np.zeros((len(design), 3))
    coefficients[0] = np.percentile(sample, 99, axis=0)
    for _ in range(3):
        background = np.maximum(np.tensordot(coefficients, design, axes=(0, 0)).T, 1.0)
        glass = (-np.log10(np.maximum(sample, 0.5) / background)).max(axis=1) < od_threshold / 2
        if glass.sum() < 100:
            break
        coefficients = np.linalg.lstsq(design[:, glass].T, sample[glass], rcond=None)[0]
    terms = _quadratic_terms((np.arange(width, dtype=np.float32) / width - 0.5)[None, :],
                             (np.arange(height, dtype=np.float32) / height - 0.5)[:, None])
    background = np.empty((height, width, 3), dtype=np.float32)
    for channel in range(3):
        background[..., channel] = sum(c * t for c, t in zip(coefficients[:, channel].astype(np.float32), terms))
    return background


def _quadratic_terms(u, v):
    return [1.0, u, v, u * u, u * v, v * v]


def detect_tissue(overview_rgb8: np.ndarray, pixel_size_um: float, origin_x_um: float = 0.0,
                  origin_y_um: float = 0.0, od_threshold: float = 0.035, closing_um: float = 100.0,
                  min_object_area_um2: float = 40_000.0, max_hole_area_um2: float = 250_000.0
                  ) -> TissueDetection:
    """Tissue mask of a bright-field overview.

    The highest channel optical density, relative to a smooth fit of the glass brightness (uneven
    illumination of the overview camera), is thresholded; gaps narrower than `closing_um` are
    bridged, holes smaller than `max_hole_area_um2` filled (they still need imaging for stitching),
    objects smaller than `min_object_area_um2` (dust, noise) dropped."""
    overview_rgb8 = np.asarray(overview_rgb8)
    if overview_rgb8.ndim != 3 or overview_rgb8.shape[2] != 3 or overview_rgb8.dtype != np.uint8:
        raise PlanningError(f"overview {overview_rgb8.shape} {overview_rgb8.dtype}; expected "
                            f"(height, width, 3) uint8")
    if not pixel_size_um > 0:
        raise PlanningError(f"pixel_size_um={pixel_size_um}; expected > 0")
    if not od_threshold > 0:
        raise PlanningError(f"od_threshold={od_threshold}; expected > 0")
    od = optical_density_rgb8(overview_rgb8, white_rgb=_glass_background(overview_rgb8, od_threshold))
    mask = od.max(axis=2) > od_threshold
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    closing_px = max(1, round(closing_um / pixel_size_um / 2))
    disc = _disc(closing_px)
    mask = ndimage.binary_closing(np.pad(mask, closing_px), structure=disc)[
        closing_px:-closing_px, closing_px:-closing_px]
    pixel_area = pixel_size_um ** 2
    holes, hole_count = ndimage.label(~mask)
    if hole_count:
        hole_sizes = np.bincount(holes.ravel())
        border_labels = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = hole_sizes * pixel_area < max_hole_area_um2
        small[border_labels] = False
        small[0] = False
        mask |= small[holes]
    objects, object_count = ndimage.label(mask)
    if object_count:
        sizes = np.bincount(objects.ravel())
        keep = sizes * pixel_area >= min_object_area_um2
        keep[0] = False
        mask = keep[objects]
    return TissueDetection(mask=mask, pixel_size_um=float(pixel_size_um), origin_x_um=float(origin_x_um),
                           origin_y_um=float(origin_y_um), od_threshold=float(od_threshold))


def _disc(radius_px: int) -> np.ndarray:
    offsets = np.arange(-radius_px, radius_px + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius_px ** 2


# ---------------------------------------------------------------------------------------------------
# Tile plan


@dataclass(frozen=True)
class PlannedTile:
    row: int
    col: int
    x_um: float     # field-of-view centre
    y_um: float


@dataclass(frozen=True)
class TilePlan(TileGrid):
    overlap_fraction: float
    tiles: tuple[PlannedTile, ...]  # acquisition order (serpentine), empty positions left out
    skipped: tuple[tuple[int, int], ...]  # (row, col) of grid positions without tissue


def plan_tiles(region_x_um: float, region_y_um: float, region_width_um: float, region_height_um: float,
               fov_width_um: float, fov_height_um: float, overlap_fraction: float = 0.1,
               limits_um: tuple[float, float, float, float] = (0.0, 0.0, 75_000.0, 25_000.0),
               tissue: TissueDetection | None = None, min_tissue_fraction: float = 0.0) -> TilePlan:
    """Serpentine grid of fields of view covering the region (top-left x, y; width, height).

    Neighbouring tiles overlap by `overlap_fraction` of the field of view. The grid is centred on
    the region, then shifted (if needed) so every field of view stays inside `limits_um`
    (x_min, y_min, x_max, y_max). With `tissue`, positions whose field of view holds a tissue
    fraction <= min_tissue_fraction are skipped. Rows go left to right, then right to left."""
    values = dict(region_x_um=region_x_um, region_y_um=region_y_um, region_width_um=region_width_um,
                  region_height_um=region_height_um, fov_width_um=fov_width_um,
                  fov_height_um=fov_height_um, overlap_fraction=overlap_fraction)
    for name, value in values.items():
        if not math.isfinite(value):
            raise PlanningError(f"{name}={value}; expected a finite number")
    if not 0.0 <= overlap_fraction <= 0.5:
        raise PlanningError(f"overlap_fraction={overlap_fraction}; expected 0 <= overlap <= 0.5")
    if region_width_um <= 0 or region_height_um <= 0:
        raise PlanningError(f"region size {region_width_um} x {region_height_um} um; expected > 0")
    if fov_width_um <= 0 or fov_height_um <= 0:
        raise PlanningError(f"field of view {fov_width_um} x {fov_height_um} um; expected > 0")
    if not 0.0 <= min_tissue_fraction < 1.0:
        raise PlanningError(f"min_tissue_fraction={min_tissue_fraction}; expected 0 <= value < 1")
    x_min, y_min, x_max, y_max = limits_um
    if (region_x_um < x_min or region_y_um < y_min or region_x_um + region_width_um > x_max
            or region_y_um + region_height_um > y_max):
        raise PlanningError(
            f"region x={region_x_um}, y={region_y_um}, {region_width_um} x {region_height_um} um is "
            f"outside the limits x {x_min}..{x_max}, y {y_min}..{y_max} um")

    cols, step_x, origin_x = _axis_layout(region_x_um, region_width_um, fov_width_um, overlap_fraction,
                                          x_min, x_max)
    rows, step_y, origin_y = _axis_layout(region_y_um, region_height_um, fov_height_um, overlap_fraction,
                                          y_min, y_max)

    grid = TileGrid(rows=rows, cols=cols, origin_x_um=origin_x, origin_y_um=origin_y, step_x_um=step_x,
                    step_y_um=step_y, fov_width_um=float(fov_width_um), fov_height_um=float(fov_height_um))
    tiles, skipped = [], []
    for row in range(rows):
        col_order = range(cols) if row % 2 == 0 else range(cols - 1, -1, -1)
        for col in col_order:
            if tissue is not None and tissue.tissue_fraction(*grid.field_um(row, col)) <= min_tissue_fraction:
                skipped.append((row, col))
            else:
                tiles.append(PlannedTile(row, col, *grid.centre_um(row, col)))
    return TilePlan(**vars(grid), overlap_fraction=float(overlap_fraction), tiles=tuple(tiles),
                    skipped=tuple(sorted(skipped)))


def _axis_layout(start: float, length: float, fov: float, overlap: float, low: float, high: float):
    """(count, step, first centre) along one axis: the fewest fields covering [start, start + length]
    with at least `overlap`, centred on it, then shifted to stay within [low, high]. Where the limits
    are too tight for that, the step shrinks (more overlap) so the outer fields touch the limits."""
    step = fov * (1.0 - overlap)
    count = 1 if length <= fov else math.ceil((length - fov) / step - 1e-9) + 1
    if fov > high - low:
        raise PlanningError(f"a field of view of {fov:.1f} um does not fit in the limits {low}..{high} um")
    if count > 1 and (count - 1) * step + fov > high - low:
        step = (high - low - fov) / (count - 1)
    first = start + length / 2 - (count - 1) * step / 2
    first = max(first, low + fov / 2)
    first = min(first, high - fov / 2 - (count - 1) * step)
    return count, step, first


# ---------------------------------------------------------------------------------------------------
# Focus points and focus map


def default_focus_point_count(tile_count: int) -> int:
    """Focus-map points of a scan that does not ask for a number: one per 9 tiles, 5 to 25."""
    return int(np.clip(tile_count // 9, 5, 25))


def focus_sweeps(depth_of_field_um: float) -> tuple[tuple[float, float], ...]:
    """(half range, step) in µm of the z-sweeps that find focus at a focus-map point: a coarse sweep of
    +-30 µm in steps of two depths of field (at least 2 µm), then a fine one over +-1.5 coarse steps in
    steps of a third of the depth of field (at least 0.25 µm) around the coarse peak."""
    coarse_step = max(2.0, 2 * depth_of_field_um)
    return (30.0, coarse_step), (1.5 * coarse_step, max(0.25, depth_of_field_um / 3))


def choose_focus_points(plan: TilePlan, count: int) -> list[PlannedTile]:
    """`count` planned tiles spread over the tissue: farthest-point sampling starting from the tile
    nearest the centroid of all planned tiles (all tiles when count >= their number)."""
    if count < 1:
        raise PlanningError(f"count={count}; expected >= 1")
    if not plan.tiles:
        raise NoTissueError("the tile plan has no tiles to put focus points on")
    xy = np.array([(t.x_um, t.y_um) for t in plan.tiles])
    if count >= len(xy):
        return list(plan.tiles)
    chosen = [int(np.argmin(((xy - xy.mean(axis=0)) ** 2).sum(axis=1)))]
    distance = ((xy - xy[chosen[0]]) ** 2).sum(axis=1)
    while len(chosen) < count:
        index = int(np.argmax(distance))
        chosen.append(index)
        distance = np.minimum(distance, ((xy - xy[index]) ** 2).sum(axis=1))
    return [plan.tiles[i] for i in chosen]


# A focus map fits a quadratic trend from this many points on (a plane from 3).
QUADRATIC_TREND_MIN_POINTS = 10


class FocusMap:
    """Smooth focal surface z(x, y) through measured focus points, robust to bad measurements.

    A polynomial trend (degree 2 from 10 points, 1 from 3, else constant) is fitted by iteratively
    reweighted least squares (Tukey biweight); points whose residual exceeds `outlier_threshold`
    robust standard deviations are rejected; from 12 inliers on, a smoothed thin-plate spline through
    the inlier residuals adds the non-polynomial warp."""

    def __init__(self, x_um, y_um, z_um, max_degree: int = 2, outlier_threshold: float = 3.5,
                 min_noise_um: float = 0.1, spline_smoothing: float = 0.01):
        x = np.asarray(x_um, dtype=np.float64).ravel()
        y = np.asarray(y_um, dtype=np.float64).ravel()
        z = np.asarray(z_um, dtype=np.float64).ravel()
        if not (len(x) == len(y) == len(z)):
            raise PlanningError(f"x, y, z have lengths {len(x)}, {len(y)}, {len(z)}; expected equal")
        if len(z) == 0:
            raise PlanningError("no focus points; expected at least one")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(z))):
            raise PlanningError("focus points contain NaN or infinity")
        if max_degree not in (0, 1, 2, 3):
            raise PlanningError(f"max_degree={max_degree}; expected 0..3")
        self._center = np.array([x.mean(), y.mean()])
        self._scale = max(float(np.hypot(x - x.mean(), y - y.mean()).max()), 1.0)
        u, v = self._normalise(x, y)
        n = len(z)
        self.degree = min(max_degree, 2 if n >= QUADRATIC_TREND_MIN_POINTS else 1 if n >= 3 else 0)
        design = _poly_design(u, v, self.degree)
        weights = np.ones(n)
        coefficients = np.zeros(design.shape[1])
        for _ in range(30):
            root_w = np.sqrt(weights)
            coefficients = np.linalg.lstsq(design * root_w[:, None], z * root_w, rcond=None)[0]
            residual = z - design @ coefficients
            inlying = weights > 0
            sigma = max(1.4826 * float(np.median(np.abs(residual[inlying]))), min_noise_um)
            scaled = residual / (4.685 * sigma)
            new_weights = np.where(np.abs(scaled) < 1, (1 - scaled ** 2) ** 2, 0.0)
            if new_weights.sum() < design.shape[1] or np.allclose(new_weights, weights, atol=1e-6):
                break
            weights = new_weights
        self._coefficients = coefficients
        residual = z - design @ coefficients
        self.noise_um = sigma
        self.inliers = np.abs(residual) <= outlier_threshold * sigma
        self._spline = None
        if self.inliers.sum() >= 12:
            points = np.column_stack([u, v])[self.inliers]
            self._spline = interpolate.RBFInterpolator(points, residual[self.inliers],
                                                       kernel="thin_plate_spline",
                                                       smoothing=spline_smoothing)
        fitted = self.z_um(x, y)
        self.residual_rms_um = float(np.sqrt(np.mean((z - fitted)[self.inliers] ** 2)))

    def _normalise(self, x, y):
        return (x - self._center[0]) / self._scale, (y - self._center[1]) / self._scale

    def z_um(self, x_um, y_um):
        """Focal z at positions (scalars or arrays of the same shape)."""
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        u, v = self._normalise(x.ravel(), y.ravel())
        z = _poly_design(u, v, self.degree) @ self._coefficients
        if self._spline is not None:
            z = z + self._spline(np.column_stack([u, v]))
        z = z.reshape(x.shape)
        return float(z) if z.ndim == 0 else z


def _poly_design(u, v, degree):
    return np.column_stack([u ** i * v ** (d - i) for d in range(degree + 1) for i in range(d + 1)])
