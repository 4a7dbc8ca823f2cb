"""`sim:=false` launches the graph on the Micro-Manager backend: here through `wsi launch`, which starts the
same graph description as `ros2 launch wsi scan.launch.py`, with the virtual microscope as Micro-Manager
devices (backend micromanager-sim) and the scanner described by a parameters file."""
import json
import signal
import subprocess
import sys

import pytest

from wsi_common.ros_env import interruptible, node_environment

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_wsi_launch_with_sim_false_scans_through_micromanager(tmp_path):
    scanner = tmp_path / "scanner.yaml"
    scanner.write_text("/**/microscope:\n  ros__parameters:\n    camera_width_px: 256\n    camera_height_px: 256\n")
    out = tmp_path / "out"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "wsi.cli", "launch", "--sim", "false", "--backend", "micromanager-sim",
         "--params-file", str(scanner), "--sim-speedup", "50", "--output-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=node_environment(),
        preexec_fn=interruptible)
    try:
        scan = subprocess.run(
            [sys.executable, "-m", "wsi.cli", "scan", "--attach", "--region", "43000", "12000", "400", "400",
             "--focus", "map", "--scan-id", "mm", "--formats", "ome-tiff", "--timeout", "180"],
            capture_output=True, text=True, timeout=600, env=node_environment())
    finally:
        launcher.send_signal(signal.SIGINT)
        log, _ = launcher.communicate(timeout=60)
    assert scan.returncode == 0, f"{scan.stdout}\n{scan.stderr}\n--- wsi launch\n{log}"
    assert "backend micromanager-sim" in log
    manifest = json.loads((out / "mm" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["tile_width_px"] == 256 and len(manifest["tiles"]) >= 16
    # Through Micro-Manager's stage and camera the focus map still lands every tile within the depth of field.
    assert max(abs(tile["ground_truth"]["defocus_um"]) for tile in manifest["tiles"]) < 1.41
    assert (out / "mm" / "mm.ome.tif").is_file()
    assert launcher.returncode == 0, log
