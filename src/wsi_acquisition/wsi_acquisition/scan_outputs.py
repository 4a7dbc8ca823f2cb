"""After the tiles: the stitching node's mosaic, its export, and the QC report.

ROS-free: the orchestrator node gives `finish_scan` a `Graph`, its view of the other nodes (what the
stitching node has said about each scan, whether one is running, the export node). Every wait polls
`should_cancel`, so a cancelled goal ends promptly whatever it waits for; no stitching node (none was
running, or it went away), or one that never took this scan, ends the scan with ERROR_STITCHING at once
instead of after `stitch_s`.

The export can start while the tiles still arrive (`ExportWhileStitching`): once the stitching node names
the scan's mosaic, the export node writes each region of it as soon as the stitcher has stored it
(ExportSlide's follow_stitching), so the slide is written when the stage stops rather than a whole
export later. A scan that fails, or is cancelled, cancels that export.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from wsi_acquisition.qc_report import write_qc_report
from wsi_acquisition.scan_request import ScanError, ScanErrorCode, ScanRequest

POLL_S = 0.2     # how often a wait looks at cancel and at the stitching node
EXPORT_NODE_WAIT_S = 10.0   # how long an export after the mosaic waits for an export node to answer


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
    follow_stitching: bool = False   # sent while the mosaic is stitched: each region is read once stored


@dataclass(frozen=True)
class ExportReply:
    succeeded: bool
    error: str = ""
    output_uris: tuple[str, ...] = ()


class ExportRun(Protocol):
    """An export goal sent to the export node."""

    def result(self, should_cancel: Callable[[], bool], timeout_s: float) -> ExportReply:
        """Wait for the export's end; cancel it and return early when `should_cancel()` turns true or after
        `timeout_s`."""

    def cancel(self) -> None:
        """Cancel the export unless it has ended: an export nobody waits for must not go on writing."""


class Graph(Protocol):
    def stitcher_running(self) -> bool:
        """Whether a stitching node is there at all (something publishes its status)."""

    def mosaic_state(self, scan_id: str) -> MosaicState | None:
        """The stitching node's last word about this scan; None if it said nothing about it."""

    def latest_mosaic_state(self) -> MosaicState | None:
        """The stitching node's last word about any scan."""

    def wait_for_mosaic_news(self, timeout_s: float) -> None:
        """Return when the stitching node says something, or after `timeout_s`."""

    def start_export(self, job: ExportJob) -> ExportRun | None:
        """Send the export goal without waiting for it; None when no export node answers now."""


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


def export_job(request: ScanRequest, mosaic_uri: str, follow_stitching: bool) -> ExportJob:
    return ExportJob(mosaic_uri=mosaic_uri, manifest_uri=str(request.manifest_path), output_dir=str(request.scan_dir),
                     output_name=request.scan_id, formats=request.output_formats, follow_stitching=follow_stitching)


class ExportWhileStitching:
    """Starts a scan's export as soon as the stitching node names the scan's mosaic (`poll`, after every tile);
    `run` is that export, or None while it has not started (no mosaic yet, no export node, no formats)."""

    def __init__(self, request: ScanRequest, graph: Graph):
        self._request = request
        self._graph = graph
        self.run: ExportRun | None = None

    def poll(self) -> None:
        if self.run is not None or not self._request.output_formats:
            return
        state = self._graph.mosaic_state(self._request.scan_id)
        if state is not None and not state.finished and state.mosaic_uri:
            self.run = self._graph.start_export(export_job(self._request, state.mosaic_uri, follow_stitching=True))


def start_export_when_answered(graph: Graph, job: ExportJob, should_cancel: Callable[[], bool],
                               clock: Callable[[], float] = time.monotonic) -> ExportRun:
    """The export of `job`, once an export node answers; ScanError(EXPORT) after EXPORT_NODE_WAIT_S."""
    started = clock()
    while (run := graph.start_export(job)) is None:
        if should_cancel():
            raise ScanError(ScanErrorCode.CANCELED, "canceled while waiting for an export node; the tiles, the "
                                                    "manifest and the mosaic are kept")
        if clock() - started > EXPORT_NODE_WAIT_S:
            raise ScanError(ScanErrorCode.EXPORT, "output formats need an export node, and none answers")
        time.sleep(POLL_S)
    return run


def produce_outputs(request: ScanRequest, graph: Graph, should_cancel: Callable[[], bool],
                    timeouts: OutputTimeouts, outputs: ScanOutputs, clock: Callable[[], float] = time.monotonic,
                    export_started: ExportRun | None = None) -> None:
    """Wait for the stitching node's final mosaic, then for its export in the request's formats (the one
    started while stitching, or one started now), into `outputs`; ScanError when either fails or the goal
    is cancelled."""
    outputs.mosaic = mosaic = wait_for_mosaic(request.scan_id, graph, should_cancel, timeouts, clock)
    if not mosaic.success:
        raise ScanError(ScanErrorCode.STITCHING, mosaic.error)
    run = export_started or start_export_when_answered(
        graph, export_job(request, mosaic.mosaic_uri, follow_stitching=False), should_cancel, clock)
    reply = run.result(should_cancel, timeouts.export_s)
    if should_cancel():
        raise ScanError(ScanErrorCode.CANCELED, "canceled while exporting; the export was cancelled too, the "
                                                "tiles, the manifest and the mosaic are kept")
    if not reply.succeeded:
        raise ScanError(ScanErrorCode.EXPORT, reply.error)
    outputs.output_uris = list(reply.output_uris)


def finish_scan(request: ScanRequest, tiles_captured: int, code: ScanErrorCode, message: str,
                graph: Graph, should_cancel: Callable[[], bool], timeouts: OutputTimeouts, qc_report: bool,
                clock: Callable[[], float] = time.monotonic, export_started: ExportRun | None = None) -> ScanOutputs:
    """What follows the tiles: stitch and export when the scan succeeded and asked for output formats, then
    the QC report of whatever was captured. `code` and `message` are the tiles' outcome; the result carries
    the scan's final outcome. `export_started`: the export started while stitching (ExportWhileStitching),
    cancelled when the scan does not end with it."""
    outputs = ScanOutputs(code, message)
    if code == ScanErrorCode.NONE and request.output_formats:
        try:
            produce_outputs(request, graph, should_cancel, timeouts, outputs, clock, export_started)
        except ScanError as error:
            outputs.code, outputs.message = error.code, str(error)
    if export_started is not None and outputs.code != ScanErrorCode.NONE:
        export_started.cancel()
    if qc_report and tiles_captured:
        report = Path(outputs.mosaic.report_uri) if outputs.mosaic is not None and outputs.mosaic.report_uri else None
        try:
            outputs.qc_index = write_qc_report(request.manifest_path, report,
                                               {Path(uri).name: Path(uri) for uri in outputs.output_uris})
        except (OSError, ValueError, KeyError) as error:
            outputs.qc_error = f"QC report of scan {request.scan_id} could not be written: {error}"
    return outputs
