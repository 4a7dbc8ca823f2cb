"""Keeps the stitching benchmark's inline mode runnable: a tiny grid must report its speed in every run against
the tile rate of the 20x anchor, and positions as accurate as the stitcher's tests require."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "stitching.py"


@pytest.mark.slow
def test_inline_mode_reports_speed_against_the_anchor_rate(tmp_path):
    output = tmp_path / "stitching.json"
    done = subprocess.run([sys.executable, str(BENCH), "--inline", "--grid", "3", "--tile", "256", "--repeat", "2",
                           "--workdir", str(tmp_path / "work"), "--output", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())["inline_3x3_256px"]
    assert result["megapixels"] == pytest.approx(9 * 256 * 256 / 1e6)
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["mpx_per_s"] == pytest.approx(result["megapixels"] / run["wall_s"])
        assert run["cpu_s"] > 0 and run["load_1min_before"] >= 0
    assert result["median_mpx_per_s"] > 0
    assert result["target_mpx_per_s"] == pytest.approx(17.0, rel=0.02)   # issue 20: the NanoZoomer S360 at 20x
    assert result["tiles_evaluated"] == 9 and result["rms_px"] < 0.5
    assert "NanoZoomer" in done.stdout and "Mpx/s" in done.stdout
