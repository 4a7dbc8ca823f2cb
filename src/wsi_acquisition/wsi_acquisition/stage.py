"""XYZ stage: soft limits, a clock-driven simulated stage, and the interface real backends implement.

The simulated stage follows the motion of a real motorised stage: trapezoidal velocity profiles
(XY as one vector move, Z on its own axis), a settle time after each move, backlash (the
carriage trails the screw by half the backlash in the direction of travel), and positioning jitter. The encoder reading is the true position quantised to
the encoder resolution, so `measured` differs from `commanded` the way it does on hardware.
"""
import enum
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

AXES = ("x", "y", "z")


class StageLimitError(ValueError):
    """A target lies outside the stage's soft limits."""


class StageFault(RuntimeError):
    """The stage hardware reported a fault or does not answer."""


class MoveGoalError(ValueError):
    """A move request that cannot be run as given: not a finite number, unknown axes, or far too slow."""


class Axes(enum.IntFlag):
    """Which axes a move drives. Mirrors MoveStage.Goal.AXES_*."""
    X = 1
    Y = 2
    Z = 4
    XY = 3
    XYZ = 7


@dataclass(frozen=True)
class StageLimits:
    x_min_um: float = 0.0
    x_max_um: float = 75_000.0
    y_min_um: float = 0.0
    y_max_um: float = 25_000.0
    z_min_um: float = -500.0
    z_max_um: float = 500.0

    def __post_init__(self):
        for axis in AXES:
            low, high = self.bounds(axis)
            if not low < high:
                raise ValueError(f"stage limits for {axis}: min {low} µm must be below max {high} µm")

    def bounds(self, axis: str) -> tuple[float, float]:
        return getattr(self, f"{axis}_min_um"), getattr(self, f"{axis}_max_um")

    def check(self, x_um: float, y_um: float, z_um: float) -> None:
        """Raise StageLimitError naming every coordinate that is outside its limits."""
        problems = []
        for axis, value in zip(AXES, (x_um, y_um, z_um)):
            low, high = self.bounds(axis)
            if not math.isfinite(value):
                problems.append(f"{axis}={value} is not a finite number")
            elif not low <= value <= high:
                problems.append(f"{axis}={value:.3f} µm is outside [{low:.3f}, {high:.3f}] µm")
        if problems:
            raise StageLimitError("target outside the stage limits: " + "; ".join(problems))


def move_target(limits: StageLimits, current_um: tuple[float, float, float],
                requested_um: tuple[float, float, float], axes: int, relative: bool, speed_um_s: float,
                max_duration_s: float) -> tuple[float, float, float]:
    """The absolute target of a move request, checked before anything moves.

    Axes not selected keep their current value (axes 0 = all three); `relative` adds the request to the
    current position. Raises MoveGoalError for a request that cannot be run as given, StageLimitError for
    a target outside the soft limits. `speed_um_s` (0 = the stage's configured speed) caps the XY speed;
    one so low that the XY travel alone would take longer than `max_duration_s` is refused, because the
    move would hold the stage, and every scan waiting for it, for that long.
    """
    if not 0 <= axes <= Axes.XYZ:
        raise MoveGoalError(f"axes {axes}: expected a combination of X={Axes.X:d}, Y={Axes.Y:d}, Z={Axes.Z:d} "
                            "(0 = all three)")
    selected = Axes(axes or Axes.XYZ)
    masks = (Axes.X, Axes.Y, Axes.Z)
    for axis, value, mask in zip(AXES, requested_um, masks):
        if mask in selected and not math.isfinite(value):
            raise MoveGoalError(f"{axis}={value} is not a finite number")
    if not math.isfinite(speed_um_s) or speed_um_s < 0:
        raise MoveGoalError(f"speed {speed_um_s} µm/s; expected a finite speed >= 0 (0 = the configured speed)")
    target = tuple((now + value if relative else value) if mask in selected else now
                   for now, value, mask in zip(current_um, requested_um, masks))
    limits.check(*target)
    xy_distance_um = math.dist(target[:2], current_um[:2])
    if speed_um_s > 0 and xy_distance_um / speed_um_s > max_duration_s:
        raise MoveGoalError(f"speed {speed_um_s:g} µm/s: the {xy_distance_um:.1f} µm move would take "
                            f"{xy_distance_um / speed_um_s:.3g} s, more than the {max_duration_s:g} s a move may "
                            "take; give a higher speed, or 0 for the stage's configured speed")
    return target


@dataclass(frozen=True)
class StageDynamics:
    xy_speed_um_s: float = 30_000.0
    xy_accel_um_s2: float = 300_000.0
    z_speed_um_s: float = 2_000.0
    z_accel_um_s2: float = 50_000.0
    settle_s: float = 0.03
    backlash_um: float = 1.0          # lost motion between approaching from one side and the other
    xy_jitter_um: float = 0.2         # one-sigma positioning repeatability
    z_jitter_um: float = 0.03
    encoder_resolution_um: float = 0.05


def trapezoid_duration_s(distance_um, speed_um_s: float, accel_um_s2: float):
    """Time to travel `distance_um` from rest to rest with limited speed and acceleration; an array of
    distances gives an array of times (scan time models sum thousands of moves)."""
    distance = np.abs(np.asarray(distance_um, dtype=float))
    ramp_distance = speed_um_s ** 2 / accel_um_s2
    duration = np.where(distance <= ramp_distance, 2.0 * np.sqrt(distance / accel_um_s2),
                        distance / speed_um_s + speed_um_s / accel_um_s2)
    return float(duration) if duration.ndim == 0 else duration


def trapezoid_fraction(t_s: float, distance_um: float, speed_um_s: float, accel_um_s2: float) -> float:
    """Fraction (0..1) of a rest-to-rest trapezoidal move covered after `t_s` seconds."""
    distance_um = abs(distance_um)
    total = trapezoid_duration_s(distance_um, speed_um_s, accel_um_s2)
    if distance_um == 0.0 or t_s >= total:
        return 1.0
    if t_s <= 0.0:
        return 0.0
    peak_speed = min(speed_um_s, math.sqrt(distance_um * accel_um_s2))
    ramp_s = peak_speed / accel_um_s2
    if t_s < ramp_s:
        covered = 0.5 * accel_um_s2 * t_s ** 2
    elif t_s <= total - ramp_s:
        covered = 0.5 * accel_um_s2 * ramp_s ** 2 + peak_speed * (t_s - ramp_s)
    else:
        remaining_s = total - t_s
        covered = distance_um - 0.5 * accel_um_s2 * remaining_s ** 2
    return covered / distance_um


def trapezoid_time_s(covered_um: float, distance_um: float, speed_um_s: float, accel_um_s2: float) -> float:
    """Time after which a rest-to-rest trapezoidal move of `distance_um` has covered `covered_um`
    (the inverse of `trapezoid_fraction`)."""
    distance_um = abs(distance_um)
    covered_um = min(max(covered_um, 0.0), distance_um)
    peak_speed = min(speed_um_s, math.sqrt(distance_um * accel_um_s2))
    ramp_s = peak_speed / accel_um_s2
    ramp_um = 0.5 * accel_um_s2 * ramp_s ** 2
    if covered_um <= ramp_um:
        return math.sqrt(2.0 * covered_um / accel_um_s2)
    if covered_um <= distance_um - ramp_um:
        return ramp_s + (covered_um - ramp_um) / peak_speed
    total = trapezoid_duration_s(distance_um, speed_um_s, accel_um_s2)
    return total - math.sqrt(2.0 * (distance_um - covered_um) / accel_um_s2)


class StageBackend(Protocol):
    """What the stage node needs from a stage, simulated or real. Positions in µm."""

    limits: StageLimits

    def start_move(self, x_um: float, y_um: float, z_um: float, speed_um_s: float = 0.0) -> float:
        """Start an absolute move; return the expected duration in seconds."""

    def position_um(self) -> tuple[float, float, float]:
        """Measured (encoder) position."""

    def is_moving(self) -> bool: ...

    def stop(self) -> None:
        """Stop motion now; the stage stays where it is."""


@dataclass
class _Move:
    start_um: np.ndarray
    end_um: np.ndarray           # true end position (backlash and jitter included)
    started_s: float
    xy_speed_um_s: float
    z_speed_um_s: float
    duration_s: float            # motion plus settle


class SimulatedStage:
    """A stage whose position follows the clock. `speedup` > 1 makes moves take less wall time."""

    def __init__(self, limits: StageLimits = StageLimits(), dynamics: StageDynamics = StageDynamics(),
                 seed: int = 0, speedup: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 start_um: tuple[float, float, float] | None = None):
        if speedup <= 0:
            raise ValueError(f"speedup {speedup} must be positive")
        self.limits = limits
        self.dynamics = dynamics
        self._speedup = speedup
        self._clock = clock
        self._rng = np.random.default_rng(seed)
        if start_um is None:
            start_um = tuple((low + high) / 2 for low, high in map(limits.bounds, AXES))
        limits.check(*start_um)
        self._rest_um = np.array(start_um, dtype=float)
        self._last_direction = np.zeros(3)
        self._move: _Move | None = None
        self._lock = threading.Lock()
        self.fault: str = ""

    def _elapsed_s(self, move: _Move) -> float:
        return (self._clock() - move.started_s) * self._speedup

    def _true_position_locked(self) -> np.ndarray:
        move = self._move
        if move is None:
            return self._rest_um.copy()
        elapsed = self._elapsed_s(move)
        if elapsed >= move.duration_s:
            self._rest_um, self._move = move.end_um, None
            return self._rest_um.copy()
        dyn = self.dynamics
        delta = move.end_um - move.start_um
        xy_fraction = trapezoid_fraction(elapsed, float(np.hypot(delta[0], delta[1])),
                                         move.xy_speed_um_s, dyn.xy_accel_um_s2)
        z_fraction = trapezoid_fraction(elapsed, float(delta[2]), move.z_speed_um_s, dyn.z_accel_um_s2)
        return move.start_um + delta * np.array([xy_fraction, xy_fraction, z_fraction])

    def true_position_um(self) -> tuple[float, float, float]:
        """Ground truth: where the stage really is (simulation only)."""
        with self._lock:
            return tuple(self._true_position_locked())

    def position_um(self) -> tuple[float, float, float]:
        resolution = self.dynamics.encoder_resolution_um
        true = np.array(self.true_position_um())
        return tuple(np.round(true / resolution) * resolution)

    def is_moving(self) -> bool:
        with self._lock:
            self._true_position_locked()
            return self._move is not None

    @property
    def speedup(self) -> float:
        return self._speedup

    def hold(self, duration_s: float) -> None:
        """Wait `duration_s` of the stage's time (an exposure: the stage must not move meanwhile)."""
        time.sleep(duration_s / self._speedup)

    def move_duration_s(self, x_um: float, y_um: float, z_um: float, speed_um_s: float = 0.0) -> float:
        """Duration of a move from the current position, without moving (for scan time estimates)."""
        start = np.array(self.true_position_um())
        return self._duration_s(np.array([x_um, y_um, z_um]) - start, self._xy_speed(speed_um_s),
                                self.dynamics.z_speed_um_s)

    def _xy_speed(self, speed_um_s: float) -> float:
        if speed_um_s < 0:
            raise ValueError(f"speed {speed_um_s} µm/s must not be negative (0 = configured speed)")
        configured = self.dynamics.xy_speed_um_s
        return configured if speed_um_s == 0 else min(speed_um_s, configured)

    def _duration_s(self, delta_um: np.ndarray, xy_speed_um_s: float, z_speed_um_s: float) -> float:
        dyn = self.dynamics
        xy = trapezoid_duration_s(float(np.hypot(delta_um[0], delta_um[1])), xy_speed_um_s, dyn.xy_accel_um_s2)
        z = trapezoid_duration_s(float(delta_um[2]), z_speed_um_s, dyn.z_accel_um_s2)
        moved = bool(np.any(np.abs(delta_um) > 0))
        return max(xy, z) + (dyn.settle_s if moved else 0.0)

    def start_move(self, x_um: float, y_um: float, z_um: float, speed_um_s: float = 0.0,
                   z_speed_um_s: float = 0.0) -> float:
        """As `StageBackend.start_move`; `z_speed_um_s` (0 = configured) caps the z speed too."""
        if self.fault:
            raise StageFault(self.fault)
        self.limits.check(x_um, y_um, z_um)
        xy_speed = self._xy_speed(speed_um_s)
        if not 0 <= z_speed_um_s < math.inf:
            raise ValueError(f"z speed {z_speed_um_s} µm/s must be finite and >= 0 (0 = configured speed)")
        z_speed = self.dynamics.z_speed_um_s if z_speed_um_s == 0 else min(z_speed_um_s, self.dynamics.z_speed_um_s)
        target = np.array([x_um, y_um, z_um], dtype=float)
        dyn = self.dynamics
        with self._lock:
            start = self._true_position_locked()
            delta = target - start
            direction = np.sign(delta)
            self._last_direction = np.where(direction != 0, direction, self._last_direction)
            # Hysteresis: the carriage trails the screw by half the backlash in the direction it last
            # moved, so the same target reached from above and from below differs by the backlash.
            end = target - self._last_direction * dyn.backlash_um / 2
            jitter = self._rng.normal(0.0, [dyn.xy_jitter_um, dyn.xy_jitter_um, dyn.z_jitter_um])
            end = end + np.where(direction != 0, jitter, 0.0)
            duration = self._duration_s(delta, xy_speed, z_speed)
            self._move = _Move(start, end, self._clock(), xy_speed, z_speed, duration)
            return duration / self._speedup

    def stop(self) -> None:
        with self._lock:
            self._rest_um = self._true_position_locked()
            self._move = None
