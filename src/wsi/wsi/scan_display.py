"""How `wsi scan` shows a scan on a terminal: a progress line from its feedback, a report of its outcome."""
import sys
import time
from dataclasses import dataclass

from wsi.client import TaskOutcome, TaskResult
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


def report(outcome: TaskOutcome) -> list[str]:
    result = outcome.result
    if outcome.status is TaskResult.REJECTED:
        return [f"the scan was not run: {outcome.error_message}"]
    lines = []
    if outcome.status is TaskResult.SUCCEEDED and result.tiles_captured == 0 and result.calibration_model_dir:
        lines.append(f"scan {result.scan_id} calibrated the autofocus in {format_duration(result.duration_s)} "
                     f"(no tiles were asked for)")
    elif outcome.status is TaskResult.SUCCEEDED:
        lines.append(f"scan {result.scan_id} finished in {format_duration(result.duration_s)}: "
                     f"{result.tiles_captured} tiles ({result.tiles_skipped_empty} empty positions skipped, "
                     f"{result.refocus_count} refocused), {result.scanned_area_mm2:.1f} mm²")
    else:
        reason = ERROR_NAMES.get(outcome.error_code, str(outcome.error_code))
        lines.append(f"scan {result.scan_id or '(none)'} did not finish ({reason}): {outcome.error_message}")
        lines.append(f"{result.tiles_captured} tiles were captured and kept")
    if result.calibration_model_dir:
        lines.append(f"autofocus calibrated for this scanner and objective: {result.calibration_model_dir}")
    if result.calibration_error and result.calibration_model_dir:
        lines.append(f"not every focus model was calibrated (the others were kept): {result.calibration_error}")
    elif result.calibration_error and outcome.error_code != ScanSlide.Result.ERROR_CALIBRATION:
        lines.append(f"autofocus not calibrated, the models in use were kept: {result.calibration_error}")
    if result.manifest_uri:
        lines.append(f"manifest: {result.manifest_uri}")
    if result.mosaic_uri:
        lines.append(f"mosaic:   {result.mosaic_uri}")
    lines.extend(f"output:   {uri}" for uri in result.output_uris)
    return lines


def exit_code(outcome: TaskOutcome) -> int:
    return {TaskResult.SUCCEEDED: 0, TaskResult.CANCELED: 130}.get(outcome.status, 1)
