"""Benchmark: focus model inference on 2 CPU threads, every backend available here.

    .venv/bin/python bench/autofocus.py [--model DIR] [--threads 2] [--repeats 50]

Per backend: latency of one model input (a patch and its context field) at batch 1, the latency of
estimating a 256x256 image (the published mobile-net anchor is ~9 ms per 256x256 patch; our model
reads it as its model-size patches and their context fields, so this is the comparable number),
throughput at batch 8 and 32, and the latency of a whole tile estimate (1024x1024 tile: patch
selection + inference + aggregation) and its CPU time when tiles arrive TILE_INTERVAL_S apart, as in a
scan (what the estimate takes from the cores the stitcher and the scan share). Prints a table and writes
bench/results/autofocus.json.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from wsi_autofocus.inference import (BACKENDS, BackendUnavailableError, FocusEstimator, default_model_dir,
                                     load_backend, read_model_metadata)
from wsi_acquisition.optics import DEFAULT_CONDENSER_FILL
from wsi_autofocus.model_io import context_px
from wsi_autofocus.two_shot import Condenser

RESULTS = Path(__file__).resolve().parent / "results"
TILE_INTERVAL_S = 0.1       # 10 tiles/s


def timed_ms(function, repeats: int) -> list[float]:
    function()                                   # warm-up: allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def bench_backend(backend, estimator: FocusEstimator, patch_px: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    row = {"backend": backend.name}
    # 20x/0.75, 6.5 µm camera pixels, the virtual microscope's condenser declared, as the bring-up graph runs it
    optics = (0.75, 0.325, Condenser(DEFAULT_CONDENSER_FILL))
    optics_row = np.array([FocusEstimator.optics_row(*optics)], np.float32)

    def model_inputs(batch: int):
        pixels = rng.random((2, batch, 3, patch_px, patch_px), dtype=np.float32)    # patches, averaged-down context
        return pixels[0], pixels[1], np.repeat(optics_row, batch, axis=0)

    single = model_inputs(1)
    times = timed_ms(lambda: backend.predict(*single), repeats)
    row["patch_b1_ms_median"] = statistics.median(times)
    row["patch_b1_ms_p95"] = float(np.percentile(times, 95))
    image256 = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    times = timed_ms(lambda: estimator.estimate(image256, *optics), repeats)
    row["image256_ms_median"] = statistics.median(times)
    row["image256_ms_p95"] = float(np.percentile(times, 95))
    for batch in (8, 32):
        inputs = model_inputs(batch)
        times = timed_ms(lambda: backend.predict(*inputs), max(3, repeats // batch * 4))
        row[f"b{batch}_patches_per_s"] = batch / (statistics.median(times) / 1e3)
    tile = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    times = timed_ms(lambda: estimator.estimate(tile, *optics), max(5, repeats // 5))
    row["tile_estimate_ms_median"] = statistics.median(times)
    cpu_started = time.process_time()
    tiles = max(5, repeats // 5)
    for _ in range(tiles):
        estimator.estimate(tile, *optics)
        time.sleep(TILE_INTERVAL_S)
    row["tile_estimate_cpu_ms"] = (time.process_time() - cpu_started) / tiles * 1e3
    row["patches_per_tile"] = estimator.patches_per_tile
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--output", type=Path, default=RESULTS / "autofocus.json")
    args = parser.parse_args()
    metadata = read_model_metadata(args.model)
    patch_px = int(metadata["patch_px"])
    rows, unavailable = [], {}
    for name in BACKENDS:
        try:
            backend, _ = load_backend(name, args.model, threads=args.threads)
        except BackendUnavailableError as error:
            unavailable[name] = str(error)
            continue
        rows.append(bench_backend(backend, FocusEstimator(backend, args.model), patch_px, args.repeats))
    print(f"Focus model {metadata['name']}@{metadata['version']} ({metadata['architecture']}), "
          f"{args.threads} threads, model patch {patch_px} px in a {context_px(patch_px)} px context field")
    print(f"{'backend':<13}{'256x256 ms':>11}{'p95':>7}{f'{patch_px}px b1 ms':>12}{'b8 patch/s':>12}"
          f"{'b32 patch/s':>12}{'tile ms':>9}{'tile CPU ms':>13}")
    for r in rows:
        print(f"{r['backend']:<13}{r['image256_ms_median']:>11.2f}{r['image256_ms_p95']:>7.2f}"
              f"{r['patch_b1_ms_median']:>12.2f}{r['b8_patches_per_s']:>12.0f}"
              f"{r['b32_patches_per_s']:>12.0f}{r['tile_estimate_ms_median']:>9.1f}"
              f"{r['tile_estimate_cpu_ms']:>13.1f}")
    for name, reason in unavailable.items():
        print(f"{name:<13}not available here: {reason}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": metadata["name"], "version": metadata["version"],
                                       "threads": args.threads, "patch_px": patch_px, "results": rows,
                                       "unavailable": unavailable}, indent=2))
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
