"""A recorded scan, replayed into autofocus + stitching + export, reproduces the live run's outputs."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import tifffile
import zarr
from action_msgs.msg import GoalStatus

from wsi.graph import GraphConfig, scan_graph
from wsi_common.action_caller import ActionCaller
from wsi_common.ros_env import node_environment
from wsi_common.topics import EXPORT_SLIDE, MOSAIC_STATUS, SCAN_SLIDE
from wsi_interfaces.action import ExportSlide, ScanSlide

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_replayed_scan_bag_reproduces_the_mosaic_and_the_pyramid(run_nodes, ros_node, tmp_path):
    graph = scan_graph(GraphConfig(output_dir=str(tmp_path), sim_speedup=20.0, record=True))
    for spec in graph:
        if spec.name == "microscope":
            spec.parameters.update(camera_width_px=512, camera_height_px=512)
    live = run_nodes(graph)
    scanner = ActionCaller(ros_node, SCAN_SLIDE)
    scanner.wait_for_server(timeout_s=60)
    goal = ScanSlide.Goal(scan_id="replayed", region_x_um=43_000.0, region_y_um=12_000.0, region_width_um=600.0,
                          region_height_um=500.0, objective_magnification=20.0, skip_empty_tiles=True,
                          focus_strategy=ScanSlide.Goal.FOCUS_MAP_INLINE, output_formats=["ome-tiff"])
    outcome = scanner.call(goal, timeout_s=900)
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, outcome.result.error_message
    live_tiff = outcome.result.output_uris[0]
    time.sleep(2.0)                                   # the recorder drains its queue
    live.stop()
    bag = next((tmp_path / "bags").iterdir())

    replay_graph = [spec for spec in scan_graph(GraphConfig(output_dir=str(tmp_path)))
                    if spec.name in ("autofocus", "stitching", "export")]
    for spec in replay_graph:
        if spec.name == "stitching":
            spec.parameters["mosaic_dir"] = "replay"
    run_nodes(replay_graph)
    mosaics = []
    MOSAIC_STATUS.subscription(ros_node, mosaics.append)
    played = subprocess.run([sys.executable, "-m", "wsi.cli", "play", str(bag), "--rate", "2",
                             "--topics", "/scan/plan", "/tiles", "/scan/status", "--wait-for-subscribers", "1",
                             "--wait-timeout", "60"], capture_output=True, text=True, timeout=600,
                            env=node_environment())
    assert played.returncode == 0, played.stderr
    deadline = time.monotonic() + 300
    while not any(m.finished for m in mosaics) and time.monotonic() < deadline:
        rclpy.spin_once(ros_node, timeout_sec=0.2)
    final = next(m for m in mosaics if m.finished)
    assert final.success, final.error
    assert final.mosaic_uri == str((tmp_path / "replay" / "replayed" / "mosaic.zarr").resolve())
    exporter = ActionCaller(ros_node, EXPORT_SLIDE)
    exporter.wait_for_server(timeout_s=30)
    exported = exporter.call(ExportSlide.Goal(mosaic_uri=final.mosaic_uri, output_dir="replay/replayed",
                                              output_name="replayed", formats=["ome-tiff"], write_thumbnail=True),
                             timeout_s=300)
    assert exported.status == GoalStatus.STATUS_SUCCEEDED, exported.result.error_message

    live_mosaic = zarr.open_group(outcome.result.mosaic_uri, mode="r")["image"][:]
    replayed_mosaic = zarr.open_group(final.mosaic_uri, mode="r")["image"][:]
    np.testing.assert_array_equal(replayed_mosaic, live_mosaic)
    with tifffile.TiffFile(live_tiff) as a, tifffile.TiffFile(exported.result.output_paths[0]) as b:
        assert [level.shape for level in a.series[0].levels] == [level.shape for level in b.series[0].levels]
        for level_a, level_b in zip(a.series[0].levels, b.series[0].levels):
            np.testing.assert_array_equal(level_b.asarray(), level_a.asarray())
    assert Path(exported.result.output_paths[0]).name == Path(live_tiff).name
