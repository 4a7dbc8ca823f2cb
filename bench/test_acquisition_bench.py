"""Keeps the acquisition benchmark runnable: a tiny scan must report throughput, the renderer comparison
and both projections with every term."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "acquisition.py"
TERMS = ("moves_s", "settles_s", "exposures_s", "focus_map_s", "recaptures_s")


@pytest.mark.slow
def test_acquisition_benchmark_reports_throughput_renderers_and_projections(tmp_path):
    output = tmp_path / "acquisition.json"
    done = subprocess.run([sys.executable, str(BENCH), "--region-mm", "0.3", "--sensor-px", "128", "--speedup", "200",
                           "--reference-tiles", "1", "--output", str(output)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    scan = result["scan"]
    assert scan["tiles"] == scan["rows"] * scan["cols"] >= 9
    assert scan["tiles_per_s"] > 0 and 0 < scan["render_ms_median"] <= scan["render_ms_p95"]
    assert scan["stage_model_ms_median"] > result["config"]["stage_dynamics"]["settle_s"] * 1000
    assert {r["objective_magnification"] for r in result["renderers"]} == {20.0, 40.0}
    assert all(r["reference_cpu_ms_median"] > 0 and r["current_cpu_ms_median"] > 0 for r in result["renderers"])
    by_objective = {p["objective_magnification"]: p for p in result["projection_15mm"]}
    assert set(by_objective) == {20.0, 40.0}
    # Half the field of view per axis: about four times the tiles.
    assert 3.5 < by_objective[40.0]["now"]["tiles"] / by_objective[20.0]["now"]["tiles"] < 4.5
    for projection in by_objective.values():
        for strategy in (projection["now"], projection["best"]):
            assert strategy["total_s"] == pytest.approx(sum(strategy[term] for term in TERMS))
        assert projection["now"]["strategy"] == "stop-and-go"
        assert projection["best"]["total_s"] <= projection["now"]["total_s"]
    assert "projected 15x15 mm" in done.stdout and "NanoZoomer" in done.stdout and "GT450" in done.stdout
