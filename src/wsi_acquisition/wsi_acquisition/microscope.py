"""Virtual bright-field microscope: a specimen imaged through an objective onto a camera.

Stage coordinates are slide coordinates (µm): x right, y down, z towards the objective. The image row
axis runs along +y and the column axis along +x; the field-of-view centre (sensor centre) sits at the
commanded stage (x, y). Every capture carries its ground truth (true pose, focal z, defocus).
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import threadpoolctl
from scipy import fft, ndimage
from wsi_common.tile_grid import field_of_view_um
from wsi_common.weak_object import weak_phase

from .optics import (CHANNEL_WAVELENGTHS_UM, DEFAULT_CONDENSER_FILL, STANDARD_OBJECTIVES, Camera,
                     FocalSurface, Objective, OtfGrid, check_condenser_fill, depth_of_field_um,
                     expose, relative_illumination, standard_normal_float32, to_rgb8)
from .specimen import Specimen, SyntheticSlide

_LN10 = math.log(10.0)
# The local defocus over the field is sampled on this many points per axis and interpolated.
_DEFOCUS_SAMPLES = 9
# Rendered border around the ROI so the FFT convolution does not wrap; blur radii beyond it (defocus
# of tens of µm) leave a slightly wrong border band in images that are featureless blur anyway.
_MAX_MARGIN_PX = 256
# With several render threads the specimen is rendered in bands of rows, each a multiple of this (the
# specimen's noise is summed in blocks of 128 rows: bands on that grid give the same pixels as one render).
_BAND_ROWS = 128
# The renderer's parallelism is its render threads; BLAS products inside them (the specimen's noise sums, the
# transfer functions) stay on one thread. With OpenBLAS's default of a thread per core on top of two render threads a
# 20x tile took 163 instead of 90 ms on 2 cores, unless every user knew to set OPENBLAS_NUM_THREADS=1.
_BLAS = threadpoolctl.ThreadpoolController()


class CaptureError(ValueError):
    """A capture was requested with invalid arguments (unknown objective, ROI off the sensor...)."""


@dataclass(frozen=True)
class Capture:
    image_rgb8: np.ndarray          # (height, width, 3) uint8
    raw: np.ndarray                 # (height, width, 3) counts at the camera bit depth (uint8/uint16)
    bit_depth: int
    pixel_size_um: float            # image pixel in the specimen plane
    stage_x_um: float               # true pose of the stage: field-of-view centre on the slide
    stage_y_um: float
    stage_z_um: float
    focal_z_um: float               # true focal z at the field-of-view centre (reference wavelength)
    defocus_um: float               # stage_z_um - focal_z_um; positive = stage above focus
    objective_magnification: float
    numerical_aperture: float
    exposure_ms: float
    gain: float
    roi: tuple[int, int, int, int]  # (row, col, height, width) of the image on the sensor; the
                                    # stage pose is that of the sensor centre whatever the ROI
    capture_index: int


@dataclass(frozen=True)
class Overview:
    image_rgb8: np.ndarray          # whole slide, (height, width, 3) uint8
    pixel_size_um: float
    origin_x_um: float = 0.0        # slide position of the image's top-left corner
    origin_y_um: float = 0.0


class VirtualMicroscope:
    """Specimen + focal surface + objectives + Köhler illumination + camera. Deterministic for a seed;
    the camera noise of capture number k is drawn from (seed, k) unless `noise_seed` is given.

    condenser_fill: condenser NA / objective NA (the aperture diaphragm), 0 < fill <= 1; below 1 the
    specimen's phase shows as contrast when defocused, at 1 (incoherent) it never does.
    camera_noise(rng, shape): the standard normal float32 draw of a capture's camera noise."""

    def __init__(self, specimen: Specimen | None = None, seed: int = 0, camera: Camera | None = None,
                 objectives: dict[float, Objective] | None = None,
                 focal_surface: FocalSurface | None = None, max_blur_levels: int = 3,
                 lamp_gradient: tuple[float, float] = (0.02, -0.015),
                 condenser_fill: float = DEFAULT_CONDENSER_FILL, render_threads: int = 1,
                 camera_noise: Callable[[np.random.Generator, tuple], np.ndarray] = standard_normal_float32):
        self.condenser_fill = check_condenser_fill(condenser_fill)
        self.seed = int(seed)
        self.specimen = SyntheticSlide(seed=seed) if specimen is None else specimen
        self.camera = Camera() if camera is None else camera
        self.objectives = dict(STANDARD_OBJECTIVES if objectives is None else objectives)
        if focal_surface is None:
            focal_surface = FocalSurface(seed=seed, center_x_um=self.specimen.width_um / 2,
                                         center_y_um=self.specimen.height_um / 2)
        self.focal_surface = focal_surface
        if max_blur_levels < 1:
            raise CaptureError(f"max_blur_levels={max_blur_levels}; expected >= 1")
        self.max_blur_levels = max_blur_levels
        if render_threads < 1:
            raise CaptureError(f"render_threads={render_threads}; expected >= 1")
        # NumPy and the FFTs release the GIL: threads render colour channels and bands of the specimen at
        # once. The image is the same for any number of threads.
        self._pool = ThreadPoolExecutor(render_threads, "render") if render_threads > 1 else None
        self.render_threads = render_threads
        self.lamp_gradient = lamp_gradient
        self.camera_noise = camera_noise
        self._capture_count = 0
        self._otf_grids: dict[tuple, OtfGrid] = {}
        self._region = None       # the last specimen region rendered: ((x0, y0, pixel), transmission, path)

    # -- optics queries ---------------------------------------------------------------------------
    def objective(self, magnification: float) -> Objective:
        try:
            return self.objectives[float(magnification)]
        except KeyError:
            raise CaptureError(f"no {magnification}x objective; available: "
                               f"{sorted(self.objectives)}") from None

    def pixel_size_um(self, magnification: float) -> float:
        return self.camera.specimen_pixel_size_um(self.objective(magnification))

    def field_of_view_um(self, magnification: float) -> tuple[float, float]:
        """(width, height) of the full sensor in the specimen plane, µm."""
        return field_of_view_um(self.camera.width_px, self.camera.height_px, self.pixel_size_um(magnification))

    def depth_of_field_um(self, magnification: float) -> float:
        return depth_of_field_um(self.objective(magnification), self.camera.pixel_size_um)

    def focal_z_um(self, x_um, y_um):
        """True focal z (µm) at slide positions: the answer autofocus should find."""
        return self.focal_surface.z_um(x_um, y_um)

    # -- imaging ---------------------------------------------------------------------------------
    def capture(self, x_um: float, y_um: float, z_um: float, magnification: float,
                exposure_ms: float = 10.0, gain: float = 1.0,
                roi: tuple[int, int, int, int] | None = None, noise_seed: int | None = None) -> Capture:
        """Image the field of view centred on (x_um, y_um) with the stage at z_um.

        roi=(row, col, height, width) renders only that part of the sensor (same pixels, blur, field
        curvature and vignetting as in the full frame), e.g. 256x256 patches for autofocus training."""
        with _BLAS.limit(limits=1, user_api="blas"):
            return self._capture(x_um, y_um, z_um, magnification, exposure_ms, gain, roi, noise_seed)

    def _capture(self, x_um, y_um, z_um, magnification, exposure_ms, gain, roi, noise_seed) -> Capture:
        objective = self.objective(magnification)
        camera = self.camera
        row0, col0, height, width = self.check_roi(roi)
        p = camera.specimen_pixel_size_um(objective)
        field_x = (col0 + np.arange(width) + 0.5 - camera.width_px / 2) * p
        field_y = (row0 + np.arange(height) + 0.5 - camera.height_px / 2) * p

        capture_index = self._capture_count
        self._capture_count += 1
        rng = np.random.default_rng(
            [self.seed & 0xFFFFFFFF, capture_index] if noise_seed is None else [noise_seed & 0xFFFFFFFF])
        # Render-thread tasks, submitted in the order they depend on each other (`_submit`). The camera noise and
        # what does not depend on the specimen come first: one thread draws them while the other renders the
        # specimen (two threads rendering specimen bands at once slow each other down).
        noise = self._submit(self.camera_noise, rng, (height, width, 3))
        levels, position = self._blur_plan(self._sensor_defocus(x_um, y_um, z_um, objective),
                                           objective, (row0, col0, height, width))
        margin = self._margin_px(objective, [level for level, _ in levels], p)
        padded_shape = (fft.next_fast_len(height + 2 * margin, real=True),
                        fft.next_fast_len(width + 2 * margin, real=True))
        left_um, top_um = x_um + field_x[0] - p / 2, y_um + field_y[0] - p / 2
        specimen = self._specimen_region(left_um - margin * p, top_um - margin * p, padded_shape, p)
        illumination = self._submit(relative_illumination, field_x, field_y, objective, self.lamp_gradient)
        weights = [self._submit(_level_weight, position, index) for _, index in levels] if position is not None \
            else [None] * len(levels)
        blurred = self._blurred_levels(specimen, padded_shape, margin, (height, width), p, objective,
                                       [level for level, _ in levels], weights)
        irradiance = np.empty((height, width, 3), np.float32)
        raw = np.empty((height, width, 3), camera.raw_dtype)
        image_rgb8 = np.empty((height, width, 3), np.uint8)
        bands = self._row_bands(height)

        # The blur levels' sum and the read-out in row bands: pixel by pixel, so the same counts as in one pass.
        # A channel is summed as soon as its levels are blurred, while the next channel's are.
        def combine(channel: int, rows: slice) -> None:
            plane = None
            for level_image in blurred[channel]:
                image = level_image()[rows]
                plane = image if plane is None else np.add(plane, image, out=plane)
            # The weak-phase term is first order; it must not make light negative where phase is strong.
            np.maximum(plane, 0.0, out=plane)
            plane *= illumination()[rows]
            irradiance[rows, :, channel] = plane

        combined = [[self._submit(combine, channel, rows) for rows in bands] for channel in range(len(blurred))]

        def read_out(band: int) -> None:
            for channel_combined in combined:
                channel_combined[band]()
            rows = bands[band]
            raw[rows] = expose(irradiance[rows], camera, exposure_ms, gain, noise()[rows])
            image_rgb8[rows] = to_rgb8(raw[rows], camera.bit_depth)

        for done in [self._submit(read_out, band) for band in range(len(bands))]:
            done()
        focal_z = float(self.focal_surface.z_um(x_um, y_um))
        return Capture(
            image_rgb8=image_rgb8, raw=raw, bit_depth=camera.bit_depth,
            pixel_size_um=p, stage_x_um=float(x_um), stage_y_um=float(y_um), stage_z_um=float(z_um),
            focal_z_um=focal_z, defocus_um=float(z_um) - focal_z,
            objective_magnification=objective.magnification,
            numerical_aperture=objective.numerical_aperture, exposure_ms=float(exposure_ms),
            gain=float(gain), roi=(row0, col0, height, width), capture_index=capture_index)

    def capture_overview(self, pixel_size_um: float = 20.0, exposure_ms: float = 10.0) -> Overview:
        """Low-magnification image of the whole slide (macro camera), for tissue detection.

        A low-NA lens: blur of about one pixel, mild uneven illumination, 8-bit camera noise."""
        if not pixel_size_um > 0:
            raise CaptureError(f"pixel_size_um={pixel_size_um}; expected > 0")
        width = max(1, round(self.specimen.width_um / pixel_size_um))
        height = max(1, round(self.specimen.height_um / pixel_size_um))
        od = self.specimen.optical_density(0.0, 0.0, width, height, pixel_size_um)
        transmitted = np.exp(od * np.float32(-_LN10))
        ndimage.gaussian_filter(transmitted, sigma=(0.7, 0.7, 0.0), output=transmitted, mode="nearest")
        ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
        xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
        transmitted *= (1.0 - 0.06 * (xs * xs + ys * ys) + 0.02 * xs)[..., None]
        overview_camera = Camera(width_px=width, height_px=height, bit_depth=8, full_well_e=10_000.0,
                                 read_noise_e=5.0, bright_field_e_per_ms=900.0)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xFEED])
        raw = expose(transmitted, overview_camera, exposure_ms, 1.0, self.camera_noise(rng, transmitted.shape))
        return Overview(image_rgb8=raw, pixel_size_um=float(pixel_size_um))

    def check_roi(self, roi) -> tuple[int, int, int, int]:
        """(row, col, height, width) of `roi` on the sensor (None: the full frame); CaptureError if it is not on it."""
        sensor_h, sensor_w = self.camera.height_px, self.camera.width_px
        if roi is None:
            return 0, 0, sensor_h, sensor_w
        row0, col0, height, width = (int(v) for v in roi)
        if height < 1 or width < 1 or row0 < 0 or col0 < 0 or row0 + height > sensor_h or col0 + width > sensor_w:
            raise CaptureError(f"roi (row, col, height, width)={roi} is not inside the "
                               f"{sensor_h}x{sensor_w} px sensor")
        return row0, col0, height, width

    # -- internals ---------------------------------------------------------------------------------
    def _sensor_defocus(self, x_um, y_um, z_um, objective) -> np.ndarray:
        """Defocus (µm, reference wavelength) over the whole sensor on a coarse grid: stage z minus the
        local focal z, plus field curvature (the objective's best-focus surface bends with field^2).
        Always the whole sensor, so a ROI is rendered exactly like the same pixels of a full frame."""
        p = self.camera.specimen_pixel_size_um(objective)
        half_w = (self.camera.width_px - 1) / 2 * p
        half_h = (self.camera.height_px - 1) / 2 * p
        sample_x = np.linspace(-half_w, half_w, _DEFOCUS_SAMPLES)
        sample_y = np.linspace(-half_h, half_h, _DEFOCUS_SAMPLES)
        focal = self.focal_surface.z_um(x_um + sample_x[None, :], y_um + sample_y[:, None])
        return z_um - focal + objective.field_curvature_shift_um(np.hypot(sample_x[None, :], sample_y[:, None]))

    def _blur_plan(self, sensor_defocus, objective, roi):
        """Defocus levels to render for the ROI as (defocus µm, level index) and the ROI's position between the
        levels ((height, width) float32 level index of each pixel; None: one level, weight 1).

        Levels span the defocus range of the whole sensor, about DOF/3 apart (at most max_blur_levels);
        pixels interpolate linearly between the two levels around their local defocus (`_level_weight`).
        One level when the defocus varies by less than DOF/6 over the sensor; levels no ROI pixel uses
        are not rendered."""
        low, high = float(sensor_defocus.min()), float(sensor_defocus.max())
        step = depth_of_field_um(objective, self.camera.pixel_size_um) / 3
        if high - low <= step / 2:
            return [(0.5 * (low + high), 0)], None
        count = min(self.max_blur_levels, math.ceil((high - low) / step) + 1)
        levels = np.linspace(low, high, count)
        row0, col0, height, width = roi
        rows = _interpolation_matrix(_DEFOCUS_SAMPLES, self.camera.height_px)[row0:row0 + height]
        cols = _interpolation_matrix(_DEFOCUS_SAMPLES, self.camera.width_px)[col0:col0 + width]
        # float32 throughout, in place: these are frame-sized arrays.
        position = rows @ sensor_defocus.astype(np.float32) @ cols.T
        position -= np.float32(levels[0])
        position /= np.float32(levels[1] - levels[0])
        np.clip(position, 0, count - 1, out=position)
        lowest, highest = position.min(), position.max()
        used = [(float(levels[k]), k) for k in range(count) if k - 1 < highest and lowest < k + 1]
        if len(used) == 1:
            return [used[0]], None
        return used, position

    def _margin_px(self, objective, levels, p) -> int:
        """Rendered border around the ROI (px) so that the blur of the farthest level does not wrap."""
        worst_defocus = max(abs(levels[0]), abs(levels[-1])) + max(abs(c) for c in objective.axial_chromatic_um)
        margin_um = objective.geometric_blur_radius_um(worst_defocus) + 8.0 * max(
            CHANNEL_WAVELENGTHS_UM) / objective.numerical_aperture
        return min(math.ceil(margin_um / p) + 2, _MAX_MARGIN_PX)

    def _blurred_levels(self, specimen, padded_shape, margin, shape, p, objective, levels, weights) -> list[list]:
        """The specimen's image at each defocus level per colour channel times the level's weight, [channel][level]
        of render-thread results: (height, width) float32 relative irradiance before illumination (the weak-phase
        term can make it negative). `specimen`: the render-thread result of `_specimen_region` of padded_shape;
        `weights`: each level's render-thread weights (None: weight 1)."""
        chromatic = objective.axial_chromatic_um
        grid = self._otf_grid(padded_shape, p)
        rows, cols = (slice(margin, margin + length) for length in shape)
        channels = range(len(CHANNEL_WAVELENGTHS_UM))

        @functools.cache
        def with_phase() -> bool:
            # Phase is invisible in incoherent light and for a specimen without optical path variation.
            return self.condenser_fill < 1.0 and bool(np.ptp(specimen()[1]) > 0)

        # Everything stays float32 / complex64: single-precision FFTs take half the time, and the
        # image, 12 bits at most, needs no more (the transfer functions are float32 tables too).
        def absorption_spectrum(channel: int) -> np.ndarray:
            return fft.rfft2(specimen()[0][channel], workers=1)

        def phase_spectrum(channel: int) -> np.ndarray | None:
            if not with_phase():
                return None
            transmission, path_um = specimen()
            return fft.rfft2(weak_phase(transmission[channel], path_um, CHANNEL_WAVELENGTHS_UM[channel]), workers=1)

        # The transfer functions need no specimen: their tasks go first, for the thread that is not rendering it.
        transfers = [[self._submit(grid.transfer, objective, CHANNEL_WAVELENGTHS_UM[channel],
                                   level + chromatic[channel], self.condenser_fill) for level in levels]
                     for channel in channels]
        # One task per transform and per channel and blur level, so that two threads share them evenly.
        spectra = [(self._submit(absorption_spectrum, channel), self._submit(phase_spectrum, channel))
                   for channel in channels]

        def blurred_level(channel: int, transfer, weight) -> np.ndarray:
            absorption, phase = spectra[channel]
            image_spectrum = grid.filter(absorption(), phase(), transfer())
            # In two steps, the second for the rows the sensor sees only: scipy's irfft2 of complex64 took twice
            # as long as the two transforms (11.1 against 5.0 ms at 1152 px, the same values to float32 rounding).
            columns = fft.ifft(image_spectrum, axis=0, workers=1, overwrite_x=True)
            image = fft.irfft(columns[rows], n=padded_shape[1], axis=1, workers=1, overwrite_x=True)[:, cols]
            # Weighed at once, while the transform's last rows are still in the cache.
            return image if weight is None else np.multiply(image, weight(), out=image)

        return [[self._submit(blurred_level, channel, transfer, weight)
                 for transfer, weight in zip(transfers[channel], weights)]
                for channel in channels]

    def _specimen_region(self, x0_um, y0_um, shape, p):
        """The render-thread result (intensity transmission as channel planes, 3 x height x width; optical path,
        height x width) of the specimen region of `shape` from (x0_um, y0_um).

        A z-sweep images one field at many z, each time with its own border for the blur: a region on
        the pixel grid of the previous one and inside it is cut from it instead of rendered again (it
        agrees with a fresh render to rounding: 1e-5 in optical density)."""
        height, width = shape
        if self._region is not None:
            (x_cached, y_cached, p_cached), transmission, path_um = self._region
            col, row = (x0_um - x_cached) / p, (y0_um - y_cached) / p
            c, r = round(col), round(row)
            if (p == p_cached and abs(col - c) < 1e-6 and abs(row - r) < 1e-6 and c >= 0 and r >= 0
                    and c + width <= path_um.shape[1] and r + height <= path_um.shape[0]):
                region = transmission[:, r:r + height, c:c + width], path_um[r:r + height, c:c + width]
                return lambda: region
        transmission = np.empty((3, height, width), dtype=np.float32)
        path_um = np.empty((height, width), dtype=np.float32)

        def render_band(rows: slice) -> None:
            od, path_um[rows] = self.specimen.optical_density_and_path(
                x0_um, y0_um + rows.start * p, width, rows.stop - rows.start, p)
            # Beer-Lambert, into contiguous channel planes: each FFT reads one plane without a copy.
            np.multiply(od.transpose(2, 0, 1), np.float32(-_LN10), out=transmission[:, rows])
            np.exp(transmission[:, rows], out=transmission[:, rows])

        bands = [self._submit(render_band, rows) for rows in self._row_bands(height, _BAND_ROWS)]

        def rendered():
            for band in bands:
                band()
            self._region = ((x0_um, y0_um, p), transmission, path_um)
            return transmission, path_um

        return rendered

    def _submit(self, function, *args, **kwargs) -> Callable[[], object]:
        """function(*args, **kwargs) on a render thread; calling the result waits for its value (or raises its
        exception). Render threads take tasks in the order submitted, so a task may wait for the result of any
        task submitted before it (that one has started): a capture submits its tasks in the order they depend
        on each other and a thread done early takes the next task instead of waiting for a whole stage. With one
        render thread the task runs at once."""
        if self._pool is None:
            value = function(*args, **kwargs)
            return lambda: value
        return self._pool.submit(function, *args, **kwargs).result

    def _row_bands(self, height: int, rows_multiple: int = 1) -> list[slice]:
        """Rows 0..height in one band per render thread, each band a multiple of `rows_multiple` rows but the last."""
        band = max(rows_multiple, math.ceil(height / self.render_threads / rows_multiple) * rows_multiple)
        return [slice(first, min(first + band, height)) for first in range(0, height, band)]

    def _otf_grid(self, shape, p) -> OtfGrid:
        key = (shape, p)
        if key not in self._otf_grids:
            if len(self._otf_grids) > 8:
                self._otf_grids.clear()
            self._otf_grids[key] = OtfGrid(shape, p)
        return self._otf_grids[key]


def _level_weight(position: np.ndarray, level_index: int) -> np.ndarray:
    """Weight of blur level `level_index` at pixels `position` (level index of each pixel, `_blur_plan`): linear
    interpolation between the two levels around each pixel."""
    weight = np.abs(position - np.float32(level_index))
    np.subtract(np.float32(1.0), weight, out=weight)
    return np.clip(weight, 0.0, 1.0, out=weight)


def _interpolation_matrix(sample_count: int, pixel_count: int) -> np.ndarray:
    """(pixel_count, sample_count) linear interpolation weights from samples spanning the first to the
    last pixel centre (sample_count >= 2)."""
    position = np.linspace(0.0, sample_count - 1, pixel_count)
    low = np.minimum(np.floor(position).astype(int), sample_count - 2)
    fraction = position - low
    matrix = np.zeros((pixel_count, sample_count), dtype=np.float32)
    matrix[np.arange(pixel_count), low] = 1.0 - fraction
    matrix[np.arange(pixel_count), low + 1] = fraction
    return matrix
