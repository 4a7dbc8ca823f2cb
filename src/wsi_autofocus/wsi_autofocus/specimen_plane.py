"""Where the specimen lies in a z-sweep: not where its sharpest image lies.

A stained section shifts the light's phase as well as absorbing it (its refractive index follows its dry
mass, and so its stain). Defocus turns that phase into contrast of one sign above the specimen and of the
other below it, which adds to the absorption's contrast on one side: the sharpest image of such a specimen
lies off its plane, by an amount set by its phase-to-absorption ratio and the illumination (0.05-0.45 µm on
the held-out microscopes at 20x/0.75; `test_heldout_imaging`). Every spatial frequency's sharpness peaks
off the plane by its own amount, in a way the weak-object transfer of a bright-field objective predicts.
`specimen_plane_z_um` fits that transfer's through-focus band powers to a sweep: the plane, the specimen's
phase per unit of absorption and, per band, a scale (the specimen's spectrum, the camera's MTF) and a noise
floor. The objective is modelled without aberrations at 550 nm under the declared condenser, or under the
source that fits best when the condenser is not known.

A calibration labels its sweeps from the specimen plane (`plane_offset_um`: the median over its sweeps of
how far the sharpest image lies from it), so that the calibrated model reads defocus from the specimen, as
the shipped model was trained to, and not from wherever its phase makes the image look sharpest.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from wsi_autofocus import training_optics
from wsi_autofocus.two_shot import (BAND_EDGES, REFERENCE_WAVELENGTH_UM, Condenser, band_log_power, depth_unit_um,
                                    field_window)

# Bands the fit reads (in NA / lambda): below ~0.13 the transfer hardly changes within the fitted range, above
# ~1.2 a partially coherent objective passes little but noise.
_BANDS = np.flatnonzero((BAND_EDGES[:-1] >= 0.13) & (BAND_EDGES[1:] <= 1.2 + 1e-9))
# The images fitted lie within this many depths of focus (lambda / NA^2) of the sharpest; the plane is sought
# within SEARCH_DEPTHS of it, in steps of SEARCH_STEP_DEPTHS.
FIT_HALF_RANGE_DEPTHS = 6.0
SEARCH_DEPTHS = 1.5
SEARCH_STEP_DEPTHS = 0.02
# Phase per unit of absorption the fit considers (0: an absorber; stained tissue lies near 0.2).
PHASE_RATIOS = np.round(np.arange(-0.4, 1.2001, 0.02), 3)
# Sources (fill, inner fill) tried when the scanner has not declared its condenser: discs, and rings (an LED
# ring, a phase annulus left in) of the common sizes.
UNKNOWN_CONDENSER_SOURCES = tuple((fill, 0.0) for fill in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) + tuple(
    (fill, round(fill * inner, 3)) for fill in (0.6, 0.7, 0.8, 0.9, 1.0) for inner in (0.5, 0.7))
_DEFOCUS_STEP_DEPTHS = 0.05


@functools.lru_cache(maxsize=32)
def _transfer_terms(numerical_aperture: float, fill: float, inner_fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Defocus grid (µm) and, per defocus and fitted band, the ring means of |H_a|^2, Re(H_a H_p*) and |H_p|^2
    of an aberration-free objective under a uniform source from `inner_fill` to `fill` of its NA."""
    optics = training_optics.TrainingOptics(
        magnification=20.0, numerical_aperture=numerical_aperture, camera_pixel_um=5.0, condenser_fill=fill,
        zernike_waves=(), pupil_taper=0.0, wavelengths_um=(REFERENCE_WAVELENGTH_UM,) * 3,
        chromatic_focus_um=(0.0, 0.0, 0.0), condenser_inner_fill=inner_fill)
    unit = depth_unit_um(numerical_aperture)
    reach = FIT_HALF_RANGE_DEPTHS + SEARCH_DEPTHS + 1.0
    defocus_um = np.arange(-reach, reach + 1e-9, _DEFOCUS_STEP_DEPTHS) * unit
    angles = np.linspace(0.0, math.pi, 16, endpoint=False)
    rings = [np.linspace(BAND_EDGES[band], BAND_EDGES[band + 1], 4) * numerical_aperture / REFERENCE_WAVELENGTH_UM
             for band in _BANDS]
    fy = np.stack([np.outer(radii, np.sin(angles)) for radii in rings])
    fx = np.stack([np.outer(radii, np.cos(angles)) for radii in rings])
    terms = np.empty((3, len(defocus_um), len(_BANDS)))
    for row, defocus in enumerate(defocus_um):
        transfer = training_optics.weak_object_transfer(optics, REFERENCE_WAVELENGTH_UM, float(defocus))
        forward, backward = transfer(fy, fx), transfer(-fy, -fx)
        absorption, phase = training_optics.absorption_and_phase_transfer(forward, backward)
        terms[0, row] = np.mean(np.abs(absorption) ** 2, axis=(1, 2))
        terms[1, row] = np.mean(np.real(absorption * np.conj(phase)), axis=(1, 2))
        terms[2, row] = np.mean(np.abs(phase) ** 2, axis=(1, 2))
    return defocus_um, terms


def _misfit(z_um: np.ndarray, power: np.ndarray, planes_um: np.ndarray, defocus_um: np.ndarray,
            terms: np.ndarray) -> np.ndarray:
    """Relative squared misfit for each (plane, phase ratio) of the band powers, each band's scale (> 0) and
    noise floor (>= 0) fitted by least squares."""
    weight = 1.0 / power                                       # (images, bands): residuals relative to the power
    misfit = np.empty((len(planes_um), len(PHASE_RATIOS)))
    ratio = PHASE_RATIOS[:, None, None]
    for row, plane in enumerate(planes_um):
        absorption, cross, phase = (np.stack([np.interp(z_um - plane, defocus_um, term[:, band])
                                              for band in range(term.shape[1])], axis=1) for term in terms)
        model = (absorption - 2 * ratio * cross + ratio ** 2 * phase) * weight    # (ratios, images, bands)
        a11, a12, a22 = (model * model).sum(1), (model * weight).sum(1), (weight * weight).sum(0)
        b1, b2 = model.sum(1), weight.sum(0)
        determinant = a11 * a22 - a12 * a12
        scale = (b1 * a22 - b2 * a12) / determinant
        floor = (a11 * b2 - a12 * b1) / determinant
        no_floor = (scale <= 0) | (floor < 0)
        scale, floor = np.where(no_floor, b1 / a11, scale), np.where(no_floor, 0.0, floor)
        residual = model * scale[:, None, :] + weight * floor[:, None, :] - 1.0
        misfit[row] = (residual ** 2).sum(axis=(1, 2))
    return misfit


def specimen_plane_z_um(images: np.ndarray, z_um: np.ndarray, pixel_size_um: float, numerical_aperture: float,
                        sharpest_z_um: float, condenser: Condenser) -> float:
    """The z of the specimen plane in a sweep of one field whose sharpest image lies at `sharpest_z_um`, under
    the scanner's declared `condenser` (its fill 0: not known); `sharpest_z_um` itself when the camera's pixels
    sample fewer than three of the bands the fit reads (no more than the sharpest image can be known then)."""
    unit = depth_unit_um(numerical_aperture)
    z_um = np.asarray(z_um, float)
    near = np.flatnonzero(np.abs(z_um - sharpest_z_um) <= FIT_HALF_RANGE_DEPTHS * unit)
    region = field_window(images[near[np.argmin(np.abs(z_um[near] - sharpest_z_um))]])
    bands = [band_log_power(images[index], numerical_aperture, pixel_size_um, region) for index in near]
    sampled = bands[0][1][_BANDS]                              # the bands wholly below the sampling limit
    if sampled.sum() < 3:
        return float(sharpest_z_um)
    power = 10.0 ** np.array([log_power[_BANDS[sampled]] for log_power, _ in bands])
    planes_um = sharpest_z_um + np.arange(-SEARCH_DEPTHS, SEARCH_DEPTHS + 1e-9, SEARCH_STEP_DEPTHS) * unit
    sources = [(condenser.fill, condenser.inner_fill)] if condenser.fill > 0 else UNKNOWN_CONDENSER_SOURCES
    best_misfit, best_plane = math.inf, sharpest_z_um
    for fill, inner_fill in sources:
        defocus_um, terms = _transfer_terms(round(float(numerical_aperture), 3), round(fill, 3), round(inner_fill, 3))
        misfit = _misfit(z_um[near], power, planes_um, defocus_um, terms[:, :, sampled])
        row, _ = np.unravel_index(np.argmin(misfit), misfit.shape)
        if misfit[row].min() < best_misfit:
            best_misfit, best_plane = float(misfit[row].min()), float(planes_um[row])
    return best_plane


def plane_offset_um(stacks, condenser: Condenser) -> float:
    """How far the sharpest image of a slide's sweeps lies above its specimen plane: the median over `stacks`
    (`calibration_store.ZStack`s, their sharpest z as `best_focus_z_um`) of each sweep's, which one sweep with
    too little signal for the fit cannot move."""
    return float(np.median([stack.best_focus_z_um - specimen_plane_z_um(
        stack.images, stack.z_um, stack.pixel_size_um, stack.numerical_aperture, stack.best_focus_z_um, condenser)
        for stack in stacks]))
