"""Keeps `make bench`'s focus model benchmark runnable against the shipped model: every backend present here reports
its latency, and the 256x256 estimate the issue's latency target names."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "autofocus.py"


def test_every_backend_here_reports_its_latency_on_the_shipped_model(tmp_path):
    output = tmp_path / "autofocus.json"
    done = subprocess.run([sys.executable, str(BENCH), "--repeats", "5", "--output", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    assert {row["backend"] for row in result["results"]} >= {"onnxruntime", "torch-cpu"}
    for row in result["results"]:
        assert 0 < row["patch_b1_ms_median"] <= row["image256_ms_median"] <= row["tile_estimate_ms_median"]
        assert row["b32_patches_per_s"] > 0 and row["tile_estimate_cpu_ms"] > 0
    assert "256x256 ms" in done.stdout
