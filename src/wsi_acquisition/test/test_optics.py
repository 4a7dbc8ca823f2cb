"""Image formation: through-focus asymmetry from spherical aberration, sharpness peaking at the true
focal z, transfer-function physics and depth of field."""
import dataclasses

import numpy as np
import pytest
from scipy import ndimage, stats

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import (OTF_TABLE_FREQUENCIES, REFERENCE_WAVELENGTH_UM, STANDARD_OBJECTIVES,
                                    Camera, OpticsError, OtfGrid, best_focus_shift_um, depth_of_field_um,
                                    diffraction_limited_mtf, radial_otf_table, standard_normal_float32,
                                    transfer_tables)
from wsi_acquisition.specimen import GLASS_OD, SyntheticSlide
from wsi_common.focus_metrics import brenner

# A field well inside the default section of the seed-5 slide.
TISSUE_X_UM, TISSUE_Y_UM = 43_200.0, 12_300.0
PATCH = (384, 384, 256, 256)


@pytest.fixture(scope="module")
def microscope():
    return VirtualMicroscope(seed=5)


def luminance(image_rgb8):
    return image_rgb8.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_patch_is_on_tissue(microscope):
    capture = microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, microscope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM),
                                 20, roi=PATCH)
    assert luminance(capture.image_rgb8).std() > 15  # nuclei and stroma, not bare glass


@pytest.mark.parametrize("magnification", [20, 40])
def test_images_above_and_below_focus_differ_beyond_noise(microscope, magnification):
    focal_z = microscope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM)
    defocus = microscope.depth_of_field_um(magnification)

    def image(z, noise_seed):
        return microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, z, magnification, roi=PATCH,
                                  noise_seed=noise_seed).image_rgb8

    def smoothed(image_rgb8):   # one-pixel smoothing keeps the blur structure, damps the noise
        return ndimage.gaussian_filter(image_rgb8.astype(np.float64), sigma=(1, 1, 0))

    above = image(focal_z + defocus, 1)
    below = image(focal_z - defocus, 2)
    above_again = image(focal_z + defocus, 3)
    noise_only = np.abs(smoothed(above) - smoothed(above_again)).mean()
    through_focus = np.abs(smoothed(above) - smoothed(below)).mean()
    assert through_focus > 3 * noise_only


def test_best_focus_is_at_zero_defocus():
    objective = STANDARD_OBJECTIVES[40.0]
    band = (OTF_TABLE_FREQUENCIES >= 0.2) & (OTF_TABLE_FREQUENCIES <= 1.0)
    defocus = np.linspace(-0.4, 0.4, 17)
    contrast = [radial_otf_table(objective, 0.53, d)[band].mean() for d in defocus]
    assert abs(defocus[int(np.argmax(contrast))]) <= 0.05


def test_asymmetry_comes_from_spherical_aberration():
    objective = STANDARD_OBJECTIVES[40.0]
    corrected = dataclasses.replace(objective, spherical_aberration_waves=0.0)
    for defocus in (0.5, 1.0, 2.0):
        aberrated_gap = np.abs(radial_otf_table(objective, 0.53, defocus)
                               - radial_otf_table(objective, 0.53, -defocus)).max()
        corrected_gap = np.abs(radial_otf_table(corrected, 0.53, defocus)
                               - radial_otf_table(corrected, 0.53, -defocus)).max()
        assert aberrated_gap > 0.05
        assert corrected_gap < 1e-3


@pytest.mark.parametrize("magnification", [20, 40])
def test_sharpness_peaks_at_true_focal_z(microscope, magnification):
    focal_z = microscope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM)
    z_step = microscope.depth_of_field_um(magnification) / 3
    # The sweep grid is offset from the focal z so the peak is not trivially a grid point.
    z_values = focal_z + 0.37 * z_step + z_step * np.arange(-9, 9)
    sharpness = [brenner(microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, z, magnification,
                                                       roi=PATCH).image_rgb8) for z in z_values]
    best_z = z_values[int(np.argmax(sharpness))]
    assert abs(best_z - focal_z) <= z_step
    assert max(sharpness) > 2 * min(sharpness)


def test_in_focus_otf_matches_diffraction_limit():
    corrected = dataclasses.replace(STANDARD_OBJECTIVES[20.0], spherical_aberration_waves=0.0)
    otf = radial_otf_table(corrected, 0.53, 0.0)
    assert np.abs(otf - diffraction_limited_mtf(OTF_TABLE_FREQUENCIES)).max() < 0.02


def test_defocus_lowers_mid_frequency_contrast_monotonically():
    objective = STANDARD_OBJECTIVES[20.0]
    mid = len(OTF_TABLE_FREQUENCIES) // 4   # 0.5 NA / lambda
    contrast = [abs(radial_otf_table(objective, 0.53, d)[mid]) for d in (0.0, 0.5, 1.0, 2.0)]
    assert contrast == sorted(contrast, reverse=True)


def test_large_defocus_uses_geometric_blur_continuously():
    objective = STANDARD_OBJECTIVES[40.0]
    # Around the switch to the geometric model the low-frequency OTF stays close.
    wave = radial_otf_table(objective, 0.53, 28.0)[:8]
    geometric = radial_otf_table(objective, 0.53, 33.0)[:8]
    assert np.abs(wave - geometric).max() < 0.15


def test_depth_of_field_shrinks_with_numerical_aperture():
    dof = [depth_of_field_um(STANDARD_OBJECTIVES[m], 6.5) for m in (10.0, 20.0, 40.0)]
    assert dof[0] > dof[1] > dof[2]
    assert 1.0 < dof[1] < 2.0          # 20x/0.75: lambda/NA^2 + e/(M NA) = 0.98 + 0.43 um


def test_invalid_camera_and_objective_rejected():
    with pytest.raises(OpticsError, match="bit_depth"):
        Camera(bit_depth=9)
    with pytest.raises(OpticsError, match="numerical_aperture"):
        dataclasses.replace(STANDARD_OBJECTIVES[20.0], numerical_aperture=1.2)


def test_colour_channels_focus_at_their_chromatic_shift():
    objective = dataclasses.replace(STANDARD_OBJECTIVES[20.0], axial_chromatic_um=(1.5, 0.0, -1.5))
    microscope = VirtualMicroscope(seed=5, objectives={20.0: objective})
    focal_z = microscope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM)
    z_values = focal_z + np.arange(-3.0, 3.01, 0.25)
    images = [microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, z, 20, roi=PATCH).image_rgb8 for z in z_values]

    def best_offset(channel):
        sharpness = [brenner(np.repeat(image[..., channel:channel + 1], 3, axis=2))
                     for image in images]
        return z_values[int(np.argmax(sharpness))] - focal_z

    red, green, blue = (best_offset(c) for c in range(3))
    # A channel focused 1.5 um further away is sharp with the stage 1.5 um lower.
    assert red - green == pytest.approx(-1.5, abs=0.3)
    assert blue - green == pytest.approx(1.5, abs=0.3)


# ---------------------------------------------------------------------------------------------------
# Partially coherent illumination and specimen phase


def _pupil(objective, wavelength_um, defocus_um, frequency_per_um):
    """Objective pupil (defocus + spherical aberration, as in optics.py) at spatial frequencies."""
    na, n = objective.numerical_aperture, objective.immersion_index
    rho = frequency_per_um * wavelength_um / na
    spherical = objective.spherical_aberration_waves * REFERENCE_WAVELENGTH_UM / wavelength_um
    inside = rho <= 1.0
    rho = np.where(inside, rho, 0.0)
    waves = (-defocus_um / wavelength_um * (np.sqrt(n * n - (na * rho) ** 2) - n)
             + spherical * np.sqrt(5.0) * (6 * rho ** 4 - 6 * rho ** 2 + 1))
    return np.where(inside, np.exp(2j * np.pi * waves), 0.0)


def _abbe_grating_response(objective, wavelength_um, defocus_um, frequency_per_um, fill, phase):
    """Image modulation per unit grating strength, by Abbe's method: every condenser point is a plane
    wave; the grating's +-1 orders go through the pupil; intensities add over the source. An
    independent route to the transfer functions (no Hankel transforms, no WOTF formula)."""
    strength = 1e-3
    radius = fill * objective.numerical_aperture / wavelength_um
    grid = np.linspace(-radius, radius, 201)
    sx, sy = np.meshgrid(grid, grid)
    inside = sx ** 2 + sy ** 2 <= radius ** 2
    sx, sy = sx[inside], sy[inside]
    direct = _pupil(objective, wavelength_um, defocus_um, np.hypot(sx, sy))
    plus = _pupil(objective, wavelength_um, defocus_um, np.hypot(sx + frequency_per_um, sy))
    minus = _pupil(objective, wavelength_um, defocus_um, np.hypot(sx - frequency_per_um, sy))
    order = (1j if phase else 1.0) * strength / 2   # t = 1 + (i) strength cos(2 pi f x)
    x = np.linspace(0.0, 1.0 / frequency_per_um, 32, endpoint=False)[:, None]
    carrier = np.exp(2j * np.pi * frequency_per_um * x)
    intensity = np.mean(np.abs(direct + order * (plus * carrier + minus / carrier)) ** 2, axis=1)
    relative = intensity / np.mean(np.abs(direct) ** 2) - 1.0
    modulation = 2 * np.mean(relative * np.cos(2 * np.pi * frequency_per_um * x[:, 0])) / strength
    # An absorption grating of amplitude strength modulates the transmitted intensity by 2 * strength.
    return modulation if phase else modulation / 2


@pytest.mark.parametrize("defocus_um", [-2.0, -0.7, 0.7, 2.0])
def test_transfer_functions_match_an_abbe_source_sum(defocus_um):
    objective, wavelength, fill = STANDARD_OBJECTIVES[20.0], 0.53, 0.7
    absorption, phase = transfer_tables(objective, wavelength, defocus_um, fill)
    paraxial_defocus = defocus_um + best_focus_shift_um(objective, wavelength, fill)
    for normalised in (0.3, 0.8, 1.4):   # units of NA / lambda; the cutoff is 1 + fill
        index = int(round(normalised / OTF_TABLE_FREQUENCIES[1]))
        frequency = normalised * objective.numerical_aperture / wavelength
        for table, is_phase in ((absorption, False), (phase, True)):
            expected = _abbe_grating_response(objective, wavelength, paraxial_defocus, frequency, fill, is_phase)
            assert table[index] == pytest.approx(expected, abs=0.02)


def test_phase_transfer_is_odd_in_defocus_and_absent_in_incoherent_light():
    corrected = dataclasses.replace(STANDARD_OBJECTIVES[40.0], spherical_aberration_waves=0.0)
    for defocus in (0.5, 1.5, 3.0):
        _, above = transfer_tables(corrected, 0.53, defocus, 0.7)
        _, below = transfer_tables(corrected, 0.53, -defocus, 0.7)
        assert np.abs(above).max() > 0.1
        assert np.abs(above + below).max() < 1e-3
        _, incoherent = transfer_tables(corrected, 0.53, defocus, 1.0)
        assert np.abs(incoherent).max() < 1e-3
    assert np.abs(transfer_tables(corrected, 0.53, 0.0, 0.7)[1]).max() < 1e-3


class _PhaseOnlySpecimen:
    """The synthetic tissue's optical path on clear glass: a transparent (unstained) section."""
    def __init__(self):
        self.slide = SyntheticSlide(seed=5)
        self.width_um, self.height_um = self.slide.width_um, self.slide.height_um

    def optical_density_and_path(self, *region):
        od, path_um = self.slide.optical_density_and_path(*region)
        return np.broadcast_to(GLASS_OD, od.shape).copy(), path_um

    def optical_density(self, *region):
        return self.optical_density_and_path(*region)[0]

    def tissue_bounds_um(self):
        return self.slide.tissue_bounds_um()


@pytest.mark.parametrize("magnification", [20, 40])
def test_defocus_turns_phase_into_contrast_that_inverts_through_focus(magnification):
    def contrast_images(fill):
        scope = VirtualMicroscope(specimen=_PhaseOnlySpecimen(), seed=5, condenser_fill=fill)
        focal_z = scope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM)
        defocus = scope.depth_of_field_um(magnification)
        images = []
        for offset in (defocus, -defocus, 0.0):
            image = scope.capture(TISSUE_X_UM, TISSUE_Y_UM, focal_z + offset, magnification, roi=PATCH,
                                  noise_seed=1).image_rgb8
            # Green: the reference wavelength, free of the objective's chromatic focus shift.
            smoothed = ndimage.gaussian_filter(image[..., 1].astype(np.float64), sigma=1)
            images.append(smoothed - smoothed.mean())
        return images

    above, below, in_focus = contrast_images(0.7)
    assert above.std() > 2 * in_focus.std()           # a transparent section shows when defocused
    assert np.corrcoef(above.ravel(), below.ravel())[0, 1] < -0.7   # dark above focus, bright below
    incoherent_above, _, _ = contrast_images(1.0)
    assert incoherent_above.std() < 0.5 * above.std()   # incoherent light shows no phase: only noise


def test_condenser_fill_out_of_range_rejected():
    with pytest.raises(OpticsError, match="condenser_fill"):
        VirtualMicroscope(seed=5, condenser_fill=1.3)
    with pytest.raises(OpticsError, match="condenser_fill"):
        transfer_tables(STANDARD_OBJECTIVES[20.0], 0.53, 1.0, 0.0)


def test_transfer_on_the_frequency_grid_interpolates_the_radial_tables():
    """OtfGrid interpolates both tables in one pass: each grid value is the tables' linear interpolation at the
    frequency's radius (0 beyond the cutoff), the negative rows mirroring the positive ones."""
    objective, wavelength_um, pixel_um = STANDARD_OBJECTIVES[20.0], 0.53, 0.325
    shape = (90, 72)
    grid = OtfGrid(shape, pixel_um)
    radius = np.hypot(np.fft.fftfreq(shape[0], pixel_um)[:, None], np.fft.rfftfreq(shape[1], pixel_um)[None, :])
    table_frequency = OTF_TABLE_FREQUENCIES * objective.numerical_aperture / wavelength_um
    for defocus_um in (0.0, 1.5, -4.0):
        grids = grid.evaluate(objective, wavelength_um, defocus_um, 0.7)
        for on_grid, table in zip(grids, transfer_tables(objective, wavelength_um, defocus_um, 0.7)):
            expected = np.interp(radius, table_frequency, table, right=0.0)
            assert on_grid.shape == radius.shape and on_grid.dtype == np.float32
            assert np.abs(on_grid - expected).max() < 1e-5
        assert np.abs(grids[1]).max() > 0.01 or defocus_um == 0.0    # the phase transfer is not left empty


def test_the_camera_noise_draw_is_standard_normal_and_independent():
    rng = np.random.default_rng(7)
    noise = standard_normal_float32(rng, (301, 400, 3))        # an odd count: one Box-Muller pair is cut
    assert noise.shape == (301, 400, 3) and noise.dtype == np.float32 and np.isfinite(noise).all()
    values = noise.ravel().astype(np.float64)
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1.0) < 0.01
    assert stats.kstest(values[::7], "norm").pvalue > 0.01
    # The two draws of a pair (here the first and second halves) and neighbouring pixels are independent.
    half = len(values) // 2
    assert abs(np.corrcoef(values[:half] ** 2, values[half:2 * half] ** 2)[0, 1]) < 0.01
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.01
    assert not np.array_equal(standard_normal_float32(rng, (4, 4)), standard_normal_float32(rng, (4, 4)))
