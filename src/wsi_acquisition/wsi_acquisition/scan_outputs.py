"""After the tiles: the stitching node's mosaic, its export, and the QC report.

ROS-free: the orchestrator node gives `finish_scan` a `Graph`, its view of the other nodes (what the
stitching node has said about each scan, whether one is running, an export run to its end). Every wait
polls `should_cancel`, so a cancelled goal ends promptly whatever it waits for; no stitching node (none
was running, or it went away), or one that never took this scan, ends the scan with ERROR_STITCHING at
once instead of after `stitch_s`.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from wsi_acquisition.qc_report import write_qc_report
from wsi_acquisition.scan_request import ScanError, ScanErrorCode, ScanRequest

POLL_S = 0.2     # how often a wait looks at cancel and at the stitching node


@dataclass(frozen=True)
class MosaicState:
    """What the stitching node last said about a scan (its MosaicStatus)."""
    finished: bool
    success: bool = False
    error: str = ""
    mosaic_uri: str = ""
    report_uri: str = ""


@dataclass(frozen=True)
class ExportJob:
    """The export of a scan's mosaic: the fields of an ExportSlide goal the scan decides."""
    mosaic_uri: str
    manifest_uri: str
    output_dir: str
    output_name: str
    formats: tuple[str, ...]


@dataclass(frozen=True)
class ExportReply:
    succeeded: bool
    error: str = ""
    output_uris: tuple[str, ...] = ()


class Graph(Protocol):
    def stitcher_running(self) -> bool:
        """Whether a stitching node is there at all (something publishes its status)."""

    def mosaic_state(self, scan_id: str) -> MosaicState | None:
        """The stitching node's last word about this scan; None if it said nothing about it."""

    def latest_mosaic_state(self) -> MosaicState | None:
        """The stitching node's last word about any scan."""

    def wait_for_mosaic_news(self, timeout_s: float) -> None:
        """Return when the stitching node says something, or after `timeout_s`."""

    def export(self, job: ExportJob, should_cancel: Callable[[], bool], timeout_s: float) -> ExportReply:
        """Run the export to its end; cancel it and return early when `should_cancel()` turns true."""


@dataclass(frozen=True)
class OutputTimeouts:
    stitch_s: float = 900.0        # the final mosaic, after the last tile
    stitch_start_s: float = 30.0   # the stitching node's first word about the scan, once it is idle
    export_s: float = 3600.0


@dataclass
class ScanOutputs:
    code: ScanErrorCode = ScanErrorCode.NONE
    message: str = ""
    mosaic: MosaicState | None = None
    output_uris: list[str] = field(default_factory=list)
    qc_index: Path | None = None
    qc_error: str = ""


def wait_for_mosaic(scan_id: str, graph: Graph, should_cancel: Callable[[], bool], timeouts: OutputTimeouts,
                    clock: Callable[[], float] = time.monotonic) -> MosaicState:
    """The stitching node's final word on the scan; ScanError(CANCELED or STITCHING) when there will be none."""
    started = clock()
    while True:
        state = graph.mosaic_state(scan_id)
        if state is not None and state.finished:
            return state
        if should_cancel():
            raise ScanError(ScanErrorCode.CANCELED, "canceled while waiting for the mosaic; the tiles and the "
                                                    "manifest are kept")
        waited = clock() - started
        if not graph.stitcher_running():
            raise ScanError(ScanErrorCode.STITCHING, f"output formats need a stitching node, and none is running "
                                                     f"(nothing publishes mosaic/status) {waited:.0f} s after the "
                                                     "last tile; the tiles are on disk, to be stitched from the "
                                                     "manifest")
        latest = graph.latest_mosaic_state()
        if state is None and (latest is None or latest.finished) and waited > timeouts.stitch_start_s:
            raise ScanError(ScanErrorCode.STITCHING, f"the stitching node never took scan {scan_id}: it has said "
                                                     f"nothing about it {waited:.0f} s after the last tile, and "
                                                     "is stitching nothing else")
        if waited > timeouts.stitch_s:
            raise ScanError(ScanErrorCode.STITCHING, f"no final mosaic within {timeouts.stitch_s:.0f} s")
        graph.wait_for_mosaic_news(POLL_S)


def produce_outputs(request: ScanRequest, manifest_path: Path, graph: Graph, should_cancel: Callable[[], bool],
                    timeouts: OutputTimeouts, outputs: ScanOutputs,
                    clock: Callable[[], float] = time.monotonic) -> None:
    """Wait for the stitching node's final mosaic, then export it in the request's formats, into `outputs`;
    ScanError when either fails or the goal is cancelled."""
    outputs.mosaic = mosaic = wait_for_mosaic(request.scan_id, graph, should_cancel, timeouts, clock)
    if not mosaic.success:
        raise ScanError(ScanErrorCode.STITCHING, mosaic.error)
    job = ExportJob(mosaic_uri=mosaic.mosaic_uri, manifest_uri=str(manifest_path), output_dir=str(request.scan_dir),
                    output_name=request.scan_id, formats=request.output_formats)
    reply = graph.export(job, should_cancel, timeouts.export_s)
    if should_cancel():
        raise ScanError(ScanErrorCode.CANCELED, "canceled while exporting; the export was cancelled too, the "
                                                "tiles, the manifest and the mosaic are kept")
    if not reply.succeeded:
        raise ScanError(ScanErrorCode.EXPORT, reply.error)
    outputs.output_uris = list(reply.output_uris)


def finish_scan(request: ScanRequest, manifest_path: Path, tiles_captured: int, code: ScanErrorCode, message: str,
                graph: Graph, should_cancel: Callable[[], bool], timeouts: OutputTimeouts, qc_report: bool,
                clock: Callable[[], float] = time.monotonic) -> ScanOutputs:
    """What follows the tiles: stitch and export when the scan succeeded and asked for output formats, then
    the QC report of whatever was captured. `code` and `message` are the tiles' outcome; the result carries
    the scan's final outcome."""
    outputs = ScanOutputs(code, message)
    if code == ScanErrorCode.NONE and request.output_formats:
        try:
            produce_outputs(request, manifest_path, graph, should_cancel, timeouts, outputs, clock)
        except ScanError as error:
            outputs.code, outputs.message = error.code, str(error)
    if qc_report and tiles_captured:
        report = Path(outputs.mosaic.report_uri) if outputs.mosaic is not None and outputs.mosaic.report_uri else None
        try:
            outputs.qc_index = write_qc_report(manifest_path, report,
                                               {Path(uri).name: Path(uri) for uri in outputs.output_uris})
        except (OSError, ValueError, KeyError) as error:
            outputs.qc_error = f"QC report of scan {request.scan_id} could not be written: {error}"
    return outputs
