import math

import numpy as np
import pytest

from wsi_acquisition.stage import (Axes, MoveGoalError, SimulatedStage, StageDynamics, StageLimitError, StageLimits,
                                   move_target, trapezoid_duration_s, trapezoid_fraction, trapezoid_time_s)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def exact_stage(clock, **dynamics):
    """A stage with no jitter (and no backlash unless asked), so positions can be checked exactly."""
    params = dict(xy_jitter_um=0.0, z_jitter_um=0.0, backlash_um=0.0, encoder_resolution_um=1e-6) | dynamics
    return SimulatedStage(StageLimits(), StageDynamics(**params), clock=clock,
                          start_um=(10_000.0, 10_000.0, 0.0))


def test_trapezoid_reaches_full_speed_on_long_moves_and_not_on_short_ones():
    assert trapezoid_duration_s(30_000, 30_000, 300_000) == pytest.approx(1.0 + 0.1)
    assert trapezoid_duration_s(100, 30_000, 300_000) == pytest.approx(2 * math.sqrt(100 / 300_000))
    halfway = trapezoid_duration_s(30_000, 30_000, 300_000) / 2
    assert trapezoid_fraction(halfway, 30_000, 30_000, 300_000) == pytest.approx(0.5)
    fractions = [trapezoid_fraction(t, 500, 30_000, 300_000) for t in np.linspace(0, 0.1, 50)]
    assert np.all(np.diff(fractions) >= 0) and fractions[-1] == 1.0


@pytest.mark.parametrize("distance_um", [0.5, 60.0, 30_000.0])   # ramps only, and a stretch at full speed
def test_the_time_a_move_takes_to_cover_a_distance_inverts_its_progress(distance_um):
    total = trapezoid_duration_s(distance_um, 280.0, 50_000.0)
    for t in np.linspace(0.0, total, 23):
        covered = trapezoid_fraction(t, distance_um, 280.0, 50_000.0) * distance_um
        assert trapezoid_time_s(covered, distance_um, 280.0, 50_000.0) == pytest.approx(t, abs=1e-9)


def test_a_z_speed_cap_slows_the_z_axis_of_a_move():
    clock = FakeClock()
    stage = exact_stage(clock)
    duration = stage.start_move(10_000.0, 10_000.0, 60.0, z_speed_um_s=280.0)
    assert duration == pytest.approx(trapezoid_duration_s(60.0, 280.0, 50_000.0) + StageDynamics().settle_s)
    clock.now = trapezoid_time_s(30.0, 60.0, 280.0, 50_000.0)
    assert stage.position_um()[2] == pytest.approx(30.0, abs=1e-3)
    with pytest.raises(ValueError, match="z speed -1"):
        stage.start_move(10_000.0, 10_000.0, 0.0, z_speed_um_s=-1.0)


def test_move_follows_the_clock_and_settles_at_the_target():
    clock = FakeClock()
    stage = exact_stage(clock)
    duration = stage.start_move(40_000.0, 10_000.0, 0.0)
    assert duration == pytest.approx(trapezoid_duration_s(30_000, 30_000, 300_000) + StageDynamics().settle_s)
    clock.now = duration / 2
    assert stage.is_moving()
    assert stage.position_um()[0] == pytest.approx(25_000.0, abs=1500)
    clock.now = duration + 1e-6
    assert not stage.is_moving()
    assert stage.position_um() == pytest.approx((40_000.0, 10_000.0, 0.0))


def test_backlash_makes_the_approach_direction_matter():
    clock = FakeClock()
    stage = exact_stage(clock, backlash_um=2.0)
    clock.now += stage.start_move(10_000.0, 10_000.0, 50.0) + 1
    clock.now += stage.start_move(10_000.0, 10_000.0, 20.0) + 1
    from_above = stage.position_um()[2]
    clock.now += stage.start_move(10_000.0, 10_000.0, 10.0) + 1
    clock.now += stage.start_move(10_000.0, 10_000.0, 20.0) + 1
    from_below = stage.position_um()[2]
    assert from_above == pytest.approx(21.0) and from_below == pytest.approx(19.0)
    clock.now += stage.start_move(10_000.0, 10_000.0, 30.0) + 1
    assert stage.position_um()[2] == pytest.approx(29.0)      # same direction: the same offset


def test_stop_leaves_the_stage_where_it_was():
    clock = FakeClock()
    stage = exact_stage(clock)
    duration = stage.start_move(40_000.0, 10_000.0, 0.0)
    clock.now = duration / 3
    stage.stop()
    stopped_at = stage.position_um()
    clock.now = duration * 2
    assert not stage.is_moving()
    assert stage.position_um() == stopped_at and 10_000 < stopped_at[0] < 40_000


def test_jitter_makes_measured_positions_scatter_around_the_target():
    clock = FakeClock()
    stage = SimulatedStage(clock=clock, seed=3, dynamics=StageDynamics(backlash_um=0.0))
    errors = []
    for i in range(200):
        target = (20_000.0 + 100 * (i % 2), 12_000.0, 0.0)
        clock.now += stage.start_move(*target) + 1
        errors.append(stage.position_um()[0] - target[0])
    assert 0.1 < np.std(errors) < 0.3 and abs(np.mean(errors)) < 0.05


def test_targets_outside_the_limits_name_the_axis_and_the_range():
    stage = SimulatedStage()
    with pytest.raises(StageLimitError, match=r"y=30000.000 µm is outside \[0.000, 25000.000\] µm"):
        stage.start_move(1000.0, 30_000.0, 0.0)
    with pytest.raises(StageLimitError, match="z=nan is not a finite number"):
        stage.start_move(1000.0, 1000.0, float("nan"))
    with pytest.raises(ValueError, match="min 5.0 µm must be below max 1.0 µm"):
        StageLimits(x_min_um=5.0, x_max_um=1.0)


def test_a_move_request_becomes_an_absolute_target_on_the_selected_axes():
    here = (10_000.0, 5_000.0, 2.0)
    assert move_target(StageLimits(), here, (1.0, 2.0, 3.0), Axes.XYZ, False, 0.0, 600.0) == (1.0, 2.0, 3.0)
    assert move_target(StageLimits(), here, (100.0, -50.0, 3.0), Axes.XY, True, 0.0, 600.0) == (
        10_100.0, 4_950.0, 2.0)
    assert move_target(StageLimits(), here, (float("nan"), 0.0, 7.0), Axes.Z, False, 0.0, 600.0) == (
        10_000.0, 5_000.0, 7.0)                           # an axis not selected is not read at all
    assert move_target(StageLimits(), here, (1.0, 2.0, 3.0), 0, False, 0.0, 600.0) == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("requested, axes, speed, message", [
    ((float("nan"), 0.0, 0.0), Axes.XYZ, 0.0, "x=nan is not a finite number"),
    ((1.0, float("inf"), 0.0), Axes.XY, 0.0, "y=inf is not a finite number"),
    ((1.0, 1.0, 0.0), 8, 0.0, "axes 8: expected a combination of X=1, Y=2, Z=4"),
    ((1.0, 1.0, 0.0), Axes.XYZ, float("nan"), "speed nan µm/s; expected a finite speed >= 0"),
    ((1.0, 1.0, 0.0), Axes.XYZ, -5.0, "speed -5.0 µm/s"),
    # 1e-6 µm/s would hold the stage (and every scan waiting for it) for about 300 years
    ((1.0, 1.0, 0.0), Axes.XYZ, 1e-6, r"the 9999.0 µm move would take 1e\+10 s, more than the 600 s"),
])
def test_move_requests_that_cannot_be_run_are_refused_with_the_reason(requested, axes, speed, message):
    with pytest.raises(MoveGoalError, match=message):
        move_target(StageLimits(), (10_000.0, 1.0, 0.0), requested, axes, False, speed, 600.0)


def test_a_slow_move_is_allowed_when_it_ends_in_time_and_a_target_outside_the_limits_is_a_limit_error():
    assert move_target(StageLimits(), (0.0, 0.0, 0.0), (500.0, 0.0, 0.0), Axes.X, False, 1.0, 600.0) == (
        500.0, 0.0, 0.0)
    with pytest.raises(StageLimitError, match="x=-5.000 µm is outside"):
        move_target(StageLimits(), (0.0, 0.0, 0.0), (-5.0, 0.0, 0.0), Axes.X, False, 0.0, 600.0)
