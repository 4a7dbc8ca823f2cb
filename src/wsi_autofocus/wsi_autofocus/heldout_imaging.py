"""Evaluation-only image formation: bright-field microscopes the focus model was never trained on.

Written apart from the optics the training data comes from (`wsi_acquisition.optics` and the
randomised training optics, `wsi_autofocus.training_optics`) and by other methods, so that an
evaluation through it measures how well defocus is read, not how well one simulator is known:

* Abbe's method: the image is the incoherent sum, over points of the condenser aperture, of coherent
  images of the specimen's full complex transmission `sqrt(T) exp(i phi)` (no weak-object
  linearisation, so strong phase and absorption edges are imaged exactly); each source point carries
  its own wavelength, drawn from the colour filter's band.
* Pupil: Seidel wavefront coefficients (spherical W040, coma W131, astigmatism W222, each with its
  own orientation) and an amplitude apodisation (cos theta)^a, where training uses Zernike terms.
* Source: a filled disc, an annulus or a Gaussian-weighted disc.
* Camera: a Bayer (RGGB) sensor demosaiced with gradient-corrected linear interpolation, shot noise
  of Poisson variance, the pixel aperture's MTF, a white balance, sRGB gamma and, for some, JPEG compression.

Defocus 0 is each microscope's plane of best focus (maximum mean incoherent MTF over a mid-frequency
band, found for its own pupil), so "in focus" means what a sharpness autofocus on that microscope
would settle on. Sign convention as everywhere in the project: defocus > 0 with the stage above focus,
where a specimen region of higher optical path (a nucleus) looks darker than in focus.

Nothing in the training path imports this module (`test_heldout_imaging.py` checks it).
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import fft, ndimage

from wsi_autofocus import two_shot

_LN10 = math.log(10.0)
_REFERENCE_WAVELENGTH_UM = 0.55
# Source points are spread so that their image shifts at the current defocus lie about this many
# pixels apart: closer than the coherent image's own defocus blur, so the sum is a smooth blur.
_SOURCE_SPACING_PX = 3.0
_MIN_SOURCE_POINTS = 12
_MAX_SOURCE_POINTS = 64


class HeldOutImagingError(ValueError):
    """A held-out microscope was configured or asked for something it cannot image."""


@dataclass(frozen=True)
class SeidelPupil:
    """Wavefront aberrations in waves at the pupil edge (reference wavelength 550 nm)."""
    spherical_w040: float = 0.0
    coma_w131: float = 0.0
    coma_angle_deg: float = 0.0
    astigmatism_w222: float = 0.0
    astigmatism_angle_deg: float = 0.0
    # Pupil amplitude (cos theta)^power: 0.5 for an aplanatic collector, 0 uniform, < 0 rim-weighted.
    apodisation_power: float = 0.0


@dataclass(frozen=True)
class HeldOutObjective:
    magnification: float
    numerical_aperture: float
    pupil: SeidelPupil = SeidelPupil()


@dataclass(frozen=True)
class Illumination:
    """Condenser aperture as fractions of the objective NA."""
    shape: str = "disc"                 # "disc", "annulus" or "gaussian"
    outer_fill: float = 0.6
    inner_fill: float = 0.0             # annulus only
    gaussian_width: float = 0.35        # gaussian only: 1/e^2 radius as a fraction of the NA

    def __post_init__(self):
        if self.shape not in ("disc", "annulus", "gaussian"):
            raise HeldOutImagingError(f"illumination shape {self.shape!r}; expected disc, annulus or gaussian")
        if not 0 <= self.inner_fill < self.outer_fill <= 1:
            raise HeldOutImagingError(f"fills {self.inner_fill}..{self.outer_fill}; expected 0 <= inner < outer <= 1")

    def declared_condenser(self) -> "two_shot.Condenser":
        """The condenser as this microscope's user declares it to the two-shot model: a disc or a ring as it is,
        a Gaussian-weighted source as the uniform disc of the same rms radius (`two_shot.Condenser`)."""
        if self.shape == "annulus":
            return two_shot.Condenser(self.outer_fill, self.inner_fill)
        if self.shape == "disc":
            return two_shot.Condenser(self.outer_fill)
        points, weights = _source_points(self, 4096, np.random.default_rng(0))
        return two_shot.Condenser.equivalent_disc(points[:, 0], weights)


@dataclass(frozen=True)
class BayerCamera:
    pixel_size_um: float = 5.5
    # Colour filter bands (centre, full width at half maximum), nm, for R, G, B.
    bands_nm: tuple[tuple[float, float], ...] = ((600.0, 60.0), (535.0, 70.0), (460.0, 50.0))
    full_well_e: float = 10_000.0
    glass_fill: float = 0.75            # clear glass at the field centre, as a fraction of full well
    read_noise_e: float = 3.0
    bit_depth: int = 10
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)
    srgb: bool = True
    jpeg_quality: int | None = 85
    illumination_falloff: float = 0.08  # relative loss at the corners of the sensor


@dataclass(frozen=True)
class HeldOutScope:
    name: str
    objectives: tuple[HeldOutObjective, ...]
    illumination: Illumination
    camera: BayerCamera
    description: str = ""
    immersion_index: float = 1.0

    def objective(self, magnification: float) -> HeldOutObjective:
        for objective in self.objectives:
            if objective.magnification == float(magnification):
                return objective
        raise HeldOutImagingError(f"{self.name} has no {magnification}x objective; "
                                  f"available: {sorted(o.magnification for o in self.objectives)}")

    def pixel_size_um(self, magnification: float) -> float:
        return self.camera.pixel_size_um / float(magnification)

    def margin_px(self, magnification: float, max_defocus_um: float) -> int:
        """Border to render around a field so that blur at `max_defocus_um` does not wrap."""
        objective = self.objective(magnification)
        sine = objective.numerical_aperture / self.immersion_index
        blur_um = (abs(max_defocus_um) + abs(best_focus_offset_um(self, magnification))) * sine / math.sqrt(1 - sine * sine)
        return int(math.ceil((blur_um + 4.0 / objective.numerical_aperture) / self.pixel_size_um(magnification))) + 4


def _wide_pupil(scope: HeldOutScope, objective: HeldOutObjective, wavelength_um: float, defocus_um: float,
                height: int, width: int, step_y: float, step_x: float) -> tuple[np.ndarray, int, int]:
    """The pupil on the image's centred frequency grid widened by the largest source shift on each side
    (so that P(f + u) for any source point u is a slice of it), computed on the aperture's bounding box only."""
    na = objective.numerical_aperture
    pad_y = int(math.ceil((1.0 + scope.illumination.outer_fill) * na / wavelength_um / step_y)) + 1
    pad_x = int(math.ceil((1.0 + scope.illumination.outer_fill) * na / wavelength_um / step_x)) + 1
    wide = np.zeros((height + 2 * pad_y, width + 2 * pad_x), np.complex64)
    centre_y, centre_x = pad_y + height // 2, pad_x + width // 2      # zero frequency after fftshift
    reach_y = min(int(math.ceil(na / wavelength_um / step_y)) + 1, centre_y)
    reach_x = min(int(math.ceil(na / wavelength_um / step_x)) + 1, centre_x)
    fy = np.arange(-reach_y, reach_y + 1) * step_y
    fx = np.arange(-reach_x, reach_x + 1) * step_x
    wide[centre_y - reach_y:centre_y + reach_y + 1, centre_x - reach_x:centre_x + reach_x + 1] = _pupil(
        scope, objective, wavelength_um, defocus_um, fy[:, None], fx[None, :])
    return wide, pad_y, pad_x


def _pupil(scope: HeldOutScope, objective: HeldOutObjective, wavelength_um: float, defocus_um: float,
           fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Complex pupil at spatial frequencies (fy, fx) (cycles/µm), for a specimen `defocus_um` from the
    paraxial focus: exact defocus phase plus the Seidel terms, zero outside the aperture."""
    na, n = objective.numerical_aperture, scope.immersion_index
    radius = np.hypot(fy, fx) * (wavelength_um / na)
    azimuth = np.arctan2(fy, fx)
    inside = radius <= 1.0
    rho = np.where(inside, radius, 0.0)
    sine = na * rho / n
    cosine = np.sqrt(1.0 - sine * sine)
    pupil = objective.pupil
    waves_scale = _REFERENCE_WAVELENGTH_UM / wavelength_um
    coma = math.radians(pupil.coma_angle_deg)
    astigmatism = math.radians(pupil.astigmatism_angle_deg)
    waves = (defocus_um / wavelength_um * n * (1.0 - cosine)
             + waves_scale * (pupil.spherical_w040 * rho ** 4
                              + pupil.coma_w131 * rho ** 3 * np.cos(azimuth - coma)
                              + pupil.astigmatism_w222 * rho ** 2 * np.cos(azimuth - astigmatism) ** 2))
    amplitude = cosine ** pupil.apodisation_power
    return np.where(inside, amplitude * np.exp(2j * math.pi * waves), 0.0).astype(np.complex64)


@functools.lru_cache(maxsize=64)
def best_focus_offset_um(scope: HeldOutScope, magnification: float) -> float:
    """Paraxial defocus of the plane of best focus: maximum mean incoherent MTF over 0.2-1.0 NA/lambda
    at 550 nm (the band sharpness metrics weigh), by golden-section search over +-2 lambda/NA^2."""
    objective = scope.objective(magnification)
    na = objective.numerical_aperture
    grid, extent = 128, 2.2 * na / _REFERENCE_WAVELENGTH_UM
    frequencies = np.fft.fftfreq(grid) * 2 * extent
    fy, fx = np.meshgrid(frequencies, frequencies, indexing="ij")
    band_radius = np.hypot(fy, fx) * _REFERENCE_WAVELENGTH_UM / na
    band = (band_radius >= 0.2) & (band_radius <= 1.0)

    def contrast(defocus_um: float) -> float:
        pupil = _pupil(scope, objective, _REFERENCE_WAVELENGTH_UM, defocus_um, fy, fx)
        psf = np.abs(np.fft.ifft2(pupil)) ** 2
        mtf = np.abs(np.fft.fft2(psf))
        return float((mtf / mtf[0, 0])[band].mean())

    span = 2.0 * _REFERENCE_WAVELENGTH_UM / na ** 2
    low, high = -span, span
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = contrast(a), contrast(b)
    for _ in range(40):
        if fa > fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = contrast(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = contrast(b)
    return float(0.5 * (low + high))


def _source_points(illumination: Illumination, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(radius as a fraction of the objective NA, azimuth) and weights of `count` condenser points:
    a golden-angle spiral over the aperture, turned by a random angle for every image."""
    index = np.arange(count) + 0.5
    turn = rng.uniform(0, 2 * math.pi)
    azimuth = turn + index * math.pi * (3 - math.sqrt(5))
    inner, outer = (illumination.inner_fill if illumination.shape == "annulus" else 0.0), illumination.outer_fill
    radius = np.sqrt(inner ** 2 + (outer ** 2 - inner ** 2) * index / count)
    weights = np.ones(count)
    if illumination.shape == "gaussian":
        weights = np.exp(-2.0 * (radius / illumination.gaussian_width) ** 2)
    return np.column_stack([radius, azimuth]), weights / weights.sum()


def _band_wavelengths_um(centre_nm: float, fwhm_nm: float, count: int) -> np.ndarray:
    """`count` wavelengths at equal-probability quantiles of a Gaussian filter band."""
    from scipy.special import ndtri

    quantiles = (np.arange(count) + 0.5) / count
    return (centre_nm + fwhm_nm / 2.3548 * ndtri(quantiles)) / 1000.0


_WAVELENGTHS_PER_BAND = 3


def coherent_sum_intensity(scope: HeldOutScope, magnification: float, od: np.ndarray, opd_um: np.ndarray,
                           defocus_um: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 irradiance relative to clear glass of a specimen (optical density per R, G, B
    and optical path difference, µm, at the image pixel size) at `defocus_um` from best focus, by Abbe's
    method. Source points sit on the frequency grid, so every shifted pupil is an exact slice."""
    objective = scope.objective(magnification)
    pixel_um = scope.pixel_size_um(magnification)
    height, width = od.shape[:2]
    na, n = objective.numerical_aperture, scope.immersion_index
    paraxial_defocus = defocus_um + best_focus_offset_um(scope, magnification)
    sine_source = scope.illumination.outer_fill * na / n
    shift_px = abs(paraxial_defocus) * sine_source / math.sqrt(1 - sine_source ** 2) / pixel_um
    count = int(np.clip(math.pi * (shift_px / _SOURCE_SPACING_PX) ** 2, _MIN_SOURCE_POINTS, _MAX_SOURCE_POINTS))
    points, weights = _source_points(scope.illumination, count, rng)
    step_y, step_x = 1.0 / (height * pixel_um), 1.0 / (width * pixel_um)
    image = np.empty((height, width, 3), np.float32)
    for channel, (centre_nm, fwhm_nm) in enumerate(scope.camera.bands_nm):
        wavelengths = _band_wavelengths_um(centre_nm, fwhm_nm, _WAVELENGTHS_PER_BAND)
        amplitude = np.exp(od[..., channel] * np.float32(-_LN10 / 2))
        intensity = np.zeros((height, width), np.float64)
        normalisation = 0.0
        for band_index, wavelength in enumerate(wavelengths):
            mine = np.arange(band_index, count, _WAVELENGTHS_PER_BAND)
            if not len(mine):
                continue
            spectrum = fft.fft2(amplitude * np.exp(1j * np.float32(2 * math.pi / wavelength) * opd_um), workers=1)
            wide, pad_y, pad_x = _wide_pupil(scope, objective, wavelength, paraxial_defocus, height, width,
                                             step_y, step_x)
            stack = np.empty((len(mine), height, width), np.complex64)
            shifted_spectrum = np.fft.fftshift(spectrum)
            for k, index in enumerate(mine):
                radius, azimuth = points[index]
                sy = int(round(radius * na / wavelength * math.sin(azimuth) / step_y))
                sx = int(round(radius * na / wavelength * math.cos(azimuth) / step_x))
                # P(f + u): rows/cols of the wide pupil offset by the source's grid shift.
                window = wide[pad_y + sy:pad_y + sy + height, pad_x + sx:pad_x + sx + width]
                stack[k] = shifted_spectrum * window
                normalisation += weights[index] * float(np.abs(wide[pad_y + sy + height // 2, pad_x + sx + width // 2]) ** 2)
            fields = fft.ifft2(np.fft.ifftshift(stack, axes=(1, 2)), axes=(1, 2), workers=1)
            intensity += np.tensordot(weights[mine], (fields.real ** 2 + fields.imag ** 2), axes=1)
        image[..., channel] = intensity / max(normalisation, 1e-12)
    return image


def _pixel_aperture(image: np.ndarray) -> np.ndarray:
    """The pixel's square aperture: its MTF sinc(f p) along each axis, applied to the point-sampled irradiance."""
    height, width = image.shape[:2]
    mtf = (np.sinc(np.fft.fftfreq(height))[:, None] * np.sinc(np.fft.rfftfreq(width))[None, :]).astype(np.float32)
    out = np.empty_like(image)
    for channel in range(image.shape[2]):
        out[..., channel] = fft.irfft2(fft.rfft2(image[..., channel], workers=1) * mtf, s=(height, width), workers=1)
    return out


# Gradient-corrected linear demosaicing kernels (Malvar, He and Cutler, ICASSP 2004), in eighths.
_G_AT_RB = np.array([[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1], [0, 0, 2, 0, 0], [0, 0, -1, 0, 0]]) / 8
_RB_AT_G_SAME_ROW = np.array([[0, 0, .5, 0, 0], [0, -1, 0, -1, 0], [-1, 4, 5, 4, -1], [0, -1, 0, -1, 0],
                              [0, 0, .5, 0, 0]]) / 8
_RB_AT_G_SAME_COLUMN = _RB_AT_G_SAME_ROW.T
_RB_AT_BR = np.array([[0, 0, -1.5, 0, 0], [0, 2, 0, 2, 0], [-1.5, 0, 6, 0, -1.5], [0, 2, 0, 2, 0],
                      [0, 0, -1.5, 0, 0]]) / 8


def demosaic_rggb(mosaic: np.ndarray) -> np.ndarray:
    """(H, W) RGGB Bayer mosaic -> (H, W, 3) by gradient-corrected linear interpolation."""
    rows, cols = np.indices(mosaic.shape)
    red = (rows % 2 == 0) & (cols % 2 == 0)
    blue = (rows % 2 == 1) & (cols % 2 == 1)
    green_red_row = (rows % 2 == 0) & (cols % 2 == 1)
    green_blue_row = (rows % 2 == 1) & (cols % 2 == 0)

    def filtered(kernel):
        return ndimage.correlate(mosaic, kernel, mode="mirror")

    g_at_rb, same_row, same_col, at_other = (filtered(k) for k in (_G_AT_RB, _RB_AT_G_SAME_ROW,
                                                                   _RB_AT_G_SAME_COLUMN, _RB_AT_BR))
    rgb = np.empty(mosaic.shape + (3,), mosaic.dtype)
    rgb[..., 0] = np.select([red, green_red_row, green_blue_row, blue], [mosaic, same_row, same_col, at_other])
    rgb[..., 1] = np.where(red | blue, g_at_rb, mosaic)
    rgb[..., 2] = np.select([blue, green_blue_row, green_red_row, red], [mosaic, same_row, same_col, at_other])
    return rgb


def expose_bayer(irradiance: np.ndarray, camera: BayerCamera, rng: np.random.Generator) -> np.ndarray:
    """Relative irradiance (H, W, 3; 1 = clear glass) -> the camera's 8-bit sRGB (or linear) RGB image."""
    height, width = irradiance.shape[:2]
    ys = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    lit = irradiance * (1.0 - np.float32(camera.illumination_falloff / 2) * (xs * xs + ys * ys))[..., None]
    rows, cols = np.indices((height, width))
    channel = np.where((rows % 2 == 0) & (cols % 2 == 0), 0, np.where((rows % 2 == 1) & (cols % 2 == 1), 2, 1))
    sampled = np.take_along_axis(lit, channel[..., None], axis=2)[..., 0]
    # Shot and read noise as one normal deviate per pixel at their summed variance: numpy's Poisson sampler takes
    # a number of random draws that depends on the mean, so an irradiance differing in its last bits (another
    # CPU's BLAS kernel) shifted every later draw of the stream, and the evaluation's tiles and sweeps differed
    # from machine to machine. At these cameras' thousands of electrons the Poisson law is this normal one to
    # within its skewness (2 % at 3000 e-).
    mean_e = np.clip(sampled, 0, None).astype(np.float32) * np.float32(camera.glass_fill * camera.full_well_e)
    deviates = rng.standard_normal(mean_e.shape, dtype=np.float32)
    electrons = mean_e + np.sqrt(mean_e + np.float32(camera.read_noise_e ** 2)) * deviates
    levels = (1 << camera.bit_depth) - 1
    counts = np.clip(np.rint(electrons / camera.full_well_e * levels), 0, levels)
    rgb = demosaic_rggb(counts / levels)
    rgb *= np.asarray(camera.white_balance, np.float32)
    rgb = np.clip(rgb, 0.0, 1.0)
    if camera.srgb:
        rgb = np.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * np.power(rgb, 1 / 2.4) - 0.055)
    image = np.round(rgb * 255).astype(np.uint8)
    if camera.jpeg_quality is not None:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=camera.jpeg_quality)
        image = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return image


@dataclass(frozen=True)
class HeldOutCapture:
    image_rgb8: np.ndarray
    defocus_um: float
    pixel_size_um: float
    numerical_aperture: float
    objective_magnification: float
    scope: str = field(default="")


def capture(scope: HeldOutScope, specimen, x_um: float, y_um: float, defocus_um: float, magnification: float,
            size_px: int, rng: np.random.Generator) -> HeldOutCapture:
    """A `size_px` square image centred on slide position (x, y) of `specimen` (anything with
    `optical_density_and_path`, e.g. `wsi_autofocus.content` specimens), `defocus_um` from best focus."""
    objective = scope.objective(magnification)
    pixel_um = scope.pixel_size_um(magnification)
    side = fft.next_fast_len(size_px + 2 * scope.margin_px(magnification, defocus_um))
    margin = (side - size_px) // 2
    left = x_um - side / 2 * pixel_um
    top = y_um - side / 2 * pixel_um
    od, opd = specimen.optical_density_and_path(left, top, side, side, pixel_um)
    irradiance = coherent_sum_intensity(scope, magnification, od, opd, defocus_um, rng)
    irradiance = _pixel_aperture(irradiance)[margin:margin + size_px, margin:margin + size_px]
    return HeldOutCapture(expose_bayer(irradiance, scope.camera, rng), float(defocus_um), pixel_um,
                          objective.numerical_aperture, float(magnification), scope.name)


def _objectives(pupils: dict[float, SeidelPupil], apertures=((10.0, 0.30), (20.0, 0.75), (40.0, 0.95))):
    return tuple(HeldOutObjective(magnification, na, pupils[magnification]) for magnification, na in apertures)


# The held-out microscopes. Their aberrations have other signs, sizes and kinds than any objective
# the training draws from its own model, their cameras are Bayer sensors with other pixels.
HELD_OUT_SCOPES: dict[str, HeldOutScope] = {scope.name: scope for scope in (
    HeldOutScope(
        "abbe-astigmatic",
        _objectives({10.0: SeidelPupil(spherical_w040=-0.10, astigmatism_w222=0.15, astigmatism_angle_deg=30),
                     20.0: SeidelPupil(spherical_w040=-0.15, coma_w131=0.10, coma_angle_deg=70,
                                       astigmatism_w222=0.12, astigmatism_angle_deg=30, apodisation_power=0.5),
                     40.0: SeidelPupil(spherical_w040=-0.20, coma_w131=0.08, astigmatism_w222=0.10,
                                       apodisation_power=0.5)}),
        Illumination("disc", outer_fill=0.55),
        BayerCamera(pixel_size_um=5.5, jpeg_quality=85),
        "negative spherical aberration with astigmatism and coma, aplanatic apodisation, condenser at 55 %, "
        "5.5 µm Bayer camera, JPEG q85"),
    HeldOutScope(
        "abbe-annular",
        _objectives({10.0: SeidelPupil(spherical_w040=0.25),
                     20.0: SeidelPupil(spherical_w040=0.30, astigmatism_w222=-0.06, astigmatism_angle_deg=100,
                                       apodisation_power=-0.3),
                     40.0: SeidelPupil(spherical_w040=0.35, coma_w131=-0.06, apodisation_power=-0.3)}),
        Illumination("annulus", outer_fill=0.8, inner_fill=0.45),
        BayerCamera(pixel_size_um=6.5, bands_nm=((615.0, 50.0), (530.0, 90.0), (450.0, 60.0)), bit_depth=12,
                    white_balance=(1.04, 1.0, 0.95), jpeg_quality=None, read_noise_e=2.0),
        "strong positive spherical aberration, rim-weighted pupil, annular condenser 45-80 %, 6.5 µm "
        "12-bit Bayer camera, no compression"),
    HeldOutScope(
        "abbe-gaussian",
        _objectives({10.0: SeidelPupil(coma_w131=0.12, coma_angle_deg=200),
                     20.0: SeidelPupil(spherical_w040=0.05, coma_w131=0.15, coma_angle_deg=200,
                                       astigmatism_w222=0.05, astigmatism_angle_deg=160),
                     40.0: SeidelPupil(spherical_w040=0.08, coma_w131=0.12, coma_angle_deg=200)}),
        Illumination("gaussian", outer_fill=0.9, gaussian_width=0.5),
        BayerCamera(pixel_size_um=4.5, full_well_e=6_000.0, glass_fill=0.6, read_noise_e=4.0,
                    white_balance=(0.97, 1.0, 1.05), jpeg_quality=75, illumination_falloff=0.15),
        "coma-dominated objective, Gaussian-weighted condenser (soft, nearly incoherent edge), 4.5 µm "
        "noisy Bayer camera, JPEG q75, 15 % illumination fall-off"),
)}
