"""Autofocus node: FocusEstimate for every Tile, the EstimateFocus service, and CalibrateAutofocus.

Tiles queue up while the model runs; the worker takes everything queued in one batch, so the node
keeps pace with a fast scan instead of falling further behind. Every tile gets one FocusEstimate, which
also tells the orchestrator the tile has left this node's buffer (`wsi_common.backpressure`). A tile or
request whose image cannot be evaluated gets an invalid estimate / failed response with the reason, never
a crash.

Each tile is estimated by this scanner's calibrated model for the tile's objective and camera pixel
when one is stored under `calibration_root` (`wsi_autofocus.calibration_store.CalibrationStore`) and was fitted on
the tile's scan, by the base model otherwise; each pair by the calibrated two-shot model of its optics whatever
the scan (`CalibratedEstimators`). CalibrateAutofocus makes both from a scan's focus-map sweeps.
"""
import threading
import time

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node

from wsi_autofocus.calibration_store import CalibratedEstimators, CalibrationError, CalibrationStore, stacks_from_scan
from wsi_autofocus.inference import BackendUnavailableError, FocusInputError
from wsi_autofocus.two_shot import CondenserDeclaration, TwoShotError, with_second_exposure
from wsi_common.diagnostics import DiagnosticsPublisher, worker_level
from wsi_common.executors import PoolExecutor
from wsi_common.image import ImageConversionError, image_to_array, to_rgb
from wsi_common.node_main import NodeConfigurationError, spin_node
from wsi_common.params import declare_parameters
from wsi_common.topics import FOCUS_ESTIMATES, TILES
from wsi_common.worker import QueueWorker
from wsi_interfaces.msg import FocusEstimate, Tile
from wsi_interfaces.srv import CalibrateAutofocus, EstimateFocus

PARAMETERS = {
    "backend": ("auto", "inference backend: auto, tensorrt, torch-cuda, onnxruntime, torch-cpu"),
    "model_dir": ("", "directory with model.pt / model.onnx / metadata.json; empty = the shipped model"),
    "calibration_root": ("out/autofocus-calibration", "calibrated models, one per scanner, objective and camera"),
    "scanner_name": ("default", "this scanner's name in calibration_root"),
    "two_shot_model": ("", "two-shot model file (.npz) for EstimateFocus with image_above; empty = the shipped one"),
    "condenser_fill": (0.0, "the microscope's condenser aperture (outer edge of a ring source) as a fraction of the "
                            "objective NA, read by both focus models; 0 = not known"),
    "condenser_inner_fill": (0.0, "inner edge of a ring source as a fraction of the objective NA; 0 for a disc"),
    "condenser_numerical_aperture": (0.0, "instead of condenser_fill: the condenser's NA, one setting for every "
                                          "objective (each objective's fill follows from its NA); 0 = not given"),
    "condenser_inner_numerical_aperture": (0.0, "with condenser_numerical_aperture: a ring source's inner edge as an "
                                                "NA; 0 for a disc"),
    "threads": (2, "CPU threads for inference"),
    "max_batch_tiles": (8, "most queued tiles evaluated in one batch"),
    "diagnostics_period_s": (2.0, "period of /diagnostics messages"),
}


def decode_rgb(image_msg):
    return to_rgb(image_to_array(image_msg), image_msg.encoding)


class AutofocusNode(Node):
    def __init__(self):
        super().__init__("autofocus")
        self.params = declare_parameters(self, PARAMETERS)
        try:
            self.condenser = CondenserDeclaration(
                self.params["condenser_fill"], self.params["condenser_inner_fill"],
                self.params["condenser_numerical_aperture"], self.params["condenser_inner_numerical_aperture"])
            self.store = CalibrationStore(self.params["calibration_root"], self.params["scanner_name"])
            self.estimators = CalibratedEstimators(self.store, self.params["backend"], self.params["model_dir"] or None,
                                                   self.params["threads"], self.params["two_shot_model"] or None)
        except (BackendUnavailableError, ValueError, OSError) as error:     # TwoShotError is a ValueError
            raise NodeConfigurationError(str(error)) from error
        self._worker = QueueWorker(self._evaluate, max_batch=self.params["max_batch_tiles"],
                                   size_of=lambda tile: len(tile.image.data))
        self._estimates = FOCUS_ESTIMATES.publisher(self)
        TILES.subscription(self, self._worker.put)
        self._models_lock = threading.Lock()
        self.create_service(EstimateFocus, "estimate_focus", self._serve,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self.create_service(CalibrateAutofocus, "calibrate_autofocus", self._calibrate,
                            callback_group=MutuallyExclusiveCallbackGroup())
        DiagnosticsPublisher(self, "autofocus", self.params["diagnostics_period_s"], self._diagnostics)
        self._stats_lock = threading.Lock()
        self._evaluated = self._rejected = 0
        self._last_latency_ms = 0.0
        base = self.estimators.base
        self.get_logger().info(f"autofocus ready: {base.model_id} on {base.backend.name}")

    def _estimator(self, magnification: float, numerical_aperture: float, pixel_size_um: float, scan_id: str):
        with self._models_lock:
            return self.estimators.for_optics(magnification, numerical_aperture, pixel_size_um, scan_id)

    def _two_shot(self, magnification: float, numerical_aperture: float, pixel_size_um: float):
        with self._models_lock:
            return self.estimators.two_shot_for(magnification, numerical_aperture, pixel_size_um)

    def _evaluate(self, tiles: list[Tile]) -> None:
        started = time.perf_counter()
        groups: dict[int, tuple[object, list, list, list]] = {}
        for tile in tiles:
            estimator = self._estimator(tile.objective_magnification, tile.numerical_aperture, tile.pixel_size_um,
                                        tile.scan_id)
            try:
                image = estimator.check_image(decode_rgb(tile.image))
                estimator.check_optics(tile.numerical_aperture, tile.pixel_size_um)
                condenser = self.condenser.for_objective_if_known(tile.numerical_aperture)
            except (ImageConversionError, FocusInputError, TwoShotError) as error:
                self._publish(tile, estimator, error=str(error))
                continue
            _, images, condensers, good = groups.setdefault(id(estimator), (estimator, [], [], []))
            images.append(image)
            condensers.append(condenser)
            good.append(tile)
        for estimator, images, condensers, good in groups.values():
            optics = [(tile.numerical_aperture, tile.pixel_size_um) for tile in good]
            try:
                results = estimator.estimate_many(images, optics, condensers)
            except Exception as error:
                # Each tile not yet answered gets its reason once; re-raised, the worker counts the
                # failure and /diagnostics turns to ERROR.
                self.get_logger().error(f"autofocus failed on {len(good)} tile(s): {error!r}")
                for tile in good:
                    self._publish(tile, estimator, error=f"autofocus failed: {error!r}")
                raise
            for tile, result in zip(good, results):
                self._publish(tile, estimator, result=result, latency_ms=(time.perf_counter() - started) * 1e3)

    def _publish(self, tile: Tile, estimator, result=None, error: str = "", latency_ms: float = 0.0) -> None:
        msg = FocusEstimate(scan_id=tile.scan_id, sequence=tile.sequence, index=tile.index,
                            valid=result is not None, error=error, model_id=estimator.model_id,
                            model_dir=str(estimator.model_dir), backend=estimator.backend.name)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = tile.header.frame_id
        if result is not None:
            _fill_estimate(msg, result)
            msg.patches_used, msg.inference_latency_ms = result.patches_used, latency_ms
        else:
            self.get_logger().warning(f"tile {tile.scan_id}#{tile.sequence}: no estimate: {error}")
        with self._stats_lock:
            self._evaluated += result is not None
            self._rejected += result is None
            self._last_latency_ms = latency_ms or self._last_latency_ms
        self._estimates.publish(msg)

    def _serve(self, request, response):
        estimator = self._estimator(request.objective_magnification, request.numerical_aperture, request.pixel_size_um,
                                    request.scan_id)
        response.model_id, response.backend = estimator.model_id, estimator.backend.name
        response.model_dir = str(estimator.model_dir)
        started = time.perf_counter()
        try:
            image = decode_rgb(request.image)
            result = estimator.estimate(image, request.numerical_aperture, request.pixel_size_um,
                                        self.condenser.for_objective_if_known(request.numerical_aperture))
            if request.image_above.width:
                two_shot = self._two_shot(request.objective_magnification, request.numerical_aperture,
                                          request.pixel_size_um)
                result = with_second_exposure(two_shot, result, image, decode_rgb(request.image_above),
                                              request.numerical_aperture, request.pixel_size_um,
                                              request.step_above_um,
                                              self.condenser.for_objective(request.numerical_aperture))
        except (ImageConversionError, FocusInputError, TwoShotError) as error:
            response.success, response.error = False, str(error)
            return response
        response.success = True
        _fill_estimate(response, result)
        response.exposures_used = 2 if request.image_above.width else 1
        response.two_shot_model = str(two_shot.path) if request.image_above.width else ""
        response.inference_latency_ms = (time.perf_counter() - started) * 1e3
        return response

    def _calibrate(self, request, response):
        """Calibrate both models on a scan's focus-map sweeps (ROS-free core: `calibration.calibrate_both`);
        from the next tile on the new single-shot model serves that scan's tiles of that objective, the new two-shot
        model that objective's pairs of every scan. The single-shot model is fitted only when tiles of the scan
        follow (`stacks_from_scan`)."""
        # Fitting needs torch (about 200 MB resident); a node that only estimates never loads it.
        from wsi_autofocus.calibration import calibrate_both

        started = time.monotonic()
        try:
            sweeps = stacks_from_scan(request.scan_dir)
            optics = sweeps.optics
            key = (optics["objective_magnification"], optics["numerical_aperture"], optics["pixel_size_um"])
            result = calibrate_both(sweeps.stacks, self.store.model_dir(*key), self.params["model_dir"] or None,
                                    self.params["two_shot_model"] or None, {"name": self.store.scanner} | optics,
                                    condenser=self.condenser.for_objective(optics["numerical_aperture"]),
                                    scan_id=sweeps.scan_id, tiles_follow=sweeps.tiles_follow)
        except (CalibrationError, OSError, ValueError, KeyError) as error:
            response.success, response.error = False, f"calibration from {request.scan_dir} failed: {error}"
            self.get_logger().error(response.error)
            return response
        with self._models_lock:
            self.estimators.forget(self.store.model_dir(*key))
        single, pair = result.single_shot, result.two_shot
        if result.not_fitted:
            self.get_logger().info(f"calibration from {request.scan_dir}: {result.not_fitted}")
        used = single or pair
        if used is not None:
            response.sweeps, response.images = used.stacks, used.images
        if single is not None:
            response.model_dir = str(single.model_dir)
            response.held_back_mae_before_um = single.held_back_mae_before_um
            response.held_back_mae_after_um = single.held_back_mae_after_um
            self._log_calibrated(single.model_dir, single.held_back_mae_before_um, single.held_back_mae_after_um)
        if pair is not None:
            response.two_shot_model, response.two_shot_pairs = str(pair.path), pair.pairs
            response.two_shot_held_back_mae_before_um = pair.held_back_mae_before_um
            response.two_shot_held_back_mae_after_um = pair.held_back_mae_after_um
            self._log_calibrated(pair.path, pair.held_back_mae_before_um, pair.held_back_mae_after_um)
        response.success = single is not None or pair is not None
        response.fit_s = time.monotonic() - started
        response.error = "; ".join(f"calibration from {request.scan_dir}: {error}" for error in result.errors)
        if result.errors:   # a warning when the other model was calibrated: the node serves both all the same
            (self.get_logger().warning if response.success else self.get_logger().error)(response.error)
        return response

    def _log_calibrated(self, model, before_um: float, after_um: float) -> None:
        self.get_logger().info(f"calibrated {model}: held-back MAE {before_um:.2f} -> {after_um:.2f} µm")

    def _diagnostics(self):
        with self._stats_lock:
            level, message = worker_level(self._worker, "running")
            base = self.estimators.base
            return level, message, {"backend": base.backend.name, "model": base.model_id,
                                   "queue_depth": self._worker.qsize(), "queue_bytes": self._worker.bytes_queued,
                                   "queue_peak_bytes": self._worker.peak_bytes_queued,
                                   "tiles_evaluated": self._evaluated,
                                   "tiles_rejected": self._rejected,
                                   "inference_latency_ms": f"{self._last_latency_ms:.1f}"}

    def destroy_node(self):
        self._worker.stop(timeout_s=2.0)
        return super().destroy_node()


def _fill_estimate(msg, result) -> None:
    """The estimate's fields, shared by FocusEstimate and the EstimateFocus response."""
    msg.defocus_um, msg.uncertainty_um = result.defocus_um, result.uncertainty_um
    msg.distance_um, msg.distance_uncertainty_um = result.distance_um, result.distance_uncertainty_um
    msg.above_focus_probability = result.above_focus_probability
    msg.sharpness, msg.tissue_fraction = result.sharpness, result.tissue_fraction


def main(args=None):
    spin_node(AutofocusNode, args, make_executor=lambda: PoolExecutor(num_threads=2))


if __name__ == "__main__":
    main()
