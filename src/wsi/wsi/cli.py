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
from action_msgs.msg import GoalStatus
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from wsi.actions import ActionCallError, ActionCaller
from wsi import player, scan_client
from wsi.graph import LAUNCH_ARGUMENTS, GraphConfig, scan_graph
from wsi_common.supervisor import NodeDiedError, Supervisor
from wsi_interfaces.action import MoveStage, ScanSlide

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    for name, (default, description) in LAUNCH_ARGUMENTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default,
                            help=f"{description} (default: {default!r})")


def _graph_config(args: argparse.Namespace) -> GraphConfig:
    return GraphConfig.from_strings({name: getattr(args, name) for name in LAUNCH_ARGUMENTS})


def _topic(namespace: str, name: str) -> str:
    return f"/{namespace.strip('/')}/{name}" if namespace.strip("/") else name


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


def smoke_round_trip(namespace: str, timeout_s: float) -> list[str]:
    """Drive the running graph through a stage move and a refused goal; return what was checked."""
    checks = []
    rclpy.init()
    node = Node("wsi_smoke")
    try:
        stage = ActionCaller(node, MoveStage, _topic(namespace, "stage/move"))
        started = time.monotonic()
        stage.wait_for_server(timeout_s)
        checks.append(f"stage action server found in {time.monotonic() - started:.1f} s")
        for target in ((30_000.0, 12_000.0, 10.0), (31_000.0, 12_500.0, -5.0)):
            outcome = stage.call(MoveStage.Goal(x_um=target[0], y_um=target[1], z_um=target[2]), timeout_s)
            result = outcome.result
            error_um = math.dist((result.x_um, result.y_um, result.z_um), target)
            if outcome.status != GoalStatus.STATUS_SUCCEEDED or result.error_code != result.ERROR_NONE:
                raise ActionCallError(f"move to {target} failed: {result.error_message or outcome.status}")
            if error_um > 5.0:
                raise ActionCallError(f"move to {target} ended {error_um:.2f} µm away from the target")
            checks.append(f"moved to {target} µm: reached within {error_um:.2f} µm in "
                          f"{result.duration_s:.2f} s, {len(outcome.feedback)} feedback messages")
        refused = stage.call(MoveStage.Goal(x_um=-1e6, y_um=0.0, z_um=0.0), timeout_s)
        if refused.status != GoalStatus.STATUS_ABORTED \
                or refused.result.error_code != MoveStage.Result.ERROR_OUT_OF_LIMITS:
            raise ActionCallError(f"a goal outside the stage limits ended with status {refused.status}, "
                                  f"error code {refused.result.error_code}")
        checks.append(f"goal outside the stage limits refused: {refused.result.error_message}")
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
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


def run_scan(args: argparse.Namespace) -> int:
    config = _graph_config(args)
    goal = scan_client.build_goal(args.scan_id, args.region, args.auto, args.objective,
                                  FOCUS_STRATEGIES[args.focus], args.formats)
    goal.calibrate_autofocus = args.calibrate_autofocus
    graph = None if args.attach else Supervisor(scan_graph(config), log=args.node_log)
    try:
        with graph or nullcontext():
            status, result = scan_client.run_scan_goal(_topic(config.namespace, "scan_slide"), goal,
                                                       args.timeout, graph)
    except (ActionCallError, NodeDiedError) as error:
        print(f"wsi scan: {scan_client.describe_error(error)}", file=sys.stderr)
        return EXIT_FAILED
    for line in scan_client.report(status, result):
        print(f"wsi scan: {line}")
    return scan_client.exit_code(status)


def run_play(args: argparse.Namespace) -> int:
    if args.wait_for_subscribers is None:
        print(f"wsi play: waiting {min(player.DISCOVERY_S, args.wait_timeout):g} s for the subscribers already "
              f"running to be discovered (--wait-for-subscribers 0: do not wait)", file=sys.stderr)
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        report = player.play(args.bag, rate=args.rate, topics=args.topics, loop=args.loop,
                             wait_for_subscribers=args.wait_for_subscribers, wait_timeout_s=args.wait_timeout)
    except KeyboardInterrupt:
        return EXIT_FAILED
    except player.NoSubscriberError as error:
        print(f"wsi play: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        rclpy.try_shutdown()
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
                       default=scan_client.DEFAULT_REGION_UM, help="region in stage µm (default: a 2.5 mm "
                       "square of the default slide's tissue)")
    where.add_argument("--auto", action="store_true", help="find the tissue on an overview and scan all of it")
    scan.add_argument("--objective", type=float, default=20.0, help="objective magnification (10, 20, 40)")
    scan.add_argument("--focus", choices=sorted(FOCUS_STRATEGIES), default="map-inline")
    scan.add_argument("--scan-id", default="", help="name of the scan (default: from the time)")
    scan.add_argument("--calibrate-autofocus", action="store_true",
                      help="fine-tune the autofocus on this scan's focus map before the tiles (kept for this "
                           "scanner and objective: later scans use it)")
    scan.add_argument("--formats", nargs="*", default=["ome-tiff", "ome-zarr"],
                      help="exports of the stitched mosaic: ome-tiff, ome-zarr, dicom (default: ome-tiff ome-zarr; "
                           "none: tiles and manifest only)")
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
