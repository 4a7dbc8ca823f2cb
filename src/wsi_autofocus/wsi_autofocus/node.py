"""Autofocus node: FocusEstimate for every Tile, and the EstimateFocus service.

Tiles queue up while the model runs; the worker takes everything queued in one batch, so the node
keeps pace with a fast scan instead of falling further behind. A tile or request whose image cannot
be evaluated gets an invalid estimate / failed response with the reason, never a crash.
"""
import threading
import time

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node

from wsi_autofocus.inference import BackendUnavailableError, FocusEstimator, FocusInputError, load_backend
from wsi_common.diagnostics import DiagnosticsPublisher, worker_level
from wsi_common.image import ImageConversionError, image_to_array, to_rgb
from wsi_common.node_main import NodeConfigurationError, spin_node
from wsi_common.params import declare_parameters
from wsi_common.qos import EVENT_QOS, TILE_QOS
from wsi_common.worker import QueueWorker
from wsi_interfaces.msg import FocusEstimate, Tile
from wsi_interfaces.srv import EstimateFocus

PARAMETERS = {
    "backend": ("auto", "inference backend: auto, tensorrt, torch-cuda, onnxruntime, torch-cpu"),
    "model_dir": ("", "directory with model.pt / model.onnx / metadata.json; empty = the shipped model"),
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
            backend, skipped = load_backend(self.params["backend"], self.params["model_dir"] or None,
                                            self.params["threads"])
            self.estimator = FocusEstimator(backend, self.params["model_dir"] or None)
        except (BackendUnavailableError, ValueError) as error:
            raise NodeConfigurationError(str(error)) from error
        for reason in skipped:
            self.get_logger().info(f"backend skipped: {reason}")
        self._worker = QueueWorker(self._evaluate, max_batch=self.params["max_batch_tiles"])
        self._estimates = self.create_publisher(FocusEstimate, "focus_estimates", EVENT_QOS)
        self.create_subscription(Tile, "tiles", self._worker.put, TILE_QOS)
        self.create_service(EstimateFocus, "estimate_focus", self._serve,
                            callback_group=MutuallyExclusiveCallbackGroup())
        DiagnosticsPublisher(self, "autofocus", self.params["diagnostics_period_s"], self._diagnostics)
        self._stats_lock = threading.Lock()
        self._evaluated = self._rejected = 0
        self._last_latency_ms = 0.0
        self.get_logger().info(f"autofocus ready: {self.estimator.model_id} on {backend.name}")

    def _evaluate(self, tiles: list[Tile]) -> None:
        started = time.perf_counter()
        images, good = [], []
        for tile in tiles:
            try:
                images.append(self.estimator.check_image(decode_rgb(tile.image)))
                good.append(tile)
            except (ImageConversionError, FocusInputError) as error:
                self._publish(tile, error=str(error))
        if images:
            optics = [(tile.numerical_aperture, tile.pixel_size_um) for tile in good]
            try:
                results = self.estimator.estimate_many(images, optics)
            except Exception as error:
                # Each tile not yet answered gets its reason once; re-raised, the worker counts the
                # failure and /diagnostics turns to ERROR.
                self.get_logger().error(f"autofocus failed on {len(good)} tile(s): {error!r}")
                for tile in good:
                    self._publish(tile, error=f"autofocus failed: {error!r}")
                raise
            for tile, result in zip(good, results):
                self._publish(tile, result=result, latency_ms=(time.perf_counter() - started) * 1e3)

    def _publish(self, tile: Tile, result=None, error: str = "", latency_ms: float = 0.0) -> None:
        msg = FocusEstimate(scan_id=tile.scan_id, sequence=tile.sequence, index=tile.index,
                            valid=result is not None, error=error, model_id=self.estimator.model_id,
                            backend=self.estimator.backend.name)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = tile.header.frame_id
        if result is not None:
            msg.defocus_um, msg.uncertainty_um = result.defocus_um, result.uncertainty_um
            msg.sharpness, msg.tissue_fraction = result.sharpness, result.tissue_fraction
            msg.patches_used, msg.inference_latency_ms = result.patches_used, latency_ms
        else:
            self.get_logger().warning(f"tile {tile.scan_id}#{tile.sequence}: no estimate: {error}")
        with self._stats_lock:
            self._evaluated += result is not None
            self._rejected += result is None
            self._last_latency_ms = latency_ms or self._last_latency_ms
        self._estimates.publish(msg)

    def _serve(self, request, response):
        response.model_id, response.backend = self.estimator.model_id, self.estimator.backend.name
        try:
            result = self.estimator.estimate(decode_rgb(request.image), request.numerical_aperture,
                                             request.pixel_size_um)
        except (ImageConversionError, FocusInputError) as error:
            response.success, response.error = False, str(error)
            return response
        response.success = True
        response.defocus_um, response.uncertainty_um = result.defocus_um, result.uncertainty_um
        response.sharpness, response.tissue_fraction = result.sharpness, result.tissue_fraction
        response.inference_latency_ms = result.latency_ms
        return response

    def _diagnostics(self):
        with self._stats_lock:
            level, message = worker_level(self._worker, "running")
            return level, message, {"backend": self.estimator.backend.name, "model": self.estimator.model_id,
                                   "queue_depth": self._worker.qsize(), "tiles_evaluated": self._evaluated,
                                   "tiles_rejected": self._rejected,
                                   "inference_latency_ms": f"{self._last_latency_ms:.1f}"}

    def destroy_node(self):
        self._worker.stop(timeout_s=2.0)
        return super().destroy_node()


def main(args=None):
    spin_node(AutofocusNode, args, make_executor=lambda: MultiThreadedExecutor(num_threads=2))


if __name__ == "__main__":
    main()
