"""The tile grid of a scan: where each grid cell's field of view lies on the stage.

Stage coordinates are µm, x to the right with image columns, y down with image rows. A tile's position is
the centre of its field of view: where the stage is sent, and the pose Tile messages and scan manifests
record. A grid's origin is therefore the centre of cell (0, 0). The ScanPlan message alone carries the
top-left edge of cell (0, 0) instead (its field semantics are part of the interface); `TileGrid.edge_origin_um`
and `TileGrid.from_edge_origin` are the one place that converts between the two.
"""
from __future__ import annotations

from dataclasses import dataclass

Cell = tuple[int, int]  # (row, col)


def field_of_view_um(width_px: int, height_px: int, pixel_size_um: float) -> tuple[float, float]:
    """(width, height) in µm on the specimen of an image of width_px x height_px pixels."""
    return width_px * pixel_size_um, height_px * pixel_size_um


@dataclass(frozen=True)
class TileGrid:
    rows: int
    cols: int
    origin_x_um: float          # centre of cell (0, 0)
    origin_y_um: float
    step_x_um: float            # from one column to the next
    step_y_um: float            # from one row to the next
    fov_width_um: float         # field of view of one tile
    fov_height_um: float

    @classmethod
    def from_edge_origin(cls, rows: int, cols: int, edge_x_um: float, edge_y_um: float, step_x_um: float,
                         step_y_um: float, fov_width_um: float, fov_height_um: float) -> TileGrid:
        """The grid whose cell (0, 0) has the top-left edge (edge_x_um, edge_y_um): a ScanPlan message's."""
        return cls(rows, cols, edge_x_um + fov_width_um / 2, edge_y_um + fov_height_um / 2, step_x_um, step_y_um,
                   fov_width_um, fov_height_um)

    def centre_um(self, row: int, col: int) -> tuple[float, float]:
        """Stage position (x, y) of the cell: the centre of its field of view."""
        return self.origin_x_um + col * self.step_x_um, self.origin_y_um + row * self.step_y_um

    def field_um(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x, y, width, height) of the cell's field of view: its top-left corner and its size."""
        x_um, y_um = self.centre_um(row, col)
        return (x_um - self.fov_width_um / 2, y_um - self.fov_height_um / 2, self.fov_width_um,
                self.fov_height_um)

    @property
    def edge_origin_um(self) -> tuple[float, float]:
        """Top-left edge (x, y) of cell (0, 0): the origin as a ScanPlan message carries it."""
        x_um, y_um, _, _ = self.field_um(0, 0)
        return x_um, y_um

    @property
    def extent_um(self) -> tuple[float, float, float, float]:
        """(x, y, width, height) covered by every cell of the grid."""
        x_um, y_um = self.edge_origin_um
        return (x_um, y_um, (self.cols - 1) * self.step_x_um + self.fov_width_um,
                (self.rows - 1) * self.step_y_um + self.fov_height_um)
