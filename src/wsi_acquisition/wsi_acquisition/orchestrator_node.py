"""Scan orchestrator node: the ScanSlide action server around the scan core.

Publishes every tile on `tiles`, the plan on `scan/plan` (latched) and progress on `scan/status`;
with inline autofocus it waits for the autofocus node's FocusEstimate of each tile.
"""
import re
import threading
import time
from pathlib import Path

from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from wsi_acquisition.qc_report import write_qc_report
from wsi_acquisition.scan import (FocusReply, FocusStrategy, ScanError, ScanErrorCode, ScanProgress, ScanRequest,
                                  ScanRunner, State)
from wsi_common.image import array_to_image
from wsi_common.paths import OutsideRootError, resolve_under
from wsi_common.params import declare_parameters
from wsi_common.qos import EVENT_QOS, LATCHED_QOS, TILE_QOS
from wsi_interfaces.action import ExportSlide, ScanSlide
from wsi_interfaces.msg import FocusEstimate, MosaicStatus, ScanPlan, ScanStatus, Tile, TileIndex
from wsi_interfaces.srv import CalibrateAutofocus, EstimateFocus

PARAMETERS = {
    "output_root": ("out", "scans are written under this directory; goals may name a sub-directory of it"),
    "default_objective": (20.0, "objective used when a goal gives 0"),
    "exposure_ms": (8.0, "tile exposure, ms"),
    "gain": (1.0, "camera gain for tiles"),
    "inline_autofocus": (True, "correct focus from the autofocus node's estimates when one is running"),
    "autofocus_timeout_s": (5.0, "how long to wait for a tile's FocusEstimate before going on without it"),
    "calibration_timeout_s": (180.0, "how long a scan waits for the autofocus to calibrate on its focus map"),
    "save_tiles": (True, "also save every tile as TIFF beside the manifest"),
    "stitch_timeout_s": (900.0, "how long to wait after the last tile for the stitching node's final mosaic"),
    "export_timeout_s": (3600.0, "how long an export may take"),
    "qc_report": (True, "write the QC report (qc/index.html) beside the manifest after every scan"),
}

SCAN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OUTPUT_FORMATS = ("ome-tiff", "ome-zarr", "dicom")  # the export node's (wsi_export.export.FORMATS)


class GoalError(ValueError):
    pass


class ScanOrchestratorNode(Node):
    def __init__(self, backend, hardware_lock: threading.Lock):
        super().__init__("scan_orchestrator")
        self.params = declare_parameters(self, PARAMETERS)
        self.backend = backend
        self._lock = hardware_lock
        group = ReentrantCallbackGroup()
        self._tiles = self.create_publisher(Tile, "tiles", TILE_QOS)
        self._status = self.create_publisher(ScanStatus, "scan/status", EVENT_QOS)
        self._plan = self.create_publisher(ScanPlan, "scan/plan", LATCHED_QOS)
        self._estimates: dict[tuple[str, int], FocusEstimate] = {}
        self._estimate_arrived = threading.Condition()
        self.create_subscription(FocusEstimate, "focus_estimates", self._on_estimate, EVENT_QOS, callback_group=group)
        self._mosaics: dict[str, MosaicStatus] = {}
        self._mosaic_arrived = threading.Condition()
        self.create_subscription(MosaicStatus, "mosaic/status", self._on_mosaic, LATCHED_QOS, callback_group=group)
        self._export = ActionClient(self, ExportSlide, "export_slide", callback_group=group)
        self._estimate_image = self.create_client(EstimateFocus, "estimate_focus", callback_group=group)
        self._calibrate = self.create_client(CalibrateAutofocus, "calibrate_autofocus", callback_group=group)
        self._server = ActionServer(self, ScanSlide, "scan_slide", execute_callback=self._execute,
                                    goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
                                    callback_group=group)

    # -- goals ---------------------------------------------------------------------------------
    def request_from_goal(self, goal) -> ScanRequest:
        scan_id = goal.scan_id or time.strftime("scan-%Y%m%d-%H%M%S")
        if not SCAN_ID_PATTERN.match(scan_id):
            raise GoalError(f"scan_id {goal.scan_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
        unknown = [f for f in goal.output_formats if f not in OUTPUT_FORMATS]
        if unknown:
            raise GoalError(f"unknown output formats {unknown}; expected any of {OUTPUT_FORMATS}")
        if goal.pixel_size_um != 0.0:
            raise GoalError(f"pixel_size_um {goal.pixel_size_um}: tiles are taken at the objective's native "
                            "pixel size; give 0 and choose the objective")
        if goal.focus_strategy not in tuple(FocusStrategy):
            raise GoalError(f"focus_strategy {goal.focus_strategy}; expected one of {[int(f) for f in FocusStrategy]}")
        region = None if goal.auto_detect_tissue else (
            goal.region_x_um, goal.region_y_um, goal.region_width_um, goal.region_height_um)
        if region is not None and goal.region_width_um == 0 and goal.region_height_um == 0:
            limits = self.backend.stage.limits
            region = (limits.x_min_um, limits.y_min_um, limits.x_max_um - limits.x_min_um,
                      limits.y_max_um - limits.y_min_um)
        try:
            output_dir = resolve_under(self.params["output_root"], goal.output_dir)
        except OutsideRootError as error:
            raise GoalError(f"output_dir {error}") from error
        return ScanRequest(
            scan_id=scan_id, output_dir=output_dir,
            region_um=region, objective_magnification=goal.objective_magnification or self.params["default_objective"],
            overlap_fraction=goal.overlap_fraction or 0.1, focus_strategy=FocusStrategy(goal.focus_strategy),
            focus_points=goal.focus_points, skip_empty_tiles=goal.skip_empty_tiles,
            calibrate_autofocus=goal.calibrate_autofocus,
            exposure_ms=self.params["exposure_ms"], gain=self.params["gain"], save_tiles=self.params["save_tiles"])

    def _on_goal(self, goal) -> GoalResponse:
        try:
            ScanRunner(self.backend, self.request_from_goal(goal)).validate()
        except (GoalError, ScanError) as error:
            self.get_logger().warning(f"rejected ScanSlide goal: {error}")
            return GoalResponse.REJECT
        if self._lock.locked():
            self.get_logger().warning("rejected ScanSlide goal: the microscope is busy")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _execute(self, goal_handle):
        result = ScanSlide.Result()
        started = time.monotonic()
        try:
            request = self.request_from_goal(goal_handle.request)
        except GoalError as error:
            return self._finish(goal_handle, result, ScanErrorCode.INVALID_GOAL, str(error), started)
        result.scan_id = request.scan_id
        inline = self.params["inline_autofocus"] and request.focus_strategy == FocusStrategy.MAP_INLINE
        runner = ScanRunner(self.backend, request, publish_tile=lambda r, f: self._publish_tile(request, r, f),
                            estimate_focus=(lambda r, f: self._wait_for_estimate(request.scan_id, r)) if inline else None,
                            on_progress=lambda p: self._progress(goal_handle, request.scan_id, p),
                            should_cancel=lambda: goal_handle.is_cancel_requested,
                            on_plan=lambda plan: self._publish_plan(request, plan, runner),
                            estimate_image=self._estimate_untiled_image if inline else None,
                            calibrate_focus=self._calibrate_autofocus)
        result.manifest_uri = str(runner.outcome.manifest_path)
        code, message = ScanErrorCode.NONE, ""
        if not self._lock.acquire(blocking=False):
            return self._finish(goal_handle, result, ScanErrorCode.INTERNAL, "the microscope is busy", started)
        try:
            runner.run()
        except ScanError as error:
            code, message = error.code, str(error)
        finally:
            self._lock.release()
        outcome = runner.outcome
        if outcome.plan is not None:
            result.tiles_planned = len(outcome.plan.tiles)
            result.tiles_skipped_empty = len(outcome.plan.skipped)
            fov_w, fov_h = outcome.plan.fov_width_um, outcome.plan.fov_height_um
            result.scanned_area_mm2 = len({(r.row, r.col) for r in outcome.records}) * fov_w * fov_h / 1e6
        result.tiles_captured = len(outcome.records)
        result.refocus_count = outcome.refocus_count
        mosaic = None
        if code == ScanErrorCode.NONE and goal_handle.request.output_formats:
            goal_handle.publish_feedback(ScanSlide.Feedback(state=int(State.FINISHING), tiles_done=result.tiles_planned,
                                                            tiles_total=result.tiles_planned))
            code, message, mosaic = self._produce_outputs(request, runner, goal_handle.request.output_formats, result)
        if self.params["qc_report"] and outcome.records:
            self._write_qc(runner, mosaic, result)
        return self._finish(goal_handle, result, code, message, started)

    # -- stitching, export and QC after the tiles -------------------------------------------------
    def _produce_outputs(self, request: ScanRequest, runner: ScanRunner, formats, result):
        """Wait for the stitching node's final mosaic, then export it; (code, message, mosaic status)."""
        if self.count_publishers("mosaic/status") == 0:
            return ScanErrorCode.STITCHING, "output formats need a stitching node, and none is running", None
        with self._mosaic_arrived:
            finished = self._mosaic_arrived.wait_for(
                lambda: request.scan_id in self._mosaics and self._mosaics[request.scan_id].finished,
                timeout=self.params["stitch_timeout_s"])
            mosaic = self._mosaics.get(request.scan_id)
        if not finished:
            return ScanErrorCode.STITCHING, f"no final mosaic within {self.params['stitch_timeout_s']:.0f} s", mosaic
        if not mosaic.success:
            return ScanErrorCode.STITCHING, mosaic.error, mosaic
        result.mosaic_uri = mosaic.mosaic_uri
        if not self._export.wait_for_server(timeout_sec=10.0):
            return ScanErrorCode.EXPORT, "output formats need an export node, and none answers", mosaic
        goal = ExportSlide.Goal(mosaic_uri=mosaic.mosaic_uri, manifest_uri=str(runner.outcome.manifest_path),
                                output_dir=str(runner.scan_dir), output_name=request.scan_id, formats=list(formats),
                                write_thumbnail=True)
        response = self._wait(self._export.send_goal_async(goal), 30.0)
        if response is None or not response.accepted:
            return ScanErrorCode.EXPORT, "the export node refused the export goal (its log says why)", mosaic
        outcome = self._wait(response.get_result_async(), self.params["export_timeout_s"])
        if outcome is None:
            return ScanErrorCode.EXPORT, f"export did not finish within {self.params['export_timeout_s']:.0f} s", mosaic
        if outcome.status != GoalStatus.STATUS_SUCCEEDED:
            return ScanErrorCode.EXPORT, outcome.result.error_message, mosaic
        result.output_uris = list(outcome.result.output_paths)
        return ScanErrorCode.NONE, "", mosaic

    @staticmethod
    def _wait(future, timeout_s: float):
        """Result of a future completed by another executor thread, or None after the timeout."""
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        return future.result() if done.wait(timeout_s) else None

    def _write_qc(self, runner: ScanRunner, mosaic, result) -> None:
        outputs = {Path(uri).name: Path(uri) for uri in result.output_uris}
        report = Path(mosaic.report_uri) if mosaic is not None and mosaic.report_uri else None
        try:
            index = write_qc_report(runner.outcome.manifest_path, report, outputs)
        except (OSError, ValueError, KeyError) as error:
            self.get_logger().error(f"QC report of scan {result.scan_id} could not be written: {error}")
            return
        self.get_logger().info(f"QC report: {index}")

    def _on_mosaic(self, msg: MosaicStatus) -> None:
        with self._mosaic_arrived:
            self._mosaics[msg.scan_id] = msg
            self._mosaic_arrived.notify_all()

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

    # -- runner callbacks ----------------------------------------------------------------------
    def _publish_tile(self, request: ScanRequest, record, frame) -> None:
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
        self._tiles.publish(msg)

    def _publish_plan(self, request: ScanRequest, plan, runner: ScanRunner) -> None:
        width, height = self.backend.sensor_size_px()
        pixel = self.backend.pixel_size_um()
        msg = ScanPlan(scan_id=request.scan_id, output_dir=str(runner.scan_dir), rows=plan.rows, cols=plan.cols,
                       tiles=[TileIndex(row=t.row, col=t.col) for t in plan.tiles], tile_width_px=width,
                       tile_height_px=height, pixel_size_um=pixel, overlap_fraction=plan.overlap_fraction,
                       objective_magnification=self.backend.objective_magnification,
                       numerical_aperture=self.backend.numerical_aperture(),
                       origin_x_um=plan.origin_x_um - width * pixel / 2,
                       origin_y_um=plan.origin_y_um - height * pixel / 2,
                       step_x_um=plan.step_x_um, step_y_um=plan.step_y_um,
                       manifest_uri=str(runner.outcome.manifest_path))
        msg.header.stamp = self.get_clock().now().to_msg()
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

    def _wait_for_estimate(self, scan_id: str, record) -> FocusReply | None:
        """The autofocus node's estimate of a just-published tile; None if none runs or it is late."""
        if self.count_publishers("focus_estimates") == 0:
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

    def _estimate_untiled_image(self, frame) -> FocusReply | None:
        """The autofocus node's estimate of an image that is not a tile (a side probe), by its service."""
        if not self._estimate_image.service_is_ready():
            return None
        request = EstimateFocus.Request(pixel_size_um=frame.pixel_size_um, numerical_aperture=frame.numerical_aperture,
                                        objective_magnification=frame.objective_magnification)
        array_to_image(frame.image_rgb8, "rgb8", request.image)
        response = self._wait(self._estimate_image.call_async(request), self.params["autofocus_timeout_s"])
        return _focus_reply(response) if response is not None and response.success else None

    def _calibrate_autofocus(self, scan_dir: Path) -> dict:
        """Ask the autofocus node to fine-tune on the scan's focus-map sweeps; what it answered, for the manifest."""
        if not self._calibrate.wait_for_service(timeout_sec=5.0):
            return {"success": False, "error": "no autofocus node offers calibrate_autofocus"}
        response = self._wait(self._calibrate.call_async(CalibrateAutofocus.Request(scan_dir=str(scan_dir))),
                              self.params["calibration_timeout_s"])
        if response is None:
            return {"success": False, "error": f"no answer within {self.params['calibration_timeout_s']:.0f} s"}
        if not response.success:
            self.get_logger().warning(f"autofocus calibration failed, scanning with the model as it was: {response.error}")
        return {"success": response.success, "error": response.error, "model_dir": response.model_dir,
                "sweeps": response.sweeps, "images": response.images, "fit_s": response.fit_s,
                "held_back_mae_before_um": response.held_back_mae_before_um,
                "held_back_mae_after_um": response.held_back_mae_after_um}


def _focus_reply(estimate) -> FocusReply:
    """A FocusEstimate message or EstimateFocus response as the scan core's FocusReply."""
    return FocusReply(estimate.defocus_um, estimate.uncertainty_um, estimate.distance_um,
                      estimate.distance_uncertainty_um, estimate.above_focus_probability)
