"""Calibration on the slide itself is judged on fields its sweeps never saw."""
import dataclasses

import numpy as np
import pytest

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_autofocus import heldout_imaging, slide_calibration
from wsi_autofocus.content import EVALUATION_IMAGES, RealImageSpecimen
from wsi_autofocus.data import in_focus_tissue_fraction
from wsi_autofocus.shift_evaluation import PROCEDURAL, CalibrationSpec
from wsi_autofocus.two_shot import default_step_um


def _widest_pixel_um(spec):
    return max(scope.pixel_size_um(spec.sweeps.magnification) for scope in heldout_imaging.HELD_OUT_SCOPES.values())


def _pixel_um(spec, scope_name: str) -> float:
    return heldout_imaging.HELD_OUT_SCOPES[scope_name].pixel_size_um(spec.sweeps.magnification)


def test_procedural_test_fields_lie_clear_of_every_sweep_field():
    spec = slide_calibration.SlideCalibrationSpec()
    _, sweeps, tests = slide_calibration._fields(spec, PROCEDURAL, np.random.default_rng(0),
                                                 _pixel_um(spec, "abbe-astigmatic"))
    assert len(sweeps) == spec.sweeps.sweeps and len(tests) == spec.test_tiles
    half_fields_um = (spec.test_tile_px + spec.sweeps.tile_px) / 2 * _widest_pixel_um(spec)
    gaps = np.abs(tests[:, None, :] - sweeps[None, :, :]).max(axis=2)
    assert gaps.min() > half_fields_um


@pytest.mark.slow
def test_procedural_test_fields_show_tissue_to_the_microscope_that_images_them():
    """Test fields are drawn again until their field shows tissue in focus, over the area the microscope that
    images them sees: the Gaussian-lit microscope's 0.225 µm pixels see less of the slide than the virtual
    microscope's 0.325 µm, and one of its test fields checked over the virtual microscope's field was bare glass."""
    spec = slide_calibration.SlideCalibrationSpec()
    magnification, pixel_um = spec.sweeps.magnification, _pixel_um(spec, "abbe-gaussian")
    seed = [spec.seed, list(heldout_imaging.HELD_OUT_SCOPES).index("abbe-gaussian"),
            slide_calibration.SLIDES.index(PROCEDURAL)]

    def tissue_seen(min_fraction: float, checked_pixel_um: float) -> np.ndarray:
        """Tissue each test field shows to the Gaussian-lit microscope, the fields drawn with a check over the
        field of `checked_pixel_um` pixels."""
        specimen, _, tests = slide_calibration._fields(
            dataclasses.replace(spec, min_field_tissue_fraction=min_fraction), PROCEDURAL,
            np.random.default_rng(seed), checked_pixel_um)
        microscope = VirtualMicroscope(specimen=specimen, seed=0)
        return np.array([in_focus_tissue_fraction(microscope, x, y, magnification, spec.test_tile_px, pixel_um)
                         for x, y in tests])

    virtual_pixel_um = VirtualMicroscope(seed=0).pixel_size_um(magnification)
    assert pixel_um < virtual_pixel_um
    assert np.sum(tissue_seen(0.0, pixel_um) < 0.01) >= 1
    assert tissue_seen(spec.min_field_tissue_fraction, virtual_pixel_um).min() < 0.01
    assert tissue_seen(spec.min_field_tissue_fraction, pixel_um).min() >= spec.min_field_tissue_fraction


def _rows_in_image(specimen: RealImageSpecimen, points: np.ndarray) -> np.ndarray:
    """Height fraction inside the (possibly mirrored) copy of the image each point lies in."""
    height = specimen._image_um[0]
    copy, within = np.divmod(points[:, 1], height)
    return np.where(copy % 2 == 0, within, height - within) / height


def test_real_image_sweeps_and_tests_come_from_bands_a_field_apart():
    spec = slide_calibration.SlideCalibrationSpec()
    specimen, sweeps, tests = slide_calibration._fields(spec, "real-he", np.random.default_rng(0),
                                                        _pixel_um(spec, "abbe-astigmatic"))
    sweep_rows, test_rows = _rows_in_image(specimen, sweeps), _rows_in_image(specimen, tests)
    assert sweep_rows.max() < slide_calibration.SWEEP_ROWS[1] and test_rows.min() >= slide_calibration.TEST_ROWS[0]
    gap_um = (test_rows.min() - sweep_rows.max()) * specimen._image_um[0]
    assert gap_um > (spec.test_tile_px + spec.sweeps.tile_px) / 2 * _widest_pixel_um(spec)


def test_a_band_without_tissue_is_refused():
    specimen = RealImageSpecimen(EVALUATION_IMAGES["real-he"])
    with pytest.raises(ValueError, match="rows"):
        specimen.tissue_points(np.random.default_rng(0), 3, rows=(0.5, 0.5))


def test_every_test_field_has_its_second_exposure_one_step_higher():
    spec = slide_calibration.SlideCalibrationSpec(sweeps=CalibrationSpec(sweeps=2, tile_px=64), test_tiles=3,
                                                  test_tile_px=96)
    tiles = slide_calibration.render_slide(spec, "abbe-gaussian", "real-he")["tiles"]
    assert tiles["images_above"].shape == tiles["images"].shape == (3, 96, 96, 3)
    assert np.all(tiles["step_above_um"] == pytest.approx(default_step_um(0.75)))
    assert not np.array_equal(tiles["images_above"], tiles["images"])


def test_each_test_field_is_swept_about_best_focus_once(tmp_path):
    """A test field's own sweep (as a focus map would take it, centred on best focus whatever the field's defocus)
    finds focus within a depth of field of best focus; a second evaluation reads it from the cache."""
    spec = slide_calibration.SlideCalibrationSpec(sweeps=CalibrationSpec(sweeps=2, tile_px=64), test_tiles=3,
                                                  test_tile_px=96)
    cell = ("abbe-gaussian", "real-he")
    rendered = {cell: slide_calibration.render_slide(spec, *cell)}
    logged = []
    swept = slide_calibration.with_sweep_focus(spec, rendered, tmp_path, workers=1, log=logged.append)
    tiles = swept[cell]["tiles"]
    assert tiles["sweep_focus_um"].shape == (3,) and len(logged) == 1
    assert np.all(np.abs(tiles["sweep_focus_um"]) < tiles["depth_of_field_um"])
    assert np.abs(tiles["true_um"]).max() > 2 * tiles["depth_of_field_um"].max()
    again = slide_calibration.with_sweep_focus(spec, rendered, tmp_path, workers=1, log=logged.append)
    assert len(logged) == 1
    np.testing.assert_array_equal(again[cell]["tiles"]["sweep_focus_um"], tiles["sweep_focus_um"])
