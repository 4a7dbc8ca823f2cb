"""VirtualMicroscope: ground truth, noise statistics, ROI patches, illumination, overview."""
import dataclasses

import numpy as np
import pytest
import threadpoolctl

from wsi_acquisition.microscope import CaptureError, VirtualMicroscope
from wsi_acquisition.optics import STANDARD_OBJECTIVES, Camera, OpticsError
from wsi_acquisition.specimen import ImageSpecimen, SyntheticSlide
from wsi_common.focus_metrics import brenner

TISSUE_X_UM, TISSUE_Y_UM = 43_200.0, 12_300.0
GLASS_X_UM, GLASS_Y_UM = 8_000.0, 5_000.0


def test_ground_truth_defocus_is_stage_z_minus_focal_z():
    microscope = VirtualMicroscope(seed=2)
    z = 12.5
    capture = microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, z, 20, roi=(0, 0, 32, 32))
    focal = microscope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM)
    assert capture.focal_z_um == pytest.approx(focal)
    assert capture.defocus_um == pytest.approx(z - focal)
    assert (capture.stage_x_um, capture.stage_y_um, capture.stage_z_um) == (TISSUE_X_UM, TISSUE_Y_UM, z)
    assert capture.pixel_size_um == pytest.approx(6.5 / 20)
    assert capture.numerical_aperture == 0.75


def test_focal_surface_is_tilted_and_warped_but_smooth():
    microscope = VirtualMicroscope(seed=4)
    xs = np.linspace(36_000, 51_000, 31)
    z = microscope.focal_z_um(xs, np.full_like(xs, 12_500.0))
    assert np.ptp(z) > 2.0                            # across a 15 mm section: several DOF of relief
    assert np.abs(np.diff(z)).max() < 2.5             # but smooth over 0.5 mm steps


def test_captures_are_deterministic_per_seed_and_noise_differs_per_capture():
    first = VirtualMicroscope(seed=9)
    second = VirtualMicroscope(seed=9)
    roi = (100, 100, 64, 64)
    a = first.capture(TISSUE_X_UM, TISSUE_Y_UM, 0.0, 20, roi=roi)
    b = second.capture(TISSUE_X_UM, TISSUE_Y_UM, 0.0, 20, roi=roi)
    again = first.capture(TISSUE_X_UM, TISSUE_Y_UM, 0.0, 20, roi=roi)
    assert np.array_equal(a.raw, b.raw)
    assert not np.array_equal(a.raw, again.raw)
    assert again.capture_index == a.capture_index + 1
    assert np.abs(a.raw.astype(float) - again.raw).mean() < 0.03 * a.raw.mean()


@pytest.mark.parametrize("specimen", ["synthetic", "image"])
def test_render_threads_give_the_same_image_as_one(specimen):
    """Bands of the specimen and colour channels on threads: the same counts as one thread."""
    camera = Camera(width_px=320, height_px=400)       # 400 rows: bands of 256 and 144 with two threads
    if specimen == "image":
        texture = np.random.default_rng(3).integers(0, 256, (900, 900, 3), dtype=np.uint8)
        make = lambda threads: VirtualMicroscope(specimen=ImageSpecimen(texture, 0.25), camera=camera,
                                                 render_threads=threads)
    else:
        make = lambda threads: VirtualMicroscope(seed=4, camera=camera, render_threads=threads)
    one, two, three = make(1), make(2), make(3)
    x_um, y_um = (one.specimen.width_um / 2, one.specimen.height_um / 2) if specimen == "image" else \
        (TISSUE_X_UM, TISSUE_Y_UM)
    for defocus, roi in ((0.4, None), (-3.0, None), (-3.0, (130, 20, 200, 64))):
        z_um = one.focal_z_um(x_um, y_um) + defocus
        expected = one.capture(x_um, y_um, z_um, 20, noise_seed=5, roi=roi).raw
        for threaded in (two, three):
            assert np.array_equal(threaded.capture(x_um, y_um, z_um, 20, noise_seed=5, roi=roi).raw, expected)


class _SlideFailingOnce(SyntheticSlide):
    """A specimen whose next render raises (a render-thread task failing mid-capture)."""
    fail_next = False

    def optical_density_and_path(self, *args):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("specimen store unreadable")
        return super().optical_density_and_path(*args)


def test_an_error_on_a_render_thread_reaches_the_caller_and_the_next_capture_is_whole():
    """Render threads run a capture's tasks while later ones wait for them: a failing task fails the capture
    with its own error (not a hang or an image from half the tasks), and the next capture is the image one
    thread renders."""
    camera = Camera(width_px=256, height_px=300)
    failing = VirtualMicroscope(specimen=_SlideFailingOnce(seed=4), seed=4, camera=camera, render_threads=2)
    reference = VirtualMicroscope(seed=4, camera=camera)
    z_um = reference.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM) + 1.5
    failing.specimen.fail_next = True
    with pytest.raises(RuntimeError, match="specimen store unreadable"):
        failing.capture(TISSUE_X_UM, TISSUE_Y_UM, z_um, 20, noise_seed=5)
    expected = reference.capture(TISSUE_X_UM, TISSUE_Y_UM, z_um, 20, noise_seed=5).raw
    assert np.array_equal(failing.capture(TISSUE_X_UM, TISSUE_Y_UM, z_um, 20, noise_seed=5).raw, expected)


class _SlideRecordingBlasThreads(SyntheticSlide):
    """A specimen that records how many threads BLAS may use while it renders (its noise sums are BLAS products)."""

    def __init__(self, seed):
        super().__init__(seed=seed)
        self.blas_threads = []

    def optical_density_and_path(self, *args):
        self.blas_threads += [pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                              if pool["user_api"] == "blas"]
        return super().optical_density_and_path(*args)


def test_a_capture_keeps_blas_on_one_thread_and_restores_it_after():
    """Two render threads, each calling a BLAS that starts a thread per core, made a tile 1.8x slower: a capture
    runs BLAS on one thread whatever the process set, and gives the process its setting back."""
    slide = _SlideRecordingBlasThreads(seed=4)
    scope = VirtualMicroscope(specimen=slide, seed=4, camera=Camera(width_px=256, height_px=256), render_threads=2)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        scope.capture(TISSUE_X_UM, TISSUE_Y_UM, scope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM), 20)
        after = {pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"}
    assert slide.blas_threads and set(slide.blas_threads) == {1}
    assert after == {2}


def test_noise_statistics_match_shot_plus_read_noise():
    camera = Camera(bit_depth=16, full_well_e=30_000.0, read_noise_e=8.0, bright_field_e_per_ms=1_000.0)
    microscope = VirtualMicroscope(seed=1, camera=camera)
    roi = (448, 448, 128, 128)   # field centre: illumination flat to < 0.1 %
    counts_per_e = camera.max_adu / camera.full_well_e
    for exposure_ms, gain in ((5.0, 1.0), (20.0, 1.0), (5.0, 2.0)):
        raw = microscope.capture(GLASS_X_UM, GLASS_Y_UM, 0.0, 20, exposure_ms=exposure_ms, gain=gain,
                                 roi=roi).raw.astype(np.float64)
        electrons = raw / (counts_per_e * gain)
        glass_transmission = 10 ** -np.array([0.012, 0.010, 0.016])
        expected_mean = exposure_ms * camera.bright_field_e_per_ms * glass_transmission
        measured_mean = electrons.mean(axis=(0, 1))
        assert np.allclose(measured_mean, expected_mean, rtol=0.01)
        expected_var = expected_mean + camera.read_noise_e ** 2
        measured_var = electrons.var(axis=(0, 1))
        assert np.allclose(measured_var, expected_var, rtol=0.08)


def test_saturation_clips_at_full_well():
    microscope = VirtualMicroscope(seed=1)
    capture = microscope.capture(GLASS_X_UM, GLASS_Y_UM, 0.0, 20, exposure_ms=100.0, roi=(0, 0, 16, 16))
    assert capture.raw.max() == microscope.camera.max_adu
    assert capture.image_rgb8.max() == 255


def test_patch_roi_matches_the_same_pixels_of_the_full_frame():
    # A deep-well camera makes noise negligible, so the images can be compared pixel by pixel.
    camera = Camera(width_px=512, height_px=512, bit_depth=16, full_well_e=1e9, read_noise_e=0.0,
                    bright_field_e_per_ms=1e8)
    microscope = VirtualMicroscope(seed=3, camera=camera)
    z = microscope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM) + 1.5
    full = microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, z, 20).raw.astype(np.float64)
    patch = microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, z, 20, roi=(300, 40, 96, 128)).raw
    crop = full[300:396, 40:168]
    assert np.abs(patch - crop).max() < 2e-3 * full.max()
    assert np.abs(patch - full[301:397, 40:168]).mean() > 10 * np.abs(patch - crop).mean()


def test_vignetting_darkens_the_corners():
    microscope = VirtualMicroscope(seed=1, lamp_gradient=(0.0, 0.0))
    objective = microscope.objective(20)
    capture = microscope.capture(GLASS_X_UM, GLASS_Y_UM, 0.0, 20)
    image = capture.raw.astype(np.float64).mean(axis=2)
    centre = image[480:544, 480:544].mean()
    corner = image[:32, :32].mean()
    corner_radius = np.hypot(496, 496) * capture.pixel_size_um / objective.field_radius_um
    expected = 1.0 - objective.vignetting * corner_radius ** 2
    assert corner / centre == pytest.approx(expected, abs=0.01)


def test_field_curvature_moves_best_focus_at_the_field_edge():
    edge_roi = (448, 896, 128, 128)                   # centred 448 px right of the optical axis
    field_radius_um = (960 - 512) * 6.5 / 20

    def best_focus_offset(field_curvature_um):
        objective = dataclasses.replace(STANDARD_OBJECTIVES[20.0], field_curvature_um=field_curvature_um)
        # Enough blur levels to follow 20 um of curvature (the default 3 suit plan objectives).
        microscope = VirtualMicroscope(seed=5, objectives={20.0: objective}, max_blur_levels=12)
        focal = microscope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM)
        z_values = focal + np.arange(-5.0, 2.01, 0.25)
        sharpness = [brenner(microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, z, 20, roi=edge_roi).image_rgb8)
                     for z in z_values]
        return z_values[int(np.argmax(sharpness))] - focal, objective.field_radius_um

    flat, _ = best_focus_offset(0.0)     # the control: focal-surface slope and colour focus shifts
    curved, field_number_radius_um = best_focus_offset(20.0)
    expected_shift = -20.0 * (field_radius_um / field_number_radius_um) ** 2
    assert curved - flat == pytest.approx(expected_shift, abs=0.3)


def test_a_z_sweep_renders_the_specimen_once_and_matches_fresh_captures():
    class CountingSlide(SyntheticSlide):
        renders = 0

        def optical_density_and_path(self, *region):
            CountingSlide.renders += 1
            return super().optical_density_and_path(*region)

    roi = (384, 384, 64, 64)
    sweeping = VirtualMicroscope(seed=2, specimen=CountingSlide(seed=2))
    focal = sweeping.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM)
    for defocus in (-20.0, 6.0, 0.5, -2.0):     # the widest blur border first, as a sweep starts
        swept = sweeping.capture(TISSUE_X_UM, TISSUE_Y_UM, focal + defocus, 20, roi=roi, noise_seed=1).raw
        fresh = VirtualMicroscope(seed=2).capture(TISSUE_X_UM, TISSUE_Y_UM, focal + defocus, 20, roi=roi,
                                                  noise_seed=1).raw
        assert np.abs(swept.astype(int) - fresh).max() <= 1        # rounding of the cut region
    assert CountingSlide.renders == 1


def test_depth_of_field_and_field_of_view():
    microscope = VirtualMicroscope()
    assert microscope.field_of_view_um(20) == pytest.approx((1024 * 0.325, 1024 * 0.325))
    assert microscope.depth_of_field_um(40) < microscope.depth_of_field_um(20) < microscope.depth_of_field_um(10)


def test_overview_shows_tissue_darker_than_glass():
    microscope = VirtualMicroscope(seed=2)
    overview = microscope.capture_overview(pixel_size_um=50.0)
    assert overview.image_rgb8.shape == (500, 1500, 3)
    gray = overview.image_rgb8.mean(axis=2)
    tissue = gray[250, int(43_500 / 50)]
    glass = gray[50, 100]
    assert glass - tissue > 30


def test_invalid_requests_raise_clear_errors():
    microscope = VirtualMicroscope()
    with pytest.raises(CaptureError, match="60x"):
        microscope.capture(0, 0, 0, 60)
    with pytest.raises(CaptureError, match="roi"):
        microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, 0, 20, roi=(1000, 0, 100, 100))
    with pytest.raises(OpticsError, match="exposure_ms"):
        microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, 0, 20, exposure_ms=0, roi=(0, 0, 8, 8))
