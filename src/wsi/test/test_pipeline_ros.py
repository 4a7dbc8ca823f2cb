"""Scan -> stitching -> export -> QC through the real node processes of the graph."""
import time

import numpy as np
import pytest
import tifffile
import zarr
from action_msgs.msg import GoalStatus

from wsi.graph import GraphConfig, scan_graph
from wsi_common.action_caller import ActionCaller
from wsi_common.topics import DIAGNOSTICS, EXPORT_SLIDE, SCAN_SLIDE, SCAN_STATUS
from wsi_interfaces.action import ScanSlide
from wsi_interfaces.msg import ScanStatus
from wsi_stitching.cli import main as stitch_cli

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_scan_goal_with_formats_produces_a_pyramid_and_a_qc_report(run_nodes, ros_node, tmp_path, capsys):
    graph = [spec for spec in scan_graph(GraphConfig(output_dir=str(tmp_path), sim_speedup=20.0))
             if spec.name != "autofocus"]   # focus from the focus map here; the model has its own tests
    for spec in graph:
        if spec.name == "microscope":
            spec.parameters.update(camera_width_px=512, camera_height_px=512)
    run_nodes(graph)
    diagnostics = []
    DIAGNOSTICS.subscription(ros_node, diagnostics.append)
    exports_running, tiles_done = [], []    # arrival times: an export goal executing; the scan's tile count
    EXPORT_SLIDE.status_topic.subscription(ros_node, lambda m: exports_running.append(time.monotonic()) if any(
        s.status == GoalStatus.STATUS_EXECUTING for s in m.status_list) else None)
    SCAN_STATUS.subscription(ros_node, lambda m: tiles_done.append((time.monotonic(), m.tiles_done, m.tiles_total)))
    scanner = ActionCaller(ros_node, SCAN_SLIDE)
    scanner.wait_for_server(timeout_s=30)
    goal = ScanSlide.Goal(scan_id="pipeline", region_x_um=43_000.0, region_y_um=12_000.0, region_width_um=700.0,
                          region_height_um=600.0, objective_magnification=20.0, focus_strategy=ScanSlide.Goal.FOCUS_MAP,
                          skip_empty_tiles=True, output_formats=["ome-tiff", "ome-zarr"])
    outcome = scanner.call(goal, timeout_s=900)
    result = outcome.result
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, result.error_message
    scan_dir = tmp_path / "pipeline"
    assert result.mosaic_uri == str((scan_dir / "mosaic.zarr").resolve())
    assert result.output_uris == [str((scan_dir / "pipeline.ome.tif").resolve()),
                                  str((scan_dir / "pipeline.ome.zarr").resolve())]
    mosaic = zarr.open_group(result.mosaic_uri, mode="r")
    assert mosaic.attrs["wsi_mosaic"]["complete"] is True
    with tifffile.TiffFile(result.output_uris[0]) as tiff:
        levels = tiff.series[0].levels
        assert levels[0].shape[:2] == mosaic["image"].shape[:2] and len(levels) >= 2
        assert tiff.pages[0].tags["XResolution"].value[0] > 0
        full = levels[0].asarray()
        names = [series.name for series in tiff.series]
        macro = tiff.series[names.index("macro")].asarray()
    assert np.mean(np.abs(full.astype(float) - mosaic["image"][:].astype(float))) < 3.0   # JPEG q90
    overview = tifffile.imread(scan_dir / "overview.tif")   # the slide photo the scan took
    assert names == ["pipeline", "thumbnail", "macro"] and macro.shape == overview.shape
    assert np.mean(np.abs(macro.astype(float) - overview.astype(float))) < 3.0
    qc = scan_dir / "qc" / "index.html"
    page = qc.read_text()
    assert "registration_residuals.png" in page and "focus_heatmap.png" in page and "pipeline.ome.tif" in page
    assert any(f.state == ScanStatus.STATE_FINISHING for f in outcome.feedback)
    # The export ran while the tiles still arrived (export_while_stitching), not after the final mosaic.
    last_tile_at = min(at for at, done, total in tiles_done if total and done == total)
    assert exports_running and min(exports_running) < last_tile_at
    reporting = {status.hardware_id: status for array in diagnostics for status in array.status}
    assert {"microscope", "stitching"} <= set(reporting)
    assert {kv.key for kv in reporting["microscope"].values} >= {"connected", "busy", "stage_position_um"}
    # The documented re-stitch lays the scan out as the node did, so it confirms the node's mosaic.
    capsys.readouterr()
    assert stitch_cli([str(scan_dir / "manifest.json")]) == 0
    assert "confirmed complete" in capsys.readouterr().out
