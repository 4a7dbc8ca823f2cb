"""Back-pressure through real processes: a consumer of the tiles that falls behind makes the scan wait, loses
no tile, and never holds more than the ceiling (`max_buffer_mb`, wsi_common.backpressure)."""
import json
import time
from collections import deque
from pathlib import Path

import pytest
import rclpy
from action_msgs.msg import GoalStatus

from wsi.graph import lifecycle_manager_spec
from wsi_common.action_caller import ActionCaller
from wsi_common.supervisor import NodeSpec
from wsi_common.topics import DIAGNOSTICS, MOSAIC_STATUS, SCAN_PLAN, SCAN_SLIDE, TILES
from wsi_interfaces.action import ScanSlide
from wsi_interfaces.msg import MosaicStatus, ScanPlan, Tile

pytestmark = [pytest.mark.ros, pytest.mark.slow]

TILE_BYTES = 256 * 256 * 3          # one RGB tile of the 256 px camera below
CEILING_TILES = 3
HANDLE_S = 1.0                      # the slow consumer handles one tile per period: slower than capturing


def test_a_slow_consumer_makes_the_scan_wait_with_no_tile_lost_and_its_buffer_under_the_ceiling(
        run_nodes, ros_node, tmp_path):
    ceiling_bytes = CEILING_TILES * TILE_BYTES
    run_nodes([NodeSpec(name="microscope", package="wsi_acquisition", executable="microscope_node",
                        module="wsi_acquisition.microscope_node", single_node=False,
                        parameters={"output_root": str(tmp_path), "camera_width_px": 256, "camera_height_px": 256,
                                    "sim_speedup": 50.0, "qc_report": False, "diagnostics_period_s": 0.5,
                                    "max_buffer_mb": ceiling_bytes / 1e6}),
               lifecycle_manager_spec("", ["microscope"])])
    caller = ActionCaller(ros_node, SCAN_SLIDE)
    caller.wait_for_server(timeout_s=30)

    # A stitching node that takes every tile off DDS into its buffer at once and handles one per HANDLE_S,
    # saying on mosaic/status how many it has handled, as the stitching node does after each tile.
    buffer, handled, peak_bytes, scan_ids = deque(), [], [0], []
    acks = MOSAIC_STATUS.publisher(ros_node)

    def on_plan(plan: ScanPlan) -> None:
        scan_ids.append(plan.scan_id)
        acks.publish(MosaicStatus(scan_id=plan.scan_id))            # "stitching it"

    def on_tile(tile: Tile) -> None:
        buffer.append(tile)
        peak_bytes[0] = max(peak_bytes[0], sum(len(t.image.data) for t in buffer))

    def handle_one() -> None:
        if buffer:
            handled.append(buffer.popleft())
            acks.publish(MosaicStatus(scan_id=scan_ids[-1], tiles_received=len(handled)))

    SCAN_PLAN.subscription(ros_node, on_plan)
    TILES.subscription(ros_node, on_tile)
    ros_node.create_timer(HANDLE_S, handle_one)
    orchestrator = []
    DIAGNOSTICS.subscription(ros_node, lambda m: orchestrator.extend(
        {v.key: v.value for v in s.values} for s in m.status if s.name.endswith("scan_orchestrator")))

    handle = caller.send_goal(ScanSlide.Goal(scan_id="slow", region_x_um=43_000.0, region_y_um=12_000.0,
                                             region_width_um=250.0, region_height_um=250.0,
                                             objective_magnification=20.0,
                                             focus_strategy=ScanSlide.Goal.FOCUS_NONE), timeout_s=30)
    status, result = caller.wait_for_result(handle, timeout_s=300)
    assert status == GoalStatus.STATUS_SUCCEEDED, result.error_message
    captured = result.tiles_captured
    assert captured == 16
    deadline = time.monotonic() + 30
    while (len(handled) < captured or not orchestrator or int(orchestrator[-1]["stalls"]) == 0) \
            and time.monotonic() < deadline:
        rclpy.spin_once(ros_node, timeout_sec=0.1)

    # Every tile arrived, in order, and the consumer never held more than the ceiling.
    assert [t.sequence for t in handled] == list(range(captured))
    assert TILE_BYTES < peak_bytes[0] <= ceiling_bytes
    # The scan waited for the consumer: a tile is captured only once all but CEILING_TILES - 1 before it
    # were handled, so the captures spread over the consumer's pace (less one period: the consumer's timer
    # runs at its own phase, so its first hand-off may come at once).
    times = [tile["captured_s"] for tile in json.loads(Path(result.manifest_uri).read_text())["tiles"]]
    assert times[-1] - times[0] >= (captured - CEILING_TILES - 2) * HANDLE_S
    last = orchestrator[-1]
    # ... and it was the wait for room that held it, most of that time (a capture takes a few tenths of a second).
    assert int(last["stalls"]) > 0 and float(last["stall_s"]) >= (captured - CEILING_TILES - 1) * HANDLE_S * 0.4
    assert int(last["buffer_peak_bytes"]) <= ceiling_bytes == int(last["buffer_limit_bytes"])
