"""Bright-field image formation: objective point spread function, focal surface, illumination, camera.

Per colour channel (one centre wavelength each) the specimen is imaged in partially coherent Köhler
illumination: a condenser filling a fraction `condenser_fill` of the objective pupil, and a circular
objective pupil carrying defocus and primary spherical aberration. The image is the specimen's
intensity transmission filtered by the absorption transfer function plus its phase filtered by the
phase transfer function, both from the weak-object transfer function (WOTF) of the two pupils.
In focus a phase object is nearly invisible; defocus turns phase into contrast of opposite sign above
and below focus (the transport-of-intensity effect), and spherical aberration makes the blur differ
above and below focus, as with real dry objectives. With `condenser_fill` = 1 the WOTF is the
incoherent optical transfer function (OTF) and phase is invisible at any defocus.

The transfer functions are computed as radial (Hankel) transforms, exact for rotationally symmetric
pupils, costing matrix-vector products instead of 2-D FFTs; see the package README for the assumptions.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import special

from .specimen import fractal_noise_points, noise_key

# Centre wavelengths of the R, G, B channels, µm. Green is the focus reference.
CHANNEL_WAVELENGTHS_UM = (0.610, 0.530, 0.465)
REFERENCE_WAVELENGTH_UM = 0.550

# Radial sampling of the PSF in units of lambda / NA; fine enough for the highest OTF frequency (2 NA / lambda).
_PSF_STEP = 0.1
# Beyond this geometric blur radius (in lambda / NA) the wave-optical OTF needs very large matrices; the
# geometric (uniform disc) blur is accurate there, and aberration asymmetry is negligible next to it.
# 200 lambda / NA keeps every objective wave-optical over the autofocus range (40x/0.95: 32 um).
_WAVE_OPTICS_MAX_BLUR = 200.0
# Köhler rule: the aperture diaphragm at about 70 % of the objective NA, the usual compromise between
# resolution (fill 1) and contrast / depth of field (small fill).
DEFAULT_CONDENSER_FILL = 0.7


class OpticsError(ValueError):
    """An optical or camera parameter is out of range."""


@dataclass(frozen=True)
class Objective:
    magnification: float
    numerical_aperture: float
    immersion_index: float = 1.0
    # Primary spherical aberration: Zernike Z(4,0) coefficient, waves RMS at the reference wavelength.
    # Balanced against defocus, so best focus stays at defocus 0.
    spherical_aberration_waves: float = 0.0
    # Focal shift of the R, G, B channels relative to the reference focus (longitudinal chromatic
    # aberration, secondary spectrum of an achromat: red and blue focus on the same side), µm.
    axial_chromatic_um: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # Field curvature: focal shift at the edge of the field number (field_number_mm / 2 in the
    # intermediate image), µm; grows with the square of the field radius.
    field_curvature_um: float = 0.0
    field_number_mm: float = 22.0
    # Relative illumination lost at the edge of the field number (vignetting), 0..1.
    vignetting: float = 0.0
    name: str = ""

    def __post_init__(self):
        if not self.magnification > 0:
            raise OpticsError(f"magnification={self.magnification}; expected > 0")
        if not 0 < self.numerical_aperture < self.immersion_index:
            raise OpticsError(f"numerical_aperture={self.numerical_aperture}; expected between 0 and "
                              f"the immersion index {self.immersion_index}")
        if not 0 <= self.vignetting < 1:
            raise OpticsError(f"vignetting={self.vignetting}; expected 0 <= vignetting < 1")
        if len(self.axial_chromatic_um) != 3:
            raise OpticsError(f"axial_chromatic_um={self.axial_chromatic_um}; expected 3 values (R, G, B)")

    @property
    def field_radius_um(self) -> float:
        """Radius of the field number in the specimen plane, µm."""
        return self.field_number_mm * 1000.0 / 2.0 / self.magnification

    @property
    def half_angle_tangent(self) -> float:
        sine = self.numerical_aperture / self.immersion_index
        return sine / math.sqrt(1.0 - sine * sine)

    def field_curvature_shift_um(self, radius_um):
        """Focal shift (µm) at `radius_um` (scalar or array) from the optical axis in the specimen plane:
        best focus bends with the square of the field radius."""
        return self.field_curvature_um * (np.asarray(radius_um) / self.field_radius_um) ** 2

    def geometric_blur_radius_um(self, defocus_um: float) -> float:
        """Radius of the geometric defocus blur disc, µm."""
        return abs(defocus_um) * self.half_angle_tangent


STANDARD_OBJECTIVES: dict[float, Objective] = {
    10.0: Objective(10.0, 0.30, spherical_aberration_waves=0.04, axial_chromatic_um=(0.8, 0.0, 0.6),
                    field_curvature_um=6.0, vignetting=0.25, name="10x/0.30 plan"),
    20.0: Objective(20.0, 0.75, spherical_aberration_waves=0.06, axial_chromatic_um=(0.25, 0.0, 0.2),
                    field_curvature_um=3.0, vignetting=0.20, name="20x/0.75 plan-apo"),
    40.0: Objective(40.0, 0.95, spherical_aberration_waves=0.08, axial_chromatic_um=(0.12, 0.0, 0.1),
                    field_curvature_um=1.5, vignetting=0.20, name="40x/0.95 plan-apo"),
}


@dataclass(frozen=True)
class Camera:
    """Scientific colour camera, modelled as three co-sited channels (3-chip or filter-wheel colour:
    no Bayer mosaic)."""
    width_px: int = 1024
    height_px: int = 1024
    pixel_size_um: float = 6.5
    bit_depth: int = 12
    full_well_e: float = 15_000.0
    read_noise_e: float = 2.0
    # Photo-electrons per ms per pixel on clear glass at the field centre (illumination x QE).
    bright_field_e_per_ms: float = 1_300.0

    def __post_init__(self):
        if self.width_px < 1 or self.height_px < 1:
            raise OpticsError(f"sensor {self.width_px}x{self.height_px} px; expected at least 1x1")
        if self.bit_depth not in (8, 10, 12, 14, 16):
            raise OpticsError(f"bit_depth={self.bit_depth}; expected 8, 10, 12, 14 or 16")
        if not (self.pixel_size_um > 0 and self.full_well_e > 0 and self.bright_field_e_per_ms > 0):
            raise OpticsError("pixel_size_um, full_well_e and bright_field_e_per_ms must be > 0")
        if self.read_noise_e < 0:
            raise OpticsError(f"read_noise_e={self.read_noise_e}; expected >= 0")

    @property
    def max_adu(self) -> int:
        return (1 << self.bit_depth) - 1

    def centre_roi(self, size_px: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the size_px square at the sensor's centre: a capture's region of interest."""
        return (self.height_px - size_px) // 2, (self.width_px - size_px) // 2, size_px, size_px

    @property
    def raw_dtype(self) -> type:
        """The type of the raw counts (`expose`)."""
        return np.uint8 if self.bit_depth == 8 else np.uint16

    def specimen_pixel_size_um(self, objective: Objective) -> float:
        return self.pixel_size_um / objective.magnification


def depth_of_field_um(objective: Objective, camera_pixel_size_um: float,
                      wavelength_um: float = REFERENCE_WAVELENGTH_UM) -> float:
    """Total depth of field (wave-optical term + detector term), µm: n*lambda/NA^2 + n*e/(M*NA)."""
    n = objective.immersion_index
    na = objective.numerical_aperture
    return n * wavelength_um / na ** 2 + n * camera_pixel_size_um / (objective.magnification * na)


# ---------------------------------------------------------------------------------------------------
# Optical transfer function


def diffraction_limited_mtf(normalised_frequency: np.ndarray) -> np.ndarray:
    """In-focus MTF of an aberration-free circular pupil; frequency in units of NA / lambda (cutoff 2)."""
    s = np.clip(np.asarray(normalised_frequency, dtype=np.float64) / 2.0, 0.0, 1.0)
    return (2.0 / math.pi) * (np.arccos(s) - s * np.sqrt(1.0 - s * s))


# Radial OTF table: frequencies in units of NA / lambda, 0 .. 2 (the incoherent cutoff).
_OTF_TABLE_SIZE = 513
OTF_TABLE_FREQUENCIES = np.linspace(0.0, 2.0, _OTF_TABLE_SIZE)


@functools.lru_cache(maxsize=8)
def _pupil_bessel_matrix(radius_count: int, pupil_count: int) -> np.ndarray:
    """J0(2 pi u rho) for u = k * _PSF_STEP and rho at pupil ring midpoints (float32)."""
    u = np.arange(radius_count) * _PSF_STEP
    rho = (np.arange(pupil_count) + 0.5) / pupil_count
    return special.j0(2.0 * math.pi * u[:, None] * rho[None, :]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _otf_bessel_matrix(radius_count: int) -> np.ndarray:
    """J0(2 pi nu u) * u for the OTF table frequencies nu and PSF radii u."""
    u = np.arange(radius_count) * _PSF_STEP
    return (special.j0(2.0 * math.pi * OTF_TABLE_FREQUENCIES[:, None] * u[None, :]) * u).astype(np.float32)


def _next_power_of_two(value: float) -> int:
    return 1 << max(6, math.ceil(math.log2(max(value, 1.0))))


def radial_otf_table(objective: Objective, wavelength_um: float, defocus_um: float) -> np.ndarray:
    """Incoherent OTF (condenser filling the pupil) at OTF_TABLE_FREQUENCIES (units of NA / lambda).
    Real, because the PSF of a rotationally symmetric pupil is real and even.

    defocus_um > 0: the stage is above focus. Defocus 0 is the plane of best mid-frequency contrast
    (`best_focus_shift_um`), where a sharpness autofocus settles.
    """
    return transfer_tables(objective, wavelength_um, defocus_um, 1.0)[0]


def transfer_tables(objective: Objective, wavelength_um: float, defocus_um: float,
                    condenser_fill: float = DEFAULT_CONDENSER_FILL) -> tuple[np.ndarray, np.ndarray]:
    """(absorption, phase) transfer functions at OTF_TABLE_FREQUENCIES (units of NA / lambda).

    For a specimen of intensity transmission T and phase phi (radians), the image intensity relative
    to clear glass is  F^-1[absorption * F(T)] + F^-1[phase * F(sqrt(T) phi)]  (weak-object approximation
    for the phase, `wsi_common.weak_object.weak_phase`; exact for absorption when condenser_fill = 1).
    absorption = Re WOTF, 1 at zero frequency; phase = -2 Im WOTF, 0 at zero frequency and odd in defocus. Defocus as in
    `radial_otf_table`: the best-focus plane of this illumination is defocus 0.
    """
    fill = check_condenser_fill(condenser_fill)
    shift = best_focus_shift_um(objective, wavelength_um, fill)
    wotf = _weak_object_transfer(objective, wavelength_um, defocus_um + shift, fill)
    return wotf.real.copy(), -2.0 * wotf.imag


def check_condenser_fill(condenser_fill: float) -> float:
    if not 0.0 < condenser_fill <= 1.0:
        raise OpticsError(f"condenser_fill={condenser_fill}; expected 0 < fill <= 1 (condenser NA / objective NA)")
    return float(condenser_fill)


# Spatial-frequency band (units of NA / lambda) whose contrast defines best focus: the band image
# sharpness metrics and pathologists' eyes weigh (nuclear detail at 20x-40x sampling).
_BEST_FOCUS_BAND = (0.2, 1.0)


@functools.lru_cache(maxsize=64)
def best_focus_shift_um(objective: Objective, wavelength_um: float, condenser_fill: float = 1.0) -> float:
    """Paraxial-focus offset of the plane of maximum mean absorption contrast over _BEST_FOCUS_BAND,
    µm. Spherical aberration moves this plane away from the paraxial focus, differently for each
    frequency."""
    band = (OTF_TABLE_FREQUENCIES >= _BEST_FOCUS_BAND[0]) & (OTF_TABLE_FREQUENCIES <= _BEST_FOCUS_BAND[1])
    axial_unit = wavelength_um * objective.immersion_index / objective.numerical_aperture ** 2

    def contrast(shift):
        return float(_weak_object_transfer(objective, wavelength_um, shift, condenser_fill).real[band].mean())

    shifts = np.linspace(-2 * axial_unit, 2 * axial_unit, 81)
    values = [contrast(s) for s in shifts]
    best = int(np.clip(np.argmax(values), 1, len(shifts) - 2))
    # Parabola through the best sample and its neighbours.
    left, centre, right = values[best - 1], values[best], values[best + 1]
    curvature = left - 2 * centre + right
    offset = float(np.clip(0.5 * (left - right) / curvature, -1, 1)) if curvature < 0 else 0.0
    return float(shifts[best] + offset * (shifts[1] - shifts[0]))


def _weak_object_transfer(objective: Objective, wavelength_um: float, defocus_um: float,
                          condenser_fill: float) -> np.ndarray:
    """Complex WOTF(f) = integral S(u) P(u + f) P*(u) du / integral S |P|^2 at OTF_TABLE_FREQUENCIES,
    for a defocus from the paraxial focus; S: uniform condenser disc of radius condenser_fill * NA.

    WOTF is the Fourier transform of p(r) q(r), with p the objective's amplitude PSF and q the
    amplitude PSF of the pupil's complex conjugate seen through the condenser aperture: two radial
    Hankel transforms for the PSFs and one for their product. With fill 1, q = p* and this is the
    incoherent OTF."""
    na = objective.numerical_aperture
    n = objective.immersion_index
    blur = objective.geometric_blur_radius_um(defocus_um) * na / wavelength_um
    if blur > _WAVE_OPTICS_MAX_BLUR:
        # Geometric optics: an absorber's shadow in the condenser's cone, a disc of radius fill * blur.
        # Phase contrast (and the coherent Fresnel chirp) is left out this far from focus.
        x = 2.0 * math.pi * OTF_TABLE_FREQUENCIES * blur * condenser_fill
        disc = 2.0 * special.j1(x) / np.maximum(x, 1e-9)
        disc[0] = 1.0
        return (_weak_object_transfer(objective, wavelength_um, 0.0, condenser_fill).real * disc).astype(complex)
    # Sampling: the PSF must fit (geometric blur plus diffraction rings) and the pupil phase must be
    # resolved (about 8 samples per wave of phase slope and per PSF oscillation).
    radius_count = _next_power_of_two((1.4 * blur + 20.0 / condenser_fill) / _PSF_STEP)
    sine_edge = na / n
    phase_slope_waves = abs(defocus_um) / wavelength_um * sine_edge ** 2 / math.sqrt(1 - sine_edge ** 2)
    pupil_count = _next_power_of_two(8.0 * max(phase_slope_waves, radius_count * _PSF_STEP) + 64)
    rho = (np.arange(pupil_count) + 0.5) / pupil_count
    spherical_waves = objective.spherical_aberration_waves * REFERENCE_WAVELENGTH_UM / wavelength_um
    phase_waves = (-defocus_um / wavelength_um * (np.sqrt(n * n - (na * rho) ** 2) - n)
                   + spherical_waves * math.sqrt(5.0) * (6 * rho ** 4 - 6 * rho ** 2 + 1))
    pupil = (np.exp(2j * math.pi * phase_waves) * rho).astype(np.complex64)
    bessel = _pupil_bessel_matrix(radius_count, pupil_count)
    amplitude = _real_matrix_times(bessel, pupil)
    if condenser_fill >= 1.0:
        product = (np.abs(amplitude) ** 2).astype(np.complex64)
    else:
        through_condenser = np.where(rho <= condenser_fill, np.conj(pupil), 0).astype(np.complex64)
        product = amplitude * _real_matrix_times(bessel, through_condenser)
    wotf = _real_matrix_times(_otf_bessel_matrix(radius_count), product).astype(np.complex128)
    wotf /= wotf[0].real
    wotf[-1] = 0.0
    return wotf


def _real_matrix_times(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """float32 matrix times complex vector, as two real products (BLAS sgemv, half the work of cgemv)."""
    return matrix @ vector.real + 1j * (matrix @ vector.imag)


class OtfGrid:
    """Transfer functions on the rfft2 frequency grid of one image shape, linearly interpolated from
    the radial tables (the table positions are cached per NA / lambda).

    Rows of negative y frequency repeat the rows of positive frequency in reverse order, so only the
    first half of the rows is interpolated; the other half is a reversed view of it."""

    def __init__(self, shape: tuple[int, int], pixel_size_um: float):
        self.shape = shape
        self._half_rows = shape[0] // 2 + 1
        fy = np.fft.fftfreq(shape[0], d=pixel_size_um)[:self._half_rows]
        fx = np.fft.rfftfreq(shape[1], d=pixel_size_um)
        self._radius_per_um = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).astype(np.float32)
        self._positions: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def evaluate(self, objective: Objective, wavelength_um: float, defocus_um: float,
                 condenser_fill: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(absorption, phase) transfer functions of `transfer_tables` on this grid, float32."""
        return tuple(np.concatenate([values for _, values in self._halves(half)])
                     for half in self.transfer(objective, wavelength_um, defocus_um, condenser_fill))

    def filter(self, spectrum: np.ndarray, phase_spectrum: np.ndarray | None,
               transfer: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Image spectrum: rfft2 `spectrum` times the absorption transfer, plus `phase_spectrum` times
        the phase transfer unless it is None; `transfer` from `transfer`."""
        absorption, phase = transfer
        image = np.empty_like(spectrum)
        for (rows, absorption_rows), (_, phase_rows) in zip(self._halves(absorption), self._halves(phase)):
            np.multiply(spectrum[rows], absorption_rows, out=image[rows])
            if phase_spectrum is not None:
                image[rows] += phase_spectrum[rows] * phase_rows
        return image

    def _halves(self, half_grid: np.ndarray):
        """(rows of the full grid, their values) for the evaluated half and its mirror image."""
        mirrored = self.shape[0] - self._half_rows
        return ((slice(0, self._half_rows), half_grid),
                (slice(self._half_rows, None), half_grid[mirrored:0:-1]))

    def transfer(self, objective: Objective, wavelength_um: float, defocus_um: float,
                 condenser_fill: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(absorption, phase) transfer functions of `transfer_tables` on the first half of the grid's rows (the
        rest mirror them), float32: what `filter` applies."""
        index, fraction = self._table_position(objective.numerical_aperture / wavelength_um)
        absorption, phase = transfer_tables(objective, wavelength_um, defocus_um, condenser_fill)
        # Both tables as one complex table: one gather serves both (a complex64 times a float32 rounds as the
        # float32 product does). Beyond the last table frequency (the cutoff) the transfer is 0: a zero appended.
        table = np.zeros(len(absorption) + 1, np.complex64)
        table.real[:-1], table.imag[:-1] = absorption, phase
        # table[i] + f (table[i + 1] - table[i]); np.take is twice as fast as fancy indexing here.
        grid = np.take(np.diff(table), index)
        grid *= fraction
        grid += np.take(table, index)
        # Contiguous: the products with the spectra are slower on strided views.
        return grid.real.copy(), grid.imag.copy()

    def _table_position(self, na_over_wavelength: float):
        if na_over_wavelength not in self._positions:
            step = OTF_TABLE_FREQUENCIES[1] * na_over_wavelength
            position = np.minimum(self._radius_per_um * np.float32(1.0 / step), _OTF_TABLE_SIZE - 1)
            index = position.astype(np.int32)
            self._positions[na_over_wavelength] = (index, (position - index).astype(np.float32))
        return self._positions[na_over_wavelength]


# ---------------------------------------------------------------------------------------------------
# Specimen focal surface


@dataclass(frozen=True)
class FocalSurface:
    """z (µm, stage coordinates) at which the specimen is in focus, as a function of slide position.

    Plane tilt (slide wedge / stage mounting) + smooth warp (slide and coverslip bending) + local
    relief (section thickness and mounting medium variation), all fixed by the seed."""
    seed: int = 0
    reference_z_um: float = 0.0
    center_x_um: float = 37_500.0
    center_y_um: float = 12_500.0
    max_tilt_um_per_mm: float = 1.5
    warp_amplitude_um: float = 3.0
    warp_lattice_um: float = 7_000.0
    relief_amplitude_um: float = 0.5
    relief_lattice_um: float = 500.0
    tilt_x_um_per_mm: float = field(init=False)
    tilt_y_um_per_mm: float = field(init=False)

    def __post_init__(self):
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 7])
        tilt = rng.uniform(-self.max_tilt_um_per_mm, self.max_tilt_um_per_mm, size=2)
        object.__setattr__(self, "tilt_x_um_per_mm", float(tilt[0]))
        object.__setattr__(self, "tilt_y_um_per_mm", float(tilt[1]))

    def z_um(self, x_um, y_um):
        """Focal z at slide positions (scalars or arrays)."""
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        z = (self.reference_z_um
             + self.tilt_x_um_per_mm * (x - self.center_x_um) / 1000.0
             + self.tilt_y_um_per_mm * (y - self.center_y_um) / 1000.0
             + self.warp_amplitude_um * fractal_noise_points(x, y, self.warp_lattice_um, 2,
                                                             noise_key(self.seed, 9001))
             + self.relief_amplitude_um * fractal_noise_points(x, y, self.relief_lattice_um, 2,
                                                               noise_key(self.seed, 9002)))
        return float(z) if z.ndim == 0 else z


# ---------------------------------------------------------------------------------------------------
# Camera exposure


def standard_normal_float32(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Independent standard normal float32 draws of `shape`, for `expose`: Box-Muller on float32 uniforms, in
    place. Exactly normal as numpy's own draw (which is a ziggurat), but about 3x faster on the frame-sized arrays
    of a capture (1024 x 1024 x 3: 9 against 27 ms), where the noise was an eighth of a tile's render."""
    count = math.prod(shape)
    half = (count + 1) // 2
    values = rng.random(2 * half, dtype=np.float32)
    radius, angle = values[:half], values[half:]
    # 1 - u lies in (0, 1]: the logarithm stays finite.
    np.subtract(np.float32(1.0), radius, out=radius)
    np.log(radius, out=radius)
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    angle *= np.float32(2.0 * math.pi)
    cosine = np.cos(angle)
    np.sin(angle, out=angle)
    angle *= radius
    np.multiply(radius, cosine, out=radius)
    return values[:count].reshape(shape)


def expose(irradiance: np.ndarray, camera: Camera, exposure_ms: float, gain: float,
           noise: np.ndarray) -> np.ndarray:
    """Relative irradiance (1 = clear glass at the field centre) -> raw counts of the camera bit depth.

    noise: one standard normal float32 draw per value of `irradiance` (overwritten). Shot noise uses the
    Gaussian limit of the Poisson law (variance = mean), accurate above ~20 e-, which bright-field always
    is; electrons clip at full well, counts at the ADC range."""
    if not exposure_ms > 0:
        raise OpticsError(f"exposure_ms={exposure_ms}; expected > 0")
    if not gain > 0:
        raise OpticsError(f"gain={gain}; expected > 0")
    electrons = irradiance * np.float32(camera.bright_field_e_per_ms * exposure_ms)
    # In place from here on: every new frame-sized array costs page faults on top of its pass.
    noise_sigma = electrons + np.float32(camera.read_noise_e ** 2)
    noise *= np.sqrt(noise_sigma, out=noise_sigma)
    electrons += noise
    np.clip(electrons, 0.0, camera.full_well_e, out=electrons)
    counts = np.multiply(electrons, np.float32(gain * camera.max_adu / camera.full_well_e), out=electrons)
    np.clip(np.rint(counts, out=counts), 0, camera.max_adu, out=counts)
    return counts.astype(camera.raw_dtype)


def to_rgb8(raw: np.ndarray, bit_depth: int) -> np.ndarray:
    if bit_depth == 8:
        return raw.astype(np.uint8, copy=False)
    return (raw >> (bit_depth - 8)).astype(np.uint8)


def relative_illumination(field_x_um: np.ndarray, field_y_um: np.ndarray, objective: Objective,
                          tilt: tuple[float, float]) -> np.ndarray:
    """Vignetting (quadratic fall-off to the field-number edge) times a slightly off-centre lamp
    (linear gradient `tilt`, fraction per field radius). field_*_um: offsets from the optical axis."""
    radius = objective.field_radius_um
    fx = (field_x_um / radius).astype(np.float32)[None, :]
    fy = (field_y_um / radius).astype(np.float32)[:, None]
    return (1.0 - np.float32(objective.vignetting) * (fx * fx + fy * fy)) * (
        1.0 + np.float32(tilt[0]) * fx + np.float32(tilt[1]) * fy)
