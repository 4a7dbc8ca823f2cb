"""Benchmark: simulated scan throughput, and projected scan times for a 15x15 mm area.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/acquisition.py [--region-mm 2] [--objective 20]
        [--speedup 1] [--sensor-px 1024] [--focus none|map]

Runs a ScanRunner scan over a tissue region of the virtual slide (stage moves take their physical
time at --speedup 1) and measures tiles/s and the simulator's render time per tile. Then projects a
15x15 mm scan at 20x and 40x from the tile plan (10 % overlap) in two separate parts:
  physical: stage move + settle (trapezoid model) + exposure per tile -- what a scanner with this
            stage and camera would need (camera readout and data transfer not included);
  simulation: physical + the measured render time per tile -- what the simulator needs, because it
            renders each tile serially after the move; render cost is not a property of a real scanner.
Prints a table and writes bench/results/acquisition.json.
"""
import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.planning import plan_tiles
from wsi_acquisition.scan import FocusStrategy, ScanRequest, ScanRunner
from wsi_acquisition.stage import StageDynamics, trapezoid_duration_s

RESULTS = Path(__file__).resolve().parent / "results"
TISSUE_CENTRE_UM = (41_500.0, 12_500.0)       # inside the tissue section of the default slide
PROJECTED_AREA_MM = 15.0
OVERLAP = 0.1


class RenderTimer:
    """Wraps a backend; times every full-frame snap (a tile) separately from ROI snaps (focusing)."""

    def __init__(self, backend):
        self._backend = backend
        self.tile_render_s: list[float] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def snap(self, exposure_ms, gain=1.0, roi=None):
        started = time.perf_counter()
        frame = self._backend.snap(exposure_ms, gain, roi=roi)
        if roi is None:
            self.tile_render_s.append(time.perf_counter() - started)
        return frame


def plan_move_times_s(plan, dynamics: StageDynamics) -> list[float]:
    """Modelled XY move + settle before each tile (the first tile's approach excluded)."""
    times = []
    for previous, tile in zip(plan.tiles, plan.tiles[1:]):
        distance = math.hypot(tile.x_um - previous.x_um, tile.y_um - previous.y_um)
        times.append(trapezoid_duration_s(distance, dynamics.xy_speed_um_s, dynamics.xy_accel_um_s2)
                     + dynamics.settle_s)
    return times


def render_probe_s(sensor_px: int, magnification: float, snaps: int) -> list[float]:
    """Render time of full tiles at another objective, for the simulation-cost projection."""
    sim = SimulatedMicroscope.create(speedup=1e6, objective_magnification=magnification,
                                     camera=Camera(width_px=sensor_px, height_px=sensor_px))
    times = []
    for index in range(snaps):
        sim.stage.start_move(TISSUE_CENTRE_UM[0] + 400.0 * index, TISSUE_CENTRE_UM[1], 0.0)
        while sim.stage.is_moving():
            time.sleep(0.0005)
        started = time.perf_counter()
        sim.snap(8.0)
        times.append(time.perf_counter() - started)
    return times


def project(sensor_px: int, magnification: float, exposure_ms: float, render_s: list[float]) -> dict:
    sim = SimulatedMicroscope.create(speedup=1e6, objective_magnification=magnification,
                                     camera=Camera(width_px=sensor_px, height_px=sensor_px))
    fov_w, fov_h = sim.field_of_view_um()
    side = PROJECTED_AREA_MM * 1000.0
    limits = sim.stage.limits
    plan = plan_tiles(TISSUE_CENTRE_UM[0] - side / 2, TISSUE_CENTRE_UM[1] - side / 2, side, side, fov_w, fov_h,
                      OVERLAP, (limits.x_min_um, limits.y_min_um, limits.x_max_um, limits.y_max_um))
    moves = plan_move_times_s(plan, sim.stage.dynamics)
    tiles = len(plan.tiles)
    physical_s = sum(moves) + tiles * exposure_ms / 1000.0
    render_median = float(np.median(render_s))
    return {"objective_magnification": magnification, "tiles": tiles, "rows": plan.rows, "cols": plan.cols,
            "fov_um": [fov_w, fov_h], "move_settle_s_median": float(np.median(moves)),
            "physical_s": physical_s, "physical_tiles_per_s": tiles / physical_s,
            "render_s_median": render_median, "render_probe_snaps": len(render_s),
            "simulation_s": physical_s + tiles * render_median}


def run(args) -> dict:
    sim = SimulatedMicroscope.create(speedup=args.speedup, objective_magnification=args.objective,
                                     camera=Camera(width_px=args.sensor_px, height_px=args.sensor_px))
    backend = RenderTimer(sim)
    side = args.region_mm * 1000.0
    region = (TISSUE_CENTRE_UM[0] - side / 2, TISSUE_CENTRE_UM[1] - side / 2, side, side)
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
    projections = []
    for magnification in (20.0, 40.0):
        render_s = list(render) if magnification == args.objective else \
            render_probe_s(args.sensor_px, magnification, args.probe_snaps)
        projections.append(project(args.sensor_px, magnification, args.exposure_ms, render_s))
    return {"config": {"objective_magnification": args.objective, "region_mm": args.region_mm,
                       "sensor_px": args.sensor_px, "speedup": args.speedup, "focus": args.focus,
                       "exposure_ms": args.exposure_ms, "overlap_fraction": OVERLAP,
                       "stage_dynamics": vars(StageDynamics()), "machine": platform.machine(),
                       "processor": platform.processor()},
            "scan": scan, "projection_15mm": projections}


def print_table(result: dict) -> None:
    scan, config = result["scan"], result["config"]
    print(f"simulated scan: {config['region_mm']:g}x{config['region_mm']:g} mm at "
          f"{config['objective_magnification']:g}x, {config['sensor_px']} px sensor, speedup {config['speedup']:g}, focus {config['focus']}")
    print(f"  tiles {scan['tiles']} ({scan['rows']}x{scan['cols']})  wall {scan['wall_s']:.1f} s  "
          f"tiles/s {scan['tiles_per_s']:.2f}  wall/tile {1000 * scan['wall_s_per_tile']:.0f} ms")
    print(f"  render/tile median {scan['render_ms_median']:.0f} ms  p95 {scan['render_ms_p95']:.0f} ms  "
          f"stage model/tile {scan['stage_model_ms_median']:.0f} ms (wall {scan['stage_model_wall_ms_median']:.0f} ms)")
    print(f"\nprojected {PROJECTED_AREA_MM:g}x{PROJECTED_AREA_MM:g} mm, {OVERLAP:.0%} overlap, exposure "
          f"{config['exposure_ms']:g} ms (physical = stage move+settle+exposure; simulation = physical + render)")
    print(f"{'objective':>9} {'tiles':>7} {'move+settle ms':>15} {'physical s':>11} {'tiles/s':>8} "
          f"{'render ms':>10} {'simulation s':>13}")
    for p in result["projection_15mm"]:
        print(f"{p['objective_magnification']:>8g}x {p['tiles']:>7d} {1000 * p['move_settle_s_median']:>15.1f} "
              f"{p['physical_s']:>11.1f} {p['physical_tiles_per_s']:>8.2f} {1000 * p['render_s_median']:>10.0f} "
              f"{p['simulation_s']:>13.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region-mm", type=float, default=2.0, help="side of the scanned square region, mm")
    parser.add_argument("--objective", type=float, default=20.0, choices=(10.0, 20.0, 40.0))
    parser.add_argument("--speedup", type=float, default=1.0, help="stage moves take 1/speedup of physical time")
    parser.add_argument("--sensor-px", type=int, default=1024, help="square sensor edge, px")
    parser.add_argument("--focus", choices=("none", "map"), default="none", help="focus strategy of the scan")
    parser.add_argument("--exposure-ms", type=float, default=8.0)
    parser.add_argument("--probe-snaps", type=int, default=8, help="renders timed at the other objective")
    parser.add_argument("--output", type=Path, default=RESULTS / "acquisition.json")
    args = parser.parse_args()
    result = run(args)
    print_table(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
