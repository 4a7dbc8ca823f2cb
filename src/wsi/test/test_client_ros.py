"""wsi.client against the real graph: a scan, an export of its mosaic, a cancelled scan, a refused goal and its
reason, a server that rejects outright, and a scanner that is not there."""
import json
import threading
import time
from pathlib import Path

import pytest
from rclpy.action import GoalResponse
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from wsi.client import ScannerClient, ScannerUnavailable, TaskResult, scan_goal
from wsi.graph import GraphConfig, scan_graph
from wsi_common.topics import MOVE_STAGE
from wsi_interfaces.action import ExportSlide, MoveStage, ScanSlide

pytestmark = pytest.mark.ros


def follow(scanner: ScannerClient) -> list:
    """Every distinct feedback message of the running task, until it ends."""
    seen = []
    while not scanner.is_task_complete():
        if scanner.feedback() is not None and (not seen or scanner.feedback() is not seen[-1]):
            seen.append(scanner.feedback())
    return seen


@pytest.fixture
def scanner(ros_node):        # ros_node: rclpy is initialised for this test
    client = ScannerClient(server_timeout_s=60.0)
    yield client
    client.destroy_node()


@pytest.mark.slow
def test_scan_export_and_cancel_through_the_client(run_nodes, scanner, tmp_path):
    graph = [spec for spec in scan_graph(GraphConfig(output_dir=str(tmp_path), sim_speedup=50.0))
             if spec.name != "autofocus"]        # focus from the focus map; the model has its own tests
    graph[0].parameters.update(camera_width_px=256, camera_height_px=256, qc_report=False)
    run_nodes(graph)

    assert scanner.scan(scan_goal("first", region_um=(43_000, 12_000, 250, 250),
                                  focus_strategy=ScanSlide.Goal.FOCUS_MAP, output_formats=["ome-tiff"]))
    feedback = follow(scanner)
    scanned = scanner.result()
    assert scanned.status is TaskResult.SUCCEEDED, scanned.error_message
    assert scanned.error_code == ScanSlide.Result.ERROR_NONE
    assert feedback and feedback[-1].tiles_done == scanned.result.tiles_planned > 0
    assert scanned.result.output_uris == [str((tmp_path / "first" / "first.ome.tif").resolve())]

    assert scanner.export(ExportSlide.Goal(mosaic_uri=scanned.result.mosaic_uri,
                                           manifest_uri=scanned.result.manifest_uri,
                                           output_dir=str(tmp_path / "first"), output_name="again",
                                           formats=["ome-zarr"]))
    follow(scanner)
    exported = scanner.result()
    assert exported.status is TaskResult.SUCCEEDED, exported.error_message
    assert exported.result.output_paths == [str((tmp_path / "first" / "again.ome.zarr").resolve())]
    assert Path(exported.result.output_paths[0]).is_dir()

    assert scanner.scan(scan_goal("second", region_um=(42_000, 11_000, 1_500, 1_500),
                                  focus_strategy=ScanSlide.Goal.FOCUS_NONE))
    while not (scanner.feedback() is not None and scanner.feedback().tiles_done >= 3):
        assert not scanner.is_task_complete(), scanner.result()
    scanner.cancel()
    follow(scanner)
    canceled = scanner.result()
    assert canceled.status is TaskResult.CANCELED and canceled.error_code == ScanSlide.Result.ERROR_CANCELED
    manifest = json.loads(Path(canceled.result.manifest_uri).read_text())
    assert manifest["status"] == "canceled" and 3 <= len(manifest["tiles"]) < canceled.result.tiles_planned

    assert scanner.scan(scan_goal("../escape", region_um=(43_000, 12_000, 250, 250)))   # ends at once, saying why
    follow(scanner)
    refused = scanner.result()
    assert refused.status is TaskResult.FAILED and refused.error_code == ScanSlide.Result.ERROR_INVALID_GOAL
    assert "scan_id '../escape'" in refused.error_message

    assert scanner.move_stage(-1e6, 0.0, 0.0)
    follow(scanner)
    refused = scanner.result()
    assert refused.status is TaskResult.FAILED and refused.error_code == MoveStage.Result.ERROR_OUT_OF_LIMITS
    assert "outside the stage limits" in refused.error_message


def test_a_server_that_rejects_outright_gives_rejected(ros_node):
    old = Node("old_stage", namespace="old")
    MOVE_STAGE.server(old, lambda handle: MoveStage.Result(), goal_callback=lambda goal: GoalResponse.REJECT)
    executor = SingleThreadedExecutor()
    executor.add_node(old)
    spinning = threading.Thread(target=executor.spin, daemon=True)
    spinning.start()
    client = ScannerClient(namespace="old", server_timeout_s=30.0)
    try:
        assert not client.move_stage(0.0, 0.0, 0.0)
        assert client.is_task_complete()
        rejected = client.result()
        assert rejected.status is TaskResult.REJECTED and rejected.result is None
        assert rejected.error_message == ("old/stage/move rejected the goal without running it; "
                                          "the server's log says why")
    finally:
        client.destroy_node()
        executor.shutdown()
        old.destroy_node()


def test_a_task_whose_server_leaves_ends_failed(ros_node):
    leaving = Node("leaving_stage", namespace="leaving")
    # Accepted and never executed: the goal is still running when the server goes.
    server = MOVE_STAGE.server(leaving, lambda handle: MoveStage.Result(), handle_accepted_callback=lambda handle: None)
    executor = SingleThreadedExecutor()
    executor.add_node(leaving)
    threading.Thread(target=executor.spin, daemon=True).start()
    client = ScannerClient(namespace="leaving", server_timeout_s=30.0)
    try:
        assert client.move_stage(0.0, 0.0, 0.0)
        assert not client.is_task_complete()
        executor.shutdown()
        server.destroy()
        leaving.destroy_node()
        deadline = time.monotonic() + 30
        while not client.is_task_complete():
            assert time.monotonic() < deadline
        gone = client.result()
        assert gone.status is TaskResult.FAILED and gone.result is None
        assert gone.error_message.startswith("leaving/stage/move: the server left before the task ended")
    finally:
        client.destroy_node()


def test_a_scanner_that_is_not_there_is_reported_after_the_timeout(ros_node):
    client = ScannerClient(namespace="nobody", server_timeout_s=1.0)
    try:
        with pytest.raises(ScannerUnavailable, match="no nobody/scan_slide action server after 1 s: no scanner "
                                                     "answers here either"):
            client.scan(scan_goal("x", region_um=(0, 0, 100, 100)))
        with pytest.raises(RuntimeError, match="no task has ended: none was sent"):
            client.result()
    finally:
        client.destroy_node()
