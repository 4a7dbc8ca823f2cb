"""The slide-loader example drives a queue of slides through the real graph and keeps going on failures."""
import json
import subprocess
import sys

import pytest

from wsi.graph import GraphConfig, scan_graph
from wsi_common.ros_env import node_environment

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_queue_scans_each_slide_and_records_a_refused_one(run_nodes, tmp_path):
    graph = [spec for spec in scan_graph(GraphConfig(output_dir=str(tmp_path), sim_speedup=50.0))
             if spec.name in ("microscope", "stitching", "export", "lifecycle_manager")]
    graph[0].parameters.update(camera_width_px=256, camera_height_px=256)
    run_nodes(graph)
    jobs = [{"slot": 1, "scan_id": "case-1", "region_um": [43_000, 12_000, 250, 250], "formats": ["ome-tiff"]},
            {"slot": 2, "scan_id": "case-2", "region_um": [74_900, 100, 900, 900]},
            {"slot": 3, "scan_id": "case-3", "region_um": [43_500, 12_500, 200, 200], "formats": []}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-m", "wsi.slide_loader", str(tmp_path / "jobs.json"), "--no-confirm",
                           "--report", str(tmp_path / "report.json"), "--timeout", "300"],
                          capture_output=True, text=True, timeout=600, env=node_environment())
    assert done.returncode == 1, done.stderr            # not every slide was scanned
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(r["slot"], r["status"]) for r in report] == [(1, "scanned"), (2, "refused"), (3, "scanned")]
    assert report[0]["outputs"][0].endswith("case-1.ome.tif") and report[0]["tiles"] > 0
    assert "outside the stage limits" in report[1]["error"]         # the scanner's reason, for the records
    assert "slot 2 (case-2): refused" in done.stdout
