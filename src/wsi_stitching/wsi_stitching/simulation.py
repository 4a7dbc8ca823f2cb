"""Synthetic scans with known ground truth for tests and benchmarks (no microscope needed).

The specimen is a periodic, tissue-like RGB texture (H&E-like stains through Beer-Lambert absorption)
with empty-glass regions; tiles are cut at true positions = nominal raster + stage jitter (sub-pixel
by Fourier shift, or integer for the cheap large-grid mode), then vignetting and noise are applied.
Tiles are generated on demand, so a 30x30 grid of 2048 px tiles never exists in memory at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.fft
from wsi_common.objective import DEFAULT_OBJECTIVE_MAGNIFICATION
from wsi_common.tile_grid import Cell

from .layout import TileGridLayout

GLASS_LEVEL = 242.0
_EOSIN_OD = np.array([0.07, 0.99, 0.11], dtype=np.float32) * 0.9      # RGB optical densities
_HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32) * 1.3


def _periodic_smooth_noise(rng, period_px: int, sigma_px: float) -> np.ndarray:
    noise = rng.standard_normal((period_px, period_px)).astype(np.float32)
    spectrum = scipy.fft.rfft2(noise, workers=2)
    fy = scipy.fft.fftfreq(period_px)[:, None]
    fx = scipy.fft.rfftfreq(period_px)[None, :]
    spectrum *= np.exp(-2 * (np.pi * sigma_px) ** 2 * (fy ** 2 + fx ** 2)).astype(np.float32)
    del noise
    field_ = scipy.fft.irfft2(spectrum, s=(period_px, period_px), workers=2)
    return ((field_ - field_.mean()) / field_.std()).astype(np.float32)


def make_specimen_texture(period_px: int, seed: int, tissue_threshold: float = -0.6,
                          tissue_blob_px: float | None = None) -> np.ndarray:
    """Periodic (period_px x period_px x 3) uint8 tissue-like texture with glass gaps between tissue.
    Tissue is where a smooth random field (scale tissue_blob_px, default period_px / 48) exceeds
    tissue_threshold standard deviations: -0.6 covers about 73 % of the area, 0.8 about 21 %."""
    rng = np.random.default_rng(seed)
    tissue = _periodic_smooth_noise(rng, period_px, tissue_blob_px or period_px / 48)
    tissue = 1.0 / (1.0 + np.exp(-4.0 * (tissue - tissue_threshold)))
    eosin = tissue * (0.55 + 0.25 * _periodic_smooth_noise(rng, period_px, 3.0))
    hematoxylin = tissue * np.clip(_periodic_smooth_noise(rng, period_px, 2.0) - 1.0, 0.0, None) * 0.9
    del tissue
    texture = np.empty((period_px, period_px, 3), dtype=np.uint8)
    for channel in range(3):  # one channel at a time keeps the float temporaries small
        od = eosin * _EOSIN_OD[channel] + hematoxylin * _HEMATOXYLIN_OD[channel]
        texture[..., channel] = np.clip(GLASS_LEVEL * np.exp(-od), 0, 255).astype(np.uint8)
    return texture


def vignetting_gain(height_px: int, width_px: int, strength: float,
                    centre: tuple[float, float] = (-0.15, 0.25)) -> np.ndarray:
    """Multiplicative shading, 1 at the optical centre (normalised (y, x) coords; real optics are
    rarely centred on the sensor, which is what makes shading visible as seams) and falling off
    quadratically by `strength` at the distance of a corner of a centred field."""
    y = np.linspace(-1, 1, height_px, dtype=np.float32)[:, None] - centre[0]
    x = np.linspace(-1, 1, width_px, dtype=np.float32)[None, :] - centre[1]
    return 1.0 - strength * (x * x + y * y) / 2.0


@dataclass
class SyntheticScan:
    """A simulated raster scan. Positions are (y, x) of a tile's top-left corner in specimen px."""
    rows: int
    cols: int
    tile_px: int = 256
    overlap_fraction: float = 0.1
    jitter_px: float = 20.0
    noise_sigma: float = 2.0
    vignetting_strength: float = 0.25
    empty_cells: tuple[Cell, ...] = ()
    subpixel: bool = True
    texture_period_px: int = 2048
    tissue_threshold: float = -0.6         # see make_specimen_texture
    tissue_blob_px: float | None = None
    seed: int = 0
    pixel_size_um: float = 0.5
    texture: np.ndarray = field(init=False, repr=False)
    nominal_positions_px: dict = field(init=False, repr=False)
    true_positions_px: dict = field(init=False, repr=False)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.texture = make_specimen_texture(self.texture_period_px, self.seed, self.tissue_threshold,
                                             self.tissue_blob_px)
        self.step_px = self.tile_px * (1 - self.overlap_fraction)
        margin = self.jitter_px + 8
        self.nominal_positions_px = {(r, c): (margin + r * self.step_px, margin + c * self.step_px)
                                     for r in range(self.rows) for c in range(self.cols)}
        jitter = rng.uniform(-self.jitter_px, self.jitter_px, size=(self.rows, self.cols, 2))
        if not self.subpixel:
            jitter = np.round(jitter)
        self.true_positions_px = {cell: (y + jitter[cell][0], x + jitter[cell][1])
                                  for cell, (y, x) in self.nominal_positions_px.items()}
        self.vignetting = vignetting_gain(self.tile_px, self.tile_px, self.vignetting_strength)

    def layout(self, scan_id: str = "synthetic") -> TileGridLayout:
        return TileGridLayout(
            scan_id, self.rows, self.cols, self.tile_px, self.tile_px, self.pixel_size_um,
            {cell: self.stage_position_um(cell) for cell in self.nominal_positions_px},
            objective_magnification=DEFAULT_OBJECTIVE_MAGNIFICATION, numerical_aperture=0.75,
            acquisition_datetime="2026-01-01T00:00:00+00:00")

    def stage_position_um(self, cell: Cell) -> tuple[float, float]:
        """Where the stage reports the tile was (the nominal raster position), (x_um, y_um)."""
        y, x = self.nominal_positions_px[cell]
        return x * self.pixel_size_um, y * self.pixel_size_um

    def _glass_mask(self, y0: int, x0: int, height: int, width: int) -> np.ndarray | None:
        """True where the specimen is empty glass (inside a whole empty cell's true footprint)."""
        mask = None
        for cell in self.empty_cells:
            ty, tx = self.true_positions_px[cell]
            ys = np.arange(y0, y0 + height)[:, None]
            xs = np.arange(x0, x0 + width)[None, :]
            inside = (ys >= ty - 4) & (ys < ty + self.tile_px + 4) & (xs >= tx - 4) & (xs < tx + self.tile_px + 4)
            mask = inside if mask is None else (mask | inside)
        return mask

    def specimen(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """Noise-free specimen (float32 RGB) over an integer window of specimen px."""
        period = self.texture_period_px
        ys = np.arange(y0, y0 + height) % period
        xs = np.arange(x0, x0 + width) % period
        window = self.texture[np.ix_(ys, xs)].astype(np.float32)
        glass = self._glass_mask(y0, x0, height, width)
        if glass is not None:
            window[glass] = GLASS_LEVEL
        return window

    def clean_tile(self, cell: Cell) -> np.ndarray:
        """The specimen under the tile at its true position, before shading and noise (float32 RGB)."""
        ty, tx = self.true_positions_px[cell]
        iy, ix = int(np.floor(ty)), int(np.floor(tx))
        fy, fx = ty - iy, tx - ix
        if fy == 0 and fx == 0:
            return self.specimen(iy, ix, self.tile_px, self.tile_px)
        pad = 16
        window = self.specimen(iy - pad, ix - pad, self.tile_px + 2 * pad, self.tile_px + 2 * pad)
        spectrum = scipy.fft.rfft2(window, axes=(0, 1), workers=2)
        ky = scipy.fft.fftfreq(window.shape[0])[:, None, None]
        kx = scipy.fft.rfftfreq(window.shape[1])[None, :, None]
        spectrum *= np.exp(2j * np.pi * (ky * fy + kx * fx)).astype(np.complex64)
        shifted = scipy.fft.irfft2(spectrum, s=window.shape[:2], axes=(0, 1), workers=2)
        return shifted[pad:pad + self.tile_px, pad:pad + self.tile_px].astype(np.float32)

    def tile(self, cell: Cell) -> np.ndarray:
        """The camera image of one grid cell: uint8 RGB with vignetting and noise."""
        rng = np.random.default_rng((self.seed, cell[0], cell[1]))
        image = self.clean_tile(cell) * self.vignetting[..., None]
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(self.noise_sigma)
        return np.clip(np.round(image), 0, 255).astype(np.uint8)


def border_steps(mosaic, scan: SyntheticScan, positions_px: dict, offset_px: tuple[int, int],
                 band_px: int = 4, segment_px: int = 64) -> dict[str, np.ndarray]:
    """Seam metric against ground truth. E = gray(mosaic) - gray(noise-free specimen), where mosaic px
    (y, x) shows specimen px (y, x) + offset_px. For every pair of grid neighbours, the step of E
    across a line (mean over band_px on one side minus the other, per segment_px of line) is measured
    on the lines where a tile's contribution starts or ends and mid-overlap ("seam"), and on the
    centre lines of the tiles ("interior", the metric's noise floor). Returns |step| arrays."""
    tile = scan.tile_px
    placed = {cell: (int(round(p[0])), int(round(p[1]))) for cell, p in positions_px.items()}
    steps = {"seam": [], "interior": []}

    def measure(kind, axis, line, start, stop):
        for s0 in range(start, stop - segment_px + 1, segment_px):
            if axis == 1:   # vertical line at x = line
                y0, y1, x0, x1 = s0, s0 + segment_px, line - band_px, line + band_px
            else:           # horizontal line at y = line
                y0, y1, x0, x1 = line - band_px, line + band_px, s0, s0 + segment_px
            if y0 < 0 or x0 < 0 or y1 > mosaic.shape[0] or x1 > mosaic.shape[1]:
                continue
            observed = np.asarray(mosaic[y0:y1, x0:x1, :], dtype=np.float32).mean(axis=2)
            truth = scan.specimen(y0 + offset_px[0], x0 + offset_px[1], y1 - y0, x1 - x0).mean(axis=2)
            error = observed - truth
            before, after = (error[:, :band_px], error[:, band_px:]) if axis == 1 else (error[:band_px], error[band_px:])
            steps[kind].append(abs(float(after.mean() - before.mean())))

    for (row, col), (ay, ax) in placed.items():
        for (dr, dc), axis in (((0, 1), 1), ((1, 0), 0)):
            neighbour = placed.get((row + dr, col + dc))
            if neighbour is None:
                continue
            by, bx = neighbour
            if axis == 1:
                start, stop = max(ay, by) + band_px, min(ay, by) + tile - band_px
                lines = (bx, ax + tile, (bx + ax + tile) // 2)
                centre = ax + tile // 2
            else:
                start, stop = max(ax, bx) + band_px, min(ax, bx) + tile - band_px
                lines = (by, ay + tile, (by + ay + tile) // 2)
                centre = ay + tile // 2
            for line in lines:
                measure("seam", axis, line, start, stop)
            measure("interior", axis, centre, start, stop)
    return {kind: np.asarray(values) for kind, values in steps.items()}


def glass_ripple(mosaic, scan: SyntheticScan, offset_px: tuple[int, int], block_px: int = 16) -> dict:
    """Flat-field residual on glass: over every block_px block of the mosaic where the specimen is
    empty glass (within one gray level of GLASS_LEVEL in every channel), the block mean of gray(mosaic)
    over gray(specimen). Returns the spread of that ratio, p99 - p1 relative to the median ("ripple",
    a fraction), and how many blocks it rests on. Mosaic px (y, x) shows specimen px (y, x) + offset_px."""
    mosaic = np.asarray(mosaic)
    rows, cols = mosaic.shape[0] // block_px, mosaic.shape[1] // block_px
    ratios = []
    for by in range(rows):
        y0 = by * block_px
        band = mosaic[y0:y0 + block_px, :cols * block_px].astype(np.float32)
        truth = scan.specimen(y0 + offset_px[0], offset_px[1], block_px, cols * block_px)
        covered = (band != 255).any(axis=2).reshape(block_px, cols, block_px).all(axis=(0, 2))
        glass = (truth >= GLASS_LEVEL - 1).all(axis=2).reshape(block_px, cols, block_px).all(axis=(0, 2))
        observed = band.mean(axis=2).reshape(block_px, cols, block_px).mean(axis=(0, 2))
        expected = truth.mean(axis=2).reshape(block_px, cols, block_px).mean(axis=(0, 2))
        ratios.append((observed / expected)[covered & glass])
    ratios = np.concatenate(ratios)
    if ratios.size == 0:
        return {"ripple": float("nan"), "blocks": 0}
    low, median, high = np.percentile(ratios, [1, 50, 99])
    return {"ripple": float((high - low) / median), "blocks": int(ratios.size)}
