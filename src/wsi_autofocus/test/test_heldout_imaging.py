"""The evaluation's held-out microscopes and the training's randomised optics: physically right, and apart.

The evaluation can only be trusted to measure generalisation if its image formation is not the
training's: these tests fail if the training path starts to use the held-out module (or the held-out
module the training optics), if the two stop differing, or if either breaks the physics both must obey.
"""
import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

from wsi_acquisition import optics as simulator_optics
from wsi_acquisition.microscope import VirtualMicroscope
from wsi_autofocus import content, heldout_imaging, training_optics
from wsi_autofocus.data import SPLITS, specimen_for_seed, tissue_points
from wsi_common.focus_metrics import brenner, refine_peak

SCOPE = heldout_imaging.HELD_OUT_SCOPES["abbe-astigmatic"]


def _modules_loaded_by(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_training_path_never_loads_the_held_out_microscopes():
    for module in ("wsi_autofocus.data", "wsi_autofocus.training", "wsi_autofocus.training_optics",
                   "wsi_autofocus.two_shot_training"):
        assert "wsi_autofocus.heldout_imaging" not in _modules_loaded_by(module), module


def test_held_out_microscopes_share_no_code_with_either_simulator():
    loaded = _modules_loaded_by("wsi_autofocus.heldout_imaging")
    assert "wsi_acquisition.optics" not in loaded and "wsi_autofocus.training_optics" not in loaded


def test_no_evaluation_image_is_a_training_texture():
    assert not set(content.EVALUATION_IMAGES) & set(content.TRAINING_IMAGES)
    for split in ("train", "val"):
        assert set(SPLITS[split].texture_images) <= set(content.TRAINING_IMAGES)
    assert not set(SPLITS["train"].texture_images) & set(SPLITS["val"].texture_images)


def _phase_bump(size: int, pixel_um: float, opd_um: float = 0.05):
    yy, xx = np.mgrid[:size, :size] - size / 2
    return (opd_um * np.exp(-(xx ** 2 + yy ** 2) / (2 * (2.0 / pixel_um) ** 2))).astype(np.float32)


def _centre(image):
    middle = image.shape[0] // 2
    return float(image[middle - 2:middle + 3, middle - 2:middle + 3].mean())


def test_every_path_shows_a_denser_region_dark_above_focus_and_bright_below():
    """Defocus turns phase into contrast whose sign is fixed by physics (transport of intensity): all three
    image formations must agree on it, or an evaluation would count a convention as a sign error."""
    size, pixel = 192, SCOPE.pixel_size_um(20.0)
    opd = _phase_bump(size, pixel)
    clear = np.zeros((size, size, 3), np.float32)
    held_out = {d: _centre(heldout_imaging.coherent_sum_intensity(SCOPE, 20.0, clear, opd, d, np.random.default_rng(0))[..., 1])
                for d in (-2.0, 2.0)}
    optics = training_optics.TrainingOptics(20.0, 0.75, 5.5, 0.6, (), 0.0, (0.61, 0.53, 0.465), (0.0, 0.0, 0.0))
    trained = {d: _centre(training_optics.image_irradiance(optics, clear, opd, d, 0.0)[..., 1]) for d in (-2.0, 2.0)}
    for name, centres in (("held-out", held_out), ("training", trained)):
        assert centres[2.0] < 0.98 < 1.02 < centres[-2.0], f"{name}: {centres}"


def test_every_path_images_densely_stained_tissue_sharper_above_focus_than_below():
    """A stained nucleus also delays the light: above focus its phase darkens it as its stain does, below focus
    it works against the stain. Abbe's exact sum (the held-out microscopes, here without aberrations) images
    procedural tissue twice as sharp 0.5 µm above focus as 0.5 µm below; each path the models learn from must
    put the sharper image on the same side."""
    seed = SPLITS["train"].specimen_seeds[0]
    microscope = VirtualMicroscope(specimen=specimen_for_seed(seed), seed=seed)
    (x, y), = tissue_points(microscope, np.random.default_rng(3), 1)
    aberration_free = dataclasses.replace(SCOPE, objectives=tuple(
        dataclasses.replace(objective, pupil=heldout_imaging.SeidelPupil()) for objective in SCOPE.objectives))
    side, pixel = 320, SCOPE.pixel_size_um(20.0)
    od, opd = microscope.specimen.optical_density_and_path(x - side / 2 * pixel, y - side / 2 * pixel, side, side,
                                                           pixel)
    optics = training_optics.TrainingOptics(20.0, 0.75, 5.5, 0.55, (), 0.0, (0.61, 0.53, 0.465), (0.0, 0.0, 0.0))
    focal_z = float(microscope.focal_z_um(x, y))
    images = {
        "held-out": lambda d: heldout_imaging.coherent_sum_intensity(aberration_free, 20.0, od, opd, d,
                                                                     np.random.default_rng(0)),
        "training": lambda d: training_optics.image_irradiance(optics, od, opd, d, 0.0),
        "virtual microscope": lambda d: microscope.capture(x, y, focal_z + d, 20.0,
                                                           roi=microscope.camera.centre_roi(256)).image_rgb8 / 255.0}

    def sharpness(image):
        return brenner(np.clip(image[32:-32, 32:-32] * 200, 0, 255).astype(np.uint8))

    above_over_below = {name: sharpness(image(0.5)) / sharpness(image(-0.5)) for name, image in images.items()}
    assert above_over_below["held-out"] > 1.5
    assert min(above_over_below.values()) > 1.0, above_over_below


def test_randomised_optics_reduce_to_the_virtual_microscope_for_a_symmetric_pupil():
    """Two methods for one physics: the 2-D correlation of the training optics and the Hankel transforms
    of the simulator agree on the weak-object transfer functions where both apply."""
    objective = simulator_optics.STANDARD_OBJECTIVES[20.0]
    optics = training_optics.TrainingOptics(20.0, 0.75, 6.5, 0.7, ((4, 0, 0.06),), 0.0, (0.61, 0.53, 0.465),
                                            (0.0, 0.0, 0.0))
    shape, pixel = (256, 256), optics.pixel_size_um
    grid = simulator_optics.OtfGrid(shape, pixel)
    shift = simulator_optics.best_focus_shift_um(objective, 0.53, 0.7)
    assert training_optics.best_focus_shift_um(optics) == pytest.approx(shift, abs=0.03)
    for defocus in (0.0, 2.0, -5.0):
        absorption, phase = training_optics.transfer_functions(optics, 0.53, defocus + shift, shape, pixel)
        reference_absorption, reference_phase = grid.evaluate(objective, 0.53, defocus, 0.7)
        assert np.abs(absorption.real - reference_absorption).max() < 0.05
        assert np.abs(phase.real - reference_phase).max() < 0.05
        assert np.abs(absorption.imag).max() < 1e-3 and np.abs(phase.imag).max() < 1e-3


def test_astigmatism_makes_the_transfer_function_depend_on_direction():
    optics = training_optics.TrainingOptics(20.0, 0.75, 6.5, 0.7, ((2, 2, 0.15),), 0.0, (0.61, 0.53, 0.465),
                                            (0.0, 0.0, 0.0))
    transfer = training_optics.weak_object_transfer(optics, 0.53, 1.0)
    along_x, along_y = transfer(np.array([0.0]), np.array([0.8])), transfer(np.array([0.8]), np.array([0.0]))
    assert abs(along_x[0].real - along_y[0].real) > 0.05


def test_the_transfer_on_an_images_frequency_grid_is_the_pointwise_interpolation():
    optics = training_optics.TrainingOptics(20.0, 0.75, 6.5, 0.7, ((2, 2, 0.15),), 0.0, (0.61, 0.53, 0.465),
                                            (0.0, 0.0, 0.0))
    # Beyond the table's edge (the finest pixel reaches past it) both read 0.
    fy, fx = np.fft.fftfreq(96, d=0.1), np.fft.rfftfreq(80, d=0.1)
    for defocus_um in (0.0, 7.0):
        transfer = training_optics.weak_object_transfer(optics, 0.53, defocus_um)
        grid = transfer.on_grid(fy, fx)
        assert grid.shape == (96, 41)
        np.testing.assert_allclose(grid, transfer(fy[:, None], fx[None, :]), atol=1e-6)
        assert np.abs(grid).max() > 0.5 and grid[48, 0] == 0

def _held_out_sweep(specimen, x, y, defocus_values):
    rng = np.random.default_rng(3)
    return [heldout_imaging.capture(SCOPE, specimen, x, y, d, 20.0, 192, rng).image_rgb8 for d in defocus_values]


@pytest.mark.slow
def test_held_out_best_focus_is_where_the_image_is_sharpest_and_blur_grows_both_ways():
    specimen = content.RealImageSpecimen(content.EVALUATION_IMAGES["real-ihc"])
    (x, y), = specimen.tissue_points(np.random.default_rng(1), 1)
    defocus = np.array([-6.0, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0])
    scores = np.array([brenner(image) for image in _held_out_sweep(specimen, x, y, defocus)])
    assert int(np.argmax(scores)) in (2, 3, 4)
    assert scores[0] < scores[1] < scores[3] and scores[6] < scores[5] < scores[3]


@pytest.mark.slow
def test_an_absorbing_specimen_is_sharpest_at_the_held_out_best_focus_and_its_phase_moves_that():
    """The evaluation's best focus (the pupil's incoherent MTF) is where a sweep finds an absorbing specimen's focus;
    the optical path the specimen's stain adds moves its sharpest image off it, which no sweep can see: why a
    calibration's labels and the evaluation's truth differ by tenths of a µm (the cards' "labels off")."""
    scope = heldout_imaging.HELD_OUT_SCOPES["abbe-gaussian"]
    defocus = np.linspace(-1.0, 1.0, 9)
    peaks = {}
    for path_um_per_od in (0.0, 0.04):
        specimen = content.RealImageSpecimen(content.EVALUATION_IMAGES["real-he"], path_um_per_od=path_um_per_od)
        (x, y), = specimen.tissue_points(np.random.default_rng(5), 1)
        rng = np.random.default_rng(3)
        scores = [brenner(heldout_imaging.capture(scope, specimen, x, y, d, 20.0, 192, rng).image_rgb8) for d in defocus]
        peaks[path_um_per_od] = refine_peak(defocus, np.array(scores))
    assert abs(peaks[0.0]) < 0.06
    assert peaks[0.04] - peaks[0.0] > 0.1


def test_held_out_camera_noise_has_the_shot_noise_variance_and_draws_the_same_noise_whatever_the_irradiance():
    raw = dataclasses.replace(SCOPE.camera, srgb=False, jpeg_quality=None, illumination_falloff=0.0,
                              white_balance=(1.0, 1.0, 1.0))
    half_glass = np.full((256, 256, 3), 0.5, np.float32)
    red_sites = heldout_imaging.expose_bayer(half_glass, raw, np.random.default_rng(0))[0::2, 0::2, 0]
    electrons_per_level = raw.full_well_e / 255
    mean_e = 0.5 * raw.glass_fill * raw.full_well_e
    assert red_sites.mean() * electrons_per_level == pytest.approx(mean_e, rel=0.01)
    shot_and_read_e = math.sqrt(mean_e + raw.read_noise_e ** 2)
    assert red_sites.std() * electrons_per_level == pytest.approx(shot_and_read_e, rel=0.1)
    # An irradiance a little different (as another CPU's arithmetic leaves it) takes the same draws from the
    # stream: the images after it stay the same images (a Poisson sampler's draws depend on its mean).
    streams = [np.random.default_rng(1), np.random.default_rng(1)]
    first = [heldout_imaging.expose_bayer(half_glass * np.float32(scale), SCOPE.camera, rng)
             for scale, rng in zip((1.0, 1.00001), streams)]
    assert (first[0] != first[1]).mean() < 0.01
    after = [heldout_imaging.expose_bayer(half_glass, SCOPE.camera, rng) for rng in streams]
    assert np.array_equal(after[0], after[1])


def test_held_out_camera_is_a_bayer_sensor_with_its_own_response():
    rng = np.random.default_rng(0)
    glass = np.ones((64, 64, 3), np.float32)
    image = heldout_imaging.expose_bayer(glass, SCOPE.camera, rng)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    # sRGB-encoded glass at 75 % of full well reads about 225 of 255, not 191 as a linear camera would.
    assert 215 < image[24:40, 24:40].mean() < 235
    # Demosaicing: a mosaic of one colour per pixel comes back as full RGB everywhere.
    mosaic = np.zeros((8, 8), np.float32)
    mosaic[0::2, 0::2] = 1.0                       # only the red sites lit
    rgb = heldout_imaging.demosaic_rggb(mosaic)
    assert rgb[..., 0].mean() > 0.7 and rgb[..., 2].mean() < 0.3


def test_held_out_and_own_simulator_images_of_the_same_field_differ():
    """Same content, same defocus: a held-out microscope must not reproduce the training simulator's image."""
    from wsi_acquisition.microscope import VirtualMicroscope

    specimen = content.RealImageSpecimen(content.EVALUATION_IMAGES["real-ihc"])
    (x, y), = specimen.tissue_points(np.random.default_rng(2), 1)
    microscope = VirtualMicroscope(specimen=specimen, seed=0)
    own = microscope.capture(x, y, float(microscope.focal_z_um(x, y)) + 2.0, 20.0, roi=(416, 416, 192, 192)).image_rgb8
    scope = heldout_imaging.HELD_OUT_SCOPES["abbe-annular"]        # same 6.5 µm camera pixel: same sampling
    held_out = heldout_imaging.capture(scope, specimen, x, y, 2.0, 20.0, 192, np.random.default_rng(0)).image_rgb8
    difference = np.abs(own.astype(float) - held_out.astype(float)).mean()
    assert difference > 5.0, f"mean |difference| {difference:.1f} grey levels"


def test_mirrored_images_cover_the_plane_and_keep_their_tissue():
    specimen = content.RealImageSpecimen(content.EVALUATION_IMAGES["real-ihc"])
    points = specimen.tissue_points(np.random.default_rng(0), 20)
    for x, y in points:
        od, path = specimen.optical_density_and_path(x - 2, y - 2, 4, 4, 0.25)
        assert od.mean() > 0.05 and (path > 0).all()
    far = specimen.optical_density_and_path(12_000.0, 9_000.0, 64, 64, 0.5)[0]
    assert far.shape == (64, 64, 3) and np.isfinite(far).all()
    assert math.isclose(specimen.width_um, 25_000.0)
