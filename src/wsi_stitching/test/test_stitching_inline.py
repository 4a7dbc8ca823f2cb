"""Inline stitching from a real simulated scan: re-captures replace first captures, lost tiles come from disk."""
import json

import numpy as np
import pytest
import zarr

from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.scan import FocusReply, FocusStrategy, ScanRequest, ScanRunner
from wsi_stitching.inline import InlineStitch, PlannedScan


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
    tiles kept in order."""
    output = tmp_path_factory.mktemp("scan")
    backend = SimulatedMicroscope.create(speedup=1000.0, camera=Camera(width_px=256, height_px=256))
    published, plans = [], []
    oracle = lambda r, f: FocusReply(f.ground_truth_defocus_um, 0.1)  # noqa: E731
    request = ScanRequest(scan_id="inline", output_dir=output, region_um=(43_000.0, 12_000.0, 300.0, 300.0),
                          focus_strategy=FocusStrategy.MAP_INLINE, focus_points=3, skip_empty_tiles=False)
    runner = _ScanWithAPoorFocusMap(backend, request, publish_tile=lambda r, f: published.append((r, f.image_rgb8)),
                                    estimate_focus=oracle, on_plan=plans.append)
    outcome = runner.run()
    plan = plans[0]
    width, height = backend.sensor_size_px()
    pixel = backend.pixel_size_um()
    planned = PlannedScan("inline", plan.rows, plan.cols, [(t.row, t.col) for t in plan.tiles], width, height, pixel,
                          plan.origin_x_um - width * pixel / 2, plan.origin_y_um - height * pixel / 2,
                          plan.step_x_um, plan.step_y_um)
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
    kept = {(record.row, record.col): record.sequence for record, _ in published}
    lost = {sorted(kept.values())[3], max(kept.values())}
    session_lost, result_lost = stitch(scan, tmp_path / "b", drop=lost)
    assert session_lost.read_from_disk == 2 and result_lost.tiles_composed == result.tiles_composed
    full = zarr.open_group(str(tmp_path / "a" / "mosaic.zarr"), mode="r")["image"][:]
    recovered = zarr.open_group(str(tmp_path / "b" / "mosaic.zarr"), mode="r")["image"][:]
    np.testing.assert_array_equal(recovered, full)
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
    from wsi_stitching.cli import main

    outcome, planned, published = scan
    assert main([str(outcome.manifest_path), "--output", str(tmp_path / "offline.zarr")]) == 0
    assert "mosaic" in capsys.readouterr().out
    offline = zarr.open_group(str(tmp_path / "offline.zarr"), mode="r")
    assert offline.attrs["wsi_mosaic"]["complete"] is True
    assert offline["image"].shape[2] == 3 and offline["image"].shape[0] >= planned.tile_height_px
    assert main([str(tmp_path / "missing.json")]) == 1
