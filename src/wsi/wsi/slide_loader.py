"""Example client for a slide-loader robot: scans a queue of slides through the ScanSlide action.

    python -m wsi.slide_loader jobs.json [--report report.json] [--namespace scanner_a]

jobs.json: [{"slot": 1, "scan_id": "case-0001", "region_um": [x, y, w, h] or "auto", "objective": 20,
             "formats": ["ome-tiff"]}, ...]

For every job the robot puts the slide on the stage, the scanner scans it, the robot takes it back.
A refused goal or a failed scan is recorded and the queue goes on with the next slide; a stage or
camera failure is retried once (it may be transient); Ctrl-C cancels the running scan and stops the
queue. The report (JSON) lists every slide's outcome for the lab's records.

`Robot` is where a real loader's API goes; `ManualRobot` asks an operator to swap the slide.
"""
import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import rclpy
from action_msgs.msg import GoalStatus
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from wsi.actions import ActionCallError, ActionCaller
from wsi_interfaces.action import ScanSlide

RETRYABLE = (ScanSlide.Result.ERROR_STAGE, ScanSlide.Result.ERROR_CAMERA)


@dataclass(frozen=True)
class Job:
    slot: int
    scan_id: str
    region_um: tuple[float, float, float, float] | None = None   # None: find the tissue automatically
    objective: float = 20.0
    formats: tuple[str, ...] = ("ome-tiff",)

    @classmethod
    def from_dict(cls, entry: dict) -> "Job":
        region = entry.get("region_um", "auto")
        return cls(int(entry["slot"]), str(entry["scan_id"]), None if region == "auto" else tuple(map(float, region)),
                   float(entry.get("objective", 20.0)), tuple(entry.get("formats", ("ome-tiff",))))

    def goal(self) -> ScanSlide.Goal:
        goal = ScanSlide.Goal(scan_id=self.scan_id, auto_detect_tissue=self.region_um is None,
                              objective_magnification=self.objective, skip_empty_tiles=True,
                              focus_strategy=ScanSlide.Goal.FOCUS_MAP_INLINE, output_formats=list(self.formats))
        if self.region_um is not None:
            goal.region_x_um, goal.region_y_um, goal.region_width_um, goal.region_height_um = self.region_um
        return goal


@dataclass
class Outcome:
    slot: int
    scan_id: str
    status: str                      # scanned, refused, failed, canceled
    attempts: int = 0
    error: str = ""
    outputs: list[str] = field(default_factory=list)
    tiles: int = 0


class Robot:
    """The loader's side: replace these with calls to the robot's own API."""

    def load(self, slot: int) -> None:
        raise NotImplementedError

    def unload(self, slot: int) -> None:
        raise NotImplementedError


class ManualRobot(Robot):
    """An operator swaps the slides; with `confirm=False` (simulation) the slide on the stage stays."""

    def __init__(self, confirm: bool = True):
        self.confirm = confirm

    def load(self, slot: int) -> None:
        if self.confirm:
            input(f"put the slide from slot {slot} on the stage, then press Enter ")

    def unload(self, slot: int) -> None:
        if self.confirm:
            input(f"take the slide back to slot {slot}, then press Enter ")


def run_queue(scanner: ActionCaller, jobs: list[Job], robot: Robot, timeout_s: float, outcomes: list[Outcome],
              log=print) -> None:
    """Scan every job in turn, appending each slide's outcome to `outcomes` as it is known."""
    for job in jobs:
        outcome = Outcome(job.slot, job.scan_id, "failed")
        robot.load(job.slot)
        try:
            while outcome.attempts < 2:
                outcome.attempts += 1
                try:
                    handle = scanner.send_goal(job.goal(), timeout_s)
                except ActionCallError as error:
                    outcome.status, outcome.error = "refused", str(error)
                    break
                try:
                    status, result = scanner.wait_for_result(handle, timeout_s)
                except KeyboardInterrupt:
                    scanner.cancel(handle)
                    scanner.wait_for_result(handle, timeout_s)
                    outcome.status, outcome.error = "canceled", "stopped by the operator"
                    outcomes.append(outcome)
                    raise
                outcome.tiles, outcome.outputs = result.tiles_captured, list(result.output_uris)
                if status == GoalStatus.STATUS_SUCCEEDED:
                    outcome.status, outcome.error = "scanned", ""
                    break
                outcome.error = result.error_message
                if result.error_code not in RETRYABLE:
                    break
                log(f"slot {job.slot}: {result.error_message}; retrying once")
        finally:
            robot.unload(job.slot)
        log(f"slot {job.slot} ({job.scan_id}): {outcome.status}" + (f": {outcome.error}" if outcome.error else ""))
        outcomes.append(outcome)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsi.slide_loader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", type=Path, help="JSON list of slides to scan")
    parser.add_argument("--report", type=Path, help="write the outcomes here (JSON)")
    parser.add_argument("--namespace", default="", help="namespace of the scanner")
    parser.add_argument("--no-confirm", action="store_true", help="do not wait for an operator (simulation)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one slide may take")
    args = parser.parse_args(argv)
    jobs = [Job.from_dict(entry) for entry in json.loads(args.jobs.read_text())]
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = Node("slide_loader")
    action = f"/{args.namespace.strip('/')}/scan_slide" if args.namespace.strip("/") else "scan_slide"
    scanner = ActionCaller(node, ScanSlide, action)
    outcomes: list[Outcome] = []
    try:
        scanner.wait_for_server(60.0)
        run_queue(scanner, jobs, ManualRobot(confirm=not args.no_confirm), args.timeout, outcomes)
    except KeyboardInterrupt:
        print("slide loader: stopped; the running scan was cancelled", file=sys.stderr)
    except ActionCallError as error:
        print(f"slide loader: {error}", file=sys.stderr)
        return 1
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        if args.report:
            args.report.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 0 if outcomes and all(o.status == "scanned" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
