"""Scan time of a tile plan on a motorised stage and a camera, term by term.

Physical time only: stage motion, settling, exposure, camera frames (image processing, transfer and
storage are not in it). The stage is `StageDynamics`: trapezoidal moves, XY as one vector move and Z on
its own axis, a settle after each stop. The camera is `CameraTiming`.

Tiles of a serpentine `TilePlan` are taken in one of two ways:

* stop-and-go: per tile a rest-to-rest XY move, a settle and the exposure; the next tile's z is reached
  during the XY move (`overlap_z`: all axes move at once, as the stage does) or after it;
* continuous: each row is one pass at constant speed and a flash of `strobe_pulse_us` exposes each tile
  as the field passes its position, so no tile waits for a stop or a settle. The pass speed is the
  lowest of the stage's top speed, the speed at which a flash smears `MAX_MOTION_BLUR_PX`, one tile
  step per camera frame, and the speed at which z can follow the focal surface. Between rows the stage
  stops, steps along y and ramps up again; the ramp outlasts the settle of the y step.

The focus map measures focus at points on the tissue with the scan's z-sweeps (`planning.focus_sweeps`):
one constant-speed z pass per sweep with a flash per camera frame (as the simulated scanner takes them,
`hardware.SimulatedMicroscope.z_pass`), or stop-and-go z steps with an exposure each. Re-captures are
tiles the inline autofocus takes again: at once (stop-and-go: only z moves) or, after continuous passes,
in one stop-and-go tour at the end.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .optics import Objective, depth_of_field_um
from .planning import QUADRATIC_TREND_MIN_POINTS, PlannedTile, TilePlan, choose_focus_points
from .stage import StageDynamics, trapezoid_duration_s

STRATEGIES = ("stop-and-go", "continuous")
# A flash may smear the image by at most this much: below half a pixel the blur is below the optics'.
MAX_MOTION_BLUR_PX = 0.5
# The focus map's accuracy, measured (test_scan_planning): 36 points over a tilted, warped 15 mm
# section, 2.5 mm apart, put tile centres within 0.35 µm RMS of focus. Between points the surface is
# smooth, so the error grows with the square of the spacing.
_MAP_REFERENCE_SPACING_UM = 2_500.0
_MAP_REFERENCE_ERROR_UM = 0.35


class TimingError(ValueError):
    """A timing model input is out of range."""


# Frames per second a 1024 x 1024, 12-bit sCMOS sensor reads out (the simulated camera's too).
SCMOS_FRAME_RATE_HZ = 100.0


@dataclass(frozen=True)
class CameraTiming:
    exposure_ms: float              # continuous light: the exposure that gives a frame its photon dose
    frame_rate_hz: float = SCMOS_FRAME_RATE_HZ
    # A flash giving the same dose: 10^4 electrons per pixel and channel, a few mW on a 1024 x 1024
    # sensor for 4 µs, which LEDs overdriven in microsecond pulses deliver.
    strobe_pulse_us: float = 4.0

    def __post_init__(self):
        if not (self.exposure_ms > 0 and self.frame_rate_hz > 0 and self.strobe_pulse_us > 0):
            raise TimingError(f"{self}: exposure, frame rate and strobe pulse must be > 0")


@dataclass(frozen=True)
class ScanTime:
    """Seconds per term; `total_s` is their sum."""
    strategy: str                   # one of STRATEGIES
    tiles: int
    moves_s: float                  # XY motion (with z where it is not overlapped), pass ramps included
    settles_s: float
    exposures_s: float              # waiting for exposures; a flash during motion costs none
    focus_points: int
    focus_map_s: float
    recaptures: int
    recaptures_s: float
    pass_speed_um_s: float = 0.0    # continuous: speed of the row passes
    motion_blur_px: float = 0.0     # continuous: smear of one flash at that speed
    speed_limit: str = ""           # continuous: what sets the pass speed

    @property
    def total_s(self) -> float:
        return self.moves_s + self.settles_s + self.exposures_s + self.focus_map_s + self.recaptures_s


def motion_blur_px(speed_um_s: float, pulse_us: float, pixel_size_um: float) -> float:
    """Distance the image moves during one flash, in pixels."""
    return speed_um_s * pulse_us * 1e-6 / pixel_size_um


def stop_and_go_s(positions_um, dynamics: StageDynamics, exposure_ms: float, overlap_z: bool = True,
                  start_um=None) -> tuple[float, float, float]:
    """(moves, settles, exposures) in s for visiting (x, y, z) positions in order with an exposure at
    each, from `start_um` (else the approach to the first position is not counted). overlap_z: z moves
    during the XY move (the longer of the two counts), else after it."""
    positions = np.asarray(positions_um, dtype=float).reshape(-1, 3)
    path = positions if start_um is None else np.vstack([start_um, positions])
    delta = np.diff(path, axis=0)
    xy = trapezoid_duration_s(np.hypot(delta[:, 0], delta[:, 1]), dynamics.xy_speed_um_s, dynamics.xy_accel_um_s2)
    z = trapezoid_duration_s(delta[:, 2], dynamics.z_speed_um_s, dynamics.z_accel_um_s2)
    moves = float(np.sum(np.maximum(xy, z) if overlap_z else xy + z))
    return moves, len(delta) * dynamics.settle_s, len(positions) * exposure_ms / 1000.0


def pass_speed_um_s(plan: TilePlan, pixel_size_um: float, dynamics: StageDynamics, camera: CameraTiming,
                    z_slope: float = 0.0) -> tuple[float, str]:
    """Speed of a continuous row pass and what sets it. z_slope: the steepest focal-surface slope
    along a row (µm of z per µm of x), which z must follow during the pass."""
    limits = {"stage top speed": dynamics.xy_speed_um_s,
              "motion blur": MAX_MOTION_BLUR_PX * pixel_size_um / (camera.strobe_pulse_us * 1e-6),
              "camera frame rate": plan.step_x_um * camera.frame_rate_hz}
    if z_slope > 0:
        limits["z tracking"] = dynamics.z_speed_um_s / z_slope
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def continuous_passes_s(plan: TilePlan, speed_um_s: float, dynamics: StageDynamics) -> float:
    """Time of the row passes at `speed_um_s` and of the steps between rows, s. A pass ramps up before
    its first tile and down after its last (outside the row, so every tile is taken at full speed)."""
    xy = _xyz(plan.tiles)[:, :2]
    rows = np.array([t.row for t in plan.tiles])
    first = np.flatnonzero(np.diff(rows, prepend=-1))         # the first tile of each row
    last = np.append(first[1:] - 1, len(rows) - 1)
    accel = dynamics.xy_accel_um_s2
    spans = np.abs(xy[last, 0] - xy[first, 0])
    passes = trapezoid_duration_s(spans + speed_um_s ** 2 / accel, speed_um_s, accel)
    steps = trapezoid_duration_s(np.diff(xy[first, 1]), dynamics.xy_speed_um_s, accel)
    return float(np.sum(passes) + np.sum(steps))


def focus_point_count(plan: TilePlan, objective: Objective, camera_pixel_um: float) -> int:
    """Focus-map points for the plan's tissue (its tiles): spaced so that the map's error plus half the
    objective's field-curvature sag from tile centre to corner stays within half the depth of field (the
    tile's z then keeps both centre and corners in focus); at least the quadratic trend's 10."""
    sag = float(objective.field_curvature_shift_um(math.hypot(plan.fov_width_um, plan.fov_height_um) / 2))
    budget = depth_of_field_um(objective, camera_pixel_um) / 2 - sag / 2
    if budget <= 0:
        raise TimingError(f"{objective.name}: field curvature ({sag:.2f} µm over the tile) leaves no depth "
                          "of field for the focus map")
    spacing = _MAP_REFERENCE_SPACING_UM * math.sqrt(budget / _MAP_REFERENCE_ERROR_UM)
    tissue_area_um2 = len(plan.tiles) * plan.step_x_um * plan.step_y_um
    return max(QUADRATIC_TREND_MIN_POINTS, math.ceil(tissue_area_um2 / spacing ** 2))


def planned_focus_points(plan: TilePlan, objective: Objective, camera_pixel_um: float) -> list[PlannedTile]:
    """Focus points on the tissue tiles, as many as the tissue area and the field curvature ask
    (`focus_point_count`), spread by farthest-point sampling and visited in a nearest-neighbour tour."""
    points = choose_focus_points(plan, focus_point_count(plan, objective, camera_pixel_um))
    return [points[0]] + nearest_neighbour_tour(points[1:], points[0])


def nearest_neighbour_tour(tiles, start: PlannedTile) -> list[PlannedTile]:
    """Scattered tiles in the order of a greedy tour from `start`: always on to the nearest unvisited."""
    left = list(tiles)
    xy = _xyz(left)[:, :2]
    here = np.array([start.x_um, start.y_um])
    visited = np.zeros(len(left), dtype=bool)
    tour = []
    for _ in left:
        distance = np.where(visited, np.inf, np.hypot(xy[:, 0] - here[0], xy[:, 1] - here[1]))
        nearest = int(np.argmin(distance))
        visited[nearest] = True
        tour.append(left[nearest])
        here = xy[nearest]
    return tour


def focus_map_s(points: list[PlannedTile], z_at: Callable, sweeps, dynamics: StageDynamics,
                camera: CameraTiming, continuous: bool) -> float:
    """Time to measure focus at `points` (visited in the given order) with the z-sweeps (half range,
    step): stop-and-go steps with an exposure each, or one strobed constant-speed pass per sweep."""
    moves, settles, _ = stop_and_go_s(_xyz(points, z_at), dynamics, camera.exposure_ms)
    z_speed, z_accel = dynamics.z_speed_um_s, dynamics.z_accel_um_s2
    exposure_s = camera.exposure_ms / 1000.0
    per_point = 0.0
    for half_range, step in sweeps:
        per_point += trapezoid_duration_s(half_range, z_speed, z_accel) + dynamics.settle_s   # to the start
        if continuous:
            speed = min(z_speed, step * camera.frame_rate_hz)          # one frame per z step
            per_point += trapezoid_duration_s(2 * half_range + speed ** 2 / z_accel, speed, z_accel)
        else:
            steps = len(np.arange(-half_range, half_range + 1e-9, step))
            per_point += exposure_s + (steps - 1) * (
                trapezoid_duration_s(step, z_speed, z_accel) + dynamics.settle_s + exposure_s)
    return moves + settles + len(points) * per_point


def recapture_tiles(plan: TilePlan, fraction: float) -> list[PlannedTile]:
    """An evenly spread `fraction` of the tiles, standing for those the inline autofocus re-takes."""
    if not 0.0 <= fraction < 1.0:
        raise TimingError(f"recapture fraction {fraction}; expected 0 <= fraction < 1")
    count = round(fraction * len(plan.tiles))
    return [plan.tiles[int(i)] for i in np.linspace(0, len(plan.tiles) - 1, count)]


def scan_time(plan: TilePlan, strategy: str, objective: Objective, camera_pixel_um: float,
              dynamics: StageDynamics, camera: CameraTiming, z_at: Callable, focus_points: list[PlannedTile],
              sweeps, recapture_fraction: float = 0.0, overlap_z: bool = True,
              strobed_sweeps: bool = True) -> ScanTime:
    """Every term of a scan of `plan` by `strategy`, with focal z from z_at(x, y) (arrays) and the focus
    map measured at `focus_points` with the z-sweeps `sweeps`, each a strobed z pass (as the simulated
    scanner takes them) or, with `strobed_sweeps` False, stepped. Re-captures correct z by one depth of field."""
    if strategy not in STRATEGIES:
        raise TimingError(f"strategy {strategy!r}; expected one of {STRATEGIES}")
    xyz = _xyz(plan.tiles, z_at)
    recaptures = recapture_tiles(plan, recapture_fraction)
    map_s = focus_map_s(focus_points, z_at, sweeps, dynamics, camera, continuous=strobed_sweeps)
    if strategy == "stop-and-go":
        moves, settles, exposures = stop_and_go_s(xyz, dynamics, camera.exposure_ms, overlap_z)
        # Each re-capture follows its tile at once: a z correction, a settle, an exposure.
        correction_s = (trapezoid_duration_s(depth_of_field_um(objective, camera_pixel_um), dynamics.z_speed_um_s,
                                             dynamics.z_accel_um_s2) + dynamics.settle_s + camera.exposure_ms / 1000)
        return ScanTime(strategy, len(plan.tiles), moves, settles, exposures, len(focus_points), map_s,
                        len(recaptures), len(recaptures) * correction_s)
    pixel_size_um = camera_pixel_um / objective.magnification
    delta = np.diff(xyz, axis=0)
    along_row = (delta[:, 1] == 0) & (delta[:, 0] != 0)
    z_slope = float(np.max(np.abs(delta[along_row, 2] / delta[along_row, 0]), initial=0.0))
    speed, limit = pass_speed_um_s(plan, pixel_size_um, dynamics, camera, z_slope)
    # Re-captures wait for the end of the passes, then one stop-and-go tour from the last tile.
    tour = nearest_neighbour_tour(recaptures, plan.tiles[-1])
    tour_s = sum(stop_and_go_s(_xyz(tour, z_at), dynamics, camera.exposure_ms, start_um=xyz[-1])) if tour else 0.0
    return ScanTime(strategy, len(plan.tiles), continuous_passes_s(plan, speed, dynamics), 0.0, 0.0,
                    len(focus_points), map_s, len(recaptures), tour_s, speed,
                    motion_blur_px(speed, camera.strobe_pulse_us, pixel_size_um), limit)


def fastest(times: list[ScanTime]) -> ScanTime:
    """The strategy to use: continuous passes pay off only when the flash lets them run fast enough."""
    return min(times, key=lambda t: t.total_s)


def _xyz(tiles, z_at: Callable | None = None) -> np.ndarray:
    """(n, 3) positions of tiles; z from z_at(x, y) or 0."""
    xyz = np.zeros((len(tiles), 3))
    xyz[:, 0] = [t.x_um for t in tiles]
    xyz[:, 1] = [t.y_um for t in tiles]
    if z_at is not None and len(tiles):
        xyz[:, 2] = z_at(xyz[:, 0], xyz[:, 1])
    return xyz
