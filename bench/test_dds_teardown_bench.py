"""Keeps the DDS teardown benchmark runnable: a short run must report both teardowns, none hung with end_ros."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_common.ros_env import node_environment

BENCH = Path(__file__).resolve().parent / "dds_teardown.py"


@pytest.mark.slow
@pytest.mark.ros
def test_dds_teardown_benchmark_reports_both_teardowns(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--processes", "3", "--rounds", "1",
                           "--output", str(tmp_path / "dds_teardown.json")],
                          capture_output=True, text=True, timeout=240, env=node_environment())
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "dds_teardown.json").read_text())["rows"]
    assert [(row["teardown"], row["teardowns"]) for row in rows] == [("end_ros", 3), ("rclpy", 3)]
    assert rows[0]["hung"] == 0 and 0 < rows[0]["teardown_s_median"] < 10
    assert "end_ros" in done.stdout
