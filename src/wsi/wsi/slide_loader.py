"""Example client for a slide-loader robot: scans a queue of slides through the ScanSlide action.

    python -m wsi.slide_loader jobs.json [--report report.json] [--namespace scanner_a]

jobs.json: [{"slot": 1, "scan_id": "case-0001", "region_um": [x, y, w, h] or "auto", "objective": 20,
             "formats": ["ome-tiff"]}, ...]

For every job the robot puts the slide on the stage, the scanner scans it (through wsi.client), the robot
takes it back. A refused goal (the scanner's reason is recorded) or a failed scan is recorded and the queue
goes on with the next slide; a stage or camera failure is retried once (it may be transient); a slide that
takes longer than --timeout is cancelled and recorded as failed; Ctrl-C cancels the running scan and stops
the queue. The report (JSON) lists every slide's outcome for the lab's records.

`Robot` is where a real loader's API goes; `ManualRobot` asks an operator to swap the slide.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import rclpy
from rclpy.signals import SignalHandlerOptions

from wsi.client import ScannerClient, ScannerUnavailable, TaskResult, scan_goal
from wsi_common.node_main import end_ros
from wsi_interfaces.action import ScanSlide

RETRYABLE = (ScanSlide.Result.ERROR_STAGE, ScanSlide.Result.ERROR_CAMERA)
# Goals the scanner will not run as given: sending them again cannot help.
REFUSED = (ScanSlide.Result.ERROR_INVALID_GOAL,)


@dataclass(frozen=True)
class Job:
    slot: int
    scan_id: str
    region_um: tuple[float, float, float, float] | None = None   # None: find the tissue automatically
    objective: float = 0.0                                         # 0: the scanner's default objective
    formats: tuple[str, ...] = ("ome-tiff",)

    @classmethod
    def from_dict(cls, entry: dict) -> "Job":
        region = entry.get("region_um", "auto")
        return cls(int(entry["slot"]), str(entry["scan_id"]), None if region == "auto" else tuple(map(float, region)),
                   float(entry.get("objective", 0.0)), tuple(entry.get("formats", ("ome-tiff",))))

    def goal(self) -> ScanSlide.Goal:
        return scan_goal(self.scan_id, self.region_um, self.objective, output_formats=self.formats)


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


def run_queue(scanner: ScannerClient, jobs: list[Job], robot: Robot, timeout_s: float, outcomes: list[Outcome],
              log=print) -> None:
    """Scan every job in turn, appending each slide's outcome to `outcomes` as it is known."""
    for job in jobs:
        outcome = Outcome(job.slot, job.scan_id, "failed")
        robot.load(job.slot)
        try:
            while outcome.attempts < 2:
                outcome.attempts += 1
                scanner.scan(job.goal())
                deadline = time.monotonic() + timeout_s
                try:
                    while not scanner.is_task_complete() and time.monotonic() < deadline:
                        pass
                    timed_out = not scanner.is_task_complete()
                    if timed_out:
                        stop(scanner)
                except KeyboardInterrupt:
                    stop(scanner)
                    outcome.status, outcome.error = "canceled", "stopped by the operator"
                    outcomes.append(outcome)
                    raise
                result = scanner.result()
                if result.result is not None:
                    outcome.tiles, outcome.outputs = result.result.tiles_captured, list(result.result.output_uris)
                if timed_out:
                    outcome.error = f"no result within {timeout_s:g} s: the scan was cancelled"
                    break
                outcome.error = result.error_message
                if result.status is TaskResult.SUCCEEDED:
                    outcome.status = "scanned"
                    break
                if result.status is TaskResult.REJECTED or result.error_code in REFUSED:
                    outcome.status = "refused"
                    break
                if result.error_code not in RETRYABLE:
                    break
                log(f"slot {job.slot}: {result.error_message}; retrying once")
        finally:
            robot.unload(job.slot)
        log(f"slot {job.slot} ({job.scan_id}): {outcome.status}" + (f": {outcome.error}" if outcome.error else ""))
        outcomes.append(outcome)


def stop(scanner: ScannerClient) -> None:
    """Cancel the running scan and wait until it has stopped (the slide is then free to take back)."""
    scanner.cancel()
    while not scanner.is_task_complete():
        pass


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
    scanner = ScannerClient(args.namespace, "slide_loader")
    outcomes: list[Outcome] = []
    try:
        run_queue(scanner, jobs, ManualRobot(confirm=not args.no_confirm), args.timeout, outcomes)
    except KeyboardInterrupt:
        print("slide loader: stopped; the running scan was cancelled", file=sys.stderr)
    except ScannerUnavailable as error:
        print(f"slide loader: {error}", file=sys.stderr)
        return 1
    finally:
        end_ros([scanner], "slide loader")
        if args.report:
            args.report.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 0 if outcomes and all(o.status == "scanned" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
