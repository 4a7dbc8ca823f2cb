"""The ExportSlide action in a real export node process."""
import json
import os
import shutil

import numpy as np
import pytest
import rclpy
import tifffile
from action_msgs.msg import GoalStatus

from wsi_common.action_caller import ActionCaller
from wsi_common.supervisor import NodeSpec
from wsi_common.topics import EXPORT_SLIDE
from wsi_export.synthetic import write_synthetic_mosaic
from wsi_interfaces.action import ExportSlide

pytestmark = pytest.mark.ros


OVERVIEW = np.random.default_rng(2).integers(0, 256, (60, 180, 3), dtype=np.uint8)


def start_export_node(run_nodes, ros_node, root) -> ActionCaller:
    run_nodes([NodeSpec(name="export", package="wsi_export", executable="export_node", module="wsi_export.node",
                        parameters={"output_root": str(root), "mosaic_root": str(root)})])
    caller = ActionCaller(ros_node, EXPORT_SLIDE)
    caller.wait_for_server(timeout_s=30)
    return caller


@pytest.fixture
def exporter(run_nodes, ros_node, tmp_path):
    write_synthetic_mosaic(tmp_path / "scan" / "mosaic.zarr", 1500, 2200, pixel_size_um=0.5, seed=1)
    tifffile.imwrite(tmp_path / "scan" / "overview.tif", OVERVIEW, photometric="rgb")
    (tmp_path / "scan" / "manifest.json").write_text(json.dumps(
        {"scan_id": "scan", "tiles": [], "overview": {"image": "overview.tif", "pixel_size_um": 20.0}}))
    return start_export_node(run_nodes, ros_node, tmp_path)


def test_export_writes_both_formats_with_feedback_per_level(exporter, tmp_path):
    goal = ExportSlide.Goal(mosaic_uri="scan/mosaic.zarr", output_dir="scan", output_name="slide",
                            formats=["ome-tiff", "ome-zarr"], compression="jpeg", jpeg_quality=85,
                            tile_size_px=256, write_thumbnail=True)
    outcome = exporter.call(goal, timeout_s=120)
    result = outcome.result
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, result.error_message
    assert result.output_paths == [str((tmp_path / "scan" / "slide.ome.tif").resolve()),
                                   str((tmp_path / "scan" / "slide.ome.zarr").resolve())]
    assert all(size > 0 for size in result.output_sizes_bytes) and result.levels >= 3
    with tifffile.TiffFile(result.output_paths[0]) as tiff:
        assert tiff.is_ome and tiff.series[0].levels[0].shape[:2] == (1500, 2200)
        assert len(tiff.series[0].levels) == result.levels
    levels_seen = {f.level for f in outcome.feedback}
    assert levels_seen == set(range(result.levels)) and outcome.feedback[-1].fraction_done == pytest.approx(1.0)


def test_the_scan_manifest_s_overview_becomes_the_macro_image(exporter, tmp_path):
    goal = ExportSlide.Goal(mosaic_uri="scan/mosaic.zarr", manifest_uri="scan/manifest.json", output_dir="scan",
                            output_name="with-macro", compression="deflate", write_thumbnail=True)
    outcome = exporter.call(goal, timeout_s=120)
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, outcome.result.error_message
    with tifffile.TiffFile(outcome.result.output_paths[0]) as tiff:
        assert [s.name for s in tiff.series] == ["with-macro", "thumbnail", "macro"]
        np.testing.assert_array_equal(tiff.series[2].asarray(), OVERVIEW)


def test_an_unreadable_overview_fails_as_an_input_error(exporter, tmp_path):
    (tmp_path / "scan" / "overview.tif").write_text("not a tiff")
    outcome = exporter.call(ExportSlide.Goal(mosaic_uri="scan/mosaic.zarr", manifest_uri="scan/manifest.json",
                                             output_dir="scan", output_name="broken"), timeout_s=60)
    assert outcome.status == GoalStatus.STATUS_ABORTED
    assert outcome.result.error_code == ExportSlide.Result.ERROR_INPUT
    assert "overview.tif" in outcome.result.error_message and not (tmp_path / "scan" / "broken.ome.tif").exists()


BAD_GOALS = [(dict(output_dir="../elsewhere"), "'../elsewhere' is outside the output root"),
             (dict(mosaic_uri="../../etc/passwd"), "'../../etc/passwd' is outside the output root"),
             (dict(mosaic_uri="scan/missing.zarr"), "mosaic 'scan/missing.zarr' does not exist"),
             (dict(formats=["png"]), "format 'png' is not supported"),
             (dict(manifest_uri="scan/missing.json"), "scan manifest 'scan/missing.json' does not exist"),
             (dict(manifest_uri="../manifest.json"), "'../manifest.json' is outside the output root"),
             (dict(output_name="../slide"), "output name '../slide' must be a plain file stem"),
             (dict(compression="gif"), "compression 'gif' is not supported"),
             (dict(jpeg_quality=101), "quality=101 must be an integer in 1..100"),
             (dict(tile_size_px=100), "tile_size_px=100 must be a positive multiple of 16"),
             (dict(formats=["dicom"], compression="zstd"), "compression 'zstd' has no DICOM WSI transfer syntax")]


def test_goals_that_cannot_be_run_end_at_once_with_the_reason_even_behind_a_running_export(exporter, ros_node):
    running = exporter.send_goal(ExportSlide.Goal(mosaic_uri="scan/mosaic.zarr", output_dir="scan",
                                                  output_name="long", compression="deflate", tile_size_px=16,  # tiny tiles: slow
                                                  formats=["ome-tiff", "ome-zarr"]), timeout_s=30)
    running_result = running.get_result_async()
    for changes, reason in BAD_GOALS:
        goal = ExportSlide.Goal(**({"mosaic_uri": "scan/mosaic.zarr", "output_dir": "scan"} | changes))
        outcome = exporter.call(goal, timeout_s=30)
        assert outcome.status == GoalStatus.STATUS_ABORTED, reason
        assert outcome.result.error_code == ExportSlide.Result.ERROR_INVALID_GOAL, outcome.result.error_message
        assert reason in outcome.result.error_message
    # every bad goal was judged while the export before it still ran (exports run one at a time)
    assert not running_result.done()
    exporter.cancel(running)
    rclpy.spin_until_future_complete(ros_node, running_result, timeout_sec=120)
    assert running_result.result().status == GoalStatus.STATUS_CANCELED


def test_a_bad_codec_fails_with_a_reason_and_the_node_lives_on(exporter):
    outcome = exporter.call(ExportSlide.Goal(mosaic_uri="scan/mosaic.zarr", output_dir="scan", compression="gif"),
                            timeout_s=60)
    assert outcome.status == GoalStatus.STATUS_ABORTED
    assert outcome.result.error_code == ExportSlide.Result.ERROR_INVALID_GOAL and "gif" in outcome.result.error_message
    again = exporter.call(ExportSlide.Goal(mosaic_uri="scan/mosaic.zarr", output_dir="scan", output_name="ok"),
                          timeout_s=120)
    assert again.status == GoalStatus.STATUS_SUCCEEDED


def test_cancel_leaves_no_file_under_the_final_name(exporter, ros_node, tmp_path):
    feedback = []
    handle = exporter.send_goal(ExportSlide.Goal(mosaic_uri="scan/mosaic.zarr", output_dir="scan",
                                                 output_name="cancelled", compression="deflate", tile_size_px=128),
                                timeout_s=30, on_feedback=feedback.append)
    exporter.cancel(handle)
    status, result = exporter.wait_for_result(handle, timeout_s=120)
    assert status == GoalStatus.STATUS_CANCELED and result.error_code == ExportSlide.Result.ERROR_CANCELED
    assert not (tmp_path / "scan" / "cancelled.ome.tif").exists()
    assert not list((tmp_path / "scan").glob(".cancelled*"))


def test_a_mosaic_that_lost_data_fails_as_an_input_error_naming_the_region(exporter, tmp_path):
    lost, damaged = tmp_path / "scan" / "lost.zarr", tmp_path / "scan" / "damaged.zarr"
    for copy in (lost, damaged):
        shutil.copytree(tmp_path / "scan" / "mosaic.zarr", copy)
    (lost / "image" / "c" / "1" / "2" / "0").unlink()
    damaged_chunk = damaged / "image" / "c" / "2" / "0" / "0"
    damaged_chunk.write_bytes(damaged_chunk.read_bytes()[:1000])
    for mosaic, reason in (("lost", "has no data in its store"), ("damaged", "cannot be read")):
        outcome = exporter.call(ExportSlide.Goal(mosaic_uri=f"scan/{mosaic}.zarr", output_dir="scan",
                                                 output_name=mosaic), timeout_s=120)
        assert outcome.status == GoalStatus.STATUS_ABORTED
        assert outcome.result.error_code == ExportSlide.Result.ERROR_INPUT, outcome.result.error_message
        region = "rows 512-1024 x cols 1024-1536 px" if mosaic == "lost" else "rows 1024-1500 x cols 0-512 px"
        assert reason in outcome.result.error_message and region in outcome.result.error_message
        assert not (tmp_path / "scan" / f"{mosaic}.ome.tif").exists()
    partial = exporter.call(ExportSlide.Goal(mosaic_uri="scan/lost.zarr", output_dir="scan", output_name="partial",
                                             allow_partial_mosaic=True), timeout_s=120)
    assert partial.status == GoalStatus.STATUS_SUCCEEDED, partial.result.error_message


def test_work_directories_of_killed_exports_are_removed_when_the_node_starts(run_nodes, ros_node, tmp_path,
                                                                            export_work_dir, partial_look_alikes):
    nested = tmp_path / "scans" / "scan-1"
    nested.mkdir(parents=True)
    killed = [export_work_dir(tmp_path, "a", running=False, age_s=3600),
              export_work_dir(nested, "b", running=False, age_s=3600)]
    kept = [export_work_dir(nested, "c", running=True, age_s=3600),   # held by an export in this process
            export_work_dir(nested, "d", running=False, age_s=0),     # may not be locked yet
            *partial_look_alikes(nested, "e")]
    start_export_node(run_nodes, ros_node, tmp_path)
    assert [path for path in killed if path.exists()] == []
    assert all(os.path.lexists(path) for path in kept)
