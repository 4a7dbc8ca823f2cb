"""Inline stitching from a real simulated scan: re-captures replace first captures, lost tiles come from disk."""
import json

import numpy as np
import pytest
import zarr

from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.orchestrator_node import scan_plan_message
from wsi_acquisition.scan import FocusReply, FocusStrategy, ScanRequest, ScanRunner
from wsi_stitching.cli import main as stitch_cli
from wsi_stitching.inline import InlineStitch
from wsi_stitching.node import planned_scan
from wsi_stitching.stitcher import StitchParameters


class _MapOffByOnEveryThirdTile:
    """A focus map 3 µm off on every third tile it is asked about: those tiles need a re-capture."""

    def __init__(self, focus_map):
        self._focus_map, self._calls = focus_map, 0

    def z_um(self, x_um, y_um):
        self._calls += 1
        return self._focus_map.z_um(x_um, y_um) + (3.0 if self._calls % 3 == 0 else 0.0)


class _ScanWithAPoorFocusMap(ScanRunner):
    def focus_map(self, plan):
        return _MapOffByOnEveryThirdTile(super().focus_map(plan))


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A 4x4-ish simulated scan whose focus map misses a few tiles, which the oracle autofocus re-captures;
    tiles kept in order, and the plan as the stitching node reads it from the orchestrator's ScanPlan."""
    output = tmp_path_factory.mktemp("scan")
    backend = SimulatedMicroscope.create(speedup=1000.0, camera=Camera(width_px=256, height_px=256))
    published, plans = [], []
    oracle = lambda r, f: FocusReply(f.ground_truth_defocus_um, 0.1)  # noqa: E731
    request = ScanRequest(scan_id="inline", output_dir=output, region_um=(43_000.0, 12_000.0, 300.0, 300.0),
                          focus_strategy=FocusStrategy.MAP_INLINE, focus_points=3, skip_empty_tiles=False)
    runner = _ScanWithAPoorFocusMap(backend, request, publish_tile=lambda r, f: published.append((r, f.image_rgb8)),
                                    estimate_focus=oracle, on_plan=plans.append)
    outcome = runner.run()
    planned = planned_scan(scan_plan_message("inline", plans[0], backend, outcome.scan_dir, outcome.manifest_path))
    return outcome, planned, published


def stitch(scan, tmp_path, drop=()):
    outcome, planned, published = scan
    session = InlineStitch(planned, tmp_path / "mosaic.zarr")
    for record, image in published:
        if record.sequence not in drop:
            session.offer(record.sequence, record.row, record.col, image, record.measured_x_um, record.measured_y_um)
    return session, session.finish(outcome.manifest_path)


def test_recaptures_replace_first_captures(scan, tmp_path):
    outcome, planned, published = scan
    assert outcome.refocus_count >= 2
    session, result = stitch(scan, tmp_path)
    kept = {}
    for record, _ in published:
        kept[(record.row, record.col)] = record.sequence
    assert session.used_sequences == kept and session.read_from_disk == 0
    assert result.tiles_composed == len(planned.cells) and result.residual_rms_px < 0.5
    group = zarr.open_group(str(tmp_path / "mosaic.zarr"), mode="r")
    assert group.attrs["wsi_mosaic"]["complete"] is True


def test_tiles_lost_in_transport_are_read_from_the_scan_files(scan, tmp_path):
    outcome, planned, published = scan
    session, result = stitch(scan, tmp_path / "a")
    # A re-capture lost (its cell's first capture arrived, so the cell waits for the manifest) and the last tile.
    first_recapture = next(record.sequence for record, _ in published if record.is_recapture)
    lost = {first_recapture, published[-1][0].sequence}
    session_lost, result_lost = stitch(scan, tmp_path / "b", drop=lost)
    assert session_lost.read_from_disk == 2 and result_lost.tiles_composed == result.tiles_composed
    # The same tiles, placed the same way (registered to their neighbours) and at the same positions up to
    # the order they arrived in: a tile placed at the end is registered to neighbours already fixed, which
    # moves positions by up to a few tenths of a pixel (and may tip a whole-pixel placement). And no hole.
    full_tiles, recovered_tiles = ({(t["row"], t["col"]): t for t in json.loads(
        (path / "mosaic.registration.json").read_text())["tiles"]} for path in (tmp_path / "a", tmp_path / "b"))
    assert recovered_tiles.keys() == full_tiles.keys() == set(planned.cells)
    for cell, tile in full_tiles.items():
        assert recovered_tiles[cell]["placement"] == tile["placement"]
        np.testing.assert_allclose(recovered_tiles[cell]["position_px"], tile["position_px"], atol=0.5)
    full = zarr.open_group(str(tmp_path / "a" / "mosaic.zarr"), mode="r")["image"][:]
    recovered = zarr.open_group(str(tmp_path / "b" / "mosaic.zarr"), mode="r")["image"][:]
    assert not np.any(np.all(recovered == 255, axis=-1) & ~np.all(full == 255, axis=-1))
    manifest = json.loads(outcome.manifest_path.read_text())
    assert manifest["status"] == "complete"


def test_a_bad_tile_is_reported_and_skipped(scan, tmp_path):
    outcome, planned, published = scan
    session = InlineStitch(planned, tmp_path / "mosaic.zarr")
    first_cell = (published[0][0].row, published[0][0].col)
    second, image = next((r, i) for r, i in published if (r.row, r.col) != first_cell)
    session.offer(900, second.row, second.col, image[:100], second.measured_x_um, second.measured_y_um)
    for record, pixels in published:     # the first tile (another cell) makes the bad one be used
        session.offer(record.sequence, record.row, record.col, pixels, record.measured_x_um, record.measured_y_um)
    result = session.finish(outcome.manifest_path)
    assert len(session.rejected) == 1 and session.rejected[0].startswith(f"tile #900 ({second.row}, {second.col})")
    assert result.tiles_composed == len(planned.cells)


def test_a_finished_scan_is_stitched_from_its_manifest_like_inline(scan, tmp_path, capsys):
    outcome, planned, published = scan
    assert stitch_cli([str(outcome.manifest_path), "--output", str(tmp_path / "offline.zarr")]) == 0
    assert "stitched" in capsys.readouterr().out
    offline = zarr.open_group(str(tmp_path / "offline.zarr"), mode="r")
    assert offline.attrs["wsi_mosaic"]["complete"] is True
    assert offline["image"].shape[2] == 3 and offline["image"].shape[0] >= planned.tile_height_px
    assert stitch_cli([str(tmp_path / "missing.json")]) == 1


def _journal(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_cli_confirms_a_mosaic_the_node_finished_and_redoes_it_on_request(scan, tmp_path, capsys):
    """The node lays the mosaic out from the ScanPlan, the CLI from the plan in the manifest: the same
    layout, so the CLI recognises the finished mosaic instead of refusing it."""
    outcome, planned, published = scan
    _, inline = stitch(scan, tmp_path)
    mosaic, journal = tmp_path / "mosaic.zarr", tmp_path / "mosaic.journal.jsonl"
    pixels, events = zarr.open_group(str(mosaic), mode="r")["image"][:], journal.read_text()
    assert stitch_cli([str(outcome.manifest_path), "--output", str(mosaic)]) == 0
    assert "confirmed complete" in capsys.readouterr().out
    assert journal.read_text() == events  # nothing registered, solved or composed again
    np.testing.assert_array_equal(zarr.open_group(str(mosaic), mode="r")["image"][:], pixels)
    confirmed = json.loads(inline.report_path.read_text())
    assert confirmed["summary"]["tiles_composed"] == len(planned.cells)
    assert {(t["row"], t["col"]): t["position_px"] for t in confirmed["tiles"]} == \
        {cell: list(position) for cell, position in inline.positions_px.items()}

    other = json.loads(outcome.manifest_path.read_text())  # the same scan with one tile captured elsewhere
    for entry in other["tiles"]:
        entry["image"] = str(outcome.manifest_path.parent / entry["image"])
    other["tiles"][-1]["measured_x_um"] += 1.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert stitch_cli([str(tmp_path / "other.json"), "--output", str(mosaic)]) == 1
    assert "another capture" in capsys.readouterr().err

    assert stitch_cli([str(outcome.manifest_path), "--output", str(mosaic), "--redo"]) == 0
    assert "stitched" in capsys.readouterr().out
    redone = _journal(journal)
    assert sum(e["type"] == "edge" for e in redone) == confirmed["summary"]["pairs_total"]
    assert zarr.open_group(str(mosaic), mode="r").attrs["wsi_mosaic"]["complete"] is True


def test_the_cli_resumes_a_mosaic_the_node_left_unfinished_with_the_node_parameters(scan, tmp_path, capsys):
    outcome, planned, published = scan
    mosaic, journal = tmp_path / "mosaic.zarr", tmp_path / "mosaic.journal.jsonl"
    session = InlineStitch(planned, mosaic, StitchParameters(blending="none", stage_repeatability_um=6.0,
                                                             flat_field_min_tiles=6))
    for record, image in published:
        session.offer(record.sequence, record.row, record.col, image, record.measured_x_um, record.measured_y_um)
    # The node is killed before the held last tile is stitched, once the writes in flight have ended (a CLI run
    # started sooner would write their chunks at the same time).
    session.stitcher._writers.shutdown(wait=True)
    session.stitcher.journal.close()
    frozen = {tuple(e["cell"]): e["position_px"] for e in _journal(journal) if e["type"] == "frozen"}
    composed = sum(len(e["indices"]) for e in _journal(journal) if e["type"] == "chunks")
    assert frozen and composed

    assert stitch_cli([str(outcome.manifest_path), "--output", str(mosaic), "--blending", "feather"]) == 1
    assert "parameter blending 'none', now 'feather'" in capsys.readouterr().err
    assert stitch_cli([str(outcome.manifest_path), "--output", str(mosaic)]) == 0
    assert "resumed and finished" in capsys.readouterr().out
    report = json.loads((tmp_path / "mosaic.registration.json").read_text())
    assert report["summary"]["tiles_composed"] == len(planned.cells) and report["blending"] == "none"
    positions = {(t["row"], t["col"]): t["position_px"] for t in report["tiles"]}
    assert {cell: positions[cell] for cell in frozen} == frozen
    events = _journal(journal)
    assert sum(len(e["indices"]) for e in events if e["type"] == "chunks") == len(
        {tuple(c) for e in events if e["type"] == "chunks" for c in e["indices"]})  # no chunk written twice
    assert zarr.open_group(str(mosaic), mode="r").attrs["wsi_mosaic"]["complete"] is True
