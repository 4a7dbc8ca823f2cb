"""`wsi` command: start the scanner graph, scan a slide, check the graph end to end.

    wsi launch [--sim true] [--slide 0] [--output-dir out] [--namespace ns] ...
    wsi scan   [--attach] [--region X Y W H | --auto] [--objective 20] ...   scan with a progress bar
    wsi smoke  [--attach]       start the graph (or use a running one) and run a round trip through it
    wsi play   BAG [--rate 1] [--topics T ...] [--loop]   replay a recorded bag
"""
import argparse
import math
import sys
import time
from contextlib import nullcontext

import rclpy
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from wsi import player, scan_display
from wsi.client import ScannerClient, ScannerUnavailable, TaskOutcome, TaskResult, scan_goal
from wsi.graph import LAUNCH_ARGUMENTS, GraphConfig, scan_graph
from wsi_common.node_main import end_ros
from wsi_common.supervisor import NodeDiedError, Supervisor
from wsi_interfaces.action import MoveStage, ScanSlide

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    for name, (default, description) in LAUNCH_ARGUMENTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default,
                            help=f"{description} (default: {default!r})")


def _graph_config(args: argparse.Namespace) -> GraphConfig:
    return GraphConfig.from_strings({name: getattr(args, name) for name in LAUNCH_ARGUMENTS})


def run_launch(args: argparse.Namespace) -> int:
    supervisor = Supervisor(scan_graph(_graph_config(args)))
    print(f"wsi launch: starting {', '.join(map(supervisor.label, supervisor.specs))}; Ctrl-C stops",
          flush=True)
    supervisor.start()
    try:
        while True:
            supervisor.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("wsi launch: stopping", flush=True)
        codes = supervisor.stop()
        return EXIT_OK if all(code in (0, -2) for code in codes.values()) else EXIT_FAILED
    except NodeDiedError as error:
        print(f"wsi launch: {error}; stopping the other nodes", file=sys.stderr, flush=True)
        supervisor.stop()
        return EXIT_FAILED


class SmokeCheckFailed(RuntimeError):
    """The running graph did not answer as it should."""


def wait_for_task(scanner: ScannerClient, timeout_s: float) -> TaskOutcome:
    """The outcome of the client's task; after `timeout_s` the task is cancelled and SmokeCheckFailed raised."""
    deadline = time.monotonic() + timeout_s
    while not scanner.is_task_complete():
        if time.monotonic() > deadline:
            scanner.cancel()
            raise SmokeCheckFailed(f"no result within {timeout_s:g} s")
    return scanner.result()


def smoke_round_trip(namespace: str, timeout_s: float) -> list[str]:
    """Drive the running graph through stage moves and a refused goal; return what was checked."""
    checks = []
    rclpy.init()
    scanner = ScannerClient(namespace, "wsi_smoke", server_timeout_s=timeout_s)
    try:
        for target in ((30_000.0, 12_000.0, 10.0), (31_000.0, 12_500.0, -5.0)):
            started = time.monotonic()
            scanner.move_stage(*target)
            outcome = wait_for_task(scanner, timeout_s)
            result = outcome.result
            if outcome.status is not TaskResult.SUCCEEDED:
                raise SmokeCheckFailed(f"move to {target} {outcome.status.value}: {outcome.error_message}")
            error_um = math.dist((result.x_um, result.y_um, result.z_um), target)
            if error_um > 5.0:
                raise SmokeCheckFailed(f"move to {target} ended {error_um:.2f} µm away from the target")
            checks.append(f"moved to {target} µm: reached within {error_um:.2f} µm, {result.duration_s:.2f} s of "
                          f"{time.monotonic() - started:.2f} s from sending the goal (discovery included)")
        scanner.move_stage(-1e6, 0.0, 0.0)
        refused = wait_for_task(scanner, timeout_s)
        if refused.status is not TaskResult.FAILED or refused.error_code != MoveStage.Result.ERROR_OUT_OF_LIMITS:
            raise SmokeCheckFailed(f"a goal outside the stage limits ended {refused.status.value}, "
                                   f"error code {refused.error_code}")
        checks.append(f"goal outside the stage limits refused: {refused.error_message}")
    finally:
        end_ros([scanner], "wsi smoke")
    return checks


def run_smoke(args: argparse.Namespace) -> int:
    config = _graph_config(args)
    graph = nullcontext() if args.attach else Supervisor(scan_graph(config))
    try:
        with graph:
            checks = smoke_round_trip(config.namespace, args.timeout)
            if not args.attach:
                graph.check_alive()
    except Exception as error:  # any failure of the round trip is the smoke test's finding
        print(f"wsi smoke: FAILED: {error}", file=sys.stderr)
        return EXIT_FAILED
    for check in checks:
        print(f"wsi smoke: ok: {check}")
    print("wsi smoke: the graph answered end to end")
    return EXIT_OK


def follow_scan(scanner: ScannerClient, goal: ScanSlide.Goal, graph: Supervisor | None) -> TaskOutcome:
    """Run the scan, drawing its progress; Ctrl-C cancels it and waits for it to stop (what was captured is kept)."""
    printer = scan_display.ProgressPrinter()
    if not scanner.scan(goal):
        return scanner.result()
    shown = None
    try:
        while not scanner.is_task_complete():
            if scanner.feedback() is not shown:
                shown = scanner.feedback()
                printer.update(shown)
            if graph is not None:
                graph.check_alive()
    except KeyboardInterrupt:
        printer.finish()
        print("wsi scan: Ctrl-C: cancelling the scan (what was captured is kept)", flush=True)
        scanner.cancel()
        while not scanner.is_task_complete():
            pass
    printer.finish()
    return scanner.result()


def _formats(args: argparse.Namespace) -> list[str]:
    """The exports asked for; by default both pyramids, or none for a calibration (which takes no tiles: the
    scanner refuses a calibration-only goal with formats, and says so)."""
    if args.formats is not None:
        return args.formats
    return [] if args.calibration_only else list(DEFAULT_FORMATS)


def run_scan(args: argparse.Namespace) -> int:
    config = _graph_config(args)
    goal = scan_goal(args.scan_id, None if args.auto else args.region, args.objective, FOCUS_STRATEGIES[args.focus],
                     _formats(args), calibrate_autofocus=args.calibrate_autofocus,
                     calibration_only=args.calibration_only, focus_points=args.focus_points)
    graph = None if args.attach else Supervisor(scan_graph(config), log=args.node_log)
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)   # Ctrl-C must reach us as KeyboardInterrupt
    scanner = ScannerClient(config.namespace, "wsi_scan", server_timeout_s=args.timeout)
    try:
        with graph or nullcontext():
            outcome = follow_scan(scanner, goal, graph)
    except (ScannerUnavailable, NodeDiedError) as error:
        print(f"wsi scan: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        end_ros([scanner], "wsi scan")
    for line in scan_display.report(outcome):
        print(f"wsi scan: {line}")
    return scan_display.exit_code(outcome)


def run_play(args: argparse.Namespace) -> int:
    if args.wait_for_subscribers is None:
        print(f"wsi play: waiting {min(player.DISCOVERY_S, args.wait_timeout):g} s for the subscribers already "
              f"running to be discovered (--wait-for-subscribers 0: do not wait)", file=sys.stderr)
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = Node("wsi_player")
    try:
        report = player.play(node, args.bag, rate=args.rate, topics=args.topics, loop=args.loop,
                             wait_for_subscribers=args.wait_for_subscribers, wait_timeout_s=args.wait_timeout)
    except KeyboardInterrupt:
        return EXIT_FAILED
    except player.NoSubscriberError as error:
        print(f"wsi play: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        end_ros([node], "wsi play")
    counts = ", ".join(f"{topic}: {count}" for topic, count in report.published.items())
    stopped = " (stopped by Ctrl-C)" if report.interrupted else ""
    print(f"wsi play: published {report.total} messages in {report.seconds:.2f} s{stopped} ({counts})")
    unheard = [topic for topic, count in report.subscribers.items() if count == 0]
    if unheard:
        print(f"wsi play: no subscriber of {', '.join(unheard)} was matched when the replay began",
              file=sys.stderr)
    for topic in report.unacknowledged:
        print(f"wsi play: not every subscriber of {topic} acknowledged the last messages", file=sys.stderr)
    if report.problems:
        print(f"wsi play: damaged bag {args.bag}; replayed what was readable. "
              f"{'; '.join(report.problems)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


DEFAULT_FORMATS = ("ome-tiff", "ome-zarr")
FOCUS_STRATEGIES = {"none": ScanSlide.Goal.FOCUS_NONE, "map": ScanSlide.Goal.FOCUS_MAP,
                    "map-inline": ScanSlide.Goal.FOCUS_MAP_INLINE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wsi", description="WSI whole-slide scanner")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser("launch", help="start the scanner node graph until Ctrl-C")
    _add_graph_arguments(launch)
    launch.set_defaults(run=run_launch)
    scan = commands.add_parser("scan", help="scan a slide: start the graph, send ScanSlide, show progress")
    _add_graph_arguments(scan)
    scan.add_argument("--attach", action="store_true", help="use an already running graph")
    where = scan.add_mutually_exclusive_group()
    where.add_argument("--region", nargs=4, type=float, metavar=("X", "Y", "W", "H"),
                       default=scan_display.DEFAULT_REGION_UM, help="region in stage µm (default: a 2.5 mm "
                       "square of the default slide's tissue)")
    where.add_argument("--auto", action="store_true", help="find the tissue on an overview and scan all of it")
    scan.add_argument("--objective", type=float, default=0.0,
                      help="objective magnification (10, 20, 40; default: the scanner's default objective)")
    scan.add_argument("--focus", choices=sorted(FOCUS_STRATEGIES), default="map-inline")
    scan.add_argument("--scan-id", default="", help="name of the scan (default: from the time)")
    scan.add_argument("--focus-points", type=int, default=0,
                      help="z-sweeps the focus map takes (0: automatic, about one per 9 tiles; at most 100)")
    scan.add_argument("--calibrate-autofocus", action="store_true",
                      help="fine-tune the autofocus on this scan's focus map before the tiles (kept for this "
                           "scanner and objective: later scans use it)")
    scan.add_argument("--calibration-only", action="store_true",
                      help="calibrate the autofocus on the focus map's sweeps of the region, as "
                           "--calibrate-autofocus does, and stop: no tiles, no exports (a scanner's calibration)")
    scan.add_argument("--formats", nargs="*", default=None,
                      help="exports of the stitched mosaic: ome-tiff, ome-zarr, dicom (default: ome-tiff ome-zarr, "
                           "with --calibration-only none; none: tiles and manifest only)")
    scan.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the graph to answer")
    scan.add_argument("--node-log", type=argparse.FileType("a"), default=sys.stderr,
                      help="where the nodes' own log lines go (default: stderr)")
    scan.set_defaults(run=run_scan)
    smoke = commands.add_parser("smoke", help="start the graph and check it answers end to end")
    _add_graph_arguments(smoke)
    smoke.add_argument("--attach", action="store_true", help="use an already running graph")
    smoke.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    smoke.set_defaults(run=run_smoke)
    play = commands.add_parser("play", help="replay a recorded bag (rosbag2, MCAP) onto the ROS graph")
    play.add_argument("bag", help="bag directory or .mcap file")
    play.add_argument("--rate", type=float, default=1.0,
                      help="speed factor of the recorded timing; 0 = as fast as possible, in order")
    play.add_argument("--topics", nargs="+", default=None, help="replay only these topics (default: all)")
    play.add_argument("--loop", action="store_true", help="replay again from the start until Ctrl-C")
    play.add_argument("--wait-for-subscribers", type=int, default=None, metavar="N",
                      help="before replaying, wait until every replayed topic has N subscribers; 0: do not wait "
                           f"(default: wait {player.DISCOVERY_S:g} s for the subscribers already running to be "
                           "discovered, then until they are matched)")
    play.add_argument("--wait-timeout", type=float, default=30.0, help="seconds to wait for them at most")
    play.set_defaults(run=run_play)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"wsi {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
