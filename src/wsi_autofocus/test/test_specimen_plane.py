"""The specimen plane of a sweep, found from its through-focus band powers: judged on a held-out microscope
(an image formation the fit's weak-object model did not write), against the plane the evaluation calls best
focus (z = 0)."""
import dataclasses

import numpy as np
import pytest

from wsi_autofocus import heldout_imaging
from wsi_autofocus.calibration_store import ZStack, stacks_with_focus
from wsi_autofocus.content import EVALUATION_IMAGES, RealImageSpecimen
from wsi_autofocus.shift_evaluation import CalibrationSpec, imaging_condenser
from wsi_autofocus.specimen_plane import specimen_plane_z_um

SCOPE_NAME = "abbe-astigmatic"
# Optical path per unit of absorbance: twice the evaluation's real H&E's (0.04), which puts the sharpest image
# 0.25-0.3 µm above the specimen under this microscope (0.08-0.1 µm at 0.04).
STAIN_PATH_UM_PER_OD = 0.08


def _sweeps(path_um_per_od: float, fields: int) -> list[ZStack]:
    """Focus-map-like sweeps about best focus of real H&E fields under the held-out astigmatic microscope."""
    scope = heldout_imaging.HELD_OUT_SCOPES[SCOPE_NAME]
    specimen = RealImageSpecimen(EVALUATION_IMAGES["real-he"], path_um_per_od=path_um_per_od)
    z_um = CalibrationSpec().z_offsets_um()
    stacks = []
    for x, y in specimen.tissue_points(np.random.default_rng(5), fields):
        rng = np.random.default_rng(1)
        images = np.stack([heldout_imaging.capture(scope, specimen, float(x), float(y), float(z), 20.0, 256,
                                                   rng).image_rgb8 for z in z_um])
        stacks.append(ZStack(images, z_um, scope.pixel_size_um(20.0), 0.75))
    return stacks


@pytest.fixture(scope="module")
def stained_sweeps():
    return _sweeps(STAIN_PATH_UM_PER_OD, 2)


def _plane_and_sharpest(stack: ZStack) -> tuple[float, float]:
    sharpest = stack.focus_z_um()
    return specimen_plane_z_um(stack.images, stack.z_um, stack.pixel_size_um, stack.numerical_aperture, sharpest,
                               imaging_condenser(SCOPE_NAME)), sharpest


@pytest.mark.slow
def test_the_plane_of_a_specimen_whose_stain_shifts_phase_lies_nearer_best_focus_than_its_sharpest_image(
        stained_sweeps):
    plane, sharpest = _plane_and_sharpest(stained_sweeps[0])
    assert sharpest > 0.2
    assert abs(plane) < 0.08


@pytest.mark.slow
def test_the_plane_of_an_absorbing_specimen_is_its_sharpest_image_and_best_focus():
    plane, sharpest = _plane_and_sharpest(_sweeps(0.0, 1)[0])
    assert abs(plane) < 0.06 and abs(plane - sharpest) < 0.06


@pytest.mark.slow
def test_a_calibration_labels_its_sweeps_from_the_specimen_plane_and_keeps_a_focus_it_was_given(stained_sweeps):
    given = dataclasses.replace(stained_sweeps[0], best_focus_z_um=0.3)
    usable, skipped = stacks_with_focus([*stained_sweeps, given], lambda message: None, imaging_condenser(SCOPE_NAME))
    sharpest = [stack.focus_z_um() for stack in stained_sweeps]
    labels = [stack.best_focus_z_um for stack in usable]
    assert not skipped and min(sharpest) > 0.2
    assert abs(np.mean(labels[:2])) < 0.08
    # One offset for the slide: every sweep moved alike.
    assert labels[0] - sharpest[0] == pytest.approx(labels[1] - sharpest[1])
    assert labels[2] == 0.3


def test_a_camera_too_coarse_to_sample_the_fitted_bands_leaves_the_sharpest_image():
    """2 µm pixels under a 0.75 NA objective sample nothing above 0.18 NA/lambda: no plane to fit, nothing moved."""
    rng = np.random.default_rng(0)
    images = rng.integers(40, 220, (9, 64, 64, 3), dtype=np.uint8)
    assert specimen_plane_z_um(images, np.arange(-2.0, 2.01, 0.5), 2.0, 0.75, 0.3, imaging_condenser(SCOPE_NAME)) == 0.3
