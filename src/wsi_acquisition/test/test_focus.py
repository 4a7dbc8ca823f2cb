import numpy as np
import pytest

from wsi_acquisition.focus import (BRACKET, CORRECTION, MIN_SHARPNESS_GAIN, OTHER_WAY, bracketing_offset,
                                   correction_captures, focus_action, kept_capture, probe_step_um, side_from_probe,
                                   trusts_estimate, two_shot_offset)
from wsi_acquisition.scan import FocusReply
from wsi_acquisition.microscope import VirtualMicroscope
from wsi_common.focus_metrics import SHARPNESS_METRICS, brenner, tissue_fraction

TISSUE_X_UM, TISSUE_Y_UM = 43_200.0, 12_300.0


@pytest.mark.parametrize("name", sorted(SHARPNESS_METRICS))
def test_every_metric_prefers_the_focused_image_and_ignores_exposure(name):
    microscope = VirtualMicroscope(seed=4)
    focal = microscope.focal_z_um(TISSUE_X_UM, TISSUE_Y_UM)
    roi = (384, 384, 256, 256)
    focused = microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, focal, 20, roi=roi, noise_seed=1).image_rgb8
    blurred = microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, focal + 4, 20, roi=roi, noise_seed=1).image_rgb8
    metric = SHARPNESS_METRICS[name]
    assert metric(focused) > 1.5 * metric(blurred)
    darker = (focused.astype(np.float64) * 0.6).astype(np.uint8)
    assert metric(darker) == pytest.approx(metric(focused), rel=0.1)


def test_tissue_fraction_separates_tissue_from_glass():
    microscope = VirtualMicroscope(seed=4)
    tissue = microscope.capture(TISSUE_X_UM, TISSUE_Y_UM, 0.0, 20, roi=(0, 0, 256, 256)).image_rgb8
    glass = microscope.capture(8_000.0, 5_000.0, 0.0, 20, roi=(0, 0, 256, 256)).image_rgb8
    assert tissue_fraction(tissue) > 0.5 and tissue_fraction(glass) < 0.05
    assert brenner(glass) < brenner(tissue)


def test_a_scan_trusts_an_estimate_only_when_its_sigma_is_below_half_the_depth_of_field():
    assert trusts_estimate(0.9, depth_of_field_um=3.0) and trusts_estimate(1.4, depth_of_field_um=3.0)
    assert not trusts_estimate(1.6, depth_of_field_um=3.0)
    # A depth of field thinner than 2 µm (high NA) still lets estimates with sigma under 1 µm through.
    assert trusts_estimate(0.8, depth_of_field_um=0.6) and not trusts_estimate(1.2, depth_of_field_um=0.6)


def test_a_tile_surely_out_of_focus_with_its_side_in_doubt_is_probed_one_distance_higher():
    dof = 1.4
    assert focus_action(0.0, 6.0, 6.0, 2.0, dof) == "probe"        # 6 µm away, 2 µm sure, side a coin toss
    assert focus_action(0.0, 6.0, 2.0, 2.0, dof) == "keep"         # might be in focus: leave it
    assert focus_action(-6.0, 0.3, 6.0, 0.3, dof) == "correct"     # side known too: move at once
    assert probe_step_um(dof, 6.0) == 6.0                          # below focus the probe lands in focus
    assert probe_step_um(dof, 0.5) == pytest.approx(2 * dof)       # near focus: far enough to tell the sides


def test_the_side_comes_from_the_probe_estimate_else_from_which_image_is_sharper():
    unsure = FocusReply(0.0, 6.0, 6.0, 1.0, 0.5)
    # 6 µm higher the probe reads 12 µm: the stage was above focus; reading ~0 µm: below.
    assert side_from_probe(unsure, FocusReply(12.0, 1.0), 6.0, 1.0, 1.0)[0] is True
    assert side_from_probe(unsure, FocusReply(0.3, 1.0), 6.0, 1.0, 1.0)[0] is False
    # No estimate of the probe (or an undecided one): sharpness decides, and only a measurable difference.
    assert side_from_probe(unsure, None, 6.0, sharpness=1.0, probe_sharpness=1.5) == (False, None)
    assert side_from_probe(unsure, None, 6.0, sharpness=1.5, probe_sharpness=1.0) == (True, None)
    assert side_from_probe(unsure, None, 6.0, sharpness=1.0, probe_sharpness=1.005) == (None, None)
    undecided, posterior = side_from_probe(FocusReply(0.0, 6.0, 6.0, 8.0, 0.5), FocusReply(9.0, 8.0), 6.0, 1.0, 1.0)
    assert undecided is None and 0.05 < posterior < 0.95


def test_two_exposures_move_the_stage_when_trusted_or_sure_of_the_side():
    depth_of_field_um = 1.4
    assert two_shot_offset(3.0, 0.5, 1.0, depth_of_field_um) == -3.0          # trusted
    assert two_shot_offset(-3.0, 1.5, 0.02, depth_of_field_um) == 3.0         # distance in doubt, side sure
    assert two_shot_offset(1.5, 2.0, 0.77, depth_of_field_um) is None         # neither
    assert two_shot_offset(0.5, 0.3, 0.95, depth_of_field_um) is None         # already within focus


def test_a_correction_still_out_of_focus_brackets_focus_in_the_ratio_of_the_two_distances():
    dof = 1.4
    # Read twice too long on a microscope the model never saw: 4 µm above focus read as 8, the correction
    # by -8 µm lands 4 µm below, read as 8 again. The two captures bracket focus half-way, whatever the factor.
    assert bracketing_offset(-8.0, 8.0, 8.0, 1.0, dof) == pytest.approx(-4.0)
    assert bracketing_offset(-8.0, 6.0, 2.0, 0.5, dof) == pytest.approx(-6.0)   # 6 µm, overshot by 2
    # A correction whose capture may be in focus is left alone.
    assert bracketing_offset(-8.0, 8.0, 1.0, 0.5, dof) is None


def _captures_of_a_tile(defocus_um: float, offset_um: float, estimate_distance=None) -> list:
    """`correction_captures` of a tile `defocus_um` from focus corrected by `offset_um`: a capture is its defocus,
    sharper nearer focus; `estimate_distance(defocus)` reads a capture's distance (None: no estimate)."""
    def sharpness(defocus):
        return 1.0 / (1.0 + defocus ** 2)

    def estimate(defocus):
        return None if estimate_distance is None else FocusReply(0.0, 5.0, estimate_distance(defocus), 0.2)

    return correction_captures(offset_um, abs(defocus_um), 1.4, lambda offset: defocus_um + offset, estimate,
                               sharpness, sharpness(defocus_um))


def test_a_correction_that_lost_sharpness_is_tried_the_same_distance_the_other_way():
    # 3 µm above focus, told below: the move up by 3 µm blurs the tile, so the scan tries 3 µm down.
    assert _captures_of_a_tile(3.0, 3.0) == [(CORRECTION, 3.0, 6.0), (OTHER_WAY, -3.0, 0.0)]
    # The right way needs nothing more, nor does a correction that fell short but still gained sharpness.
    assert _captures_of_a_tile(3.0, -3.0) == [(CORRECTION, -3.0, 0.0)]
    assert _captures_of_a_tile(3.0, -1.5) == [(CORRECTION, -1.5, 1.5)]
    # Through focus and twice as far: the bracketing capture finds focus, so the other way is not tried.
    assert _captures_of_a_tile(3.0, -9.0, abs) == [(CORRECTION, -9.0, -6.0), (BRACKET, -3.0, 0.0)]
    # A wrong way read as out of focus brackets on the wrong side too; then the other way.
    assert [kind for kind, _, _ in _captures_of_a_tile(3.0, 3.0, abs)] == [CORRECTION, BRACKET, OTHER_WAY]


def test_the_sharpest_correction_replaces_the_focus_maps_capture_only_if_measurably_sharper():
    assert kept_capture(1.0, [1.5, 3.0]) == 1
    assert kept_capture(1.0, [1.5, 0.4]) == 0
    assert kept_capture(1.0, [1.0 + MIN_SHARPNESS_GAIN / 2, 0.9]) is None
    assert kept_capture(1.0, []) is None
