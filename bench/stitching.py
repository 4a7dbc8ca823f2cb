"""Stitching benchmark: accuracy, speed and memory of wsi_stitching against ASHLAR and m2stitch.

Accuracy mode (default): simulated scans with known true tile positions (10x10 grid of 1024 px RGB
tiles, 10 % overlap, vignetting and noise), one per case:
  dense    tissue over ~73 % of the slide, three empty-glass tiles, stage errors up to ±20 px;
  stage60  the same specimen, stage errors up to ±60 px (of a 102 px overlap);
  sparse   tissue over ~21 % in large islands, many tiles mostly or wholly glass, errors up to ±20 px.
Each scan is written to disk once as .npy tiles plus a manifest; each method then runs in its own
subprocess on the same files and reports positions, wall time and peak RSS. Every method searches the
same range (twice the stage error); ours is told the simulated stage's specification (its
stage_repeatability_um is the jitter).

Position errors are measured after removing the common translation (no method can observe the
absolute offset of the specimen) over the tiles an image can place: the largest group of tiles linked
by true overlaps that are at least 16 px wide and show structure (band-passed gray level of the
noise-free specimen, std >= 2.5 levels, clearly stained tissue rather than a faint haze); ground
truth, the same tiles for every method. Our mosaic is also judged: "at limit" counts tiles placed within 0.5 px of the
placement limit without a flag (must be 0: a clamp would put them there); "glass ripple" is the
flat-field residual on glass (p99 - p1 of the mosaic-over-truth ratio in 16 px blocks of empty
glass); the seam metric compares the blended mosaic with the noise-free specimen: the step of the
error across tile borders versus the same statistic on tile centre lines (noise floor). Our wall time
includes flat-field estimation and writing the blended Zarr mosaic; the peers only compute positions.

Memory mode (--grid 30 --tile 2048): tiles are generated on the fly and fed straight to the
incremental stitcher (integer jitter, so generation stays cheap); reports peak RSS of that process.

Inline mode (--inline): the speed of stitching while a scan runs, on the dense case. The tiles are read
into memory first (not timed), then fed to the stitcher in serpentine order as a scan delivers them, with
the flat-field estimated inline from the first tiles as the stitching node does; timed from the first
tile to the finished mosaic, --repeat times. Reports Mpx/s of tile data against the rate of tile data
the 20x anchor of bench/acquisition.py means (NanoZoomer S360: 15 x 15 mm in 156 s, with our camera's
pixel and 10 % overlap), CPU time, the 1-minute load average before each run (the machine may be
shared), position errors and peak RSS (all tiles in memory).

    nice -n 10 .venv/bin/python bench/stitching.py                     # 3 cases, 10x10, 1024 px, all methods
    nice -n 10 .venv/bin/python bench/stitching.py --cases stage60 --methods ours,ashlar
    nice -n 10 .venv/bin/python bench/stitching.py --grid 30 --tile 2048
    nice -n 10 .venv/bin/python bench/stitching.py --inline                 # 10x10 of 1024 px, 3 runs
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
sys.path[:0] = [str(p) for p in sorted((ROOT / "src").iterdir()) if (p / "setup.py").exists()]

from wsi_common.scan_files import MANIFEST_NAME, Manifest  # noqa: E402
from wsi_stitching.simulation import SyntheticScan, border_steps, glass_ripple  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EMPTY_CELLS = ((2, 7), (6, 3), (8, 8))
CASES = {
    "dense": {"jitter_px": 20.0, "empty_cells": EMPTY_CELLS},
    "stage60": {"jitter_px": 60.0, "empty_cells": EMPTY_CELLS},
    "sparse": {"jitter_px": 20.0, "empty_cells": (), "tissue_threshold": 0.8, "tissue_blob_px": 256.0},
}
MIN_SHARED_PX = 16          # a true overlap narrower than this cannot be registered
# Nor one whose noise-free specimen has less structure (band-passed gray std, gray levels): below it lies
# a faint haze of tissue (10 % of an overlap, lightly stained), which neither our registration (texture
# gate) nor ASHLAR trusts here.
MIN_STRUCTURE = 2.5
AT_LIMIT_PX = 0.5


def search_limit_px(case: str) -> float:
    """Every method searches the same range: two tiles' stage errors, each up to the jitter."""
    return 2 * CASES[case]["jitter_px"]


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set (VmHWM; unlike ru_maxrss it is not inherited
    from the parent across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_scan(args, case: str, subpixel: bool) -> SyntheticScan:
    spec = CASES[case]
    empty = tuple(c for c in spec["empty_cells"] if c[0] < args.grid and c[1] < args.grid)
    return SyntheticScan(args.grid, args.grid, tile_px=args.tile, overlap_fraction=args.overlap,
                         jitter_px=spec["jitter_px"], empty_cells=empty, subpixel=subpixel,
                         texture_period_px=4096, seed=args.seed,
                         tissue_threshold=spec.get("tissue_threshold", -0.6),
                         tissue_blob_px=spec.get("tissue_blob_px"))


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
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


def load_manifest(directory: Path):
    manifest = Manifest.read(directory / MANIFEST_NAME).document
    pixel = manifest["pixel_size_um"]
    cells = [(t["row"], t["col"]) for t in manifest["tiles"]]
    stage_px = np.array([[t["measured_y_um"] / pixel, t["measured_x_um"] / pixel] for t in manifest["tiles"]])
    files = [directory / t["image"] for t in manifest["tiles"]]
    return manifest, cells, stage_px, files


def gray(image: np.ndarray) -> np.ndarray:
    return image.mean(axis=2).astype(np.uint8)


# ----- methods (each runs in its own subprocess) ----------------------------------------------------
def stitch_parameters(case: str, pixel_size_um: float):
    """Ours is told the simulated stage's specification: errors up to the jitter."""
    from wsi_stitching.stitcher import StitchParameters
    return StitchParameters(stage_repeatability_um=CASES[case]["jitter_px"] * pixel_size_um)


def run_ours(directory: Path, args) -> dict:
    from wsi_stitching.stitcher import remove_mosaic, stitch_manifest
    output = directory / "ours.zarr"
    remove_mosaic(output)
    manifest, cells, _, _ = load_manifest(directory)
    started = time.perf_counter()
    parameters = stitch_parameters(args.child_case, manifest["pixel_size_um"])
    result = stitch_manifest(directory / MANIFEST_NAME, output, parameters, resume=False)
    wall = time.perf_counter() - started
    report = json.loads(result.report_path.read_text())
    limit_px = report["summary"]["stage_error_limit"]["placement_limit_px"]
    at_limit = [t for t in report["tiles"]
                if np.abs(t["offset_from_stage_px"]).max() >= limit_px - AT_LIMIT_PX and not t["flags"]]
    return {"wall_s": wall, "positions": [list(result.positions_px[c]) for c in cells],
            "mosaic": str(output), "pairs_dropped": result.pairs_dropped,
            "tiles_at_stage_position": result.tiles_at_stage_position, "tiles_flagged": result.tiles_flagged,
            "tiles_at_limit_unflagged": len(at_limit), "placement_limit_px": limit_px,
            "residual_rms_px": result.residual_rms_px, "flat_field": report["summary"]["flat_field"]["method"]}


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
    aligner = reg.EdgeAligner(ArrayReader(), channel=0,
                              max_shift=search_limit_px(args.child_case) * manifest["pixel_size_um"],
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
    threshold_percent = 100.0 * search_limit_px(args.child_case) / manifest["tile_width_px"]
    result, _ = m2stitch.stitch_images(images, rows=[r for r, _ in cells], cols=[c for _, c in cells],
                                       position_initial_guess=stage_px, overlap_diff_threshold=threshold_percent,
                                       row_col_transpose=False)
    wall = time.perf_counter() - started
    positions = [[float(result.loc[i, "y_pos"]), float(result.loc[i, "x_pos"])] for i in range(len(cells))]
    return {"wall_s": wall, "positions": positions}


def serpentine(rows: int, cols: int) -> list:
    """Grid cells in the order a serpentine scan takes them."""
    return [(row, col) for row in range(rows) for col in (range(cols) if row % 2 == 0 else reversed(range(cols)))]


def anchor_tile_rate(tile_px: int) -> tuple[str, float]:
    """(scanner, Mpx/s): the tile data the 20x anchor's scan takes in, as tiles of tile_px (the scan-time
    anchors and their tile grid live in bench/acquisition.py)."""
    from acquisition import anchor_tile_rates
    from wsi_common.objective import DEFAULT_OBJECTIVE_MAGNIFICATION
    [anchor] = [a for a in anchor_tile_rates(tile_px)
                if a["objective_magnification"] == DEFAULT_OBJECTIVE_MAGNIFICATION]
    return anchor["scanner"], anchor["mpx_per_s"]


def run_inline(directory: Path, args) -> dict:
    """Inline mode: tiles in memory first, then stitched in scan order, timed from first tile to finish()."""
    from wsi_stitching.layout import read_manifest
    from wsi_stitching.stitcher import MosaicStitcher, remove_mosaic
    manifest = read_manifest(directory / MANIFEST_NAME)
    tiles = {(t.row, t.col): (np.load(t.image_path), t.x_um, t.y_um) for t in manifest.tiles}
    parameters = stitch_parameters(args.child_case, manifest.layout.pixel_size_um)
    output = directory / "inline.zarr"
    runs = []
    for _ in range(args.repeat):
        remove_mosaic(output)
        load_1min = os.getloadavg()[0]
        cpu_started, started = time.process_time(), time.perf_counter()
        stitcher = MosaicStitcher(manifest.layout, output, parameters, resume=False)
        for cell in serpentine(manifest.layout.rows, manifest.layout.cols):
            stitcher.add_tile(*cell, *tiles[cell])
        result = stitcher.finish()
        runs.append({"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started,
                     "load_1min_before": load_1min})
    cells = [(t.row, t.col) for t in manifest.tiles]
    return {"runs": runs, "positions": [list(result.positions_px[c]) for c in cells], "tiles": len(cells),
            "tile_px": [manifest.layout.tile_height_px, manifest.layout.tile_width_px]}


def run_streaming(args) -> dict:
    """Memory mode: generate each tile when it is needed and stitch inline (serpentine order)."""
    from wsi_stitching.stitcher import MosaicStitcher, remove_mosaic
    scan = make_scan(args, "dense", subpixel=False)
    simulator_rss_mb = peak_rss_mb()
    output = Path(args.workdir) / "streaming.zarr"
    remove_mosaic(output)
    parameters = stitch_parameters("dense", scan.pixel_size_um)
    started = time.perf_counter()
    stitcher = MosaicStitcher(scan.layout("bench-streaming"), output, parameters, resume=False)
    most_in_memory = 0
    for row, col in serpentine(scan.rows, scan.cols):
        stitcher.add_tile(row, col, scan.tile((row, col)), *scan.stage_position_um((row, col)))
        most_in_memory = max(most_in_memory, stitcher.tiles_in_memory)
    result = stitcher.finish()
    wall = time.perf_counter() - started
    cells = sorted(scan.nominal_positions_px)
    errors = position_errors([result.positions_px[c] for c in cells], scan, cells,
                             [c for c in cells if c not in scan.empty_cells])
    shutil.rmtree(output, ignore_errors=True)
    return {"wall_s": wall, "simulator_peak_rss_mb": simulator_rss_mb, "most_tiles_in_memory": most_in_memory, "mosaic_px": [result.height_px, result.width_px],
            **errors, "tiles_at_stage_position": result.tiles_at_stage_position,
            "pairs_dropped": result.pairs_dropped}


def child_main(args) -> None:
    try:
        if args.child == "streaming":
            outcome = run_streaming(args)
        else:
            runners = {"ours": run_ours, "ashlar": run_ashlar, "m2stitch": run_m2stitch, "inline": run_inline}
            runner = runners[args.child]
            outcome = runner(Path(args.workdir), args)
        outcome["peak_rss_mb"] = peak_rss_mb()
    except BaseException as exc:  # reported, not hidden: the table shows why a peer could not run
        outcome = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    print("RESULT " + json.dumps(outcome))


def run_child(method: str, args, case: str, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--child", method, "--child-case", case, "--workdir", str(workdir),
               "--grid", str(args.grid), "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--seed", str(args.seed), "--repeat", str(args.repeat)]
    completed = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit code {completed.returncode}; stderr tail: {completed.stderr[-1500:]}"}
    return json.loads(lines[-1][len("RESULT "):])


# ----- evaluation -------------------------------------------------------------------------------
def position_errors(positions, scan: SyntheticScan, cells, evaluated_cells) -> dict:
    """Errors of the evaluated tiles' positions after removing their common translation."""
    evaluated = [i for i, c in enumerate(cells) if c in set(evaluated_cells)]
    estimated = np.asarray(positions, dtype=float)[evaluated]
    truth = np.array([scan.true_positions_px[cells[i]] for i in evaluated])
    error = estimated - truth
    error -= error.mean(axis=0)
    norms = np.linalg.norm(error, axis=1)
    return {"rms_px": float(np.sqrt(np.mean(norms ** 2))), "max_px": float(norms.max()),
            "tiles_evaluated": len(evaluated)}


def placeable_tiles(scan: SyntheticScan) -> list:
    """The largest group of tiles joined by true overlaps an image can register (ground truth): at least
    MIN_SHARED_PX wide, with MIN_STRUCTURE in the noise-free specimen between ~2 and ~15 px scale. Tiles
    outside it have no observable position relative to it, whatever the method."""
    from scipy import ndimage
    size = scan.tile_px
    links = {cell: [] for cell in scan.true_positions_px}
    for (row, col), (ay, ax) in scan.true_positions_px.items():
        for neighbour in ((row, col + 1), (row + 1, col)):
            if neighbour not in scan.true_positions_px:
                continue
            by, bx = scan.true_positions_px[neighbour]
            y0, y1 = int(np.ceil(max(ay, by))), int(np.floor(min(ay, by) + size))
            x0, x1 = int(np.ceil(max(ax, bx))), int(np.floor(min(ax, bx) + size))
            if min(y1 - y0, x1 - x0) < MIN_SHARED_PX:
                continue
            gray = scan.specimen(y0, x0, y1 - y0, x1 - x0).mean(axis=2)
            structure = float(np.std(ndimage.gaussian_filter(gray, 2.0) - ndimage.gaussian_filter(gray, 15.0)))
            if structure >= MIN_STRUCTURE:
                links[(row, col)].append(neighbour)
                links[neighbour].append((row, col))
    best, seen = [], set()
    for start in sorted(links):
        if start in seen:
            continue
        group, stack = [], [start]
        seen.add(start)
        while stack:
            cell = stack.pop()
            group.append(cell)
            for other in links[cell]:
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        best = max(best, group, key=len)
    return sorted(best)


def mosaic_report(scan: SyntheticScan, outcome: dict, cells, evaluated_cells, case: str) -> dict:
    """Seams and glass ripple of our blended mosaic, against the noise-free specimen."""
    import zarr
    from PIL import Image
    mosaic = zarr.open_group(outcome["mosaic"], mode="r")["image"][:]
    positions = {c: tuple(p) for c, p in zip(cells, outcome["positions"])}
    offsets = [np.subtract(scan.true_positions_px[c], np.round(positions[c])) for c in evaluated_cells]
    offset = tuple(int(v) for v in np.round(np.median(offsets, axis=0)))
    ripple = glass_ripple(mosaic, scan, offset)
    steps = border_steps(mosaic, scan, {c: positions[c] for c in evaluated_cells}, offset)
    # PNG of a four-tile corner in the middle of the grid, where two seams cross.
    corner_cell = (scan.rows // 2, scan.cols // 2)
    y, x = (int(round(v)) for v in positions[corner_cell])
    half = min(256, scan.tile_px // 2)
    crop = mosaic[max(0, y - half):y + half, max(0, x - half):x + half]
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"stitching_seam_{case}.png"
    Image.fromarray(crop).save(png)
    return {"glass_ripple": ripple["ripple"], "glass_blocks": ripple["blocks"],
            "seam_step_mean": float(steps["seam"].mean()), "seam_step_p95": float(np.percentile(steps["seam"], 95)),
            "noise_step_mean": float(steps["interior"].mean()),
            "noise_step_p95": float(np.percentile(steps["interior"], 95)),
            "segments": int(steps["seam"].size), "png": str(png.relative_to(ROOT))}


def save_results(path: Path, key: str, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[key] = document
    path.write_text(json.dumps(existing, indent=1))
    return path


def run_case(args, case: str) -> tuple[dict, list]:
    workdir = Path(args.workdir) / case
    workdir.mkdir(parents=True, exist_ok=True)
    scan = make_scan(args, case, subpixel=True)
    errors_px = np.array([np.subtract(scan.true_positions_px[c], scan.nominal_positions_px[c])
                          for c in scan.nominal_positions_px])
    started = time.perf_counter()
    write_dataset(scan, workdir)
    evaluated = placeable_tiles(scan)
    print(f"\n[{case}] {args.grid}x{args.grid} tiles of {args.tile} px, overlap {args.overlap:.0%} "
          f"({args.tile * args.overlap:.0f} px), stage errors up to {np.abs(errors_px).max():.1f} px "
          f"(jitter ±{scan.jitter_px:g} px), empty-glass tiles {list(scan.empty_cells)}; "
          f"{len(evaluated)} tiles placeable from the images; written in {time.perf_counter() - started:.0f} s")
    _, cells, _, _ = load_manifest(workdir)
    document = {"dataset": {"grid": args.grid, "tile_px": args.tile, "overlap": args.overlap,
                            "jitter_px": scan.jitter_px, "max_stage_error_px": float(np.abs(errors_px).max()),
                            "empty_cells": scan.empty_cells, "tissue_threshold": scan.tissue_threshold,
                            "tiles_evaluated": len(evaluated), "seed": args.seed}, "methods": {}}
    rows = []
    for method in args.methods.split(","):
        outcome = run_child(method, args, case, workdir)
        if "error" not in outcome:
            outcome.update(position_errors(outcome["positions"], scan, cells, evaluated))
            if method == "ours":
                outcome["mosaic_quality"] = mosaic_report(scan, outcome, cells, evaluated, case)
        outcome.pop("positions", None)
        document["methods"][method] = outcome
        rows.append((case, method, outcome))
    return document, rows


def accuracy_mode(args) -> None:
    print(f"accuracy mode, cases {args.cases}; data in {args.workdir}")
    documents, rows = {}, []
    for case in args.cases.split(","):
        documents[case], case_rows = run_case(args, case)
        rows += case_rows
    print(f"\n{'case':<8} {'method':<9} {'tiles':>5} {'RMS px':>7} {'max px':>7} {'flagged':>7} {'at limit':>8} "
          f"{'glass ripple':>12} {'wall s':>7} {'peak RSS MB':>11}")
    for case, method, outcome in rows:
        if "error" in outcome:
            print(f"{case:<8} {method:<9} could not run: {outcome['error']}")
            continue
        ours = {"flagged": "-", "at_limit": "-", "ripple": "-"}
        if method == "ours":
            ours = {"flagged": outcome["tiles_flagged"], "at_limit": outcome["tiles_at_limit_unflagged"],
                    "ripple": f"{100 * outcome['mosaic_quality']['glass_ripple']:.2f} %"}
        print(f"{case:<8} {method:<9} {outcome['tiles_evaluated']:>5} {outcome['rms_px']:7.3f} "
              f"{outcome['max_px']:7.3f} {ours['flagged']:>7} {ours['at_limit']:>8} {ours['ripple']:>12} "
              f"{outcome['wall_s']:7.1f} {outcome['peak_rss_mb']:11.0f}")
    for case, method, outcome in rows:
        if "mosaic_quality" in outcome:
            q = outcome["mosaic_quality"]
            print(f"[{case}] ours: seam step mean {q['seam_step_mean']:.2f}, p95 {q['seam_step_p95']:.2f} gray levels "
                  f"(noise floor mean {q['noise_step_mean']:.2f}, p95 {q['noise_step_p95']:.2f}); glass ripple over "
                  f"{q['glass_blocks']} blocks; flat-field from {outcome['flat_field']}; residual RMS "
                  f"{outcome['residual_rms_px']:.3f} px; placement limit {outcome['placement_limit_px']:.0f} px; "
                  f"PNG {q['png']}")
    print(f"JSON: {save_results(args.output, f'accuracy_{args.grid}x{args.grid}_{args.tile}px', documents)}")


def memory_mode(args) -> None:
    print(f"memory mode: {args.grid}x{args.grid} tiles of {args.tile} px RGB generated on the fly "
          f"(integer jitter ±{CASES['dense']['jitter_px']:g} px), stitched inline in serpentine order")
    outcome = run_child("streaming", args, "dense", Path(args.workdir))
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
    print(f"JSON: {save_results(args.output, f'memory_{args.grid}x{args.grid}_{args.tile}px', outcome)}")


def inline_mode(args) -> None:
    case = "dense"
    workdir = Path(args.workdir) / "inline"
    workdir.mkdir(parents=True, exist_ok=True)
    scan = make_scan(args, case, subpixel=True)
    write_dataset(scan, workdir)
    megapixels = args.grid * args.grid * args.tile * args.tile / 1e6
    print(f"inline mode: {args.grid}x{args.grid} tiles of {args.tile} px RGB ({megapixels:.1f} Mpx), overlap "
          f"{args.overlap:.0%}, {case} case, stitched in serpentine order from memory; {os.cpu_count()} CPUs")
    outcome = run_child("inline", args, case, workdir)
    if "error" in outcome:
        print(f"inline run failed: {outcome['error']}\n{outcome.get('traceback', '')}")
        return
    _, cells, _, _ = load_manifest(workdir)
    outcome.update(position_errors(outcome.pop("positions"), scan, cells, placeable_tiles(scan)))
    print(f"\n{'run':>6} {'wall s':>7} {'CPU s':>6} {'Mpx/s':>6} {'tiles/s':>7} {'load 1 min':>10}")
    for index, run in enumerate(outcome["runs"], 1):
        run["mpx_per_s"] = megapixels / run["wall_s"]
        print(f"{index:>6} {run['wall_s']:7.2f} {run['cpu_s']:6.1f} {run['mpx_per_s']:6.1f} "
              f"{outcome['tiles'] / run['wall_s']:7.1f} {run['load_1min_before']:10.2f}")
    median = float(np.median([run["mpx_per_s"] for run in outcome["runs"]]))
    anchor, target = anchor_tile_rate(args.tile)
    outcome.update({"megapixels": megapixels, "median_mpx_per_s": median, "target_mpx_per_s": target})
    print(f"{'median':>6} {'':>7} {'':>6} {median:6.1f}   target {target:.1f} Mpx/s ({anchor} at 20x): "
          f"{'met' if median >= target else 'not met'}")
    print(f"positions: RMS {outcome['rms_px']:.3f} px, max {outcome['max_px']:.3f} px over "
          f"{outcome['tiles_evaluated']} tiles; peak RSS {outcome['peak_rss_mb']:.0f} MB (all tiles in memory)")
    print(f"JSON: {save_results(args.output, f'inline_{args.grid}x{args.grid}_{args.tile}px', outcome)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=10, help="rows = columns of the tile grid (default 10)")
    parser.add_argument("--tile", type=int, default=1024, help="tile size, px (default 1024)")
    parser.add_argument("--overlap", type=float, default=0.1, help="nominal overlap fraction (default 0.1)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"accuracy cases (default: all of {list(CASES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="ours,ashlar,m2stitch")
    parser.add_argument("--memory", action="store_true",
                        help="memory mode (implied by --grid >= 20): on-the-fly tiles, our stitcher only")
    parser.add_argument("--inline", action="store_true", help="inline mode: speed of stitching as tiles arrive")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs in inline mode (default 3)")
    parser.add_argument("--workdir", help="where the dataset and mosaics go (default: a temporary directory)")
    parser.add_argument("--output", type=Path, default=RESULTS / "stitching.json",
                        help="JSON file the results are added to (default bench/results/stitching.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    temporary = None
    if args.workdir is None:
        temporary = tempfile.mkdtemp(prefix="bench_stitching_")
        args.workdir = temporary
    try:
        if args.inline:
            inline_mode(args)
        elif args.memory or args.grid >= 20:
            memory_mode(args)
        else:
            accuracy_mode(args)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
