import json
from types import SimpleNamespace

from wsi_acquisition.qc_report import write_qc_report
from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.scan import FocusReply, FocusStrategy, ScanRequest, ScanRunner


class _ScanWithAFocusMapOffOnEveryFourthTile(ScanRunner):
    """The focus map 2.5 µm off on every fourth tile: those tiles need the autofocus."""

    def focus_map(self, plan):
        focus_map = super().focus_map(plan)
        off_tiles = {(tile.x_um, tile.y_um) for tile in plan.tiles[::4]}
        return SimpleNamespace(z_um=lambda x_um, y_um: focus_map.z_um(x_um, y_um) + 2.5 * ((x_um, y_um) in off_tiles))


def test_qc_report_shows_grid_focus_registration_and_timing(tmp_path):
    backend = SimulatedMicroscope.create(speedup=1000.0, camera=Camera(width_px=192, height_px=192))
    request = ScanRequest(scan_id="qc", output_dir=tmp_path, region_um=(43_000.0, 12_000.0, 300.0, 250.0),
                          focus_strategy=FocusStrategy.MAP_INLINE, focus_points=3, skip_empty_tiles=True)
    oracle = lambda record, frame: FocusReply(frame.ground_truth_defocus_um + 0.2, 0.3)  # noqa: E731
    outcome = _ScanWithAFocusMapOffOnEveryFourthTile(backend, request, estimate_focus=oracle).run()
    registration = tmp_path / "qc" / "mosaic.registration.json"
    registration.write_text(json.dumps({"summary": {"pairs_dropped": 1}, "edges": [
        {"status": "kept", "residual_px": 0.2}, {"status": "kept", "residual_px": 0.4},
        {"status": "dropped", "residual_px": None}]}))
    index = write_qc_report(outcome.manifest_path, registration, outputs={"manifest": outcome.manifest_path})
    page = index.read_text()
    for png in ("overview_grid.png", "focus_heatmap.png", "registration_residuals.png", "timing.png"):
        assert (index.parent / png).stat().st_size > 1000 and png in page
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["tiles kept"] == len(outcome.plan.tiles)
    assert float(summary["autofocus mae um"]) == 0.2        # the oracle's bias, measured back
    assert summary["registration pairs dropped"] == 1
    assert "manifest.json" in summary["output manifest"]
    # Which focus every tile ended with, and what its correction gained.
    assert "Focus source of every tile" in page
    sources = {k: v for k, v in summary.items() if k.startswith("tiles focused by")}
    assert sum(sources.values()) == len(outcome.plan.tiles)
    assert summary["tiles focused by autofocus"] == outcome.refocus_count > 0
    assert summary["tiles focused by autofocus+two-shot"] == 0      # every source listed, also where none used it
    assert summary["corrections refused (not sharper)"] == len({(c["row"], c["col"]) for c in outcome.focus_checks})
    assert summary["corrections tried the other way (they lost sharpness)"] == sum(
        c["other_way_from_offset_um"] is not None for c in outcome.focus_checks)


def test_qc_report_lists_every_tile_the_stitcher_flagged_or_left_on_its_stage_pose(tmp_path):
    manifest = {"scan_id": "flags", "status": "complete", "tiles": [], "refocus_count": 0,
                "objective_magnification": 20.0, "numerical_aperture": 0.75, "pixel_size_um": 0.325,
                "duration_s": 1.0}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    tile = {"stage_px": [100.0, 100.0], "position_px": [100.0, 100.0], "placement": "registered", "flags": []}
    registration = tmp_path / "mosaic.registration.json"
    registration.write_text(json.dumps({
        "summary": {"tiles_flagged": 2, "stage_error_limit": {"placement_limit_px": 40.0}},
        "edges": [{"status": "kept", "residual_px": 0.1}, {"status": "dropped", "residual_px": 61.0}],
        "tiles": [{**tile, "row": 0, "col": 0, "placement": "stage_position", "flags": ["beyond_stage_error"]},
                  {**tile, "row": 0, "col": 1, "position_px": [90.0, 125.0], "flags": ["link_at_search_limit"]},
                  {**tile, "row": 1, "col": 0, "placement": "stage_position"},
                  {**tile, "row": 1, "col": 1}]}))
    index = write_qc_report(tmp_path / "manifest.json", registration)
    page = index.read_text()
    assert "Tiles flagged or on their stage pose" in page
    for cells in (("0", "0", "stage_position", "beyond_stage_error"), ("0", "1", "registered", "link_at_search_limit"),
                  ("1", "0", "stage_position", "")):
        assert "".join(f"<td>{c}</td>" for c in cells) in page
    assert "<td>1</td><td>1</td>" not in page
    assert "<td>-10.0, +25.0</td>" in page
    assert json.loads((index.parent / "summary.json").read_text())["registration tiles flagged"] == 2
    assert (index.parent / "registration_residuals.png").stat().st_size > 1000
