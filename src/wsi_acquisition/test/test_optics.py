"""Image formation: through-focus asymmetry from spherical aberration, sharpness peaking at the true
focal z, transfer-function physics and depth of field."""
import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from wsi_acquisition.focus import brenner
from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import (OTF_TABLE_FREQUENCIES, STANDARD_OBJECTIVES, Camera, OpticsError,
                                    depth_of_field_um, diffraction_limited_mtf, radial_otf_table)

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
    # The sharpness differs too, not just the pixels.
    brenner_above = brenner(above)
    brenner_below = brenner(below)
    assert abs(brenner_above - brenner_below) > 0.1 * max(brenner_above, brenner_below)


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
