"""Stitching benchmark: accuracy, speed and memory of wsi_stitching against ASHLAR and m2stitch.

Accuracy mode (default): a simulated scan with known true tile positions (10x10 grid, 10 % overlap,
stage jitter up to ±20 px, three empty-glass tiles, 1024 px RGB tiles, vignetting and noise) is
written to disk once as .npy tiles plus a manifest; each method then runs in its own subprocess on the
same files and reports positions, wall time and peak RSS. Position errors are measured after removing
the common translation (no method can observe the absolute offset of the specimen) over the tiles
that have tissue (empty-glass tiles have nothing to register against and are reported separately).
Our wall time includes flat-field estimation and writing the blended Zarr mosaic; the peers only
compute positions. The seam metric compares our blended mosaic with the noise-free specimen: the step
of the error across tile borders versus the same statistic on tile centre lines (noise floor).

Memory mode (--grid 30 --tile 2048): tiles are generated on the fly and fed straight to the
incremental stitcher (integer jitter, so generation stays cheap); reports peak RSS of that process.

    nice -n 10 .venv/bin/python bench/stitching.py                     # 10x10, 1024 px, all methods
    nice -n 10 .venv/bin/python bench/stitching.py --grid 30 --tile 2048
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src" / "wsi_stitching"))

from wsi_stitching.simulation import SyntheticScan, border_steps  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EMPTY_CELLS = ((2, 7), (6, 3), (8, 8))


def search_limit_px(args) -> float:
    """Every method searches the same range: two tiles' stage errors, each up to the jitter."""
    return 2 * args.jitter


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set (VmHWM; unlike ru_maxrss it is not inherited
    from the parent across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_scan(args, subpixel: bool) -> SyntheticScan:
    empty = tuple(c for c in EMPTY_CELLS if c[0] < args.grid and c[1] < args.grid)
    return SyntheticScan(args.grid, args.grid, tile_px=args.tile, overlap_fraction=args.overlap,
                         jitter_px=args.jitter, empty_cells=empty, subpixel=subpixel,
                         texture_period_px=4096, seed=args.seed)


# ----- dataset on disk ----------------------------------------------------------------------------
def write_dataset(scan: SyntheticScan, directory: Path) -> None:
    entries = []
    for (row, col) in sorted(scan.nominal_positions_px):
        name = f"tile_r{row:02d}_c{col:02d}.npy"
        np.save(directory / name, scan.tile((row, col)))
        x_um, y_um = scan.stage_position_um((row, col))
        entries.append({"row": row, "col": col, "measured_x_um": x_um, "measured_y_um": y_um, "image": name})
    manifest = {"scan_id": "bench-stitching", "pixel_size_um": scan.pixel_size_um,
                "tile_width_px": scan.tile_px, "tile_height_px": scan.tile_px, "tiles": entries}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def load_manifest(directory: Path):
    manifest = json.loads((directory / "manifest.json").read_text())
    pixel = manifest["pixel_size_um"]
    cells = [(t["row"], t["col"]) for t in manifest["tiles"]]
    stage_px = np.array([[t["measured_y_um"] / pixel, t["measured_x_um"] / pixel] for t in manifest["tiles"]])
    files = [directory / t["image"] for t in manifest["tiles"]]
    return manifest, cells, stage_px, files


def gray(image: np.ndarray) -> np.ndarray:
    return image.mean(axis=2).astype(np.uint8)


# ----- methods (each runs in its own subprocess) ----------------------------------------------------
def stitch_parameters(args, pixel_size_um: float):
    """Ours is told the simulated stage's specification: errors up to the jitter."""
    from wsi_stitching.stitcher import StitchParameters
    return StitchParameters(stage_repeatability_um=args.jitter * pixel_size_um)


def run_ours(directory: Path, args) -> dict:
    from wsi_stitching.stitcher import remove_mosaic, stitch_manifest
    output = directory / "ours.zarr"
    remove_mosaic(output)
    manifest, _, _, _ = load_manifest(directory)
    started = time.perf_counter()
    parameters = stitch_parameters(args, manifest["pixel_size_um"])
    result = stitch_manifest(directory / "manifest.json", output, parameters, resume=False)
    wall = time.perf_counter() - started
    _, cells, _, _ = load_manifest(directory)
    return {"wall_s": wall, "positions": [list(result.positions_px[c]) for c in cells],
            "mosaic": str(output), "pairs_dropped": result.pairs_dropped,
            "tiles_at_stage_position": result.tiles_at_stage_position,
            "residual_rms_px": result.residual_rms_px}


def run_ashlar(directory: Path, args) -> dict:
    import ashlar.reg as reg  # starts a JVM through pyjnius (Bio-Formats), even though we do not read files

    manifest, cells, stage_px, files = load_manifest(directory)

    class ArrayMetadata(reg.Metadata):
        """Stage positions in px (y, x), single-channel uint8 tiles."""
        @property
        def _num_images(self):
            return len(files)

        @property
        def num_channels(self):
            return 1

        @property
        def pixel_size(self):
            return manifest["pixel_size_um"]

        @property
        def pixel_dtype(self):
            return np.dtype(np.uint8)

        def tile_position(self, i):
            # Whole pixels: ASHLAR crops overlaps at truncated positions, and fractional stage
            # positions (921.6 px steps here) gave it a 0.04 % scale bias (RMS 1.6 px) in a trial run.
            return np.round(stage_px[i])

        def tile_size(self, i):
            return np.array([manifest["tile_height_px"], manifest["tile_width_px"]])

    class ArrayReader(reg.Reader):
        def __init__(self):
            self.metadata = ArrayMetadata()

        def read(self, series, c):
            return gray(np.load(files[series]))

    started = time.perf_counter()
    aligner = reg.EdgeAligner(ArrayReader(), channel=0, max_shift=search_limit_px(args) * manifest["pixel_size_um"],
                              filter_sigma=0.0, verbose=False)
    aligner.run()
    wall = time.perf_counter() - started
    return {"wall_s": wall, "positions": aligner.positions.tolist()}


def run_m2stitch(directory: Path, args) -> dict:
    import m2stitch
    manifest, cells, stage_px, files = load_manifest(directory)
    started = time.perf_counter()
    # m2stitch 0.7.2 divides the centred dot product by the norms of the *uncentred* overlaps, so
    # bright-field tiles (mean ~200) score NCC ~0.01 and it aborts ("no good top pair"); tiles with
    # their mean removed keep its NCC meaningful.
    images = np.stack([gray(np.load(f)) for f in files]).astype(np.float32)
    images -= images.mean(axis=(1, 2), keepdims=True)
    threshold_percent = 100.0 * search_limit_px(args) / manifest["tile_width_px"]
    result, _ = m2stitch.stitch_images(images, rows=[r for r, _ in cells], cols=[c for _, c in cells],
                                       position_initial_guess=stage_px, overlap_diff_threshold=threshold_percent,
                                       row_col_transpose=False)
    wall = time.perf_counter() - started
    positions = [[float(result.loc[i, "y_pos"]), float(result.loc[i, "x_pos"])] for i in range(len(cells))]
    return {"wall_s": wall, "positions": positions}


def run_streaming(args) -> dict:
    """Memory mode: generate each tile when it is needed and stitch inline (serpentine order)."""
    from wsi_stitching.stitcher import MosaicStitcher, remove_mosaic
    scan = make_scan(args, subpixel=False)
    simulator_rss_mb = peak_rss_mb()
    output = Path(args.workdir) / "streaming.zarr"
    remove_mosaic(output)
    parameters = stitch_parameters(args, scan.pixel_size_um)
    started = time.perf_counter()
    stitcher = MosaicStitcher(scan.layout("bench-streaming"), output, parameters, resume=False)
    most_in_memory = 0
    for row in range(scan.rows):
        columns = range(scan.cols) if row % 2 == 0 else reversed(range(scan.cols))
        for col in columns:
            stitcher.add_tile(row, col, scan.tile((row, col)), *scan.stage_position_um((row, col)))
            most_in_memory = max(most_in_memory, stitcher.tiles_in_memory)
    result = stitcher.finish()
    wall = time.perf_counter() - started
    cells = sorted(scan.nominal_positions_px)
    errors = position_errors([result.positions_px[c] for c in cells], scan, cells)
    shutil.rmtree(output, ignore_errors=True)
    return {"wall_s": wall, "simulator_peak_rss_mb": simulator_rss_mb, "most_tiles_in_memory": most_in_memory, "mosaic_px": [result.height_px, result.width_px],
            **errors, "tiles_at_stage_position": result.tiles_at_stage_position,
            "pairs_dropped": result.pairs_dropped}


def child_main(args) -> None:
    try:
        if args.child == "streaming":
            outcome = run_streaming(args)
        else:
            runner = {"ours": run_ours, "ashlar": run_ashlar, "m2stitch": run_m2stitch}[args.child]
            outcome = runner(Path(args.workdir), args)
        outcome["peak_rss_mb"] = peak_rss_mb()
    except BaseException as exc:  # reported, not hidden: the table shows why a peer could not run
        outcome = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    print("RESULT " + json.dumps(outcome))


def run_child(method: str, args) -> dict:
    command = [sys.executable, __file__, "--child", method, "--workdir", str(args.workdir),
               "--grid", str(args.grid), "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--jitter", str(args.jitter), "--seed", str(args.seed)]
    completed = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit code {completed.returncode}; stderr tail: {completed.stderr[-1500:]}"}
    return json.loads(lines[-1][len("RESULT "):])


# ----- evaluation -------------------------------------------------------------------------------
def position_errors(positions, scan: SyntheticScan, cells) -> dict:
    evaluated = [i for i, c in enumerate(cells) if c not in scan.empty_cells]
    estimated = np.asarray(positions, dtype=float)[evaluated]
    truth = np.array([scan.true_positions_px[cells[i]] for i in evaluated])
    error = estimated - truth
    error -= error.mean(axis=0)
    norms = np.linalg.norm(error, axis=1)
    return {"rms_px": float(np.sqrt(np.mean(norms ** 2))), "max_px": float(norms.max()),
            "tiles_evaluated": len(evaluated)}


def seam_report(scan: SyntheticScan, outcome: dict, cells) -> dict:
    import zarr
    from PIL import Image
    mosaic = zarr.open_group(outcome["mosaic"], mode="r")["image"][:]
    positions = {c: tuple(p) for c, p in zip(cells, outcome["positions"])}
    offsets = [np.subtract(scan.true_positions_px[c], np.round(positions[c])) for c in cells]
    offset = tuple(int(v) for v in np.round(np.median(offsets, axis=0)))
    steps = border_steps(mosaic, scan, positions, offset)
    # PNG of a four-tile corner in the middle of the grid, where two seams cross.
    corner_cell = (scan.rows // 2, scan.cols // 2)
    y, x = (int(round(v)) for v in positions[corner_cell])
    half = min(256, scan.tile_px // 2)
    crop = mosaic[max(0, y - half):y + half, max(0, x - half):x + half]
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "stitching_seam.png"
    Image.fromarray(crop).save(png)
    return {"seam_step_mean": float(steps["seam"].mean()), "seam_step_p95": float(np.percentile(steps["seam"], 95)),
            "noise_step_mean": float(steps["interior"].mean()),
            "noise_step_p95": float(np.percentile(steps["interior"], 95)),
            "segments": int(steps["seam"].size), "png": str(png.relative_to(ROOT))}


def save_results(key: str, document: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "stitching.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[key] = document
    path.write_text(json.dumps(existing, indent=1))
    return path


def accuracy_mode(args) -> None:
    scan = make_scan(args, subpixel=True)
    print(f"dataset: {args.grid}x{args.grid} tiles of {args.tile} px RGB, overlap {args.overlap:.0%}, "
          f"jitter ±{args.jitter} px (sub-pixel), empty-glass tiles {list(scan.empty_cells)}, "
          f"noise σ={scan.noise_sigma}, vignetting {scan.vignetting_strength:.0%}; data in {args.workdir}")
    started = time.perf_counter()
    write_dataset(scan, Path(args.workdir))
    print(f"dataset written in {time.perf_counter() - started:.1f} s")
    _, cells, _, _ = load_manifest(Path(args.workdir))
    rows, document = [], {"dataset": {"grid": args.grid, "tile_px": args.tile, "overlap": args.overlap,
                                      "jitter_px": args.jitter, "empty_cells": scan.empty_cells,
                                      "seed": args.seed}, "methods": {}}
    for method in args.methods.split(","):
        outcome = run_child(method, args)
        if "error" not in outcome:
            outcome.update(position_errors(outcome["positions"], scan, cells))
            if method == "ours":
                outcome["seam"] = seam_report(scan, outcome, cells)
        outcome.pop("positions", None)
        document["methods"][method] = outcome
        rows.append((method, outcome))
    print(f"\n{'method':<10} {'RMS px':>8} {'max px':>8} {'wall s':>8} {'peak RSS MB':>12}")
    for method, outcome in rows:
        if "error" in outcome:
            print(f"{method:<10} could not run: {outcome['error']}")
            continue
        print(f"{method:<10} {outcome['rms_px']:8.3f} {outcome['max_px']:8.3f} {outcome['wall_s']:8.1f} "
              f"{outcome['peak_rss_mb']:12.0f}")
    ours = document["methods"].get("ours", {})
    if "seam" in ours:
        seam = ours["seam"]
        print(f"\nseam step (blended overlaps, gray levels): mean {seam['seam_step_mean']:.2f}, "
              f"p95 {seam['seam_step_p95']:.2f}; noise floor (tile centre lines): mean "
              f"{seam['noise_step_mean']:.2f}, p95 {seam['noise_step_p95']:.2f}; PNG {seam['png']}")
    print(f"JSON: {save_results(f'accuracy_{args.grid}x{args.grid}_{args.tile}px', document)}")


def memory_mode(args) -> None:
    print(f"memory mode: {args.grid}x{args.grid} tiles of {args.tile} px RGB generated on the fly "
          f"(integer jitter ±{args.jitter} px), stitched inline in serpentine order")
    outcome = run_child("streaming", args)
    if "error" in outcome:
        print(f"streaming run failed: {outcome['error']}\n{outcome.get('traceback', '')}")
    else:
        print(f"\n{'mode':<10} {'tiles':>6} {'mosaic px':>14} {'RMS px':>7} {'max px':>7} {'wall s':>8} "
              f"{'peak RSS MB':>12} {'tiles held':>10}")
        print(f"{'streaming':<10} {args.grid * args.grid:>6} {outcome['mosaic_px'][0]:>6}x{outcome['mosaic_px'][1]:<7} "
              f"{outcome['rms_px']:7.3f} {outcome['max_px']:7.3f} {outcome['wall_s']:8.1f} "
              f"{outcome['peak_rss_mb']:12.0f} {outcome['most_tiles_in_memory']:>10}")
        print(f"peak RSS is of the whole process, including the simulator (texture + generation: "
              f"{outcome['simulator_peak_rss_mb']:.0f} MB before the first tile)")
    print(f"JSON: {save_results(f'memory_{args.grid}x{args.grid}_{args.tile}px', outcome)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=10, help="rows = columns of the tile grid (default 10)")
    parser.add_argument("--tile", type=int, default=1024, help="tile size, px (default 1024)")
    parser.add_argument("--overlap", type=float, default=0.1, help="nominal overlap fraction (default 0.1)")
    parser.add_argument("--jitter", type=float, default=20.0, help="stage jitter, ± px (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="ours,ashlar,m2stitch")
    parser.add_argument("--memory", action="store_true",
                        help="memory mode (implied by --grid >= 20): on-the-fly tiles, our stitcher only")
    parser.add_argument("--workdir", help="where the dataset and mosaics go (default: a temporary directory)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    temporary = None
    if args.workdir is None:
        temporary = tempfile.mkdtemp(prefix="bench_stitching_")
        args.workdir = temporary
    try:
        if args.memory or args.grid >= 20:
            memory_mode(args)
        else:
            accuracy_mode(args)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
