"""Export node: the ExportSlide action (mosaic -> OME-TIFF / OME-Zarr / DICOM WSI), confined to an output root.

Every goal is accepted; one that cannot be run ends at once, aborted with ERROR_INVALID_GOAL and the reason,
without waiting for the export that may be running (exports run one at a time).
"""
import threading
import time

from rclpy.action import CancelResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from wsi_common.executors import PoolExecutor
from wsi_common.node_main import spin_node
from wsi_common.params import declare_parameters
from wsi_common.paths import OutsideRootError, resolve_under
from wsi_common.topics import EXPORT_SLIDE
from wsi_export import (ExportCancelled, ExportOptions, ExportOptionsError, ExportStorageError, MosaicInputError,
                        SlideImageError, export_slide, remove_stale_partials_under)
from wsi_export.export import validate_export
from wsi_export.mosaic import describe_regions
from wsi_export.scan_manifest import slide_images_from_manifest
from wsi_interfaces.action import ExportSlide

PARAMETERS = {
    "output_root": ("out", "exports are written under this directory; goals may name a sub-directory of it"),
    "mosaic_root": ("out", "mosaics and scan manifests are read from under this directory"),
    "workers": (0, "local encoding threads; 0 = automatic"),
    "default_scheduler_address": ("", "dask.distributed scheduler used when a goal names none; empty = local"),
    "stitching_stall_timeout_s": (ExportOptions.stitching_stall_timeout_s,
                                  "a follow_stitching goal fails when the stitcher stores nothing for this long, s"),
}

ERROR_CODES = ((ExportCancelled, ExportSlide.Result.ERROR_CANCELED),
               (ExportOptionsError, ExportSlide.Result.ERROR_INVALID_GOAL),
               (MosaicInputError, ExportSlide.Result.ERROR_INPUT),
               (SlideImageError, ExportSlide.Result.ERROR_INPUT),
               (ExportStorageError, ExportSlide.Result.ERROR_STORAGE))


class GoalError(ValueError):
    pass


def options_from_goal(goal, params: dict) -> ExportOptions:
    """The export options of a goal, with the node's parameters where the goal leaves them to the node."""
    # A followed mosaic is read as the stitcher on this machine stores it, on local threads: the node's default
    # scheduler does not apply (a goal naming one is refused by validate_export).
    scheduler = goal.scheduler_address or ("" if goal.follow_stitching else params["default_scheduler_address"])
    return ExportOptions(compression=goal.compression or "jpeg", quality=goal.jpeg_quality or 90,
                         lossless=goal.lossless, tile_size_px=goal.tile_size_px or 512,
                         write_thumbnail=goal.write_thumbnail, scheduler_address=scheduler or None,
                         local_workers=params["workers"] or None, allow_partial_mosaic=goal.allow_partial_mosaic,
                         follow_stitching=goal.follow_stitching,
                         stitching_stall_timeout_s=params["stitching_stall_timeout_s"])


class ExportNode(Node):
    def __init__(self):
        super().__init__("export")
        self.params = declare_parameters(self, PARAMETERS)
        # Before serving goals: the work directories of exports killed with an earlier node (or any
        # other exporter) that has ended; a live export's is locked and stays.
        for removed in remove_stale_partials_under(resolve_under(self.params["output_root"], "")):
            self.get_logger().info(f"removed {removed}, left by an export that did not end")
        self._busy = threading.Lock()
        self._server = EXPORT_SLIDE.server(self, self._execute, cancel_callback=lambda _: CancelResponse.ACCEPT,
                                           callback_group=ReentrantCallbackGroup())

    def checked_goal(self, goal):
        """(mosaic path, output dir, formats, options, scan manifest path or None) of a goal, or GoalError /
        ExportOptionsError naming what is wrong."""
        try:
            mosaic = resolve_under(self.params["mosaic_root"], goal.mosaic_uri)
            output_dir = resolve_under(self.params["output_root"], goal.output_dir)
            manifest = resolve_under(self.params["mosaic_root"], goal.manifest_uri) if goal.manifest_uri else None
        except OutsideRootError as error:
            raise GoalError(str(error)) from error
        if not goal.mosaic_uri or not mosaic.exists():
            raise GoalError(f"mosaic {goal.mosaic_uri!r} does not exist")
        if manifest is not None and not manifest.is_file():
            raise GoalError(f"scan manifest {goal.manifest_uri!r} does not exist")
        formats = tuple(goal.formats) or ("ome-tiff",)
        options = options_from_goal(goal, self.params)
        validate_export(goal.output_name or None, formats, options)
        return mosaic, output_dir, formats, options, manifest

    def _execute(self, goal_handle):
        started = time.monotonic()
        result = ExportSlide.Result()
        try:
            mosaic, output_dir, formats, options, manifest = self.checked_goal(goal_handle.request)
        except (GoalError, ExportOptionsError) as error:
            return self._failed(goal_handle, result, error, started)
        # One export at a time: each already uses every core. A goal waiting for its turn can be cancelled.
        while not self._busy.acquire(timeout=0.2):
            if goal_handle.is_cancel_requested:
                return self._failed(goal_handle, result, ExportCancelled("cancelled while waiting for the export "
                                                                         "before it; nothing was written"), started)
        try:
            slide_images = slide_images_from_manifest(manifest) if manifest is not None else {}
            output_dir.mkdir(parents=True, exist_ok=True)
            exported = export_slide(mosaic, output_dir, goal_handle.request.output_name or None, formats,
                                    options, progress=lambda p: self._feedback(goal_handle, p),
                                    should_cancel=lambda: goal_handle.is_cancel_requested, **slide_images)
        except Exception as error:  # mapped to a result code below; never lets the node die
            return self._failed(goal_handle, result, error, started)
        finally:
            self._busy.release()
        if exported.missing_regions:
            self.get_logger().warning(
                f"exported {goal_handle.request.mosaic_uri!r} with {len(exported.missing_regions)} region(s) "
                f"missing from the mosaic in its fill colour (allow_partial_mosaic): "
                f"{describe_regions(exported.missing_regions)}")
        result.output_paths = [str(p) for p in exported.output_paths]
        result.output_sizes_bytes = list(exported.output_sizes_bytes)
        result.levels = exported.levels
        result.duration_s = time.monotonic() - started
        goal_handle.succeed()
        return result

    def _feedback(self, goal_handle, progress) -> None:
        goal_handle.publish_feedback(ExportSlide.Feedback(
            format=progress.format, level=progress.level, levels_total=progress.levels_total,
            fraction_done=progress.fraction_done, bytes_written=progress.bytes_written))

    def _failed(self, goal_handle, result, error: Exception, started: float):
        code = next((c for kind, c in ERROR_CODES if isinstance(error, kind)),
                    ExportSlide.Result.ERROR_INVALID_GOAL if isinstance(error, GoalError)
                    else ExportSlide.Result.ERROR_STORAGE if isinstance(error, OSError)
                    else ExportSlide.Result.ERROR_INTERNAL)
        result.error_code, result.error_message = code, str(error)
        result.duration_s = time.monotonic() - started
        if code == ExportSlide.Result.ERROR_CANCELED:
            goal_handle.canceled()
        else:
            self.get_logger().error(f"export failed: {error}")
            goal_handle.abort()
        return result


def main(args=None):
    spin_node(ExportNode, args, make_executor=lambda: PoolExecutor(num_threads=3))


if __name__ == "__main__":
    main()
