"""Tissue detection, serpentine tile plans, focus points and the focus-map fit."""
import numpy as np
import pytest

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import FocalSurface
from wsi_acquisition.planning import (FocusMap, NoTissueError, PlanningError, TissueDetection,
                                      choose_focus_points, detect_tissue, plan_tiles)
from wsi_acquisition.specimen import SyntheticSlide, TissueSection


def synthetic_overview(pixel_size_um=20.0):
    rng = np.random.default_rng(0)
    image = np.full((250, 400, 3), 235, dtype=np.float64)
    image[100:180, 150:300] = (200, 120, 190)        # tissue 3.0 x 1.6 mm
    image[130:140, 200:210] = 235                     # a small tear inside: filled
    image[20:22, 30:32] = (120, 120, 120)             # dust: dropped
    image += rng.normal(0, 2.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), pixel_size_um


def test_detects_tissue_rectangle_and_ignores_dust():
    overview, p = synthetic_overview()
    detection = detect_tissue(overview, p, origin_x_um=1000.0, origin_y_um=500.0)
    x, y, w, h = detection.bounding_box_um
    assert (x, y, w, h) == pytest.approx((1000 + 150 * p, 500 + 100 * p, 150 * p, 80 * p), abs=1.01 * p)
    assert detection.tissue_area_mm2 == pytest.approx(150 * 80 * p * p / 1e6, rel=0.03)
    assert detection.mask[135, 205]                   # small hole filled
    assert not detection.mask[21, 31]


def test_detects_the_virtual_slide_sections():
    sections = (TissueSection(20_000.0, 12_500.0, 8_000.0, 6_000.0, "he"),
                TissueSection(50_000.0, 12_500.0, 10_000.0, 10_000.0, "ihc"))
    microscope = VirtualMicroscope(specimen=SyntheticSlide(seed=8, sections=sections), seed=8)
    overview = microscope.capture_overview(pixel_size_um=25.0)
    detection = detect_tissue(overview.image_rgb8, overview.pixel_size_um)
    x, y, w, h = detection.bounding_box_um
    # The ragged edge sits up to ~10 % inside the nominal outline.
    assert 16_000 - 100 <= x <= 16_000 + 0.1 * 8_000 + 100
    assert 55_000 - 0.1 * 10_000 - 100 <= x + w <= 55_000 + 100
    for section in sections:
        inner = detection.tissue_fraction(section.center_x_um - 1500, section.center_y_um - 1500, 3000, 3000)
        assert inner > 0.6
    assert detection.tissue_fraction(30_000.0, 5_000.0, 5_000.0, 5_000.0) == 0.0


def test_serpentine_plan_geometry():
    plan = plan_tiles(10_000.0, 5_000.0, 1_000.0, 700.0, fov_width_um=332.8, fov_height_um=332.8,
                      overlap_fraction=0.1)
    step = 332.8 * 0.9
    assert plan.step_x_um == pytest.approx(step)
    assert (plan.rows, plan.cols) == (3, 4)
    x, y, w, h = plan.extent_um
    assert x <= 10_000.0 and y <= 5_000.0 and x + w >= 11_000.0 and y + h >= 5_700.0
    assert x + w - 11_000.0 == pytest.approx(10_000.0 - x)  # centred on the region
    order = [(t.row, t.col) for t in plan.tiles]
    assert order[:8] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 3), (1, 2), (1, 1), (1, 0)]
    for previous, current in zip(plan.tiles, plan.tiles[1:]):
        # Consecutive tiles are neighbours: overlap in x or a single row step.
        assert abs(current.x_um - previous.x_um) + abs(current.y_um - previous.y_um) == pytest.approx(step)
    assert plan.tiles[5].x_um == pytest.approx(plan.origin_x_um + 2 * step)


def test_no_overlap_and_single_tile_regions():
    plan = plan_tiles(0.0, 0.0, 100.0, 100.0, 300.0, 200.0, overlap_fraction=0.0, limits_um=(-1e4, -1e4, 1e4, 1e4))
    assert (plan.rows, plan.cols) == (1, 1)
    assert (plan.tiles[0].x_um, plan.tiles[0].y_um) == pytest.approx((50.0, 50.0))


def test_grid_is_shifted_inside_the_limits():
    plan = plan_tiles(0.0, 0.0, 1_000.0, 500.0, 300.0, 300.0, overlap_fraction=0.2,
                      limits_um=(0.0, 0.0, 75_000.0, 25_000.0))
    x, y, _, _ = plan.extent_um
    assert x >= 0.0 and y >= 0.0


def test_empty_tiles_are_skipped():
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:40, 10:40] = True                         # tissue only in the top-left 300 x 300 um
    tissue = TissueDetection(mask=mask, pixel_size_um=10.0, origin_x_um=0.0, origin_y_um=0.0, od_threshold=0.05)
    plan = plan_tiles(0.0, 0.0, 1_000.0, 1_000.0, 200.0, 200.0, overlap_fraction=0.0, tissue=tissue,
                      limits_um=(0.0, 0.0, 1_000.0, 1_000.0))
    kept = {(t.row, t.col) for t in plan.tiles}
    assert kept == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert len(plan.skipped) == plan.rows * plan.cols - 4
    assert not kept & set(plan.skipped)


@pytest.mark.parametrize("kwargs, message", [
    (dict(overlap_fraction=0.6), "overlap_fraction"),
    (dict(overlap_fraction=-0.1), "overlap_fraction"),
    (dict(region_x_um=74_900.0), "outside the limits"),
    (dict(region_width_um=0.0), "region size"),
    (dict(fov_width_um=-1.0), "field of view"),
    (dict(region_y_um=float("nan")), "finite"),
])
def test_invalid_plans_rejected(kwargs, message):
    arguments = dict(region_x_um=1_000.0, region_y_um=1_000.0, region_width_um=500.0, region_height_um=500.0,
                     fov_width_um=300.0, fov_height_um=300.0, overlap_fraction=0.1)
    arguments.update(kwargs)
    with pytest.raises(PlanningError, match=message):
        plan_tiles(**arguments)


def test_focus_points_spread_over_the_plan():
    plan = plan_tiles(0.0, 0.0, 5_000.0, 5_000.0, 500.0, 500.0, overlap_fraction=0.0,
                      limits_um=(0.0, 0.0, 5_000.0, 5_000.0))
    points = choose_focus_points(plan, 5)
    xy = np.array([(t.x_um, t.y_um) for t in points])
    assert len({tuple(p) for p in xy}) == 5
    assert np.hypot(*(xy[0] - 2_500.0)) < 400      # first point near the centre
    distances = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    assert distances[~np.eye(5, dtype=bool)].min() > 1_500.0
    assert len(choose_focus_points(plan, 1000)) == len(plan.tiles)
    empty = plan_tiles(0.0, 0.0, 100.0, 100.0, 50.0, 50.0, tissue=TissueDetection(
        np.zeros((10, 10), bool), 10.0, 0.0, 0.0, 0.05), limits_um=(0.0, 0.0, 100.0, 100.0))
    with pytest.raises(NoTissueError):
        choose_focus_points(empty, 3)


def test_focus_map_recovers_a_warped_tilted_surface_despite_outliers():
    surface = FocalSurface(seed=21, center_x_um=43_500.0, relief_amplitude_um=0.0)
    rng = np.random.default_rng(1)
    plan = plan_tiles(36_000.0, 5_000.0, 15_000.0, 15_000.0, 332.8, 332.8, overlap_fraction=0.1)
    points = choose_focus_points(plan, 36)
    x = np.array([p.x_um for p in points])
    y = np.array([p.y_um for p in points])
    z = surface.z_um(x, y) + rng.normal(0, 0.1, len(x))
    z[[3, 17]] += (9.0, -7.0)                          # autofocus failures
    focus_map = FocusMap(x, y, z)
    assert not focus_map.inliers[3] and not focus_map.inliers[17]
    assert focus_map.inliers.sum() >= 32
    tile_x = np.array([t.x_um for t in plan.tiles])
    tile_y = np.array([t.y_um for t in plan.tiles])
    error = focus_map.z_um(tile_x, tile_y) - surface.z_um(tile_x, tile_y)
    assert np.ptp(surface.z_um(tile_x, tile_y)) > 5.0     # the surface is far from flat
    assert np.sqrt(np.mean(error ** 2)) < 0.35
    assert np.abs(error).max() < 1.0


def test_focus_map_degrades_gracefully_with_few_points():
    assert FocusMap([0.0], [0.0], [5.0]).z_um(1e4, 1e4) == pytest.approx(5.0)
    plane = FocusMap([0.0, 1e3, 0.0, 1e3], [0.0, 0.0, 1e3, 1e3], [1.0, 2.0, 3.0, 4.0])
    assert plane.degree == 1
    assert plane.z_um(500.0, 500.0) == pytest.approx(2.5, abs=1e-6)
    with pytest.raises(PlanningError, match="lengths"):
        FocusMap([0.0, 1.0], [0.0], [0.0])
