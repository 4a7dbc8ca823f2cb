"""Scan orchestrator node: the ScanSlide action server around the scan core.

Publishes every tile on `tiles`, the plan on `scan/plan` (latched) and progress on `scan/status`;
with inline autofocus it waits for the autofocus node's FocusEstimate of each tile. Before each tile it
waits, too, until the tile fits in the buffer of every node consuming tiles (`max_buffer_mb`; the stitching
node's `mosaic/status` and the autofocus node's estimates say which tiles have left their buffers), so that
a consumer that falls behind slows the scan instead of growing its memory (`wsi_common.backpressure`).
The goal's rules (scan_request) and what follows the tiles (scan_outputs) are ROS-free; this node adapts
them. Every goal is accepted; one that cannot be run ends at once, aborted with ERROR_INVALID_GOAL or
ERROR_BUSY and the reason in error_message, so that the caller learns why.
"""
import functools
import threading
import time
from pathlib import Path

from action_msgs.msg import GoalStatus
from rclpy.action import CancelResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from wsi_acquisition.planning import TilePlan
from wsi_acquisition.scan import FocusReply, FocusStrategy, ScanError, ScanErrorCode, ScanProgress, ScanRunner, State
from wsi_acquisition.scan_outputs import (POLL_S, ExportJob, ExportReply, ExportWhileStitching, MosaicState,
                                          OutputTimeouts, finish_scan)
from wsi_acquisition.scan_request import DEFAULTS, ScannerSettings, ScanRequest
from wsi_common.backpressure import MB, CreditWindow
from wsi_common.diagnostics import OK, DiagnosticsPublisher
from wsi_common.image import array_to_image
from wsi_common.params import declare_parameters
from wsi_common.topics import EXPORT_SLIDE, FOCUS_ESTIMATES, MOSAIC_STATUS, SCAN_PLAN, SCAN_SLIDE, SCAN_STATUS, TILES
from wsi_interfaces.action import ExportSlide, ScanSlide
from wsi_interfaces.msg import FocusEstimate, MosaicStatus, ScanPlan, ScanStatus, Tile, TileIndex
from wsi_interfaces.srv import CalibrateAutofocus, EstimateFocus

PARAMETERS = {
    "output_root": ("out", "scans are written under this directory; goals may name a sub-directory of it"),
    "default_objective": (DEFAULTS["objective_magnification"], "objective used when a goal gives 0"),
    "exposure_ms": (DEFAULTS["exposure_ms"], "tile exposure, ms"),
    "gain": (DEFAULTS["gain"], "camera gain for tiles"),
    "inline_autofocus": (True, "correct focus from the autofocus node's estimates when one is running"),
    "autofocus_timeout_s": (5.0, "how long to wait for a tile's FocusEstimate before going on without it"),
    "calibration_timeout_s": (180.0, "how long a scan waits for the autofocus to calibrate on its focus map"),
    "save_tiles": (DEFAULTS["save_tiles"], "also save every tile as TIFF beside the manifest"),
    "stitch_timeout_s": (OutputTimeouts.stitch_s,
                         "how long to wait after the last tile for the stitching node's final mosaic"),
    "stitch_start_timeout_s": (OutputTimeouts.stitch_start_s,
                               "how long after the last tile a stitching node busy with nothing else may say "
                               "nothing about the scan before the scan fails as not stitched"),
    "export_timeout_s": (OutputTimeouts.export_s, "how long an export may take"),
    "export_while_stitching": (True, "start a scan's export once the stitching node opens its mosaic, so the slide "
                                     "is written as it is stitched; false: export after the final mosaic"),
    "qc_report": (True, "write the QC report (qc/index.html) beside the manifest after every scan"),
    "max_buffer_mb": (256.0, "most MB of tiles published and not yet handled by any one consumer (stitching, "
                             "autofocus); a tile that would exceed it waits, so the scan slows to the consumer's pace"),
    "diagnostics_period_s": (2.0, "period of /diagnostics messages (tile buffer depth, bytes and stall time)"),
}


def scan_plan_message(scan_id: str, plan: TilePlan, backend, scan_dir: Path, manifest_path: Path) -> ScanPlan:
    """The ScanPlan message of a tile plan taken with `backend` (a MicroscopeBackend); no stamp."""
    width, height = backend.sensor_size_px()
    edge_x_um, edge_y_um = plan.edge_origin_um
    return ScanPlan(scan_id=scan_id, output_dir=str(scan_dir), rows=plan.rows, cols=plan.cols,
                    tiles=[TileIndex(row=t.row, col=t.col) for t in plan.tiles], tile_width_px=width,
                    tile_height_px=height, pixel_size_um=backend.pixel_size_um(),
                    overlap_fraction=plan.overlap_fraction, objective_magnification=backend.objective_magnification,
                    numerical_aperture=backend.numerical_aperture(), origin_x_um=edge_x_um, origin_y_um=edge_y_um,
                    step_x_um=plan.step_x_um, step_y_um=plan.step_y_um, manifest_uri=str(manifest_path))


def wait_for_future(future, timeout_s: float, should_cancel=lambda: False):
    """Result of a future completed by another executor thread; None after the timeout or on cancel."""
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    deadline = time.monotonic() + timeout_s
    while not done.wait(min(POLL_S, max(deadline - time.monotonic(), 0.0))):
        if should_cancel() or time.monotonic() >= deadline:
            return None
    return future.result()


class ExportGoal:
    """An ExportSlide goal the orchestrator sent (scan_outputs.ExportRun), from the future of its sending."""

    def __init__(self, sent):
        self._sent = sent
        self._ended = False

    def result(self, should_cancel, timeout_s: float) -> ExportReply:
        handle = wait_for_future(self._sent, 30.0, should_cancel)
        if handle is None or not handle.accepted:
            self.cancel()   # should the export node take it after all, it must not go on writing
            return ExportReply(False, "the export node did not take the export goal")
        outcome = wait_for_future(handle.get_result_async(), timeout_s, should_cancel)
        if outcome is None:
            self.cancel()
            return ExportReply(False, f"export did not finish within {timeout_s:.0f} s")
        self._ended = True
        if outcome.status != GoalStatus.STATUS_SUCCEEDED:
            return ExportReply(False, outcome.result.error_message)
        return ExportReply(True, "", tuple(outcome.result.output_paths))

    def cancel(self) -> None:
        if self._ended:
            return

        def cancel_if_accepted(sent):
            handle = sent.result()
            if handle is not None and handle.accepted:
                handle.cancel_goal_async()

        self._sent.add_done_callback(cancel_if_accepted)


def _mosaic_state(msg: MosaicStatus | None) -> MosaicState | None:
    return None if msg is None else MosaicState(msg.finished, msg.success, msg.error, msg.mosaic_uri, msg.report_uri)


class ScanOrchestratorNode(Node):
    def __init__(self, backend, hardware_lock: threading.Lock):
        super().__init__("scan_orchestrator")
        self.params = declare_parameters(self, PARAMETERS)
        self.backend = backend
        self._lock = hardware_lock
        self._running_scan = ""
        self._settings = ScannerSettings(Path(self.params["output_root"]), self.params["default_objective"],
                                         self.params["exposure_ms"], self.params["gain"], self.params["save_tiles"])
        self._timeouts = OutputTimeouts(self.params["stitch_timeout_s"], self.params["stitch_start_timeout_s"],
                                        self.params["export_timeout_s"])
        self._window = CreditWindow(round(self.params["max_buffer_mb"] * MB))
        self._estimates_this_scan = 0      # the running scan's tiles the autofocus has handled (estimated)
        group = ReentrantCallbackGroup()
        self._tiles = TILES.publisher(self)
        self._status = SCAN_STATUS.publisher(self)
        self._plan = SCAN_PLAN.publisher(self)
        self._estimates: dict[tuple[str, int], FocusEstimate] = {}
        self._estimate_arrived = threading.Condition()
        FOCUS_ESTIMATES.subscription(self, self._on_estimate, callback_group=group)
        self._mosaics: dict[str, MosaicStatus] = {}
        self._latest_mosaic: MosaicStatus | None = None
        self._mosaic_arrived = threading.Condition()
        MOSAIC_STATUS.subscription(self, self._on_mosaic, callback_group=group)
        self._export = EXPORT_SLIDE.client(self, callback_group=group)
        self._estimate_image = self.create_client(EstimateFocus, "estimate_focus", callback_group=group)
        self._calibrate = self.create_client(CalibrateAutofocus, "calibrate_autofocus", callback_group=group)
        self._server = SCAN_SLIDE.server(self, self._execute, cancel_callback=lambda _: CancelResponse.ACCEPT,
                                         callback_group=group)
        DiagnosticsPublisher(self, "scan_orchestrator", self.params["diagnostics_period_s"], self._diagnostics)

    # -- goals ---------------------------------------------------------------------------------
    def _execute(self, goal_handle):
        result = ScanSlide.Result(scan_id=goal_handle.request.scan_id)
        started = time.monotonic()
        try:
            # Judged before the lock, so a goal that cannot be run learns why even while the microscope is busy;
            # the runner judges it again under the lock (another scan may have taken its folder meanwhile).
            request = ScanRequest.from_goal(goal_handle.request, self._settings, self.backend)
        except ScanError as error:
            return self._finish(goal_handle, result, error.code, str(error), started)
        result.scan_id = request.scan_id
        if not self._lock.acquire(blocking=False):
            holder = (f"scan {self._running_scan} is running" if self._running_scan
                      else "a stage move or a camera frame holds it")
            return self._finish(goal_handle, result, ScanErrorCode.BUSY, f"the microscope is busy: {holder}; send "
                                "the goal again when it is idle", started)
        should_cancel = lambda: goal_handle.is_cancel_requested  # noqa: E731 (one predicate for every wait)
        inline = self.params["inline_autofocus"] and request.focus_strategy == FocusStrategy.MAP_INLINE
        export_while_stitching = (ExportWhileStitching(request, self)
                                  if self.params["export_while_stitching"] else None)

        def publish_tile(record, frame):
            self._publish_tile(request, record, frame, should_cancel)
            if export_while_stitching is not None:
                export_while_stitching.poll()

        runner = ScanRunner(self.backend, request, publish_tile=publish_tile,
                            estimate_focus=(lambda r, f: self._wait_for_estimate(request.scan_id, r)) if inline else None,
                            on_progress=lambda p: self._progress(goal_handle, request.scan_id, p),
                            should_cancel=should_cancel,
                            on_plan=lambda plan: self._publish_plan(request, plan, runner),
                            estimate_image=functools.partial(self._estimate_untiled_image, request.scan_id)
                            if inline else None,
                            calibrate_focus=lambda scan_dir: self._calibrate_autofocus(scan_dir, should_cancel))
        code, message = ScanErrorCode.NONE, ""
        with self._estimate_arrived:
            self._estimates_this_scan = 0
        self._window.start_scan()
        self._running_scan = request.scan_id
        try:
            runner.run()
        except ScanError as error:
            code, message = error.code, str(error)
        finally:
            self._running_scan = ""
            self._lock.release()
        outcome = runner.outcome
        if outcome.manifest_path.exists():
            result.manifest_uri = str(outcome.manifest_path)
        if outcome.plan is not None:
            result.tiles_planned = len(outcome.plan.tiles)
            result.tiles_skipped_empty = len(outcome.plan.skipped)
            fov_w, fov_h = outcome.plan.fov_width_um, outcome.plan.fov_height_um
            result.scanned_area_mm2 = len({(r.row, r.col) for r in outcome.records}) * fov_w * fov_h / 1e6
        result.tiles_captured = len(outcome.records)
        result.refocus_count = outcome.refocus_count
        if outcome.autofocus_calibration is not None:
            calibration = outcome.autofocus_calibration
            # The store's directory of both models; a calibration-only goal's holds the two-shot model alone.
            result.calibration_model_dir = (calibration["model_dir"] or str(Path(calibration["two_shot_model"]).parent)
                                            if calibration["success"] else "")
            result.calibration_error = calibration["error"]
        if code == ScanErrorCode.NONE and request.output_formats:
            goal_handle.publish_feedback(ScanSlide.Feedback(state=int(State.FINISHING), tiles_done=result.tiles_planned,
                                                            tiles_total=result.tiles_planned))
        outputs = finish_scan(request, len(outcome.records), code, message, self,
                              should_cancel, self._timeouts, self.params["qc_report"],
                              export_started=export_while_stitching.run if export_while_stitching else None)
        if outputs.mosaic is not None and outputs.mosaic.success:
            result.mosaic_uri = outputs.mosaic.mosaic_uri
        result.output_uris = outputs.output_uris
        if outputs.qc_error:
            self.get_logger().error(outputs.qc_error)
        elif outputs.qc_index is not None:
            self.get_logger().info(f"QC report: {outputs.qc_index}")
        return self._finish(goal_handle, result, outputs.code, outputs.message, started)

    def _finish(self, goal_handle, result, code: ScanErrorCode, message: str, started: float):
        result.error_code, result.error_message = int(code), message
        result.duration_s = time.monotonic() - started
        if code == ScanErrorCode.NONE:
            goal_handle.succeed()
        elif code == ScanErrorCode.CANCELED:
            goal_handle.canceled()
        else:
            self.get_logger().error(f"scan {result.scan_id} failed: {message}")
            goal_handle.abort()
        return result

    # -- the graph, as scan_outputs sees it -----------------------------------------------------
    def stitcher_running(self) -> bool:
        return self.count_publishers(MOSAIC_STATUS.name) > 0

    def mosaic_state(self, scan_id: str) -> MosaicState | None:
        with self._mosaic_arrived:
            return _mosaic_state(self._mosaics.get(scan_id))

    def latest_mosaic_state(self) -> MosaicState | None:
        with self._mosaic_arrived:
            return _mosaic_state(self._latest_mosaic)

    def wait_for_mosaic_news(self, timeout_s: float) -> None:
        with self._mosaic_arrived:
            self._mosaic_arrived.wait(timeout_s)

    def start_export(self, job: ExportJob) -> ExportGoal | None:
        if not self._export.server_is_ready():
            return None
        goal = ExportSlide.Goal(mosaic_uri=job.mosaic_uri, manifest_uri=job.manifest_uri, output_dir=job.output_dir,
                                output_name=job.output_name, formats=list(job.formats), write_thumbnail=True,
                                follow_stitching=job.follow_stitching)
        return ExportGoal(self._export.send_goal_async(goal))

    def _on_mosaic(self, msg: MosaicStatus) -> None:
        with self._mosaic_arrived:
            self._mosaics[msg.scan_id] = self._latest_mosaic = msg
            self._mosaic_arrived.notify_all()
        # Outside the lock above: the window asks for the mosaic state while it holds its own lock.
        if msg.scan_id == self._running_scan and not msg.finished:
            self._window.acknowledge("stitching", msg.tiles_received)

    def _tile_consumers(self) -> list[str]:
        """The consumers whose buffers a tile must fit in: the autofocus while it runs (it estimates every
        tile), the stitching node once it has said it stitches this scan and until it has finished it."""
        consumers = ["autofocus"] if self.count_publishers(FOCUS_ESTIMATES.name) else []
        with self._mosaic_arrived:
            state = self._mosaics.get(self._running_scan)
        if state is not None and not state.finished and self.stitcher_running():
            consumers.append("stitching")
        return consumers

    def _diagnostics(self):
        window = self._window.stats(self._tile_consumers() if self._running_scan else [])
        return OK, f"scanning {self._running_scan}" if self._running_scan else "idle", {
            "buffer_limit_bytes": self._window.max_bytes, "buffer_tiles": window.tiles, "buffer_bytes": window.bytes,
            "buffer_peak_bytes": window.peak_bytes, "stalls": window.stalls, "stall_s": f"{window.stall_s:.2f}"}

    # -- runner callbacks ----------------------------------------------------------------------
    def _publish_tile(self, request: ScanRequest, record, frame, should_cancel) -> None:
        msg = Tile(scan_id=request.scan_id, sequence=record.sequence, index=TileIndex(row=record.row, col=record.col),
                   is_recapture=record.is_recapture, pixel_size_um=frame.pixel_size_um,
                   objective_magnification=frame.objective_magnification,
                   numerical_aperture=frame.numerical_aperture, exposure_ms=frame.exposure_ms, gain=frame.gain,
                   applied_focus_offset_um=record.applied_focus_offset_um,
                   ground_truth_defocus_um=frame.ground_truth_defocus_um,
                   commanded_x_um=record.commanded_x_um, commanded_y_um=record.commanded_y_um,
                   commanded_z_um=record.commanded_z_um, measured_x_um=record.measured_x_um,
                   measured_y_um=record.measured_y_um, measured_z_um=record.measured_z_um)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = "camera_optical_frame"
        array_to_image(frame.image_rgb8, "rgb8", msg.image)
        msg.image.header = msg.header
        nbytes = len(msg.image.data)
        if not self._window.wait_for_room(nbytes, self._tile_consumers, should_cancel, POLL_S):
            raise ScanError(ScanErrorCode.CANCELED, f"canceled while tile #{record.sequence} waited for room in "
                                                    "the consumers' buffers; the tiles captured are kept")
        self._window.sent(nbytes)
        self._tiles.publish(msg)

    def _publish_plan(self, request: ScanRequest, plan: TilePlan, runner: ScanRunner) -> None:
        msg = scan_plan_message(request.scan_id, plan, self.backend, runner.scan_dir, runner.outcome.manifest_path)
        msg.header.stamp = self.get_clock().now().to_msg()
        with self._mosaic_arrived:
            # A scan of the same id in another output directory had a mosaic of its own: not this one's.
            self._mosaics.pop(request.scan_id, None)
        self._plan.publish(msg)

    def _progress(self, goal_handle, scan_id: str, progress: ScanProgress) -> None:
        status = ScanStatus(scan_id=scan_id, state=int(progress.state), tiles_done=progress.tiles_done,
                            tiles_total=progress.tiles_total, refocus_count=progress.refocus_count,
                            elapsed_s=progress.elapsed_s, eta_s=progress.eta_s)
        status.header.stamp = self.get_clock().now().to_msg()
        self._status.publish(status)
        if progress.state not in (State.SUCCEEDED, State.CANCELED, State.FAILED):
            goal_handle.publish_feedback(ScanSlide.Feedback(
                state=int(progress.state), tiles_done=progress.tiles_done, tiles_total=progress.tiles_total,
                refocus_count=progress.refocus_count, elapsed_s=progress.elapsed_s, eta_s=progress.eta_s,
                current_tile=TileIndex(row=progress.current[0], col=progress.current[1])))

    def _on_estimate(self, msg: FocusEstimate) -> None:
        with self._estimate_arrived:
            self._estimates[(msg.scan_id, msg.sequence)] = msg
            self._estimate_arrived.notify_all()
            if msg.scan_id == self._running_scan:
                self._estimates_this_scan += 1
            handled = self._estimates_this_scan
        self._window.acknowledge("autofocus", handled)

    def _wait_for_estimate(self, scan_id: str, record) -> FocusReply | None:
        """The autofocus node's estimate of a just-published tile; None if none runs or it is late."""
        if self.count_publishers(FOCUS_ESTIMATES.name) == 0:
            return None
        key = (scan_id, record.sequence)
        with self._estimate_arrived:
            arrived = self._estimate_arrived.wait_for(lambda: key in self._estimates,
                                                      timeout=self.params["autofocus_timeout_s"])
            estimate = self._estimates.pop(key, None) if arrived else None
        if estimate is None:
            self.get_logger().warning(f"no focus estimate for tile {key} within "
                                      f"{self.params['autofocus_timeout_s']} s; going on without it")
            return None
        return _focus_reply(estimate) if estimate.valid else None

    def _estimate_untiled_image(self, scan_id: str, frame, frame_above=None,
                                step_above_um: float = 0.0) -> FocusReply | None:
        """The autofocus node's estimate of an image of scan `scan_id` that is not a tile, by its service: a side
        probe or a correction's capture alone, or a tile with the probe taken `step_above_um` higher (two
        exposures)."""
        if not self._estimate_image.service_is_ready():
            return None
        request = EstimateFocus.Request(pixel_size_um=frame.pixel_size_um, numerical_aperture=frame.numerical_aperture,
                                        objective_magnification=frame.objective_magnification, scan_id=scan_id)
        array_to_image(frame.image_rgb8, "rgb8", request.image)
        if frame_above is not None:
            array_to_image(frame_above.image_rgb8, "rgb8", request.image_above)
            request.step_above_um = step_above_um
        response = wait_for_future(self._estimate_image.call_async(request), self.params["autofocus_timeout_s"])
        if response is not None and not response.success:
            self.get_logger().warning(f"autofocus could not estimate a focus check: {response.error}")
        return _focus_reply(response) if response is not None and response.success else None

    def _calibrate_autofocus(self, scan_dir: Path, should_cancel) -> dict:
        """Ask the autofocus node to fine-tune on the scan's focus-map sweeps; what it answered, for the manifest."""
        if not self._calibrate.wait_for_service(timeout_sec=5.0):
            return {"success": False, "error": "no autofocus node offers calibrate_autofocus"}
        response = wait_for_future(self._calibrate.call_async(CalibrateAutofocus.Request(scan_dir=str(scan_dir))),
                                   self.params["calibration_timeout_s"], should_cancel)
        if response is None:
            # A cancelled scan does not wait for the answer; it stops before its first tile.
            return {"success": False, "error": "the scan was cancelled before the calibration answered"
                    if should_cancel() else f"no answer within {self.params['calibration_timeout_s']:.0f} s"}
        if not response.success:
            self.get_logger().warning(f"autofocus calibration failed, the models in use are kept: {response.error}")
        return {"success": response.success, "error": response.error, "model_dir": response.model_dir,
                "sweeps": response.sweeps, "images": response.images, "fit_s": response.fit_s,
                "held_back_mae_before_um": response.held_back_mae_before_um,
                "held_back_mae_after_um": response.held_back_mae_after_um, "two_shot_model": response.two_shot_model,
                "two_shot_pairs": response.two_shot_pairs,
                "two_shot_held_back_mae_before_um": response.two_shot_held_back_mae_before_um,
                "two_shot_held_back_mae_after_um": response.two_shot_held_back_mae_after_um}


def _focus_reply(estimate) -> FocusReply:
    """A FocusEstimate message or EstimateFocus response as the scan core's FocusReply."""
    return FocusReply(estimate.defocus_um, estimate.uncertainty_um, estimate.distance_um,
                      estimate.distance_uncertainty_um, estimate.above_focus_probability)
