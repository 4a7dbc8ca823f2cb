import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from wsi.cli import _formats
from wsi.client import TaskOutcome, TaskResult
from wsi.scan_display import exit_code, format_duration, progress_line, report
from wsi_interfaces.action import ScanSlide
from wsi_common.ros_env import interruptible, node_environment


def test_progress_line_shows_state_bar_tiles_and_eta():
    feedback = SimpleNamespace(state=4, tiles_done=15, tiles_total=60, refocus_count=2, elapsed_s=75.0, eta_s=3725.0)
    assert progress_line(feedback, width=8) == (
        "acquiring  [##......] 15/60 tiles, 2 refocused, elapsed 01:15, ETA 1:02:05")
    assert format_duration(-1.0) == "--:--"


def test_report_gives_the_reason_and_what_was_kept():
    result = ScanSlide.Result(scan_id="s1", error_code=ScanSlide.Result.ERROR_INVALID_GOAL, error_message="why",
                              manifest_uri="out/s1/manifest.json")
    failed = TaskOutcome(TaskResult.FAILED, result.error_code, result.error_message, result)
    assert report(failed) == ["scan s1 did not finish (invalid goal): why", "0 tiles were captured and kept",
                              "manifest: out/s1/manifest.json"]
    rejected = TaskOutcome(TaskResult.REJECTED, 0, "scan_slide rejected the goal without running it")
    assert report(rejected) == ["the scan was not run: scan_slide rejected the goal without running it"]
    canceled = TaskOutcome(TaskResult.CANCELED, ScanSlide.Result.ERROR_CANCELED, "", result)
    assert [exit_code(o) for o in (failed, rejected, canceled)] == [1, 1, 130]


def test_report_says_where_the_autofocus_calibration_went_or_why_it_was_not_made():
    calibrated = ScanSlide.Result(scan_id="c1", tiles_planned=16, duration_s=42.0, calibration_model_dir="store/20x")
    assert report(TaskOutcome(TaskResult.SUCCEEDED, 0, "", calibrated)) == [
        "scan c1 calibrated the autofocus in 00:42 (no tiles were asked for)",
        "autofocus calibrated for this scanner and objective: store/20x"]
    calibrated.calibration_error = "two-shot model: the held-back sweeps were no better"
    assert report(TaskOutcome(TaskResult.SUCCEEDED, 0, "", calibrated))[2] == (
        "not every focus model was calibrated (the others were kept): two-shot model: the held-back sweeps were no "
        "better")
    scanned = ScanSlide.Result(scan_id="s2", tiles_captured=16, calibration_error="no clear focus")
    assert report(TaskOutcome(TaskResult.SUCCEEDED, 0, "", scanned))[1] == (
        "autofocus not calibrated, the models in use were kept: no clear focus")
    failed = ScanSlide.Result(scan_id="c2", error_code=ScanSlide.Result.ERROR_CALIBRATION,
                              error_message="the autofocus was not calibrated: no clear focus",
                              calibration_error="no clear focus")
    assert report(TaskOutcome(TaskResult.FAILED, failed.error_code, failed.error_message, failed)) == [
        "scan c2 did not finish (calibration): the autofocus was not calibrated: no clear focus",
        "0 tiles were captured and kept"]


def test_wsi_scan_exports_both_pyramids_by_default_nothing_for_a_calibration_and_what_it_is_told():
    assert _formats(SimpleNamespace(formats=None, calibration_only=False)) == ["ome-tiff", "ome-zarr"]
    assert _formats(SimpleNamespace(formats=None, calibration_only=True)) == []
    assert _formats(SimpleNamespace(formats=["ome-tiff"], calibration_only=True)) == ["ome-tiff"]


@pytest.mark.ros
@pytest.mark.slow
def test_ctrl_c_cancels_the_scan_and_keeps_the_tiles(tmp_path):
    env = node_environment()
    scan = subprocess.Popen(
        [sys.executable, "-m", "wsi.cli", "scan", "--region", "41000", "11000", "2000", "2000", "--focus", "none",
         "--sim-speedup", "5", "--output-dir", str(tmp_path), "--scan-id", "interrupted",
         "--node-log", str(tmp_path / "nodes.log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    for line in scan.stdout:
        if re.search(r"acquiring .* [1-9]\d*/\d+ tiles", line) or time.monotonic() > deadline:
            break
    scan.send_signal(signal.SIGINT)
    rest, _ = scan.communicate(timeout=120)
    assert scan.returncode == 130, rest
    assert "Ctrl-C: cancelling the scan" in rest
    assert "did not finish (canceled)" in rest
    manifest = json.loads((tmp_path / "interrupted" / "manifest.json").read_text())
    assert manifest["status"] == "canceled" and manifest["tiles"]
    assert f"manifest: {tmp_path / 'interrupted' / 'manifest.json'}" in rest
