"""Scan timing model: stop-and-go against continuous strobed passes, tile order, z overlap, focus map."""
import dataclasses

import numpy as np
import pytest

from wsi_acquisition.optics import STANDARD_OBJECTIVES
from wsi_acquisition.planning import choose_focus_points, focus_sweeps, plan_tiles
from wsi_acquisition.scan_timing import (MAX_MOTION_BLUR_PX, CameraTiming, TimingError, fastest, focus_map_s,
                                         focus_point_count, motion_blur_px, pass_speed_um_s, scan_time,
                                         stop_and_go_s)
from wsi_acquisition.stage import StageDynamics

CAMERA_PIXEL_UM = 6.5
DYNAMICS = StageDynamics()


def plan_for(magnification, side_um=15_000.0):
    fov = 1024 * CAMERA_PIXEL_UM / magnification
    return plan_tiles(34_000.0, 5_000.0, side_um, side_um, fov, fov, overlap_fraction=0.1)


def tilted(x_um, y_um):
    return 1.5e-3 * x_um - 1.0e-3 * y_um      # 1.5 and 1 µm per mm


def timing(plan, strategy, camera, magnification=20.0, recapture_fraction=0.0):
    objective = STANDARD_OBJECTIVES[magnification]
    return scan_time(plan, strategy, objective, CAMERA_PIXEL_UM, DYNAMICS, camera, tilted,
                     choose_focus_points(plan, 10), focus_sweeps(1.4), recapture_fraction)


def test_stop_and_go_tiles_of_15_mm_at_20x_take_the_253_s_of_the_earlier_projection():
    plan = plan_for(20.0)
    moves, settles, exposures = stop_and_go_s([(t.x_um, t.y_um, 0.0) for t in plan.tiles], DYNAMICS, 8.0)
    assert len(plan.tiles) == 2500
    assert moves + settles + exposures == pytest.approx(253.0, abs=0.5)
    assert settles == pytest.approx(2499 * DYNAMICS.settle_s) and exposures == pytest.approx(2500 * 0.008)


def test_the_blur_criterion_chooses_strobed_passes_only_when_a_flash_is_short_enough():
    plan = plan_for(20.0)
    short = [timing(plan, s, CameraTiming(8.0, strobe_pulse_us=4.0)) for s in ("stop-and-go", "continuous")]
    chosen = fastest(short)
    assert chosen.strategy == "continuous"
    assert chosen.motion_blur_px <= MAX_MOTION_BLUR_PX and chosen.settles_s == 0 and chosen.exposures_s == 0
    # A flash of 2 ms holds the passes to 0.08 mm/s: stopping for every tile is faster.
    long = [timing(plan, s, CameraTiming(8.0, strobe_pulse_us=2000.0)) for s in ("stop-and-go", "continuous")]
    assert long[1].speed_limit == "motion blur"
    assert long[1].motion_blur_px == pytest.approx(MAX_MOTION_BLUR_PX)
    assert fastest(long).strategy == "stop-and-go"


def test_every_limit_of_the_pass_speed_is_honoured():
    plan = plan_for(20.0)
    pixel = CAMERA_PIXEL_UM / 20.0
    cases = {"stage top speed": (CameraTiming(8.0, frame_rate_hz=1000.0, strobe_pulse_us=1.0), 0.0),
             "camera frame rate": (CameraTiming(8.0, frame_rate_hz=20.0, strobe_pulse_us=1.0), 0.0),
             "motion blur": (CameraTiming(8.0, frame_rate_hz=1000.0, strobe_pulse_us=50.0), 0.0),
             "z tracking": (CameraTiming(8.0, frame_rate_hz=1000.0, strobe_pulse_us=1.0), 0.2)}
    for expected, (camera, z_slope) in cases.items():
        speed, limit = pass_speed_um_s(plan, pixel, DYNAMICS, camera, z_slope)
        assert limit == expected
        assert speed <= DYNAMICS.xy_speed_um_s
        assert speed <= plan.step_x_um * camera.frame_rate_hz * (1 + 1e-12)
        assert motion_blur_px(speed, camera.strobe_pulse_us, pixel) <= MAX_MOTION_BLUR_PX * (1 + 1e-12)
        assert speed * z_slope <= DYNAMICS.z_speed_um_s * (1 + 1e-12)


def test_serpentine_order_is_shorter_than_raster():
    plan = plan_for(20.0, side_um=3_000.0)
    serpentine = [(t.x_um, t.y_um, 0.0) for t in plan.tiles]
    raster = [(t.x_um, t.y_um, 0.0) for t in sorted(plan.tiles, key=lambda t: (t.row, t.col))]
    assert sorted(serpentine) == sorted(raster) and serpentine != raster
    assert sum(stop_and_go_s(serpentine, DYNAMICS, 8.0)) < sum(stop_and_go_s(raster, DYNAMICS, 8.0))


def test_z_overlapped_with_xy_is_never_longer_than_sequential():
    rng = np.random.default_rng(4)
    for _ in range(50):
        positions = rng.uniform([0, 0, -20], [2_000, 2_000, 20], size=(rng.integers(2, 12), 3))
        positions[rng.random(len(positions)) < 0.3, 2] = 0.0
        overlapped = stop_and_go_s(positions, DYNAMICS, 8.0, overlap_z=True)
        sequential = stop_and_go_s(positions, DYNAMICS, 8.0, overlap_z=False)
        assert overlapped[0] <= sequential[0] and overlapped[1:] == sequential[1:]
    level = [(0.0, 0.0, 0.0), (300.0, 0.0, 0.0), (300.0, 300.0, 0.0)]
    assert stop_and_go_s(level, DYNAMICS, 8.0, True) == stop_and_go_s(level, DYNAMICS, 8.0, False)


def test_continuous_z_sweeps_measure_the_focus_map_faster_than_z_steps():
    plan = plan_for(20.0, side_um=5_000.0)
    points = choose_focus_points(plan, 9)
    camera = CameraTiming(8.0)
    stepped = focus_map_s(points, tilted, focus_sweeps(1.4), DYNAMICS, camera, continuous=False)
    passes = focus_map_s(points, tilted, focus_sweeps(1.4), DYNAMICS, camera, continuous=True)
    assert 0 < passes < stepped / 2


def test_focus_points_follow_the_tissue_area_and_the_field_curvature():
    objective = STANDARD_OBJECTIVES[20.0]
    small, large = plan_for(20.0, side_um=3_000.0), plan_for(20.0)
    assert focus_point_count(small, objective, CAMERA_PIXEL_UM) == 10         # the quadratic trend's minimum
    points = focus_point_count(large, objective, CAMERA_PIXEL_UM)
    assert 10 < points < 100
    curved = dataclasses.replace(objective, field_curvature_um=2 * objective.field_curvature_um)
    assert focus_point_count(large, curved, CAMERA_PIXEL_UM) > points
    with pytest.raises(TimingError, match="field curvature"):
        focus_point_count(large, dataclasses.replace(objective, field_curvature_um=20.0), CAMERA_PIXEL_UM)


def test_recaptures_cost_a_z_move_when_stopped_and_a_tour_after_passes():
    plan = plan_for(20.0, side_um=6_000.0)
    camera = CameraTiming(8.0)
    for strategy in ("stop-and-go", "continuous"):
        none, some = timing(plan, strategy, camera), timing(plan, strategy, camera, recapture_fraction=0.02)
        assert none.recaptures == 0 and none.recaptures_s == 0
        assert some.recaptures == round(0.02 * len(plan.tiles)) and some.recaptures_s > 0
        assert some.total_s - none.total_s == pytest.approx(some.recaptures_s)
    with pytest.raises(TimingError):
        timing(plan, "stop-and-go", camera, recapture_fraction=1.0)
    with pytest.raises(TimingError, match="strategy"):
        timing(plan, "line-scan", camera)
