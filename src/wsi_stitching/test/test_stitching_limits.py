"""The stage-error limit: one parameter for search and placement, rejection instead of clamping, and a
QC report that tells the truth about the final placement."""
import json

import numpy as np
import pytest

import wsi_stitching.stitcher as stitcher_module
from wsi_stitching.errors import StitchingError
from wsi_stitching.registration import PairRegistration, register_pair
from wsi_stitching.simulation import SyntheticScan
from wsi_stitching.stitcher import MosaicStitcher, StageErrorLimit, StitchParameters


def _stitch(scan, path, parameters):
    stitcher = MosaicStitcher(scan.layout(), path, parameters)
    for cell in scan.layout().cells:
        stitcher.add_tile(*cell, scan.tile(cell), *scan.stage_position_um(cell))
    return stitcher.finish()


def _position_errors(scan, positions, cells):
    error = np.array([np.subtract(positions[c], scan.true_positions_px[c]) for c in cells])
    return np.linalg.norm(error - error.mean(axis=0), axis=1)


def test_limit_is_derived_from_the_stage_repeatability_and_bounded_by_the_overlap():
    limit = StageErrorLimit.derive(stage_repeatability_um=10.0, pixel_size_um=0.5, overlap_px=102.4)
    assert (limit.stage_error_px, limit.bound_by) == (20.0, "stage_repeatability")
    assert limit.search_px == limit.placement_px == 40.0 and limit.margin_px == 61
    wide = StageErrorLimit.derive(stage_repeatability_um=80.0, pixel_size_um=0.5, overlap_px=102.4)
    assert (wide.stage_error_px, wide.bound_by) == (102.4, "overlap")
    with pytest.raises(StitchingError, match="stage_repeatability_um must be a positive number of µm, got -1"):
        StitchParameters(stage_repeatability_um=-1.0)


def test_stage_errors_up_to_the_overlap_width_are_placed_where_the_images_are(tmp_path):
    """Stage errors up to ±60 px with a 102 px overlap (the bench's 10 % of 1024 px, here 20 % of
    512 px): every tile is placed at its true position; none is clamped toward its stage position."""
    scan = SyntheticScan(4, 4, tile_px=512, overlap_fraction=0.2, jitter_px=60.0, seed=5)
    assert max(abs(np.subtract(scan.true_positions_px[c], scan.nominal_positions_px[c])).max()
               for c in scan.nominal_positions_px) > 50
    parameters = StitchParameters(stage_repeatability_um=60.0 * scan.pixel_size_um, flat_field_min_tiles=12)
    result = _stitch(scan, tmp_path / "wide.zarr", parameters)
    errors = _position_errors(scan, result.positions_px, list(scan.nominal_positions_px))
    assert np.sqrt(np.mean(errors ** 2)) < 0.3 and errors.max() < 0.6
    report = json.loads(result.report_path.read_text())
    assert report["summary"]["tiles_flagged"] == 0 and result.tiles_at_stage_position == 0
    assert report["summary"]["stage_error_limit"]["search_limit_px"] == pytest.approx(120.0)


def test_a_placement_beyond_the_limit_is_rejected_flagged_and_reported_at_its_final_position(tmp_path, monkeypatch):
    """Both links of a corner tile agree (so no loop can catch them) but say it is 60 px above where the
    stage put it, beyond the 40 px placement limit. It must not be clamped to the limit and called
    registered: it lands on its stage position, is flagged, and its links are reported dropped with
    the residual they have at the final positions."""
    scan = SyntheticScan(3, 3, tile_px=256, overlap_fraction=0.25, jitter_px=8, seed=2)
    corner = (0, 0)

    def register_with_a_displaced_corner(image_a, image_b, stage_offset_px, search_limit_px, parameters):
        result = register_pair(image_a, image_b, stage_offset_px, search_limit_px, parameters)
        if image_a is tiles[corner]:
            return PairRegistration((result.offset_px[0] + 60.0, result.offset_px[1]), result.stage_offset_px,
                                    50.0, 0.95, result.texture, result.overlap_px, True, "")
        return result

    tiles = {cell: scan.tile(cell) for cell in scan.nominal_positions_px}
    monkeypatch.setattr(scan, "tile", tiles.__getitem__)
    monkeypatch.setattr(stitcher_module, "register_pair", register_with_a_displaced_corner)
    parameters = StitchParameters(stage_repeatability_um=10.0, flat_field_min_tiles=9)  # E = 20 px
    result = _stitch(scan, tmp_path / "displaced.zarr", parameters)
    report = json.loads(result.report_path.read_text())
    tiles_report = {(t["row"], t["col"]): t for t in report["tiles"]}
    assert tiles_report[corner]["placement"] == "stage_position"
    assert tiles_report[corner]["flags"] == ["beyond_stage_error"]
    assert tiles_report[corner]["offset_from_stage_px"] == [0.0, 0.0]
    assert report["summary"]["tiles_flagged"] == result.tiles_flagged == 1
    assert report["summary"]["tiles_beyond_stage_error"] == 1
    positions = {(t["row"], t["col"]): np.array(t["position_px"]) for t in report["tiles"]}
    for edge in report["edges"]:
        a, b = tuple(edge["a"]), tuple(edge["b"])
        if corner in (a, b):
            assert edge["status"] == "dropped" and edge["reason"] == "beyond_stage_error"
        if edge["residual_px"] is not None:  # measured at the final placement, every link
            final = np.linalg.norm(positions[b] - positions[a] - np.array(edge["measured_offset_px"]))
            assert edge["residual_px"] == pytest.approx(final, abs=1e-9)
    corner_residuals = [e["residual_px"] for e in report["edges"] if corner in (tuple(e["a"]), tuple(e["b"]))]
    assert min(corner_residuals) > 50
    kept = [e["residual_px"] for e in report["edges"] if e["status"] == "kept"]
    assert report["summary"]["residual_rms_px"] == pytest.approx(np.sqrt(np.mean(np.square(kept))))
    others = [c for c in scan.nominal_positions_px if c != corner]
    assert _position_errors(scan, result.positions_px, others).max() < 0.5


def test_tiles_with_a_link_at_the_search_limit_are_flagged(tmp_path, monkeypatch):
    scan = SyntheticScan(3, 3, tile_px=256, overlap_fraction=0.25, jitter_px=8, seed=2)
    pair = ((1, 1), (1, 2))
    tiles = {cell: scan.tile(cell) for cell in scan.nominal_positions_px}

    def register_with_one_peak_at_the_limit(image_a, image_b, stage_offset_px, search_limit_px, parameters):
        result = register_pair(image_a, image_b, stage_offset_px, search_limit_px, parameters)
        if image_a is tiles[pair[0]] and image_b is tiles[pair[1]]:
            return PairRegistration(result.offset_px, result.stage_offset_px, result.peak_ratio, result.ncc,
                                    result.texture, result.overlap_px, False, "shift_at_search_limit")
        return result

    monkeypatch.setattr(scan, "tile", tiles.__getitem__)
    monkeypatch.setattr(stitcher_module, "register_pair", register_with_one_peak_at_the_limit)
    result = _stitch(scan, tmp_path / "limit.zarr", StitchParameters(flat_field_min_tiles=9))
    report = json.loads(result.report_path.read_text())
    flags = {(t["row"], t["col"]): t["flags"] for t in report["tiles"] if t["flags"]}
    assert flags == {pair[0]: ["link_at_search_limit"], pair[1]: ["link_at_search_limit"]}
    assert result.tiles_flagged == 2 and result.tiles_at_stage_position == 0
