"""Stitching node: composes the mosaic while the scan runs; finalises it when the scan ends.

Inputs: `scan/plan` (starts a mosaic), `tiles`, `scan/status` (a finished, cancelled or failed scan
finalises its mosaic from what was captured). Output: `mosaic/status` (latched) with the mosaic and
report paths, published again after every tile: its `tiles_received` tells the orchestrator how many of the
scan's tiles have left this node's buffer, so that a scan slows down to the pace of stitching
(`wsi_common.backpressure`). Registration runs in a worker thread so callbacks never block on it; bad tiles are
reported and skipped. The plan is latched, so a stitching node (re)started after a scan ended still
receives it: stitching live scans into their own folders, a plan whose manifest records the end of its
scan opens no session, as no tile and no end of that scan will come (it is re-stitched from its manifest
with `python -m wsi_stitching.cli`). With `mosaic_dir` the node re-stitches replayed scans, which have
all ended, beside the originals.
"""
from pathlib import Path

from rclpy.node import Node

from wsi_common.diagnostics import DiagnosticsPublisher, worker_level
from wsi_common.image import ImageConversionError, image_to_array, to_rgb
from wsi_common.node_main import NodeConfigurationError, spin_node
from wsi_common.params import declare_parameters
from wsi_common.paths import OutsideRootError, resolve_under
from wsi_common.topics import MOSAIC_STATUS, SCAN_PLAN, SCAN_STATUS, TILES
from wsi_common.scan_files import ManifestError, ended_scan_status
from wsi_common.tile_grid import TileGrid, field_of_view_um
from wsi_common.worker import QueueWorker
from wsi_interfaces.msg import MosaicStatus, ScanPlan, ScanStatus, Tile
from wsi_stitching.errors import StitchingError
from wsi_stitching.inline import InlineStitch
from wsi_stitching.layout import PlannedScan, iso_utc
from wsi_stitching.stitcher import StitchParameters

PARAMETERS = {
    "output_root": ("out", "mosaics are written into the scan's directory, which must lie under this root"),
    "mosaic_name": ("mosaic.zarr", "name of the mosaic inside the scan directory"),
    "mosaic_dir": ("", "write mosaics to <mosaic_dir>/<scan_id>/ instead of the scan's own directory "
                       "(re-stitching a replayed bag beside the original: plans of scans that have ended are "
                       "then stitched too); must lie under output_root"),
    "blending": ("feather", "overlap blending: feather, none or sharpness"),
    "flat_field": ("estimate", "vignetting correction: 'estimate' from the tiles, or 'none'"),
    "stage_repeatability_um": (StitchParameters.stage_repeatability_um,
                               "largest error of a reported stage pose, µm (the stage's specified repeatability): "
                               "bounds the registration search and the placement of every tile"),
    "diagnostics_period_s": (2.0, "period of /diagnostics messages"),
}
TERMINAL_STATES = (ScanStatus.STATE_SUCCEEDED, ScanStatus.STATE_CANCELED, ScanStatus.STATE_FAILED)


def _tile_bytes(item) -> int:
    kind, msg = item
    return len(msg.image.data) if kind == "tile" else 0


def planned_scan(msg: ScanPlan) -> PlannedScan:
    grid = TileGrid.from_edge_origin(msg.rows, msg.cols, msg.origin_x_um, msg.origin_y_um, msg.step_x_um,
                                     msg.step_y_um, *field_of_view_um(msg.tile_width_px, msg.tile_height_px,
                                                                      msg.pixel_size_um))
    return PlannedScan(msg.scan_id, grid, [(t.row, t.col) for t in msg.tiles], msg.tile_width_px,
                       msg.tile_height_px, msg.pixel_size_um, msg.objective_magnification, msg.numerical_aperture,
                       iso_utc(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9))


class StitchingNode(Node):
    def __init__(self):
        super().__init__("stitching")
        self.params = declare_parameters(self, PARAMETERS)
        try:
            self.stitch_parameters = StitchParameters(blending=self.params["blending"],
                                                      flat_field=self.params["flat_field"],
                                                      stage_repeatability_um=self.params["stage_repeatability_um"])
        except StitchingError as error:
            raise NodeConfigurationError(str(error)) from error
        self._work = QueueWorker(self._handle, on_error=self._item_failed, size_of=_tile_bytes)
        self._status_pub = MOSAIC_STATUS.publisher(self)
        SCAN_PLAN.subscription(self, lambda m: self._work.put(("plan", m)))
        TILES.subscription(self, lambda m: self._work.put(("tile", m)))
        SCAN_STATUS.subscription(self, self._on_status)
        DiagnosticsPublisher(self, "stitching", self.params["diagnostics_period_s"], self._diagnostics)
        self._session: InlineStitch | None = None
        self._plan: ScanPlan | None = None
        self._received = 0

    def _on_status(self, msg: ScanStatus) -> None:
        if msg.state in TERMINAL_STATES:
            self._work.put(("end", msg))

    def _handle(self, batch) -> None:
        handlers = {"plan": self._start, "tile": self._tile, "end": self._end}
        for kind, msg in batch:
            handlers[kind](msg)

    def _item_failed(self, batch, error: Exception) -> None:
        """An unexpected failure on a tile counts it as rejected, so the mosaic status says so."""
        for kind, msg in batch:
            if kind == "tile" and self._session is not None:
                self._session.rejected.append(f"tile #{msg.sequence}: {error!r}")
                self._publish(self._plan.scan_id)      # the tile has left the buffer all the same
            self.get_logger().error(f"stitching failed on a {kind!r} message: {error!r}")

    def _start(self, plan: ScanPlan) -> None:
        # The same plan again (a latched message can arrive twice) changes nothing; the same scan_id with
        # another manifest is another scan (in another output directory).
        if self._plan is not None and (self._plan.scan_id, self._plan.manifest_uri) == (plan.scan_id,
                                                                                       plan.manifest_uri):
            return
        live = not self.params["mosaic_dir"]     # with mosaic_dir: re-stitching replayed scans, all ended
        try:
            ended = ended_scan_status(plan.manifest_uri) if live and plan.manifest_uri else None
        except ManifestError as error:
            self.get_logger().warning(f"not stitching scan {plan.scan_id}: {error}")
            return
        if ended is not None:
            self.get_logger().info(f"not stitching scan {plan.scan_id}: it has ended ({ended}, says "
                                   f"{plan.manifest_uri}) before this node took its plan")
            return
        try:
            scan_dir = resolve_under(self.params["output_root"], plan.output_dir)
            if self.params["mosaic_dir"]:
                scan_dir = resolve_under(self.params["output_root"], self.params["mosaic_dir"]) / plan.scan_id
                scan_dir.mkdir(parents=True, exist_ok=True)
            self._session = InlineStitch(planned_scan(plan), scan_dir / self.params["mosaic_name"],
                                         self.stitch_parameters)
        except (OutsideRootError, StitchingError, OSError) as error:
            self._session = None
            self._publish(plan.scan_id, finished=True, error=f"cannot stitch scan {plan.scan_id}: {error}")
            return
        self._plan, self._received = plan, 0
        self.get_logger().info(f"stitching scan {plan.scan_id}: {len(plan.tiles)} tiles into "
                               f"{self._session.mosaic_path}")
        self._publish(plan.scan_id)

    def _tile(self, tile: Tile) -> None:
        if self._session is None or tile.scan_id != self._plan.scan_id:
            return
        self._received += 1
        try:
            pixels = to_rgb(image_to_array(tile.image), tile.image.encoding)
        except ImageConversionError as error:
            self._session.rejected.append(f"tile #{tile.sequence}: {error}")
            self.get_logger().warning(f"skipped tile #{tile.sequence}: {error}")
        else:
            self._session.offer(tile.sequence, tile.index.row, tile.index.col, pixels, tile.measured_x_um,
                                tile.measured_y_um)
        self._publish(tile.scan_id)

    def _end(self, status: ScanStatus) -> None:
        if self._session is None or status.scan_id != self._plan.scan_id:
            return
        session, plan = self._session, self._plan
        self._session = None
        try:
            result = session.finish(Path(plan.manifest_uri))
        except (StitchingError, ManifestError, OSError) as error:
            self._publish(plan.scan_id, finished=True, error=f"stitching scan {plan.scan_id} failed: {error}")
            return
        if session.read_from_disk:
            self.get_logger().warning(f"{session.read_from_disk} tiles did not arrive on 'tiles' and were read "
                                      "from the scan's tile files")
        self._publish(plan.scan_id, finished=True, result=result, rejected=len(session.rejected))
        self.get_logger().info(f"mosaic of scan {plan.scan_id}: {result.width_px}x{result.height_px} px, "
                               f"residual RMS {result.residual_rms_px:.2f} px -> {result.mosaic_path}")

    def _publish(self, scan_id: str, finished: bool = False, error: str = "", result=None, rejected: int = 0):
        msg = MosaicStatus(scan_id=scan_id, finished=finished, success=finished and not error, error=error,
                           tiles_received=self._received, tiles_rejected=rejected)
        if self._session is not None:
            msg.mosaic_uri = str(self._session.mosaic_path)
        if result is not None:
            msg.mosaic_uri, msg.report_uri = str(result.mosaic_path), str(result.report_path)
            msg.width_px, msg.height_px, msg.pixel_size_um = result.width_px, result.height_px, result.pixel_size_um
            msg.tiles_composed, msg.pairs_total, msg.pairs_dropped = (result.tiles_composed, result.pairs_total,
                                                                      result.pairs_dropped)
            msg.tiles_at_stage_position, msg.residual_rms_px = result.tiles_at_stage_position, result.residual_rms_px
        if error:
            self.get_logger().error(error)
        msg.header.stamp = self.get_clock().now().to_msg()
        self._status_pub.publish(msg)

    def _diagnostics(self):
        session = self._session
        level, message = worker_level(self._work, "stitching" if session else "idle")
        return level, message, {
            "queue_depth": self._work.qsize(), "queue_bytes": self._work.bytes_queued,
            "queue_peak_bytes": self._work.peak_bytes_queued, "scan": self._plan.scan_id if self._plan else "",
            "tiles_received": self._received, "tiles_rejected": len(session.rejected) if session else 0}

    def destroy_node(self):
        self._work.stop(timeout_s=5.0)
        return super().destroy_node()


def main(args=None):
    # One executor thread: every callback only queues its message for the worker. A multi-threaded executor's
    # dispatching took 7 ms of CPU per tile on the cores the stitching itself needs (3 ms with one thread).
    spin_node(StitchingNode, args)


if __name__ == "__main__":
    main()
