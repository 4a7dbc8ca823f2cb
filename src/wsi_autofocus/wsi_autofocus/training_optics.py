"""Randomised bright-field image formation for training: a different microscope for every sample.

The focus model must read defocus, not one simulator. Each training field is imaged through optics
drawn at random (`sample_optics`): objective NA within its class, camera pixel size, condenser fill,
Zernike aberrations with random signs and sizes (spherical, astigmatism, coma, trefoil, secondary
spherical), a Gaussian pupil taper, colour-channel wavelengths and longitudinal chromatic focus
shifts; then a random camera (`sample_camera`): photon budget, read noise, white balance, response
curve (linear or gamma), illumination non-uniformity and vignetting, optional Bayer mosaic with
bilinear demosaicing, optional JPEG.

Method: partially coherent Köhler imaging in the weak-object approximation, for a 2-D pupil. The
weak-object transfer function W(f) = sum_u S(u) P*(u) P(u + f) / sum_u S |P|^2 is one FFT
correlation of the pupil with its condenser-limited copy on a pupil grid fine enough for the
defocus phase; the image spectrum is H_a(f) F(T) + H_p(f) F(sqrt(T) phi) with
H_a = (W(f) + W*(-f)) / 2 and H_p = i (W(f) - W*(-f)) (both Hermitian: the image is real), T the
intensity transmission and phi the specimen phase. For a rotationally symmetric pupil these reduce
to the virtual microscope's Re W and -2 Im W (`wsi_acquisition.optics.transfer_tables`).

Defocus 0 is each sampled objective's plane of best mid-band contrast (mean H_a over 0.2-1.0
NA/lambda at the green wavelength), as in the virtual microscope. The held-out microscopes of the
evaluation (`heldout_imaging`) are not among these optics and share no code with them.
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy import fft, ndimage
from wsi_common.weak_object import weak_phase

_LN10 = math.log(10.0)
# Named in what data rendered through these optics records, so that data drawn alike but imaged by an earlier
# version (the phase weighted by T, before sqrt(T)) is not taken for this version's.
RENDERING_VERSION = "weak object, phase term sqrt(T) phi"
# Objective classes the data is drawn for: (magnification, NA range).
NA_RANGES = {10.0: (0.25, 0.45), 20.0: (0.5, 0.8), 40.0: (0.75, 0.95)}
CAMERA_PIXEL_UM_RANGE = (3.45, 6.5)
# Zernike terms (n, m) and the standard deviation of their RMS coefficient, waves at 550 nm.
# m < 0: the sine term. Signs are random: the training sees both signs of every aberration. Sizes are
# those of usable objectives (a diffraction-limited one has under 0.07 waves RMS in all, Maréchal);
# spherical aberration, which coverslip and mountant mismatch add to, spreads widest.
ZERNIKE_SPREAD_WAVES = {(4, 0): 0.045, (2, 2): 0.025, (2, -2): 0.025, (3, 1): 0.02, (3, -1): 0.02,
                        (3, 3): 0.012, (3, -3): 0.012, (6, 0): 0.01}
_GREEN_UM = 0.55


@dataclass(frozen=True)
class TrainingOptics:
    magnification: float
    numerical_aperture: float
    camera_pixel_um: float
    condenser_fill: float
    zernike_waves: tuple[tuple[int, int, float], ...]
    pupil_taper: float                                # amplitude exp(-taper rho^2); < 0: rim-weighted
    wavelengths_um: tuple[float, float, float]        # R, G, B
    chromatic_focus_um: tuple[float, float, float]    # focal shift of each channel
    condenser_inner_fill: float = 0.0                 # > 0: an annular source from it to condenser_fill

    @property
    def pixel_size_um(self) -> float:
        return self.camera_pixel_um / self.magnification


def sample_optics(magnification: float, rng: np.random.Generator, annular_fraction: float = 0.0,
                  rim_weighted_fraction: float = 0.0) -> TrainingOptics:
    """Optics drawn at random; `annular_fraction` of them with an annular condenser (ring illumination, an
    LED ring or a phase annulus left in), `rim_weighted_fraction` with a pupil brighter at its rim than
    at its centre (apodisation the other way). Both 0 draw exactly what they always drew."""
    low, high = NA_RANGES[float(magnification)]
    na = float(rng.uniform(low, high))
    depth = _GREEN_UM / na ** 2
    zernike = tuple((n, m, float(rng.normal(0.0, spread))) for (n, m), spread in ZERNIKE_SPREAD_WAVES.items()
                    if rng.random() < 0.7)
    optics = TrainingOptics(
        magnification=float(magnification), numerical_aperture=na,
        camera_pixel_um=float(rng.uniform(*CAMERA_PIXEL_UM_RANGE)),
        condenser_fill=float(rng.choice([rng.uniform(0.3, 0.95), 1.0], p=[0.9, 0.1])),
        zernike_waves=zernike, pupil_taper=float(rng.choice([0.0, rng.uniform(0.0, 0.6)])),
        wavelengths_um=(float(rng.uniform(0.59, 0.63)), float(rng.uniform(0.52, 0.56)), float(rng.uniform(0.445, 0.48))),
        chromatic_focus_um=(float(rng.normal(0, 0.3 * depth)), 0.0, float(rng.normal(0, 0.3 * depth))))
    if annular_fraction and rng.random() < annular_fraction:
        outer = float(rng.uniform(0.6, 0.95))
        optics = replace(optics, condenser_fill=outer, condenser_inner_fill=outer * float(rng.uniform(0.4, 0.8)))
    if rim_weighted_fraction and rng.random() < rim_weighted_fraction:
        optics = replace(optics, pupil_taper=float(rng.uniform(-0.5, -0.1)))
    return optics


def _zernike(n: int, m: int, rho: np.ndarray, azimuth: np.ndarray) -> np.ndarray:
    """RMS-normalised Zernike polynomial Z(n, m) on the unit disc (m < 0: sine term)."""
    radial = np.zeros_like(rho)
    k_max = (n - abs(m)) // 2
    for k in range(k_max + 1):
        radial += ((-1) ** k * math.factorial(n - k)
                   / (math.factorial(k) * math.factorial((n + abs(m)) // 2 - k) * math.factorial((n - abs(m)) // 2 - k))
                   * rho ** (n - 2 * k))
    if m == 0:
        return math.sqrt(n + 1) * radial
    angular = np.cos(m * azimuth) if m > 0 else np.sin(-m * azimuth)
    return math.sqrt(2 * (n + 1)) * radial * angular


def _pupil_samples(optics: TrainingOptics, wavelength_um: float, defocus_um: float) -> int:
    """Pupil radius in grid samples: at least 2 per wave of defocus-phase slope at the rim."""
    sine = optics.numerical_aperture
    slope_waves = abs(defocus_um) / wavelength_um * sine * sine / math.sqrt(1 - sine * sine)
    return int(np.clip(2 ** math.ceil(math.log2(max(2.0 * slope_waves, 24.0))), 32, 256))


@dataclass(frozen=True)
class WeakObjectTransfer:
    """W(f) of one pupil, wavelength and defocus, tabulated on the pupil grid."""
    table: np.ndarray
    samples_per_cutoff: float           # grid samples per cycle/µm

    def __call__(self, frequencies_y: np.ndarray, frequencies_x: np.ndarray) -> np.ndarray:
        """W at frequencies in cycles/µm (broadcastable arrays)."""
        centre = self.table.shape[0] // 2
        row, col = np.broadcast_arrays(frequencies_y * self.samples_per_cutoff + centre,
                                       frequencies_x * self.samples_per_cutoff + centre)
        coordinates = np.stack([row.ravel(), col.ravel()])
        real = ndimage.map_coordinates(self.table.real, coordinates, order=1, mode="constant")
        imaginary = ndimage.map_coordinates(self.table.imag, coordinates, order=1, mode="constant")
        return (real + 1j * imaginary).reshape(row.shape)

    def on_grid(self, frequencies_y: np.ndarray, frequencies_x: np.ndarray) -> np.ndarray:
        """W on the grid of 1-D frequency axes (cycles/µm), (len(y), len(x)): the same bilinear values as
        `__call__`, interpolated one axis at a time, which an image's whole spectrum needs at a fraction of the
        cost of interpolating every point."""
        rows, row_low, row_high = self._axis_weights(frequencies_y)
        cols, col_low, col_high = self._axis_weights(frequencies_x)
        along_y = self.table[rows] * row_low[:, None] + self.table[rows + 1] * row_high[:, None]
        return along_y[:, cols] * col_low + along_y[:, cols + 1] * col_high

    def _axis_weights(self, frequencies: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Table index below each frequency and the weights of it and the next; 0 outside the table."""
        size = self.table.shape[0]
        position = np.ravel(frequencies) * self.samples_per_cutoff + size // 2
        lower = np.clip(np.floor(position).astype(np.intp), 0, size - 2)
        above = (position - lower).astype(np.float32)
        inside = (position >= 0) & (position <= size - 1)
        return lower, np.where(inside, 1 - above, 0).astype(np.float32), np.where(inside, above, 0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _pupil_grid(optics: TrainingOptics, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rho, exact defocus path 1 - cos theta, Zernike aberration in waves at 550 nm) on a grid of
    4 radius samples per side: what every wavelength and defocus of one microscope shares."""
    size = 4 * radius
    axis = (np.arange(size) - size // 2) / radius
    uy, ux = np.meshgrid(axis, axis, indexing="ij")
    rho = np.hypot(uy, ux)
    azimuth = np.arctan2(uy, ux)
    sine = np.clip(optics.numerical_aperture * rho, 0, 0.999999)
    aberration = np.zeros_like(rho)
    inside = rho <= 1.0
    for n, m, coefficient in optics.zernike_waves:
        aberration += coefficient * np.where(inside, _zernike(n, m, rho, azimuth), 0.0)
    return rho, 1.0 - np.sqrt(1.0 - sine * sine), aberration


def weak_object_transfer(optics: TrainingOptics, wavelength_um: float, defocus_um: float) -> WeakObjectTransfer:
    """W(f) = sum_u S(u) P*(u) P(u + f) / sum_u S |P|^2 for the paraxial defocus `defocus_um`, as a
    function of frequency in cycles/µm."""
    na = optics.numerical_aperture
    radius = _pupil_samples(optics, wavelength_um, defocus_um)
    size = 4 * radius
    rho, defocus_shape, aberration_waves = _pupil_grid(optics, radius)
    waves = (defocus_um / wavelength_um) * defocus_shape + (_GREEN_UM / wavelength_um) * aberration_waves
    pupil = np.where(rho <= 1.0, np.exp(-optics.pupil_taper * rho * rho) * np.exp(2j * math.pi * waves),
                     0).astype(np.complex64)
    source = ((rho <= optics.condenser_fill) & (rho >= optics.condenser_inner_fill)).astype(np.float32)
    # The correlation as a product of the two amplitude PSFs.
    psf = fft.fft2(fft.ifftshift(pupil), workers=1)
    psf_source = fft.fft2(fft.ifftshift(source * pupil), workers=1)
    correlation = fft.fftshift(fft.ifft2(np.conj(psf_source) * psf, workers=1))
    correlation /= correlation[size // 2, size // 2].real
    return WeakObjectTransfer(correlation, radius * wavelength_um / na)


def absorption_and_phase_transfer(forward: np.ndarray, backward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H_a, H_p) of a weak object from W at frequencies f (`forward`) and -f (`backward`)."""
    return 0.5 * (forward + np.conj(backward)), 1j * (forward - np.conj(backward))


def transfer_functions(optics: TrainingOptics, wavelength_um: float, defocus_um: float,
                       shape: tuple[int, int], pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
    """(H_a, H_p) on the rfft2 grid of an image of `shape` (complex64)."""
    fy = np.fft.fftfreq(shape[0], d=pixel_size_um)
    fx = np.fft.rfftfreq(shape[1], d=pixel_size_um)
    transfer = weak_object_transfer(optics, wavelength_um, defocus_um)
    forward, backward = transfer.on_grid(fy, fx), transfer.on_grid(-fy, -fx)
    absorption, phase = absorption_and_phase_transfer(forward, backward)
    return absorption.astype(np.complex64), phase.astype(np.complex64)


_BAND = (0.2, 1.0)


def best_focus_shift_um(optics: TrainingOptics) -> float:
    """Paraxial defocus of the best mid-band absorption contrast at the green wavelength (parabola
    through the best of 25 samples over +-2 lambda/NA^2)."""
    na, wavelength = optics.numerical_aperture, optics.wavelengths_um[1]
    angles = np.linspace(0, math.pi, 12, endpoint=False)
    radii = np.linspace(_BAND[0], _BAND[1], 12) * na / wavelength
    fy = (radii[:, None] * np.sin(angles)[None, :])
    fx = (radii[:, None] * np.cos(angles)[None, :])
    span = 2.0 * wavelength / na ** 2
    shifts = np.linspace(-span, span, 25)
    values = []
    for shift in shifts:
        transfer = weak_object_transfer(optics, wavelength, shift)
        forward, backward = transfer(fy, fx), transfer(-fy, -fx)
        values.append(float(np.real(absorption_and_phase_transfer(forward, backward)[0]).mean()))
    best = int(np.clip(np.argmax(values), 1, len(shifts) - 2))
    left, centre, right = values[best - 1:best + 2]
    curvature = left - 2 * centre + right
    offset = float(np.clip(0.5 * (left - right) / curvature, -1, 1)) if curvature < 0 else 0.0
    return float(shifts[best] + offset * (shifts[1] - shifts[0]))


def margin_px(optics: TrainingOptics, defocus_um: float) -> int:
    """Border that the blur at `defocus_um` needs around a field."""
    sine = optics.numerical_aperture
    blur_um = (abs(defocus_um) + 1.0) * sine / math.sqrt(1 - sine * sine) + 3.0 / optics.numerical_aperture
    return int(math.ceil(blur_um / optics.pixel_size_um)) + 2


def image_irradiance(optics: TrainingOptics, od: np.ndarray, opd_um: np.ndarray, defocus_um: float,
                     focus_shift_um: float) -> np.ndarray:
    """(H, W, 3) irradiance relative to clear glass of a specimen region rendered at the optics' pixel size."""
    shape = od.shape[:2]
    transmission = np.exp(od * np.float32(-_LN10))
    image = np.empty(od.shape, np.float32)
    for channel, wavelength in enumerate(optics.wavelengths_um):
        paraxial = defocus_um + focus_shift_um + optics.chromatic_focus_um[channel]
        absorption, phase = transfer_functions(optics, wavelength, paraxial, shape, optics.pixel_size_um)
        spectrum = fft.rfft2(transmission[..., channel], workers=1) * absorption
        if np.ptp(opd_um) > 0:
            spectrum += fft.rfft2(weak_phase(transmission[..., channel], opd_um, wavelength), workers=1) * phase
        image[..., channel] = np.maximum(fft.irfft2(spectrum, s=shape, workers=1), 0.0)
    return image


@dataclass(frozen=True)
class TrainingCamera:
    glass_electrons: float
    read_noise_e: float
    glass_level: float                        # clear glass in [0, 1] of the 8-bit range
    white_balance: tuple[float, float, float]
    gamma: float                              # output = linear ** gamma (1: linear camera)
    illumination: tuple[float, float, float, float, float]   # 1 + a x + b y + c x^2 + d y^2 + e x y
    bayer: bool
    jpeg_quality: int | None


def sample_camera(rng: np.random.Generator) -> TrainingCamera:
    return TrainingCamera(
        glass_electrons=float(np.exp(rng.uniform(math.log(1500), math.log(25000)))),
        read_noise_e=float(rng.uniform(1.0, 6.0)), glass_level=float(rng.uniform(0.3, 0.94)),
        white_balance=tuple(float(v) for v in rng.uniform(0.9, 1.1, 3)),
        gamma=float(rng.choice([1.0, rng.uniform(0.4, 0.8)])),
        illumination=tuple(float(v) for v in rng.normal(0, [0.04, 0.04, 0.03, 0.03, 0.02])),
        bayer=bool(rng.random() < 0.3), jpeg_quality=int(rng.integers(60, 96)) if rng.random() < 0.4 else None)


def _bilinear_demosaic(mosaic: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    kernel_rb = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4
    kernel_g = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4
    return np.stack([ndimage.convolve(mosaic * mask, kernel, mode="mirror")
                     for mask, kernel in zip(masks, (kernel_rb, kernel_g, kernel_rb))], axis=2)


def camera_image(irradiance: np.ndarray, camera: TrainingCamera, rng: np.random.Generator) -> np.ndarray:
    """Relative irradiance (H, W, 3) -> uint8 RGB as this camera records it."""
    height, width = irradiance.shape[:2]
    ys = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    a, b, c, d, e = camera.illumination
    light = irradiance * (1 + a * xs + b * ys + c * xs * xs + d * ys * ys + e * xs * ys)[..., None]
    electrons = light * np.float32(camera.glass_electrons)
    electrons += np.sqrt(np.maximum(electrons, 0) + camera.read_noise_e ** 2) * rng.standard_normal(
        electrons.shape, dtype=np.float32)
    linear = np.clip(electrons / np.float32(camera.glass_electrons), 0, None)
    if camera.bayer:
        rows, cols = np.indices((height, width))
        masks = [((rows % 2 == 0) & (cols % 2 == 0)), (rows + cols) % 2 == 1, ((rows % 2 == 1) & (cols % 2 == 1))]
        masks = [m.astype(np.float32) for m in masks]
        mosaic = sum(linear[..., k] * masks[k] for k in range(3))
        linear = _bilinear_demosaic(mosaic, masks)
    level = camera.glass_level ** (1 / camera.gamma)      # glass lands at glass_level after the curve
    encoded = np.clip(linear * np.asarray(camera.white_balance, np.float32) * np.float32(level), 0, 1) ** np.float32(camera.gamma)
    image = np.round(encoded * 255).astype(np.uint8)
    if camera.jpeg_quality is not None:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=camera.jpeg_quality)
        image = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return image
