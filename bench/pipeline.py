"""Pipeline benchmark: pre-rendered tiles replayed through the real nodes at increasing rates.

The autofocus, stitching and export nodes run as the graph runs them (wsi.graph, each in its own process
under the supervisor, real DDS); the scan orchestrator runs unchanged in a microscope process of its own
whose camera hands out tiles rendered once by the virtual microscope (bench/replay_microscope.py). So the
tiles reach autofocus and stitching as a scan publishes them: plan, tiles under the tile-credit
back-pressure (the orchestrator's `max_buffer_mb`), scan status, manifest and tile files, then the final
mosaic and the OME-TIFF export the scan asks for.

The tiles of a --cache-region-mm square in the tissue of the default slide are rendered once (not timed)
and cached under build/bench/pipeline/ (by default the whole 15 x 15 tile region, so that every tile meets
the neighbours it overlaps: on a repeated tile the stitcher's pairs fail and are registered again on wider
windows, 60 of 420 pairs with a 6 x 6 cache). Each run replays a --region-mm square at one camera rate
(tiles/s; a grid larger than the rendered one takes its tiles again, cyclically: --region-mm 15 is a
15 x 15 mm equivalent) with a new microscope process; the other nodes stay up, as on a scanner between slides.
Per rate it reports how fast each part went, from the graph's own messages (tiles published: scan status;
taken off the stitching node's buffer: mosaic status; estimated: focus estimates), tiles lost (published
but never received by a consumer), the orchestrator's back-pressure stalls (/diagnostics), the time from
the last tile to the final mosaic and to the finished OME-TIFF (the scan's result, sent when the export
has ended), the peak resident memory of every node process (sampled every RSS_PERIOD_S) and the CPU each
used over the run, in cores (CPU seconds per second: what shares the machine's cores) and per tile published
(which does not move with how the cores happened to be shared: the machine's cores divided by the graph's
CPU per tile bound the rate it can carry). A rate is
sustained when no tile is lost and every part kept at least SUSTAINED_FRACTION of it; the runs stop at the
first rate that is not (--all-rates: run every rate). Beside the highest sustained rate: the tile data rates of the
NanoZoomer S360 and Aperio GT450 scans (bench/acquisition.py ANCHORS) as tiles of this camera.
Prints a table and writes bench/results/pipeline.json.

    nice -n 10 .venv/bin/python bench/pipeline.py                          # 20x, 1024 px, 15x15 tiles, 4..32 tiles/s
    nice -n 10 .venv/bin/python bench/pipeline.py --region-mm 15 --rates 8,16   # 15 x 15 mm equivalent
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import rclpy
import tifffile

from acquisition import OVERLAP, anchor_tile_rates, square_region_um, square_scan_plan
from wsi.client import ScannerClient, TaskResult, scan_goal
from wsi.graph import GraphConfig, scan_graph
from wsi.player import DISCOVERY_S
from wsi_acquisition import microscope, optics, specimen
from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import STANDARD_OBJECTIVES, Camera
from wsi_common.backpressure import MB
from wsi_common.node_main import end_ros
from wsi_common.objective import DEFAULT_OBJECTIVE_MAGNIFICATION
from wsi_common.supervisor import Supervisor
from wsi_common.topics import DIAGNOSTICS, EXPORT_SLIDE, FOCUS_ESTIMATES, MOSAIC_STATUS, SCAN_STATUS, TILES
from wsi_interfaces.action import ScanSlide
from wsi_interfaces.msg import ScanStatus

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
CACHE_DIR = BENCH.parent / "build" / "bench" / "pipeline"
# A part of the pipeline that goes at 95 % of the camera's rate keeps up with it: the first and last tiles'
# latencies (a batch of the autofocus, the stitching node's held tile) take a few percent of a short run.
SUSTAINED_FRACTION = 0.95
RSS_PERIOD_S = 0.2
# Reading a process's PSS (smaps_rollup) takes ~4 ms where RSS takes 0.02: sampled every second, it costs the
# cores the graph shares ~2 % instead of ~9 %.
PSS_PERIOD_S = 1.0
CONSUMERS = ("autofocus", "stitching", "export")


def stamp_s(header) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def renderer_version() -> str:
    """Hash of the virtual microscope's sources: tiles cached by another renderer are rendered again."""
    digest = hashlib.sha256()
    for module in (microscope, optics, specimen):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def rendered_tiles(args) -> Path:
    """The .npy of the tiles of the --cache-region-mm square (rows, cols, height, width, 3), rendered in focus
    at their grid positions the first time they are asked for; the .json beside it says how."""
    rendering = {"slide_seed": args.slide, "objective_magnification": args.objective, "sensor_px": args.sensor_px,
                 "region_mm": args.cache_region_mm, "overlap_fraction": OVERLAP, "renderer": renderer_version()}
    key = hashlib.sha256(json.dumps(rendering, sort_keys=True).encode()).hexdigest()[:16]
    path = args.cache_dir / f"tiles-{key}.npy"
    if path.exists() and path.with_suffix(".json").exists():
        return path
    _, camera, plan = square_scan_plan(args.objective, args.sensor_px, args.cache_region_mm)
    scope = VirtualMicroscope(seed=args.slide, camera=camera)
    print(f"rendering {len(plan.tiles)} tiles ({plan.rows}x{plan.cols}) of {args.sensor_px} px at {args.objective:g}x "
          f"once, into {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    tiles = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                      shape=(plan.rows, plan.cols, camera.height_px, camera.width_px, 3))
    started = time.perf_counter()
    for tile in plan.tiles:
        focus_z = scope.focal_z_um(tile.x_um, tile.y_um)
        tiles[tile.row, tile.col] = scope.capture(tile.x_um, tile.y_um, focus_z, args.objective).image_rgb8
    tiles.flush()
    del tiles
    path.with_suffix(".json").write_text(json.dumps(rendering, indent=1))
    os.replace(partial, path)
    print(f"rendered in {time.perf_counter() - started:.0f} s", flush=True)
    return path


class ProcessUsage:
    """The largest resident set of each process (with its children) and of all of them at once, sampled
    every RSS_PERIOD_S (the graph's PSS every PSS_PERIOD_S) on a thread until stop(); and the CPU time each used from start to stop(). A sum of
    resident sets counts shared pages once per process mapping them (the Fast DDS shared-memory segment a
    tile's publisher and its subscribers share, the libraries); the graph's proportional set size (PSS)
    counts them once, which is the memory the graph takes from the machine."""

    def __init__(self, pids: dict[str, int]):
        self._processes = {label: psutil.Process(pid) for label, pid in pids.items()}
        self.peak_mb = dict.fromkeys(pids, 0.0)
        self.total_peak_mb = 0.0
        self.total_peak_pss_mb = 0.0
        self.cpu_cores: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}
        self._started_s = time.monotonic()
        self._cpu_started_s = {label: self._cpu_s(process) for label, process in self._processes.items()}
        self._trees: dict[str, list[psutil.Process]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _list_trees(self) -> None:
        """Each process and its children, listed every PSS_PERIOD_S: listing children reads every process of
        the machine, which every RSS_PERIOD_S took a tenth of a core from the graph measured (py-spy)."""
        for label, process in self._processes.items():
            try:
                self._trees[label] = [process, *process.children(recursive=True)]
            except psutil.NoSuchProcess:
                self._trees[label] = []

    def _memory_mb(self, label: str, pss: bool) -> float:
        """RSS (or PSS) of the process and its children, MB."""
        total = 0
        for process in self._trees[label]:
            try:
                total += process.memory_full_info().pss if pss else process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / MB

    @staticmethod
    def _cpu_s(process: psutil.Process) -> float:
        try:
            return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0.0

    def _run(self) -> None:
        pss_due = 0.0
        while True:
            pss_now = time.monotonic() >= pss_due
            if pss_now:
                self._list_trees()
            now = {label: self._memory_mb(label, pss=False) for label in self._processes}
            for label, rss in now.items():
                self.peak_mb[label] = max(self.peak_mb[label], rss)
            self.total_peak_mb = max(self.total_peak_mb, sum(now.values()))
            if pss_now:
                pss_due = time.monotonic() + PSS_PERIOD_S
                self.total_peak_pss_mb = max(self.total_peak_pss_mb, sum(
                    self._memory_mb(label, pss=True) for label in self._processes))
            if self._stopped.wait(RSS_PERIOD_S):
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        elapsed_s = time.monotonic() - self._started_s
        self.cpu_s = {label: self._cpu_s(process) - self._cpu_started_s[label]
                      for label, process in self._processes.items()}
        self.cpu_cores = {label: cpu_s / elapsed_s for label, cpu_s in self.cpu_s.items()}


class ScanObserver:
    """What the graph says about one scan, heard by the bench's client node: when each tile had been published
    (scan status), taken off the stitching node's buffer (mosaic status) and estimated (focus estimates),
    the final mosaic, and the orchestrator's last back-pressure readings (/diagnostics)."""

    def __init__(self, node, scan_id: str):
        self.scan_id = scan_id
        self.published: list[tuple[int, float]] = []     # (tiles published so far, time s)
        self.stitched: list[tuple[int, float]] = []      # (tiles off the stitching node's buffer, time s)
        self.estimated: dict[int, float] = {}            # tile sequence -> time s of its estimate
        self.mosaic = None                               # the final MosaicStatus
        self.orchestrator: dict[str, str] = {}
        self._node = node
        self._subscriptions = [SCAN_STATUS.subscription(node, self._on_status),
                               MOSAIC_STATUS.subscription(node, self._on_mosaic),
                               FOCUS_ESTIMATES.subscription(node, self._on_estimate),
                               DIAGNOSTICS.subscription(node, self._on_diagnostics)]

    def _on_status(self, msg) -> None:
        if msg.scan_id == self.scan_id and msg.state == ScanStatus.STATE_ACQUIRING:
            self.published.append((msg.tiles_done, stamp_s(msg.header)))

    def _on_mosaic(self, msg) -> None:
        if msg.scan_id != self.scan_id:
            return
        if msg.finished:
            self.mosaic = msg
        elif msg.tiles_received:
            self.stitched.append((msg.tiles_received, stamp_s(msg.header)))

    def _on_estimate(self, msg) -> None:
        if msg.scan_id == self.scan_id:
            self.estimated.setdefault(msg.sequence, stamp_s(msg.header))

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.hardware_id == "scan_orchestrator":
                self.orchestrator = {kv.key: kv.value for kv in status.values}

    def close(self) -> None:
        for subscription in self._subscriptions:
            self._node.destroy_subscription(subscription)

    def estimate_counts(self) -> list[tuple[int, float]]:
        return [(count, t) for count, t in enumerate(sorted(self.estimated.values()), 1)]


def tiles_per_s(counts: list[tuple[int, float]]) -> float:
    """Rate of a running count of tiles ((count, time s) readings): from its first reading to the first that
    reached its final count."""
    if len(counts) < 2:
        return 0.0
    first = min(counts, key=lambda c: c[1])
    last = min((c for c in counts if c[0] == max(n for n, _ in counts)), key=lambda c: c[1])
    return (last[0] - first[0]) / (last[1] - first[1]) if last[1] > first[1] else 0.0


def ome_tiff_levels(path: str) -> list[list[int]]:
    with tifffile.TiffFile(path) as tiff:
        return [list(level.shape) for level in tiff.series[0].levels]


def replay_spec(graph, args, cache: Path, rate: float):
    """The graph's microscope process, with the replay camera of bench/replay_microscope.py."""
    [spec] = [s for s in graph if s.name == "microscope"]
    parameters = {**spec.parameters, "tile_cache": str(cache), "region_um": list(square_region_um(args.region_mm)),
                  "tiles_per_s": rate, "qc_report": False, "diagnostics_period_s": 0.5}
    if args.max_buffer_mb:
        parameters["max_buffer_mb"] = args.max_buffer_mb
    parameters["export_while_stitching"] = not args.export_after_mosaic
    return replace(spec, module="replay_microscope", parameters=parameters, lifecycle_nodes=())


def spin_until(node, done, timeout_s: float, what: str, supervisors=()) -> None:
    """Spin `node` until done(); TimeoutError naming `what` after timeout_s, NodeDiedError when a process of
    `supervisors` has died."""
    deadline = time.monotonic() + timeout_s
    while not done():
        for supervisor in supervisors:
            supervisor.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        rclpy.spin_once(node, timeout_sec=0.1)


def spin_for(node, seconds: float) -> None:
    until = time.monotonic() + seconds
    spin_until(node, lambda: time.monotonic() >= until, seconds + 1.0, "spinning")


def consumers_up(node) -> bool:
    """The autofocus (its model loaded), stitching and export nodes are on the graph."""
    return bool(node.count_publishers(FOCUS_ESTIMATES.name) and node.count_publishers(MOSAIC_STATUS.name)
                and node.count_subscribers(TILES.name) >= 2 and node.count_publishers(EXPORT_SLIDE.status_topic.name))


def run_rate(args, graph, consumers: Supervisor, client: ScannerClient, cache: Path, rate: float, log) -> dict:
    scan_id = f"pipeline-{rate:g}-tiles-per-s"
    shutil.rmtree(Path(args.workdir) / scan_id, ignore_errors=True)
    load_1min = os.getloadavg()[0]
    microscope_process = Supervisor([replay_spec(graph, args, cache, rate)], env=args.microscope_env, log=log).start()
    observer = ScanObserver(client, scan_id)
    try:
        spin_until(client, lambda: client.count_publishers(TILES.name), 120.0, "the replay microscope coming up",
                   [microscope_process])
        # The new microscope process must find the consumers' readers before its first tile, or they miss it.
        spin_for(client, DISCOVERY_S)
        usage = ProcessUsage({label: process.pid for label, process in
                       (consumers.processes | microscope_process.processes).items()})
        goal = scan_goal(scan_id, square_region_um(args.region_mm), args.objective,
                         ScanSlide.Goal.FOCUS_MAP_INLINE if args.focus == "inline" else ScanSlide.Goal.FOCUS_NONE,
                         ["ome-tiff"], skip_empty_tiles=False)
        goal.overlap_fraction = OVERLAP
        goal.focus_points = 1 if args.focus == "inline" else 0
        client.scan(goal)
        deadline = time.monotonic() + args.timeout_s
        while not client.is_task_complete():
            consumers.check_alive()
            microscope_process.check_alive()
            if time.monotonic() > deadline:
                client.cancel()
                raise TimeoutError(f"scan {scan_id} did not end within {args.timeout_s:.0f} s")
        exported_s = time.time()
        outcome = client.result()
        spin_for(client, 1.0)      # the orchestrator's last /diagnostics (every 0.5 s)
        usage.stop()
    finally:
        observer.close()
        microscope_process.stop()
    # The next run's microscope must not be mistaken for this one.
    spin_until(client, lambda: not client.count_publishers(TILES.name), 30.0, "the replay microscope leaving")
    return measurements(args, rate, scan_id, outcome, observer, usage, exported_s, load_1min)


def measurements(args, rate: float, scan_id: str, outcome, observer: ScanObserver, usage: ProcessUsage,
                 exported_s: float, load_1min: float) -> dict:
    megapixels = args.sensor_px * args.sensor_px / 1e6
    row = {"offered_tiles_per_s": rate, "offered_mpx_per_s": rate * megapixels, "scan_id": scan_id,
           "load_1min_before": load_1min, "peak_rss_mb": usage.peak_mb, "graph_peak_rss_mb": usage.total_peak_mb,
           "graph_peak_pss_mb": usage.total_peak_pss_mb,
           "cpu_cores": usage.cpu_cores}
    if outcome.status is not TaskResult.SUCCEEDED:
        row["error"] = f"scan {outcome.status.value}: {outcome.error_message}"
        return row
    result = outcome.result
    published, mosaic = result.tiles_captured, observer.mosaic
    # CPU per tile does not depend on how the machine's cores were shared at the moment, which moves the
    # rates from run to run; the cores divided by the graph's CPU per tile bound the rate the machine carries.
    row["cpu_ms_per_tile"] = {label: cpu_s * 1e3 / max(published, 1) for label, cpu_s in usage.cpu_s.items()}
    row["graph_cpu_ms_per_tile"] = sum(row["cpu_ms_per_tile"].values())
    row["cpu_bound_tiles_per_s"] = (os.cpu_count() or 1) * 1e3 / max(row["graph_cpu_ms_per_tile"], 1e-9)
    rates = {"published": tiles_per_s(observer.published), "stitched": tiles_per_s(observer.stitched),
             "estimated": tiles_per_s(observer.estimate_counts())}
    pipeline = min(rates.values())
    lost = {"stitching": published - mosaic.tiles_received, "autofocus": published - len(observer.estimated)}
    last_tile_s = min(t for count, t in observer.published if count == max(n for n, _ in observer.published))
    orchestrator = observer.orchestrator
    levels = ome_tiff_levels(result.output_uris[0])
    row |= {"tiles": published, "tiles_planned": result.tiles_planned,
            **{f"{part}_tiles_per_s": value for part, value in rates.items()},
            "pipeline_tiles_per_s": pipeline, "pipeline_mpx_per_s": pipeline * megapixels, "lost": lost,
            "stalls": int(orchestrator["stalls"]), "stall_s": float(orchestrator["stall_s"]),
            "buffer_peak_mb": int(orchestrator["buffer_peak_bytes"]) / MB,
            "buffer_limit_mb": int(orchestrator["buffer_limit_bytes"]) / MB,
            "last_tile_to_mosaic_s": stamp_s(mosaic.header) - last_tile_s,
            "last_tile_to_ome_tiff_s": exported_s - last_tile_s,
            "mosaic": {"width_px": mosaic.width_px, "height_px": mosaic.height_px,
                       "tiles_composed": mosaic.tiles_composed, "pairs_total": mosaic.pairs_total,
                       "pairs_dropped": mosaic.pairs_dropped},
            "ome_tiff": {"path": result.output_uris[0], "levels": levels,
                         "level0_is_the_mosaic": levels[0][:2] == [mosaic.height_px, mosaic.width_px]},
            "sustained": not any(lost.values()) and pipeline >= SUSTAINED_FRACTION * rate}
    if not args.keep_scans:
        shutil.rmtree(Path(args.workdir) / scan_id, ignore_errors=True)
    return row


HEADER = (f"{'offered':>14} {'published':>9} {'stitched':>8} {'focus':>6} {'lost':>5} {'stalls':>6} {'stall s':>7} "
          f"{'buffer':>6} {'->mosaic':>8} {'->OME-TIFF':>10} {'peak RSS MB':>28} {'graph':>6} {'graph':>6}  sustained")
SUBHEADER = (f"{'tiles/s  Mpx/s':>14} {'tiles/s':>9} {'tiles/s':>8} {'t/s':>6} {'':>5} {'':>6} {'':>7} {'MB':>6} "
             f"{'s':>8} {'s':>10} {'focus stitch export scope':>28} {'RSS MB':>6} {'PSS MB':>6}")


def table_row(row: dict) -> str:
    offered = f"{row['offered_tiles_per_s']:>6g} {row['offered_mpx_per_s']:>7.1f}"
    if "error" in row:
        return f"{offered:>14}  {row['error']}"
    rss = row["peak_rss_mb"]
    memory = " ".join(f"{rss[label]:>{width}.0f}" for label, width in
                      (("autofocus", 5), ("stitching", 6), ("export", 6), ("microscope", 5)))
    return (f"{offered:>14} {row['published_tiles_per_s']:>9.1f} {row['stitched_tiles_per_s']:>8.1f} "
            f"{row['estimated_tiles_per_s']:>6.1f} {sum(row['lost'].values()):>5} {row['stalls']:>6} "
            f"{row['stall_s']:>7.1f} {row['buffer_peak_mb']:>6.0f} {row['last_tile_to_mosaic_s']:>8.1f} "
            f"{row['last_tile_to_ome_tiff_s']:>10.1f} {memory:>28} {row['graph_peak_rss_mb']:>6.0f} "
            f"{row['graph_peak_pss_mb']:>6.0f}  "
            f"{'yes' if row['sustained'] else 'no'}\n{'CPU cores:':>24} "
            + "  ".join(f"{label} {cores:.2f}" for label, cores in row["cpu_cores"].items())
            + f"\n{'CPU ms per tile:':>24} "
            + "  ".join(f"{label} {ms:.0f}" for label, ms in row["cpu_ms_per_tile"].items())
            + f"  graph {row['graph_cpu_ms_per_tile']:.0f}: {os.cpu_count()} cores carry at most "
              f"{row['cpu_bound_tiles_per_s']:.1f} tiles/s")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", type=float, default=DEFAULT_OBJECTIVE_MAGNIFICATION,
                        choices=sorted(STANDARD_OBJECTIVES))
    parser.add_argument("--sensor-px", type=int, default=Camera().width_px, help="square tile edge, px")
    parser.add_argument("--slide", type=int, default=0, help="seed of the virtual slide the tiles are rendered from")
    parser.add_argument("--cache-region-mm", type=float, default=4.5,
                        help="side of the square whose tiles are rendered once (4.5: 15x15 tiles at 20x, 1024 px, "
                             "708 MB; 1.8: 6x6)")
    parser.add_argument("--region-mm", type=float, default=4.5,
                        help="side of the square each run scans (4.5: 15x15 tiles at 20x, 1024 px; 15: 15 x 15 mm)")
    parser.add_argument("--rates", default="4,6,8,12,16,24,32", help="camera rates to replay at, tiles/s, increasing")
    parser.add_argument("--all-rates", action="store_true", help="go on after a rate that is not sustained")
    parser.add_argument("--focus", choices=("none", "inline"), default="none",
                        help="none: the autofocus estimates every tile beside the scan; inline: the scan waits for "
                             "each tile's estimate and may re-capture it (as `make scan`), after a one-point focus map")
    parser.add_argument("--max-buffer-mb", type=float, default=0.0,
                        help="the orchestrator's tile buffer ceiling (0: its default)")
    parser.add_argument("--export-after-mosaic", action="store_true",
                        help="export after the final mosaic, not while it is stitched (the orchestrator's "
                             "export_while_stitching:=false)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where rendered tiles are kept")
    parser.add_argument("--workdir", help="output root of the graph (default: a temporary directory, removed)")
    parser.add_argument("--keep-scans", action="store_true", help="keep each run's tiles, mosaic and OME-TIFF")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="longest a run may take")
    parser.add_argument("--domain-id", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", 100 + os.getpid() % 100)),
                        help="ROS_DOMAIN_ID of the graph")
    parser.add_argument("--output", type=Path, default=RESULTS / "pipeline.json", help="JSON results file")
    args = parser.parse_args()
    args.rates = [float(rate) for rate in args.rates.split(",")]
    if any(rate <= 0 for rate in args.rates):
        parser.error(f"--rates {args.rates}: every rate must be more than 0 tiles/s")
    return args


def main() -> int:
    args = parse_args()
    os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    # The replay microscope's module lives here, beside this script.
    args.microscope_env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH),
                                                                                   os.environ.get("PYTHONPATH")]))}
    cache = rendered_tiles(args)
    temporary = None if args.workdir else tempfile.mkdtemp(prefix="bench_pipeline_")
    args.workdir = args.workdir or temporary
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    _, _, plan = square_scan_plan(args.objective, args.sensor_px, args.region_mm)
    cached_rows, cached_cols = np.load(cache, mmap_mode="r").shape[:2]
    anchors = anchor_tile_rates(args.sensor_px)
    graph = scan_graph(GraphConfig(output_dir=args.workdir))
    log_path = Path(args.workdir) / "nodes.log"
    print(f"replaying {plan.rows}x{plan.cols} tiles ({args.region_mm:g} mm square) of {args.sensor_px} px at "
          f"{args.objective:g}x from {cached_rows}x{cached_cols} rendered ones; focus {args.focus}; "
          f"{os.cpu_count()} CPUs; node logs in {log_path}", flush=True)
    rows = []
    with open(log_path, "w") as log:
        consumers = Supervisor([s for s in graph if s.name in CONSUMERS], log=log).start()
        rclpy.init()
        client = ScannerClient(node_name="pipeline_bench", server_timeout_s=120.0)
        try:
            spin_until(client, lambda: consumers_up(client), 300.0, "the autofocus, stitching and export nodes",
                       [consumers])
            print(HEADER + "\n" + SUBHEADER, flush=True)
            for rate in args.rates:
                rows.append(run_rate(args, graph, consumers, client, cache, rate, log))
                print(table_row(rows[-1]), flush=True)
                if not rows[-1].get("sustained") and not args.all_rates:
                    break
        finally:
            end_ros([client], "pipeline bench")
            consumers.stop()
            if temporary:
                shutil.rmtree(temporary, ignore_errors=True)
    sustained = [row for row in rows if row.get("sustained")]
    best = max(sustained, key=lambda row: row["offered_tiles_per_s"], default=None)
    if best is None:
        print("no rate was sustained")
    else:
        print(f"highest sustained: {best['offered_tiles_per_s']:g} tiles/s = {best['offered_mpx_per_s']:.1f} Mpx/s "
              f"(pipeline {best['pipeline_mpx_per_s']:.1f} Mpx/s), 0 tiles lost; OME-TIFF "
              f"{best['last_tile_to_ome_tiff_s']:.1f} s after the last tile; peak memory of the graph "
              f"{best['graph_peak_pss_mb']:.0f} MB PSS ({best['graph_peak_rss_mb']:.0f} MB as a sum of RSS)")
    for anchor in anchors:
        print(f"  {anchor['scanner']} ({anchor['kind']}, 15x15 mm at {anchor['objective_magnification']:g}x in "
              f"{anchor['seconds']:g} s): {anchor['tiles']} tiles of {args.sensor_px} px, "
              f"{anchor['tiles_per_s']:.1f} tiles/s = {anchor['mpx_per_s']:.1f} Mpx/s")
    document = {"config": {"command": sys.argv, "objective_magnification": args.objective, "sensor_px": args.sensor_px,
                           "slide_seed": args.slide, "region_mm": args.region_mm, "grid": [plan.rows, plan.cols],
                           "cache_region_mm": args.cache_region_mm, "cached_grid": [cached_rows, cached_cols],
                           "focus": args.focus, "overlap_fraction": OVERLAP, "max_buffer_mb": args.max_buffer_mb,
                           "export_while_stitching": not args.export_after_mosaic,
                           "sustained_fraction": SUSTAINED_FRACTION, "cpus": os.cpu_count()},
                "runs": rows, "highest_sustained": best, "anchors": anchors}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1))
    print(f"written {args.output}")
    return 0 if rows and "error" not in rows[-1] else 1


if __name__ == "__main__":
    sys.exit(main())
