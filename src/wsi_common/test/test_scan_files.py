import json

import numpy as np
import pytest
import tifffile

from wsi_common.scan_files import (JOURNAL_NAME, MANIFEST_NAME, Manifest, ManifestError, ManifestTile,
                                   ended_scan_status, last_capture_per_cell, load_tile_image, plan_record)
from wsi_common.tile_grid import TileGrid, field_of_view_um

GRID = TileGrid(rows=2, cols=3, origin_x_um=1_000.1, origin_y_um=2_000.2, step_x_um=57.6, step_y_um=57.6,
                fov_width_um=64.0, fov_height_um=64.0)


def capture(row, col, sequence, image=""):
    return {"sequence": sequence, "row": row, "col": col, "measured_x_um": 10.0 * col + sequence,
            "measured_y_um": 10.0 * row, "image": image}


def write(directory, document) -> Manifest:
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(document))
    return Manifest.read(path)


def journal_line(**entry) -> str:
    return json.dumps(entry) + "\n"


def test_a_running_scan_s_manifest_reads_on_through_its_journal_up_to_a_torn_last_line(tmp_path):
    (tmp_path / JOURNAL_NAME).write_text(
        journal_line(tiles=[capture(0, 0, 0)])                           # already in the manifest
        + journal_line(tiles=[capture(0, 1, 1)], refocus_count=0, duration_s=2.0)
        + journal_line(tiles=[capture(0, 1, 2)], focus_checks=[{"kind": "correction"}], refocus_count=1,
                       duration_s=3.0)
        + '{"tiles": [{"row": 1')                                        # killed while writing
    manifest = write(tmp_path, {"status": "running", "tiles": [capture(0, 0, 0)], "refocus_count": 0,
                                "journal": {"path": JOURNAL_NAME, "lines_included": 1}})
    assert [entry["sequence"] for entry in manifest.document["tiles"]] == [0, 1, 2]
    assert manifest.document["focus_checks"] == [{"kind": "correction"}]
    assert manifest.document["refocus_count"] == 1 and manifest.document["duration_s"] == 3.0
    assert "journal" not in manifest.document


def test_a_manifest_whose_journal_is_gone_holds_everything_itself(tmp_path):
    manifest = write(tmp_path, {"tiles": [capture(0, 0, 0)], "journal": {"path": JOURNAL_NAME, "lines_included": 0}})
    assert [entry["sequence"] for entry in manifest.document["tiles"]] == [0]


def test_a_malformed_journal_line_is_named(tmp_path):
    (tmp_path / JOURNAL_NAME).write_text(journal_line(tiles=[]) + "[1, 2]\n" + journal_line(tiles=[]))
    with pytest.raises(ManifestError, match=f"journal .*{JOURNAL_NAME} line 2 is malformed"):
        write(tmp_path, {"journal": {"path": JOURNAL_NAME, "lines_included": 0}})


def test_the_last_capture_of_a_cell_wins_in_the_order_the_cells_were_first_taken():
    captures = [capture(0, 0, 0), capture(0, 1, 1), capture(0, 1, 2), capture(1, 1, 3), capture(0, 0, 4)]
    kept = last_capture_per_cell(captures, lambda entry: (entry["row"], entry["col"]))
    assert list(kept) == [(0, 0), (0, 1), (1, 1)]
    assert [entry["sequence"] for entry in kept.values()] == [4, 2, 3]


def test_a_manifest_keeps_the_last_capture_of_every_cell(tmp_path):
    for name in ("first.tif", "refocused.tif", "other.tif"):
        (tmp_path / name).write_bytes(b"")
    manifest = write(tmp_path, {"tiles": [capture(0, 0, 0, "first.tif"), capture(0, 0, 1, "refocused.tif"),
                                          capture(0, 1, 2, "other.tif")]})
    assert {cell: entry["sequence"] for cell, entry in manifest.final_captures().items()} == {(0, 0): 1, (0, 1): 2}
    assert manifest.tiles() == [ManifestTile(0, 0, 1.0, 0.0, tmp_path / "refocused.tif"),
                                ManifestTile(0, 1, 12.0, 0.0, tmp_path / "other.tif")]


def test_the_plan_a_manifest_records_reads_back_as_the_same_grid(tmp_path):
    tile_px, pixel_size_um = 256, 0.25
    grid = TileGrid(GRID.rows, GRID.cols, GRID.origin_x_um, GRID.origin_y_um, GRID.step_x_um, GRID.step_y_um,
                    *field_of_view_um(tile_px, tile_px, pixel_size_um))
    record = plan_record(grid, [(0, 0), (0, 1), (1, 1)], [(1, 0)])
    manifest = write(tmp_path, {"tile_width_px": tile_px, "tile_height_px": tile_px, "pixel_size_um": pixel_size_um,
                                "plan": json.loads(json.dumps(record))})
    plan = manifest.plan()
    assert plan.grid == grid
    assert plan.tiles == [(0, 0), (0, 1), (1, 1)] and plan.skipped_empty == [(1, 0)]
    assert write(tmp_path, {"plan": None}).plan() is None


@pytest.mark.parametrize("content, message", [
    (None, "cannot read manifest .*manifest.json: .*No such file"),
    ("{", "cannot read manifest .*manifest.json: Expecting property name"),
    ("[]", "manifest .*manifest.json holds a JSON list; expected an object"),
])
def test_a_manifest_that_cannot_be_read_is_named(tmp_path, content, message):
    if content is not None:
        (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match=message):
        Manifest.read(tmp_path / MANIFEST_NAME)


@pytest.mark.parametrize("document, read, message", [
    ({"tiles": [{"row": 0, "col": 0}]}, Manifest.tiles,
     r"manifest .*manifest.json tile #0 is malformed \('measured_x_um'\); expected keys row, col, measured_x_um"),
    ({"tiles": [capture(0, 0, 0, "gone.tif")]}, Manifest.tiles,
     "manifest .*manifest.json tile #0 image .*gone.tif does not exist"),
    ({"tiles": [{"sequence": 0}]}, Manifest.final_captures,
     "manifest .*manifest.json lists a tile without its grid cell .*; expected keys row and col"),
    ({"tile_width_px": 64, "tile_height_px": 64, "pixel_size_um": 0.5, "plan": {"rows": 2}}, Manifest.plan,
     "manifest .*manifest.json plan is malformed .*'cols'.*; expected rows, cols, tiles"),
    ({"plan": plan_record(GRID, [], [])}, Manifest.plan,
     "manifest .*manifest.json plan is malformed .*'tile_width_px'.*tile_width_px, tile_height_px and pixel_size_um"),
    ({"overview": {"image": "overview.tif"}}, Manifest.slide_images,
     "manifest .*manifest.json 'overview' entry .* is malformed .*; expected keys image and pixel_size_um"),
    ({"scan_id": "s"}, lambda manifest: manifest.require(("scan_id", "tiles")),
     r"manifest .*manifest.json lacks keys \['tiles'\]; expected all of \['scan_id', 'tiles'\]"),
])
def test_a_malformed_manifest_names_the_file_and_what_was_expected(tmp_path, document, read, message):
    manifest = write(tmp_path, document)
    with pytest.raises(ManifestError, match=message):
        read(manifest)


def test_the_manifest_tells_a_running_scan_from_one_that_has_ended(tmp_path):
    path = tmp_path / MANIFEST_NAME
    assert ended_scan_status(path) is None          # not written yet: planning
    for status, ended in (("running", None), ("complete", "complete"), ("canceled", "canceled")):
        path.write_text(json.dumps({"status": status}))
        assert ended_scan_status(path) == ended


def test_tile_images_are_read_from_npy_and_tiff_files(tmp_path):
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    np.save(tmp_path / "tile.npy", pixels)
    tifffile.imwrite(tmp_path / "tile.tif", pixels, photometric="rgb")
    np.testing.assert_array_equal(load_tile_image(tmp_path / "tile.npy"), pixels)
    np.testing.assert_array_equal(load_tile_image(tmp_path / "tile.tif"), pixels)
    with pytest.raises(ManifestError, match=r"tile image .*tile.png has unsupported type '.png'; expected .npy"):
        load_tile_image(tmp_path / "tile.png")
