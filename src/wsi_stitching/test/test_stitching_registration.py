"""Pairwise registration and global alignment on synthetic tiles with known true offsets."""
import numpy as np
import pytest

from wsi_stitching.alignment import AlignmentParameters, Link, solve_positions
from wsi_stitching.registration import register_pair
from wsi_stitching.simulation import SyntheticScan

SEARCH_LIMIT_PX = 48.0   # twice the scan's stage error (10 px), with room to spare
STAGE_SIGMA_PX = 20.0


@pytest.fixture(scope="module")
def scan():
    return SyntheticScan(3, 3, tile_px=384, overlap_fraction=0.2, jitter_px=10, seed=11, empty_cells=((2, 2),))


def _pair(scan, a, b, search_limit_px=SEARCH_LIMIT_PX):
    stage_a, stage_b = scan.nominal_positions_px[a], scan.nominal_positions_px[b]
    true_a, true_b = scan.true_positions_px[a], scan.true_positions_px[b]
    stage_offset = (stage_b[0] - stage_a[0], stage_b[1] - stage_a[1])
    true_offset = np.subtract(true_b, true_a)
    return register_pair(scan.tile(a), scan.tile(b), stage_offset, search_limit_px), true_offset


@pytest.mark.parametrize("a, b", [((0, 0), (0, 1)), ((0, 0), (1, 0)), ((1, 1), (1, 2)), ((0, 1), (1, 1))])
def test_textured_pair_is_registered_to_sub_pixel_accuracy(scan, a, b):
    result, true_offset = _pair(scan, a, b)
    assert result.reliable, result.reason
    assert np.linalg.norm(np.subtract(result.offset_px, true_offset)) < 0.15
    assert result.ncc > 0.8 and result.peak_ratio > 2


def test_pair_over_empty_glass_is_flagged_not_trusted(scan):
    result, _ = _pair(scan, (2, 1), (2, 2))
    assert not result.reliable
    assert result.reason == "low_texture"


def test_wrong_stage_offset_beyond_search_range_is_not_trusted(scan):
    a, b = (0, 0), (0, 1)
    stage_a, stage_b = scan.nominal_positions_px[a], scan.nominal_positions_px[b]
    wrong = (stage_b[0] - stage_a[0] + 70.0, stage_b[1] - stage_a[1])
    result = register_pair(scan.tile(a), scan.tile(b), wrong, SEARCH_LIMIT_PX)
    true_offset = np.subtract(scan.true_positions_px[b], scan.true_positions_px[a])
    assert not result.reliable or np.linalg.norm(np.subtract(result.offset_px, true_offset)) < 0.5


def _grid_links(truth, rng, noise_px=0.05):
    links = []
    for (r, c) in truth:
        for nb in ((r, c + 1), (r + 1, c)):
            if nb in truth:
                offset = np.subtract(truth[nb], truth[(r, c)]) + rng.normal(0, noise_px, 2)
                links.append(Link((r, c), nb, tuple(offset), 9.0))
    return links


def _truth_and_stage(rows=5, cols=5, seed=0):
    rng = np.random.default_rng(seed)
    truth = {(r, c): (r * 900.0 + rng.uniform(-20, 20), c * 900.0 + rng.uniform(-20, 20))
             for r in range(rows) for c in range(cols)}
    stage = {(r, c): (r * 900.0, c * 900.0) for r in range(rows) for c in range(cols)}
    return truth, stage, rng


def _errors_after_translation(solved, truth, cells):
    error = np.array([np.subtract(solved[c], truth[c]) for c in cells])
    return np.linalg.norm(error - error.mean(axis=0), axis=1)


def test_wrong_link_is_dropped_and_does_not_propagate():
    truth, stage, rng = _truth_and_stage()
    links = _grid_links(truth, rng)
    bad = links[7]
    links[7] = Link(bad.a, bad.b, (bad.offset_px[0] + 9.0, bad.offset_px[1] - 6.0), bad.weight)
    solution = solve_positions(stage, links, stage_sigma_px=STAGE_SIGMA_PX)
    assert solution.dropped == {(bad.a, bad.b): "outlier_residual"}
    errors = _errors_after_translation(solution.positions_px, truth, list(truth))
    assert errors.max() < 0.2


def test_tile_without_reliable_link_falls_back_to_stage_position():
    truth, stage, rng = _truth_and_stage()
    isolated = (2, 2)
    links = [link for link in _grid_links(truth, rng) if isolated not in (link.a, link.b)]
    solution = solve_positions(stage, links, stage_sigma_px=STAGE_SIGMA_PX)
    assert np.allclose(solution.positions_px[isolated], stage[isolated], atol=1e-6)
    others = [c for c in truth if c != isolated]
    assert _errors_after_translation(solution.positions_px, truth, others).max() < 0.2


def test_frozen_tiles_are_constants_and_anchor_the_rest():
    truth, stage, rng = _truth_and_stage()
    links = _grid_links(truth, rng, noise_px=0.0)
    fixed = {cell: truth[cell] for cell in truth if cell[0] == 0}
    unknown = {cell: stage[cell] for cell in truth if cell[0] > 0}
    solution = solve_positions(unknown, links, fixed, AlignmentParameters(), stage_sigma_px=STAGE_SIGMA_PX)
    assert set(solution.positions_px) == set(unknown)
    worst = max(np.linalg.norm(np.subtract(solution.positions_px[c], truth[c])) for c in unknown)
    assert worst < 0.05


def test_tiles_within_the_placement_limit_keep_their_registered_positions():
    """Stage errors up to ±20 px with a 40 px limit: nothing is rejected, nothing is moved toward the
    stage (a clamp at the limit would move the tiles whose error plus the common offset is largest)."""
    truth, stage, rng = _truth_and_stage()
    solution = solve_positions(stage, _grid_links(truth, rng), stage_sigma_px=STAGE_SIGMA_PX,
                               placement_limit_px=40.0)
    assert solution.beyond_limit == set() and solution.dropped == {}
    assert _errors_after_translation(solution.positions_px, truth, list(truth)).max() < 0.2


def test_placement_beyond_the_limit_is_rejected_not_clamped():
    """A corner tile hanging on two links that agree with each other (no loop can catch them) but put
    it 45 px from its stage position, with a 30 px limit: the tile lands on its stage position, its
    links are dropped as beyond_stage_error, and the rest of the grid is not pulled."""
    truth, stage, rng = _truth_and_stage()
    corner = (0, 0)
    shifted = []
    for link in _grid_links(truth, rng, noise_px=0.0):
        if link.a == corner:  # its links say it is 45 px above its stage position
            link = Link(link.a, link.b, (link.offset_px[0] + 45.0 + truth[corner][0] - stage[corner][0],
                                         link.offset_px[1]), link.weight)
        shifted.append(link)
    solution = solve_positions(stage, shifted, stage_sigma_px=STAGE_SIGMA_PX, placement_limit_px=30.0)
    assert solution.beyond_limit == {corner}
    assert np.allclose(solution.positions_px[corner], stage[corner], atol=1e-6)
    corner_links = {(link.a, link.b) for link in shifted if corner in (link.a, link.b)}
    assert {key: solution.dropped[key] for key in corner_links} == dict.fromkeys(corner_links, "beyond_stage_error")
    others = [c for c in truth if c != corner]
    assert _errors_after_translation(solution.positions_px, truth, others).max() < 0.2


@pytest.mark.parametrize("error_px", [(30.0, -100.0), (-55.0, 60.0)])
def test_pair_off_by_up_to_the_overlap_width_is_registered(error_px):
    """Stage errors up to ±60 px per tile with a 102 px overlap: the pair's offset may differ from the
    stage's by up to 120 px. 100 px closer than planned, the nominal window shares 2 px of specimen;
    the widened window finds it. 60 px farther apart, 42 px are shared inside the nominal window."""
    scan = SyntheticScan(1, 2, tile_px=512, overlap_fraction=0.2, jitter_px=0.0, seed=4)
    y, x = scan.true_positions_px[(0, 1)]
    scan.true_positions_px[(0, 1)] = (y + error_px[0], x + error_px[1])
    result, true_offset = _pair(scan, (0, 0), (0, 1), search_limit_px=120.0)
    assert result.reliable, result.reason
    assert np.linalg.norm(np.subtract(result.offset_px, true_offset)) < 0.25
