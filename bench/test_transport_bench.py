"""Keeps the transport benchmark runnable: a short run must report every case with sane numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_common.ros_env import node_environment

BENCH = Path(__file__).resolve().parent / "transport.py"


@pytest.mark.slow
@pytest.mark.ros
def test_transport_benchmark_reports_both_profiles(tmp_path):
    env = node_environment()
    done = subprocess.run([sys.executable, str(BENCH), "--duration", "1.5", "--size", "256",
                           "--output", str(tmp_path / "transport.json")],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr
    runs = json.loads((tmp_path / "transport.json").read_text())["runs"]
    assert [(r["profile"], r["mode"]) for r in runs] == [
        ("default", "max rate"), ("default", "10 Hz"), ("wsi_large_images", "max rate"),
        ("wsi_large_images", "10 Hz")]
    for run in runs:
        assert run["received"] > 0 and run["images_per_s"] > 0 and run["latency_ms_p95"] > 0
    assert "wsi_large_images" in done.stdout
