"""Benchmark: simulated scan throughput, the renderer against an earlier one, and the projected time
of a 15x15 mm scan at 20x and 40x by the stage and camera timing model.

    .venv/bin/python bench/acquisition.py [--region-mm 2] [--objective 20]
        [--speedup 1] [--sensor-px 1024] [--focus none|map] [--reference-commit 80468c4]

1. Runs a ScanRunner scan over a tissue region of the virtual slide (stage moves take their physical
   time at --speedup 1) and measures tiles/s and the simulator's render time per tile.
2. Renders full tiles alternately with this renderer and with the renderer of --reference-commit (its
   microscope, optics and specimen modules read from git; "none" skips this), CPU time per tile, and
   wall time with this renderer's two threads (the microscope node's default).
3. Projects a 15x15 mm scan (10 % overlap) with `wsi_acquisition.scan_timing`, every term shown:
   as the scan runs now (stop-and-go tiles, whose terms are the earlier 253 s projection at 20x; the
   scan's focus points, each z-sweep a strobed z pass), and the faster of stop-and-go and continuous strobed passes with
   focus points set by tissue and field curvature, beside the NanoZoomer S360 (15x15 mm at 20x in
   156 s, measured) and the Aperio GT450 (15x15 mm at 40x in 32 s, claimed). Physical time only:
   camera transfer, processing and the simulator's rendering are not in it.
Prints tables and writes bench/results/acquisition.json.
"""
import argparse
import importlib
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import STANDARD_OBJECTIVES, Camera, depth_of_field_um
from wsi_acquisition.planning import choose_focus_points, default_focus_point_count, focus_sweeps, plan_tiles
from wsi_acquisition.scan import FocusStrategy, ScanRequest, ScanRunner
from wsi_acquisition.scan_timing import CameraTiming, fastest, planned_focus_points, scan_time
from wsi_acquisition.stage import StageDynamics, trapezoid_duration_s
from wsi_common.heap import keep_freed_memory
from wsi_common.objective import DEFAULT_OBJECTIVE_MAGNIFICATION
from wsi_common.tile_grid import field_of_view_um

RESULTS = Path(__file__).resolve().parent / "results"
TISSUE_CENTRE_UM = (41_500.0, 12_500.0)       # inside the tissue section of the default slide
PROJECTED_AREA_MM = 15.0
OVERLAP = 0.1
REPOSITORY = Path(__file__).resolve().parent.parent
# The renderer before it was made faster (issue 20): the bench renders with it and with this one.
REFERENCE_COMMIT = "80468c4"
# 15x15 mm scan times to beat (issue 20).
ANCHORS = {20.0: ("Hamamatsu NanoZoomer S360", 156.0, "measured"), 40.0: ("Leica Aperio GT450", 32.0, "claimed")}


class RenderTimer:
    """Wraps a backend; times the render of every full frame (a tile), not of ROIs (focusing)."""

    def __init__(self, backend):
        self._backend = backend
        self.tile_render_s: list[float] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def expose(self, exposure_ms, gain=1.0, roi=None):
        """Times a full frame from the end of its exposure to its read-out: the render (it overlaps the move
        to the next tile)."""
        read_out = self._backend.expose(exposure_ms, gain, roi=roi)
        started = time.perf_counter()

        def timed_read_out():
            frame = read_out()
            if roi is None:
                self.tile_render_s.append(time.perf_counter() - started)
            return frame
        return timed_read_out


def plan_move_times_s(plan, dynamics: StageDynamics) -> list[float]:
    """Modelled XY move + settle before each tile (the first tile's approach excluded)."""
    times = []
    for previous, tile in zip(plan.tiles, plan.tiles[1:]):
        distance = math.hypot(tile.x_um - previous.x_um, tile.y_um - previous.y_um)
        times.append(trapezoid_duration_s(distance, dynamics.xy_speed_um_s, dynamics.xy_accel_um_s2)
                     + dynamics.settle_s)
    return times


def reference_renderer(commit: str):
    """The microscope and optics modules of the renderer at `commit`, read from git into a temporary
    package (nothing of it stays in the source tree)."""
    package = Path(tempfile.mkdtemp(prefix="wsi_reference_")) / "wsi_reference_renderer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("microscope", "optics", "specimen"):
        path = f"{commit}:src/wsi_acquisition/wsi_acquisition/{name}.py"
        (package / f"{name}.py").write_text(subprocess.run(["git", "-C", str(REPOSITORY), "show", path],
                                                           capture_output=True, text=True, check=True).stdout)
    sys.path.insert(0, str(package.parent))
    return (importlib.import_module("wsi_reference_renderer.microscope"),
            importlib.import_module("wsi_reference_renderer.optics"))


def compare_renderers(commit: str, sensor_px: int, tiles: int) -> list[dict]:
    """CPU and wall ms per full tile, the renderer at `commit` and this one on one and on two threads (as
    the microscope node runs it), rendering the same tiles in turn (which goes first rotates) so that all
    see the same machine load; the first tile of each (tables being built) is not counted."""
    reference_microscope, reference_optics = reference_renderer(commit)
    rows = []
    for magnification in (20.0, 40.0):
        scopes = {"reference": reference_microscope.VirtualMicroscope(
                      seed=0, camera=reference_optics.Camera(width_px=sensor_px, height_px=sensor_px)),
                  **{name: VirtualMicroscope(seed=0, camera=Camera(width_px=sensor_px, height_px=sensor_px),
                                             render_threads=threads)
                     for name, threads in (("current", 1), ("current_2_threads", 2))}}
        step = scopes["current"].field_of_view_um(magnification)[0] * 0.9
        cpu = {name: [] for name in scopes}
        wall = {name: [] for name in scopes}
        for index in range(tiles + 1):
            x, y = TISSUE_CENTRE_UM[0] - 1_000.0 + index * step, TISSUE_CENTRE_UM[1]
            names = list(scopes)
            for name in names[index % len(names):] + names[:index % len(names)]:
                scope = scopes[name]
                started_wall, started_cpu = time.perf_counter(), time.process_time()
                scope.capture(x, y, scope.focal_z_um(x, y) + 0.3, magnification)
                if index:
                    cpu[name].append(time.process_time() - started_cpu)
                    wall[name].append(time.perf_counter() - started_wall)
        row = {"objective_magnification": magnification, "tiles": tiles, "reference_commit": commit}
        for name in scopes:
            row[f"{name}_cpu_ms_median"] = 1000 * float(np.median(cpu[name]))
            row[f"{name}_wall_ms_median"] = 1000 * float(np.median(wall[name]))
        row["speedup_cpu"] = row["reference_cpu_ms_median"] / row["current_cpu_ms_median"]
        row["speedup_wall_2_threads"] = row["reference_wall_ms_median"] / row["current_2_threads_wall_ms_median"]
        rows.append(row)
    return rows


def square_region_um(side_mm: float) -> tuple[float, float, float, float]:
    """(x, y, width, height) of a square of side_mm centred in the tissue of the default slide."""
    side = side_mm * 1000.0
    return TISSUE_CENTRE_UM[0] - side / 2, TISSUE_CENTRE_UM[1] - side / 2, side, side


def square_scan_plan(magnification: float, sensor_px: int, side_mm: float = PROJECTED_AREA_MM):
    """(objective, camera, tile plan) of a scan of square_region_um(side_mm) at `magnification` with a square
    sensor of sensor_px, OVERLAP between tiles."""
    objective = STANDARD_OBJECTIVES[magnification]
    camera = Camera(width_px=sensor_px, height_px=sensor_px)
    p = camera.specimen_pixel_size_um(objective)
    plan = plan_tiles(*square_region_um(side_mm), *field_of_view_um(camera.width_px, camera.height_px, p), OVERLAP)
    return objective, camera, plan


def anchor_tile_rates(sensor_px: int) -> list[dict]:
    """The tile data each anchor's 15x15 mm scan delivers per second, as our tiles (a square sensor of
    sensor_px at our pixel size of the anchor's objective, OVERLAP): the rate a pipeline that keeps up with
    that scanner must take in."""
    rates = []
    for magnification, (scanner, seconds, kind) in ANCHORS.items():
        _, camera, plan = square_scan_plan(magnification, sensor_px)
        tiles = len(plan.tiles)
        rates.append({"scanner": scanner, "objective_magnification": magnification, "seconds": seconds,
                      "kind": kind, "tiles": tiles, "tiles_per_s": tiles / seconds,
                      "mpx_per_s": tiles * camera.width_px * camera.height_px / 1e6 / seconds})
    return rates


def project(magnification: float, sensor_px: int, camera_timing: CameraTiming, recapture_fraction: float,
            z_at) -> dict:
    """The 15x15 mm scan as the scan runs now (stop-and-go tiles, its focus points, strobed z-sweeps) and by the
    faster of stop-and-go and continuous passes with focus points set by tissue and field curvature."""
    objective, camera, plan = square_scan_plan(magnification, sensor_px)
    sweeps = focus_sweeps(depth_of_field_um(objective, camera.pixel_size_um))
    dynamics = StageDynamics()

    def timed(strategy, points):
        return scan_time(plan, strategy, objective, camera.pixel_size_um, dynamics, camera_timing, z_at, points,
                         sweeps, recapture_fraction)

    now = timed("stop-and-go", choose_focus_points(plan, default_focus_point_count(len(plan.tiles))))
    points = planned_focus_points(plan, objective, camera.pixel_size_um)
    best = fastest([timed(strategy, points) for strategy in ("stop-and-go", "continuous")])
    return {"objective_magnification": magnification, "rows": plan.rows, "cols": plan.cols,
            "now": asdict(now) | {"total_s": now.total_s}, "best": asdict(best) | {"total_s": best.total_s},
            "verdict": verdict(magnification, best, camera_timing)}


def verdict(magnification: float, best, camera_timing: CameraTiming) -> str:
    """The projection against its anchor and, where it is slower, what limits it."""
    name, anchor_s, kind = ANCHORS[magnification]
    line = f"{magnification:g}x: {best.total_s:.0f} s against {anchor_s:g} s of the {name} ({kind})"
    if best.total_s < anchor_s:
        return line + ": faster"
    if best.speed_limit == "camera frame rate":
        return (line + f": the camera limits it, {best.tiles} frames at {camera_timing.frame_rate_hz:g} "
                f"frames/s alone take {best.tiles / camera_timing.frame_rate_hz:.0f} s (a line-scan sensor, "
                f"or a larger or faster area sensor, takes the same area in fewer frame times)")
    return line + f": limited by {best.speed_limit or 'stopping at every tile'}"


def run(args) -> dict:
    # As the microscope node runs the simulator (both renderers compared below run with it too).
    heap_kept = keep_freed_memory()
    sim = SimulatedMicroscope.create(speedup=args.speedup, objective_magnification=args.objective,
                                     camera=Camera(width_px=args.sensor_px, height_px=args.sensor_px))
    backend = RenderTimer(sim)
    region = square_region_um(args.region_mm)
    tile_times = []
    with tempfile.TemporaryDirectory() as scratch:
        request = ScanRequest(scan_id="bench", output_dir=Path(scratch), region_um=region,
                              objective_magnification=args.objective, overlap_fraction=OVERLAP,
                              focus_strategy=FocusStrategy.MAP if args.focus == "map" else FocusStrategy.NONE,
                              skip_empty_tiles=False, exposure_ms=args.exposure_ms, save_tiles=False)
        started = time.perf_counter()
        outcome = ScanRunner(backend, request, publish_tile=lambda r, f: tile_times.append(time.perf_counter())).run()
        wall_s = time.perf_counter() - started
    tiles = len(outcome.records)
    steady_s = tile_times[-1] - tile_times[0]
    render = np.array(backend.tile_render_s)
    moves = plan_move_times_s(outcome.plan, sim.stage.dynamics)
    scan = {"region_um": list(region), "tiles": tiles, "rows": outcome.plan.rows, "cols": outcome.plan.cols,
            "wall_s": wall_s, "tiles_per_s": (tiles - 1) / steady_s if tiles > 1 else 0.0,
            "wall_s_per_tile": steady_s / (tiles - 1) if tiles > 1 else 0.0,
            "render_ms_median": 1000 * float(np.median(render)),
            "render_ms_p95": 1000 * float(np.percentile(render, 95)),
            "stage_model_ms_median": 1000 * float(np.median(moves)) if moves else 0.0,
            "stage_model_wall_ms_median": 1000 * float(np.median(moves)) / args.speedup if moves else 0.0}
    renderers = [] if args.reference_commit == "none" else \
        compare_renderers(args.reference_commit, args.sensor_px, args.reference_tiles)
    camera_timing = CameraTiming(args.exposure_ms, args.frame_rate_hz, args.strobe_pulse_us)
    projections = [project(m, args.sensor_px, camera_timing, args.recapture_fraction, sim.microscope.focal_z_um)
                   for m in (20.0, 40.0)]
    return {"config": {"objective_magnification": args.objective, "region_mm": args.region_mm,
                       "sensor_px": args.sensor_px, "speedup": args.speedup, "focus": args.focus,
                       "exposure_ms": args.exposure_ms, "overlap_fraction": OVERLAP,
                       "camera_timing": asdict(camera_timing), "recapture_fraction": args.recapture_fraction,
                       "stage_dynamics": vars(StageDynamics()), "machine": platform.machine(),
                       "freed_memory_kept": heap_kept,
                       "processor": platform.processor()},
            "scan": scan, "renderers": renderers, "projection_15mm": projections}


def print_tables(result: dict) -> None:
    scan, config = result["scan"], result["config"]
    print(f"simulated scan: {config['region_mm']:g}x{config['region_mm']:g} mm at "
          f"{config['objective_magnification']:g}x, {config['sensor_px']} px sensor, speedup {config['speedup']:g}, focus {config['focus']}")
    print(f"  tiles {scan['tiles']} ({scan['rows']}x{scan['cols']})  wall {scan['wall_s']:.1f} s  "
          f"tiles/s {scan['tiles_per_s']:.2f}  wall/tile {1000 * scan['wall_s_per_tile']:.0f} ms")
    print(f"  render/tile median {scan['render_ms_median']:.0f} ms  p95 {scan['render_ms_p95']:.0f} ms  "
          f"stage model/tile {scan['stage_model_ms_median']:.0f} ms (wall {scan['stage_model_wall_ms_median']:.0f} ms)")
    if result["renderers"]:
        first = result["renderers"][0]
        print(f"\nrenderer, ms per {config['sensor_px']} px tile (median of {first['tiles']}, the same tiles in turn): "
              f"this one against {first['reference_commit']}")
        print(f"{'objective':>9} {'CPU ' + first['reference_commit']:>12} {'CPU now':>8} {'speed-up':>9} "
              f"{'wall ' + first['reference_commit']:>13} {'wall now':>9} {'wall 2 threads':>15} {'speed-up':>9}")
        for row in result["renderers"]:
            print(f"{row['objective_magnification']:>8g}x {row['reference_cpu_ms_median']:>12.0f} "
                  f"{row['current_cpu_ms_median']:>8.0f} {row['speedup_cpu']:>8.2f}x "
                  f"{row['reference_wall_ms_median']:>13.0f} {row['current_wall_ms_median']:>9.0f} "
                  f"{row['current_2_threads_wall_ms_median']:>15.0f} {row['speedup_wall_2_threads']:>8.2f}x")
    timing = config["camera_timing"]
    print(f"\nprojected {PROJECTED_AREA_MM:g}x{PROJECTED_AREA_MM:g} mm, {OVERLAP:.0%} overlap, {config['sensor_px']} px "
          f"sensor: exposure {timing['exposure_ms']:g} ms or a {timing['strobe_pulse_us']:g} us flash, "
          f"{timing['frame_rate_hz']:g} frames/s, {config['recapture_fraction']:.0%} of tiles re-captured; "
          f"physical time only")
    columns = [(f"{p['objective_magnification']:g}x {label}", p[key]) for p in result["projection_15mm"]
               for label, key in (("now", "now"), ("fastest", "best"))]
    rows = [("strategy", lambda t: t["strategy"]), ("tiles", lambda t: f"{t['tiles']}"),
            ("moves s", lambda t: f"{t['moves_s']:.1f}"), ("settles s", lambda t: f"{t['settles_s']:.1f}"),
            ("exposures s", lambda t: f"{t['exposures_s']:.1f}"),
            ("  tiles: moves+settles+exposures s", lambda t: f"{t['moves_s'] + t['settles_s'] + t['exposures_s']:.1f}"),
            ("focus map s", lambda t: f"{t['focus_map_s']:.1f}"), ("  focus points", lambda t: f"{t['focus_points']}"),
            ("re-captures s", lambda t: f"{t['recaptures_s']:.1f}"), ("  re-captured tiles", lambda t: f"{t['recaptures']}"),
            ("total s", lambda t: f"{t['total_s']:.1f}"),
            ("pass speed mm/s", lambda t: f"{t['pass_speed_um_s'] / 1000:.1f}" if t["pass_speed_um_s"] else "-"),
            ("  motion blur px", lambda t: f"{t['motion_blur_px']:.2f}" if t["pass_speed_um_s"] else "-"),
            ("  set by", lambda t: t["speed_limit"] or "-")]
    print(f"{'':<36}" + "".join(f"{name:>19}" for name, _ in columns))
    for label, cell in rows:
        print(f"{label:<36}" + "".join(f"{cell(t):>19}" for _, t in columns))
    for p in result["projection_15mm"]:
        print(p["verdict"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region-mm", type=float, default=2.0, help="side of the scanned square region, mm")
    parser.add_argument("--objective", type=float, default=DEFAULT_OBJECTIVE_MAGNIFICATION, choices=(10.0, 20.0, 40.0))
    parser.add_argument("--speedup", type=float, default=1.0, help="stage moves take 1/speedup of physical time")
    parser.add_argument("--sensor-px", type=int, default=1024, help="square sensor edge, px")
    parser.add_argument("--focus", choices=("none", "map"), default="none", help="focus strategy of the scan")
    parser.add_argument("--exposure-ms", type=float, default=8.0)
    parser.add_argument("--reference-commit", default=REFERENCE_COMMIT,
                        help="renderer to compare with ('none': no comparison)")
    parser.add_argument("--reference-tiles", type=int, default=8, help="tiles per renderer and objective")
    parser.add_argument("--frame-rate-hz", type=float, default=CameraTiming.frame_rate_hz)
    parser.add_argument("--strobe-pulse-us", type=float, default=CameraTiming.strobe_pulse_us)
    parser.add_argument("--recapture-fraction", type=float, default=0.02,
                        help="tiles the inline autofocus takes again (make scan: 1 of 81)")
    parser.add_argument("--output", type=Path, default=RESULTS / "acquisition.json")
    args = parser.parse_args()
    result = run(args)
    print_tables(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
