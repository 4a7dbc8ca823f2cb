"""The microscope process of bench/pipeline.py: the product's scan orchestrator over a camera that replays
pre-rendered tiles.

The scan orchestrator (wsi_acquisition.orchestrator_node) runs as on a scanner: it plans the goal's grid,
moves the stage, publishes the plan, every tile under the tile-credit back-pressure and the scan status,
writes the manifest and the tile files, waits for the stitching node's mosaic and asks the export node for
the OME-TIFF. Only the camera differs: a full frame is the tile bench/pipeline.py rendered beforehand for
the grid cell under the stage (a grid larger than the rendered one takes its tiles again, cyclically),
read from the cache file into a new buffer as a camera delivers each frame (the process does not hold the
cache in memory, which would count against the graph's), handed out no sooner than 1/tiles_per_s after the
previous one; a crop for the focus map is rendered by the virtual microscope. bench/pipeline.py starts this
process through the supervisor, in place of the microscope process of the graph.
"""
import json
import threading
import time
from pathlib import Path

import numpy as np
from rclpy.node import Node

from wsi_acquisition.hardware import Frame, ReadOut, SimulatedMicroscope
from wsi_acquisition.microscope_node import PARAMETERS as MICROSCOPE_PARAMETERS
from wsi_acquisition.optics import Camera
from wsi_acquisition.orchestrator_node import ScanOrchestratorNode
from wsi_acquisition.planning import plan_tiles
from wsi_common.executors import PoolExecutor
from wsi_common.node_main import spin_nodes
from wsi_common.params import declare_parameters

PARAMETERS = {
    "tile_cache": ("", "the .npy of pre-rendered tiles (rows, cols, height, width, 3) that bench/pipeline.py "
                       "wrote; the .json beside it says how they were rendered"),
    "region_um": ([0.0, 0.0, 0.0, 0.0], "the region (x, y, width, height) the scan goal names: the grid whose "
                                        "cells the tiles are handed out for"),
    "tiles_per_s": (0.0, "the camera's frame rate: full frames no closer together than 1/tiles_per_s; 0: as fast "
                         "as the scan asks for them"),
}
# A stage move between neighbouring tiles (about 50 ms at 20x) takes a negligible 50 µs: the camera's rate
# sets the pace of the replay.
STAGE_SPEEDUP = 1000.0


class ReplayMicroscope(SimulatedMicroscope):
    """The virtual microscope of the rendered tiles, whose camera hands them out at a set rate."""

    def __init__(self, cache: Path, rendering: dict, region_um, tiles_per_s: float):
        tiles = np.load(cache, mmap_mode="r")   # for its layout only: frames are read with read_tile
        sim = SimulatedMicroscope.create(slide_seed=rendering["slide_seed"], speedup=STAGE_SPEEDUP,
                                         objective_magnification=rendering["objective_magnification"],
                                         camera=Camera(width_px=tiles.shape[3], height_px=tiles.shape[2]))
        super().__init__(sim.microscope, sim.stage, sim.objective_magnification)
        limits = self.stage.limits
        # The grid the scan plans for this region, so that a stage position names its cell.
        self.grid = plan_tiles(*region_um, *self.field_of_view_um(), rendering["overlap_fraction"],
                               (limits.x_min_um, limits.y_min_um, limits.x_max_um, limits.y_max_um))
        self.cache, self.cached_grid, self.tile_shape = cache, tiles.shape[:2], tiles.shape[2:]
        self._tiles_offset = tiles.offset
        del tiles
        self.frame_interval_s = 1.0 / tiles_per_s if tiles_per_s > 0 else 0.0
        self._next_frame_s = 0.0

    def expose(self, exposure_ms: float, gain: float = 1.0, roi=None) -> ReadOut:
        if roi is not None:
            return super().expose(exposure_ms, gain, roi)
        now = time.monotonic()
        if now < self._next_frame_s:
            time.sleep(self._next_frame_s - now)
        self._next_frame_s = max(now, self._next_frame_s) + self.frame_interval_s
        x_um, y_um, z_um = self.stage.position_um()
        row = round((y_um - self.grid.origin_y_um) / self.grid.step_y_um)
        col = round((x_um - self.grid.origin_x_um) / self.grid.step_x_um)
        frame = Frame(self.read_tile(row, col), self.pixel_size_um(), exposure_ms, gain, x_um, y_um, z_um,
                      self.objective_magnification, self.numerical_aperture())
        return lambda: frame

    def read_tile(self, row: int, col: int) -> np.ndarray:
        """The rendered tile of a grid cell (cyclically), in a buffer of its own."""
        rows, cols = self.cached_grid
        size = int(np.prod(self.tile_shape))
        index = (row % rows) * cols + col % cols
        return np.fromfile(self.cache, np.uint8, count=size, offset=self._tiles_offset + index * size
                           ).reshape(self.tile_shape)


def make_nodes() -> list[Node]:
    camera = Node("replay_camera")
    p = declare_parameters(camera, PARAMETERS)
    cache = Path(p["tile_cache"])
    backend = ReplayMicroscope(cache, json.loads(cache.with_suffix(".json").read_text()), p["region_um"],
                               p["tiles_per_s"])
    return [camera, ScanOrchestratorNode(backend, threading.Lock())]


def main(args=None):
    threads = MICROSCOPE_PARAMETERS["device_threads"][0]
    spin_nodes(make_nodes, "replay_microscope", args, make_executor=lambda: PoolExecutor(num_threads=threads))


if __name__ == "__main__":
    main()
