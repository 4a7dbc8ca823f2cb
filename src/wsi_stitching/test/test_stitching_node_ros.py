"""The stitching node in a real process: which scan plans open a stitching session."""
import json
import time

import pytest
import rclpy

from wsi_common.supervisor import NodeSpec
from wsi_common.topics import MOSAIC_STATUS, SCAN_PLAN
from wsi_interfaces.msg import ScanPlan, TileIndex

pytestmark = pytest.mark.ros


def plan(scan_id: str, scan_dir) -> ScanPlan:
    """A 2 x 2 plan of 64 px tiles, as the orchestrator publishes it."""
    return ScanPlan(scan_id=scan_id, output_dir=str(scan_dir), rows=2, cols=2,
                    tiles=[TileIndex(row=r, col=c) for r in range(2) for c in range(2)], tile_width_px=64,
                    tile_height_px=64, pixel_size_um=0.5, overlap_fraction=0.1, objective_magnification=20.0,
                    numerical_aperture=0.75, origin_x_um=1000.0, origin_y_um=1000.0, step_x_um=28.8,
                    step_y_um=28.8, manifest_uri=str(scan_dir / "manifest.json"))


def test_a_restarted_node_opens_no_session_for_the_latched_plan_of_an_ended_scan(run_nodes, ros_node, tmp_path):
    ended, running, elsewhere = tmp_path / "ended", tmp_path / "running", tmp_path / "b" / "running"
    for scan_dir in (ended, running, elsewhere):
        scan_dir.mkdir(parents=True)
    (ended / "manifest.json").write_text(json.dumps({"scan_id": "ended", "status": "complete", "tiles": []}))
    statuses = []
    MOSAIC_STATUS.subscription(ros_node, statuses.append)
    plans = SCAN_PLAN.publisher(ros_node)
    plans.publish(plan("ended", ended))          # what a node started after that scan finds latched
    run_nodes([NodeSpec(name="stitching", package="wsi_stitching", executable="stitching_node",
                        module="wsi_stitching.node", parameters={"output_root": str(tmp_path)})])
    deadline = time.monotonic() + 30
    while plans.get_subscription_count() == 0:
        assert time.monotonic() < deadline, "the stitching node did not subscribe to scan/plan"
        rclpy.spin_once(ros_node, timeout_sec=0.1)
    for _ in range(20):                          # the latched plan reaches the node as it subscribes
        rclpy.spin_once(ros_node, timeout_sec=0.1)
    # Plans are handled in order: once a later plan has opened a session, the ended scan's plan was handled.
    # The same scan_id in another output directory is another scan, with a session of its own.
    for scan_dir in (running, elsewhere):
        plans.publish(plan("running", scan_dir))
        deadline = time.monotonic() + 30
        while not any(m.mosaic_uri == str(scan_dir / "mosaic.zarr") for m in statuses):
            assert time.monotonic() < deadline, [(m.scan_id, m.mosaic_uri) for m in statuses]
            rclpy.spin_once(ros_node, timeout_sec=0.1)
    assert not [m for m in statuses if m.scan_id == "ended"]
    assert not (ended / "mosaic.zarr").exists()
