"""Keeps the acquisition benchmark runnable: a tiny scan must report throughput and both projections."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "acquisition.py"


@pytest.mark.slow
def test_acquisition_benchmark_reports_throughput_and_projections(tmp_path):
    output = tmp_path / "acquisition.json"
    done = subprocess.run([sys.executable, str(BENCH), "--region-mm", "0.3", "--sensor-px", "128", "--speedup", "200",
                           "--probe-snaps", "2", "--output", str(output)],
                          capture_output=True, text=True, timeout=240, env=os.environ | {"OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    scan = result["scan"]
    assert scan["tiles"] == scan["rows"] * scan["cols"] >= 9
    assert scan["tiles_per_s"] > 0 and 0 < scan["render_ms_median"] <= scan["render_ms_p95"]
    assert scan["stage_model_ms_median"] > result["config"]["stage_dynamics"]["settle_s"] * 1000
    by_objective = {p["objective_magnification"]: p for p in result["projection_15mm"]}
    assert set(by_objective) == {20.0, 40.0}
    # Half the field of view per axis: about four times the tiles.
    assert 3.5 < by_objective[40.0]["tiles"] / by_objective[20.0]["tiles"] < 4.5
    for projection in by_objective.values():
        assert projection["physical_s"] > projection["tiles"] * result["config"]["exposure_ms"] / 1000
        assert projection["simulation_s"] > projection["physical_s"]
    assert "projected 15x15 mm" in done.stdout
