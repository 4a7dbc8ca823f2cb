"""`wsi scan`: send a ScanSlide goal, show its progress, cancel it on Ctrl-C, report the outputs."""
import sys
import time
from dataclasses import dataclass

import rclpy
from action_msgs.msg import GoalStatus
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from wsi.actions import ActionCallError, ActionCaller
from wsi_interfaces.action import ScanSlide
from wsi_interfaces.msg import ScanStatus

# A 2.5 x 2.5 mm area inside the tissue section of the bundled default slide (seed 0).
DEFAULT_REGION_UM = (41_000.0, 11_000.0, 2_500.0, 2_500.0)

STATE_NAMES = {value: name.removeprefix("STATE_").lower().replace("_", " ")
               for name, value in vars(ScanStatus).items() if name.startswith("STATE_")}
ERROR_NAMES = {value: name.removeprefix("ERROR_").lower().replace("_", " ")
               for name, value in vars(ScanSlide.Result).items() if name.startswith("ERROR_")}


def format_duration(seconds: float) -> str:
    if seconds < 0:
        return "--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes:02d}:{secs:02d}"


def progress_line(feedback, width: int = 30) -> str:
    """One line of scan progress: state, bar, tiles, refocus count, elapsed and ETA."""
    state = STATE_NAMES.get(feedback.state, str(feedback.state))
    total = max(feedback.tiles_total, 1)
    filled = int(width * min(feedback.tiles_done / total, 1.0))
    bar = "#" * filled + "." * (width - filled)
    return (f"{state:<10} [{bar}] {feedback.tiles_done}/{feedback.tiles_total} tiles, "
            f"{feedback.refocus_count} refocused, elapsed {format_duration(feedback.elapsed_s)}, "
            f"ETA {format_duration(feedback.eta_s)}")


@dataclass
class ProgressPrinter:
    """Redraws one line on a terminal; elsewhere prints a line at most every `interval_s`."""
    stream: object = sys.stdout
    interval_s: float = 5.0
    _last_print: float = 0.0
    _drawn: bool = False

    def update(self, feedback) -> None:
        line = progress_line(feedback)
        if self.stream.isatty():
            self.stream.write("\r" + line + "\033[K")
            self._drawn = True
        elif time.monotonic() - self._last_print >= self.interval_s:
            self.stream.write(line + "\n")
            self._last_print = time.monotonic()
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def build_goal(scan_id: str, region_um, auto_detect: bool, objective: float, focus_strategy: int,
               output_formats: list[str]) -> ScanSlide.Goal:
    goal = ScanSlide.Goal(scan_id=scan_id, auto_detect_tissue=auto_detect, objective_magnification=objective,
                          focus_strategy=focus_strategy, skip_empty_tiles=True, output_formats=output_formats)
    if not auto_detect:
        goal.region_x_um, goal.region_y_um, goal.region_width_um, goal.region_height_um = region_um
    return goal


def run_scan_goal(action_name: str, goal: ScanSlide.Goal, server_timeout_s: float, graph=None,
                  printer: ProgressPrinter | None = None) -> tuple[int, ScanSlide.Result]:
    """Send the goal and wait for its result; Ctrl-C cancels it (and waits for the scan to stop)."""
    printer = printer or ProgressPrinter()
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)   # Ctrl-C must reach us as KeyboardInterrupt
    node = Node("wsi_scan")
    try:
        caller = ActionCaller(node, ScanSlide, action_name)
        caller.wait_for_server(server_timeout_s)
        handle = caller.send_goal(goal, server_timeout_s, on_feedback=printer.update)
        future = handle.get_result_async()
        try:
            while not future.done():
                rclpy.spin_once(node, timeout_sec=0.2)
                if graph is not None:
                    graph.check_alive()
        except KeyboardInterrupt:
            printer.finish()
            print("wsi scan: Ctrl-C: cancelling the scan (what was captured is kept)", flush=True)
            caller.cancel(handle)
            while not future.done():
                rclpy.spin_once(node, timeout_sec=0.2)
        printer.finish()
        response = future.result()
        return response.status, response.result
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def report(status: int, result: ScanSlide.Result) -> list[str]:
    lines = []
    if status == GoalStatus.STATUS_SUCCEEDED:
        lines.append(f"scan {result.scan_id} finished in {format_duration(result.duration_s)}: "
                     f"{result.tiles_captured} tiles ({result.tiles_skipped_empty} empty positions skipped, "
                     f"{result.refocus_count} refocused), {result.scanned_area_mm2:.1f} mm²")
    else:
        reason = ERROR_NAMES.get(result.error_code, str(result.error_code))
        lines.append(f"scan {result.scan_id or '(none)'} did not finish ({reason}): {result.error_message}")
        lines.append(f"{result.tiles_captured} tiles were captured and kept")
    if result.manifest_uri:
        lines.append(f"manifest: {result.manifest_uri}")
    if result.mosaic_uri:
        lines.append(f"mosaic:   {result.mosaic_uri}")
    lines.extend(f"output:   {uri}" for uri in result.output_uris)
    return lines


def exit_code(status: int) -> int:
    return 0 if status == GoalStatus.STATUS_SUCCEEDED else 130 if status == GoalStatus.STATUS_CANCELED else 1


def describe_error(error: Exception) -> str:
    if isinstance(error, ActionCallError):
        return f"{error}"
    return f"{type(error).__name__}: {error}"
