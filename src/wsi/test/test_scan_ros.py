"""ScanSlide through the real microscope process (stage + camera + orchestrator nodes)."""
import json
import time
from pathlib import Path

import pytest
import rclpy
from action_msgs.msg import GoalStatus
from std_srvs.srv import Trigger

from wsi.graph import lifecycle_manager_spec
from wsi_acquisition.focus import MIN_SHARPNESS_GAIN
from wsi_common.action_caller import ActionCaller
from wsi_common.image import image_to_array
from wsi_common.service_caller import query
from wsi_common.supervisor import NodeSpec
from wsi_common.topics import (CAMERA_IMAGE, CAMERA_LIVE, FOCUS_ESTIMATES, MOSAIC_STATUS, SCAN_PLAN, SCAN_SLIDE,
                               TILES)
from wsi_interfaces.action import ScanSlide
from wsi_interfaces.msg import FocusEstimate, MosaicStatus, ScanStatus
from wsi_interfaces.srv import EstimateFocus

pytestmark = [pytest.mark.ros, pytest.mark.slow]

TISSUE_REGION_UM = (40_000.0, 11_000.0, 3_000.0, 3_000.0)   # inside the default slide's tissue
SMALL_REGION_UM = (43_000.0, 12_000.0, 250.0, 250.0)         # 16 tiles of a 256 px camera
# 16 such tiles that all show tissue (SMALL_REGION_UM holds a hole in the section: glass, whose sharpness is
# camera noise, so a correction there is neither sharper nor blurrier but either by chance).
SMALL_TISSUE_REGION_UM = (43_000.0, 12_300.0, 250.0, 250.0)
# The bring-up manager activates the microscope, which then starts its stage, camera and scan orchestrator.
MANAGER = lifecycle_manager_spec("", ["microscope"])


def microscope_spec(output_root: Path, **parameters) -> NodeSpec:
    return NodeSpec(name="microscope", package="wsi_acquisition", executable="microscope_node",
                    module="wsi_acquisition.microscope_node", single_node=False,
                    parameters={"sim_speedup": 20.0, "output_root": str(output_root)} | parameters)


@pytest.fixture
def scanner(run_nodes, ros_node, tmp_path):
    run_nodes([microscope_spec(tmp_path), MANAGER])
    caller = ActionCaller(ros_node, SCAN_SLIDE)
    caller.wait_for_server(timeout_s=30)
    return caller


@pytest.fixture
def small_scanner(run_nodes, ros_node, tmp_path):
    """A fast microscope: small tiles, quick stage, no QC report after each scan."""
    run_nodes([microscope_spec(tmp_path, camera_width_px=256, camera_height_px=256, sim_speedup=50.0,
                               qc_report=False), MANAGER])
    caller = ActionCaller(ros_node, SCAN_SLIDE)
    caller.wait_for_server(timeout_s=30)
    return caller


def spin_until(ros_node, condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        rclpy.spin_once(ros_node, timeout_sec=0.1)


def goal(region=TISSUE_REGION_UM, **changes) -> ScanSlide.Goal:
    x, y, width, height = region
    values = dict(scan_id="t1", region_x_um=x, region_y_um=y, region_width_um=width, region_height_um=height,
                  objective_magnification=20.0, focus_strategy=ScanSlide.Goal.FOCUS_MAP, skip_empty_tiles=True)
    return ScanSlide.Goal(**(values | changes))


def test_scan_of_a_3mm_region_at_20x_publishes_every_tile(scanner, ros_node, tmp_path):
    tiles, plans = [], []
    TILES.subscription(ros_node, tiles.append)
    SCAN_PLAN.subscription(ros_node, plans.append)
    outcome = scanner.call(goal(), timeout_s=600)
    result = outcome.result
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, result.error_message
    deadline = time.monotonic() + 10
    while len(tiles) < result.tiles_captured and time.monotonic() < deadline:
        rclpy.spin_once(ros_node, timeout_sec=0.1)
    manifest = json.loads(Path(result.manifest_uri).read_text())
    planned = len(manifest["plan"]["tiles"])
    assert planned >= 81 and result.tiles_planned == planned == result.tiles_captured
    assert len(tiles) == planned and [t.sequence for t in tiles] == list(range(planned))
    assert {(t.index.row, t.index.col) for t in tiles} == {tuple(rc) for rc in manifest["plan"]["tiles"]}
    first = tiles[0]
    assert image_to_array(first.image).shape == (1024, 1024, 3)
    assert first.pixel_size_um == pytest.approx(0.325) and first.objective_magnification == 20.0
    assert abs(first.ground_truth_defocus_um) < 1.41       # within the depth of field at 20x
    assert plans and plans[-1].rows * plans[-1].cols >= planned and plans[-1].manifest_uri == result.manifest_uri
    assert manifest["status"] == "complete" and result.scanned_area_mm2 > 9.0
    assert outcome.feedback and outcome.feedback[-1].tiles_done == planned
    assert any(f.eta_s > 0 for f in outcome.feedback)


def test_goals_that_cannot_be_run_end_at_once_with_the_reason(small_scanner):
    for refused, reason in [
            (goal(region=(74_000.0, 1_000.0, 3_000.0, 3_000.0)), "is outside the stage limits"),
            (goal(region=(float("nan"), 12_000.0, 250.0, 250.0)), "expected finite numbers"),
            (goal(focus_points=1_000_000), "focus_points 1000000; expected 0 (automatic) to 100"),
            (goal(scan_id="../escape"), "scan_id '../escape' must be"),
            (goal(output_dir="../escape"), "output_dir '../escape' is outside the output root"),
            (goal(output_formats=["png"]), "output formats ['png']")]:
        started = time.monotonic()
        outcome = small_scanner.call(refused, timeout_s=30)
        assert outcome.status == GoalStatus.STATUS_ABORTED, reason
        assert outcome.result.error_code == ScanSlide.Result.ERROR_INVALID_GOAL, outcome.result.error_message
        assert reason in outcome.result.error_message and time.monotonic() - started < 5


def test_of_two_goals_at_once_one_scans_and_the_other_learns_the_microscope_is_busy(small_scanner, ros_node):
    futures = [small_scanner.client.send_goal_async(goal(SMALL_REGION_UM, scan_id=name,
                                                         focus_strategy=ScanSlide.Goal.FOCUS_NONE))
               for name in ("first", "second")]
    spin_until(ros_node, lambda: all(f.done() for f in futures), 30)
    assert all(f.result().accepted for f in futures)
    results = [f.result().get_result_async() for f in futures]
    spin_until(ros_node, lambda: all(r.done() for r in results), 120)
    (done, scanned), (busy, refused) = sorted(((r.result().status, r.result().result) for r in results),
                                              key=lambda outcome: outcome[1].error_code)
    assert done == GoalStatus.STATUS_SUCCEEDED and scanned.tiles_captured == 16
    assert busy == GoalStatus.STATUS_ABORTED and refused.error_code == ScanSlide.Result.ERROR_BUSY
    assert refused.error_message.startswith(f"the microscope is busy: scan {scanned.scan_id} is running")
    # The scan's folder is its own: the same scan_id again is refused, and the scan stays as it was.
    again = small_scanner.call(goal(SMALL_REGION_UM, scan_id=scanned.scan_id), timeout_s=30)
    assert again.result.error_code == ScanSlide.Result.ERROR_INVALID_GOAL
    assert "already holds the files of an earlier scan" in again.result.error_message
    assert json.loads(Path(scanned.manifest_uri).read_text())["status"] == "complete"


def test_cancel_or_a_lost_stitching_node_ends_the_wait_for_the_mosaic(small_scanner, ros_node):
    stand_in = MOSAIC_STATUS.publisher(ros_node)   # a stitching node that hangs
    feedback = []
    for scan_id in ("canceled", "stitcher-lost"):
        stand_in.publish(MosaicStatus(scan_id=scan_id, finished=False))   # "stitching it"
        handle = small_scanner.send_goal(goal(SMALL_REGION_UM, scan_id=scan_id, output_formats=["ome-tiff"],
                                              focus_strategy=ScanSlide.Goal.FOCUS_NONE),
                                         timeout_s=30, on_feedback=feedback.append)
        spin_until(ros_node, lambda: feedback and feedback[-1].state == ScanStatus.STATE_FINISHING, 120)
        feedback.clear()
        started = time.monotonic()
        if scan_id == "canceled":
            small_scanner.cancel(handle)
        else:
            ros_node.destroy_publisher(stand_in)
        status, result = small_scanner.wait_for_result(handle, timeout_s=60)
        assert time.monotonic() - started < 10
        if scan_id == "canceled":
            assert status == GoalStatus.STATUS_CANCELED and result.error_code == ScanSlide.Result.ERROR_CANCELED
            assert "canceled while waiting for the mosaic" in result.error_message
        else:
            assert status == GoalStatus.STATUS_ABORTED and result.error_code == ScanSlide.Result.ERROR_STITCHING
            assert "need a stitching node, and none is running" in result.error_message
        assert json.loads(Path(result.manifest_uri).read_text())["status"] == "complete"


def test_a_side_probe_sends_the_tile_and_the_probe_as_a_pair_and_its_correction_must_be_sharper(small_scanner,
                                                                                                 ros_node):
    """The orchestrator's side probe through ROS: an autofocus stand-in in this process says of every tile
    "4 µm from focus, side unknown", so the scan takes a probe 4 µm higher and asks estimate_focus about both
    exposures; the stand-in reads the pair as 3 µm below focus, and the corrected capture (asked about alone)
    as in focus. The focus map had the tiles (all over tissue) in focus, so every such correction is blurrier;
    the scan tries the same move the other way, blurrier too, and refuses both: the tiles stay as the focus map
    took them."""
    tiles, pairs, corrected = {}, [], []

    def estimate_tile(tile):
        tiles[tile.sequence] = image_to_array(tile.image)
        estimates.publish(FocusEstimate(scan_id=tile.scan_id, sequence=tile.sequence, index=tile.index, valid=True,
                                        defocus_um=4.0, uncertainty_um=5.0, distance_um=4.0,
                                        distance_uncertainty_um=0.2, above_focus_probability=0.5))

    def estimate_pair(request, response):
        if not request.image_above.data:
            corrected.append(image_to_array(request.image))
            response.success, response.exposures_used = True, 1
            response.defocus_um, response.uncertainty_um, response.above_focus_probability = 0.0, 0.2, 0.5
            response.distance_um, response.distance_uncertainty_um = 0.0, 0.2
            return response
        pairs.append((image_to_array(request.image), image_to_array(request.image_above), request.step_above_um))
        response.success, response.exposures_used, response.two_shot_model = True, 2, "stand-in"
        response.defocus_um, response.uncertainty_um, response.above_focus_probability = -3.0, 0.2, 0.01
        response.distance_um, response.distance_uncertainty_um = 3.0, 0.2
        return response

    estimates = FOCUS_ESTIMATES.publisher(ros_node)
    TILES.subscription(ros_node, estimate_tile)
    ros_node.create_service(EstimateFocus, "estimate_focus", estimate_pair)
    outcome = small_scanner.call(goal(SMALL_TISSUE_REGION_UM, scan_id="probes", skip_empty_tiles=False,
                                      focus_strategy=ScanSlide.Goal.FOCUS_MAP_INLINE), timeout_s=300)
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, outcome.result.error_message
    manifest = json.loads(Path(outcome.result.manifest_uri).read_text())
    planned = len(manifest["plan"]["tiles"])
    probes = [check for check in manifest["focus_checks"] if check["kind"] == "side-probe"]
    corrections = [check for check in manifest["focus_checks"] if check["kind"] == "correction"]
    first_tries = [check for check in corrections if check["other_way_from_offset_um"] is None]
    other_way = [check for check in corrections if check["other_way_from_offset_um"] is not None]
    assert len(probes) == len(first_tries) == len(pairs) == len(corrected) == planned
    for probe, (image, image_above, step_um) in zip(probes, pairs):
        assert probe["step_um"] == step_um == 4.0 and probe["two_shot_defocus_um"] == -3.0
        # The pair is the tile as published and its probe, the same field 4 µm higher.
        tile = next(t for t in manifest["tiles"] if (t["row"], t["col"]) == (probe["row"], probe["col"]))
        assert (tiles[tile["sequence"]] == image).all() and image_above.shape == image.shape
        assert probe["ground_truth"]["z_um"] - tile["ground_truth"]["z_um"] == pytest.approx(4.0, abs=0.3)
    assert all(c["offset_um"] == 3.0 and c["source"] == "autofocus+two-shot" and c["sharpness_gain"] < 0
               for c in first_tries)
    assert len(other_way) == sum(c["sharpness_gain"] <= -MIN_SHARPNESS_GAIN for c in first_tries) > planned / 2
    assert all(c["offset_um"] == -3.0 and c["sharpness_gain"] < 0 for c in other_way)
    assert manifest["refocus_count"] == 0 and all(t["focus_source"] == "focus-map" for t in manifest["tiles"])


def test_a_scanner_calibrated_from_a_slide_without_scanning_it_reads_the_next_scans_pairs_with_the_calibration(
        run_nodes, ros_node, tmp_path, tiny_model, mismatched_two_shot_model):
    """How a lab calibrates a scanner: a calibration-only goal takes the focus map's sweeps of a region, the
    autofocus node fine-tunes the two-shot model on them and stores it for this scanner and objective, and no tile
    is taken; the next scan's pairs (its side probes) are read by the calibrated two-shot model without being asked.
    Its tiles are read by the base single-shot model: a single-shot calibration learns the slide it was fitted on
    and serves only that scan's tiles, so a goal without tiles does not fit one."""
    root = tmp_path / "calibration"
    autofocus = NodeSpec(name="autofocus", package="wsi_autofocus", executable="autofocus_node",
                         module="wsi_autofocus.node",
                         parameters={"model_dir": str(tiny_model), "backend": "onnxruntime",
                                     "two_shot_model": str(mismatched_two_shot_model),
                                     "calibration_root": str(root), "scanner_name": "bench-1"})
    run_nodes([microscope_spec(tmp_path, camera_width_px=256, camera_height_px=256, sim_speedup=50.0,
                               qc_report=False), MANAGER, autofocus])
    scanner = ActionCaller(ros_node, SCAN_SLIDE)
    scanner.wait_for_server(timeout_s=30)
    estimates, plans, tiles = [], [], []
    FOCUS_ESTIMATES.subscription(ros_node, estimates.append)
    SCAN_PLAN.subscription(ros_node, plans.append)       # what a stitching node opens a mosaic for
    TILES.subscription(ros_node, tiles.append)
    # The calibration's time is bench/calibration.py's to measure; more than 60 s once on the CI machine.
    calibrating = scanner.call(goal(SMALL_TISSUE_REGION_UM, scan_id="calibrate", focus_points=3,
                                    calibration_only=True), timeout_s=400)
    result = calibrating.result
    assert calibrating.status == GoalStatus.STATUS_SUCCEEDED, result.error_message
    assert result.calibration_model_dir == str(root / "bench-1" / "20x_na0.75_px0.325") and not result.calibration_error
    # No tile of this goal is left for a single-shot calibration to serve: only the two-shot model is fitted.
    assert not (Path(result.calibration_model_dir) / "metadata.json").exists()
    assert result.tiles_planned == 16 and result.tiles_captured == 0 and estimates == [] and plans == []
    manifest = json.loads(Path(result.manifest_uri).read_text())
    assert manifest["status"] == "complete" and manifest["tiles"] == [] and len(manifest["focus_map"]["sweeps"]) == 3
    assert manifest["calibration_only"]
    calibration = manifest["autofocus_calibration"]
    assert calibration["success"] and calibration["sweeps"] == 3 and calibration["model_dir"] == ""
    assert calibration["two_shot_held_back_mae_after_um"] < calibration["two_shot_held_back_mae_before_um"]
    scanned = scanner.call(goal(SMALL_TISSUE_REGION_UM, scan_id="after", focus_points=3, skip_empty_tiles=False,
                                focus_strategy=ScanSlide.Goal.FOCUS_MAP_INLINE), timeout_s=400)
    assert scanned.status == GoalStatus.STATUS_SUCCEEDED, scanned.result.error_message
    assert scanned.result.tiles_captured == 16 and not scanned.result.calibration_model_dir
    spin_until(ros_node, lambda: len({e.sequence for e in estimates if e.scan_id == "after"}) == 16, timeout_s=30)
    assert {e.model_dir for e in estimates if e.scan_id == "after"} == {str(tiny_model)}
    assert [plan.scan_id for plan in plans] == ["after"]
    pair = EstimateFocus.Request(pixel_size_um=0.325, numerical_aperture=0.75, objective_magnification=20.0,
                                 step_above_um=2.0, scan_id="after")
    pair.image = pair.image_above = next(tile.image for tile in tiles if tile.scan_id == "after")
    answer = query(ros_node.create_client(EstimateFocus, "estimate_focus"), pair, 30.0, node=ros_node)
    assert answer.success, answer.error
    assert answer.two_shot_model == str(Path(result.calibration_model_dir) / "two_shot.npz")
    assert answer.model_dir == str(tiny_model)


def test_a_calibration_only_goal_without_an_autofocus_node_fails_with_the_reason(small_scanner):
    outcome = small_scanner.call(goal(SMALL_TISSUE_REGION_UM, scan_id="alone", focus_points=3, calibration_only=True),
                                 timeout_s=120)
    assert outcome.status == GoalStatus.STATUS_ABORTED
    result = outcome.result
    assert result.error_code == ScanSlide.Result.ERROR_CALIBRATION and result.tiles_captured == 0
    assert result.error_message == ("the autofocus was not calibrated (the models in use are kept): no autofocus "
                                    "node offers calibrate_autofocus")
    assert result.calibration_error == "no autofocus node offers calibrate_autofocus"
    assert not result.calibration_model_dir


def test_cancel_mid_scan_ends_cleanly_and_keeps_the_tiles(scanner, ros_node):
    feedback = []
    handle = scanner.send_goal(goal(scan_id="t2", focus_strategy=ScanSlide.Goal.FOCUS_NONE), timeout_s=30,
                               on_feedback=feedback.append)
    deadline = time.monotonic() + 120
    while not any(f.tiles_done >= 3 for f in feedback) and time.monotonic() < deadline:
        rclpy.spin_once(ros_node, timeout_sec=0.1)
    scanner.cancel(handle)
    status, result = scanner.wait_for_result(handle, timeout_s=60)
    assert status == GoalStatus.STATUS_CANCELED
    assert result.error_code == ScanSlide.Result.ERROR_CANCELED
    manifest = json.loads(Path(result.manifest_uri).read_text())
    assert manifest["status"] == "canceled" and 3 <= len(manifest["tiles"]) < result.tiles_planned
    assert all((Path(result.manifest_uri).parent / t["image"]).exists() for t in manifest["tiles"])
    # The microscope is free again: the camera answers a trigger.
    trigger = ros_node.create_client(Trigger, "camera/trigger")
    images = []
    CAMERA_IMAGE.subscription(ros_node, images.append)
    answer = query(trigger, Trigger.Request(), 30.0, node=ros_node)     # a second image does no harm
    assert answer is not None and answer.success, answer
    deadline = time.monotonic() + 10
    while not images and time.monotonic() < deadline:
        rclpy.spin_once(ros_node, timeout_sec=0.1)
    assert images and images[0].width == 1024


def test_live_stream_publishes_frames_with_camera_info(run_nodes, ros_node, tmp_path):
    run_nodes([microscope_spec(tmp_path, live_rate_hz=5.0, camera_width_px=256, camera_height_px=256), MANAGER])
    frames = []
    CAMERA_LIVE.subscription(ros_node, frames.append)
    deadline = time.monotonic() + 30
    while len(frames) < 3 and time.monotonic() < deadline:
        rclpy.spin_once(ros_node, timeout_sec=0.1)
    assert len(frames) >= 3
    assert (frames[-1].width, frames[-1].height, frames[-1].encoding) == (256, 256, "rgb8")
    assert image_to_array(frames[-1]).std() > 5          # an image of the slide, not a blank buffer
