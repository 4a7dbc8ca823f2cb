import pytest

from wsi_common.tile_grid import TileGrid, field_of_view_um

# A 3 x 4 grid of 1024 x 768 px tiles at 0.325 µm/px (332.8 x 249.6 µm), 10 % overlap.
GRID = TileGrid(rows=3, cols=4, origin_x_um=41_000.5, origin_y_um=12_000.25, step_x_um=299.52, step_y_um=224.64,
                fov_width_um=332.8, fov_height_um=249.6)


def test_the_field_of_view_is_the_pixel_count_times_the_pixel_size():
    assert field_of_view_um(1024, 768, 0.325) == pytest.approx((332.8, 249.6))


def test_a_cell_is_centred_on_its_stage_position():
    x, y, width, height = GRID.field_um(2, 3)
    assert (width, height) == (332.8, 249.6)
    assert (x + width / 2, y + height / 2) == pytest.approx(GRID.centre_um(2, 3))
    assert GRID.centre_um(2, 3) == pytest.approx((41_000.5 + 3 * 299.52, 12_000.25 + 2 * 224.64))


def test_neighbouring_fields_overlap_by_the_field_less_the_step():
    left, _, width, _ = GRID.field_um(1, 1)
    right, _, _, _ = GRID.field_um(1, 2)
    assert left + width - right == pytest.approx(332.8 - 299.52)


def test_the_edge_origin_of_a_scan_plan_message_round_trips():
    edge_x, edge_y = GRID.edge_origin_um
    assert (edge_x, edge_y) == pytest.approx((41_000.5 - 166.4, 12_000.25 - 124.8))
    received = TileGrid.from_edge_origin(GRID.rows, GRID.cols, edge_x, edge_y, GRID.step_x_um, GRID.step_y_um,
                                         GRID.fov_width_um, GRID.fov_height_um)
    for row, col in ((0, 0), (2, 3), (1, 2)):
        assert received.centre_um(row, col) == pytest.approx(GRID.centre_um(row, col), abs=1e-9)


def test_the_extent_runs_from_the_first_field_to_the_last():
    x, y, width, height = GRID.extent_um
    first_x, first_y, _, _ = GRID.field_um(0, 0)
    last_x, last_y, last_width, last_height = GRID.field_um(GRID.rows - 1, GRID.cols - 1)
    assert (x, y) == (first_x, first_y)
    assert (x + width, y + height) == pytest.approx((last_x + last_width, last_y + last_height))
