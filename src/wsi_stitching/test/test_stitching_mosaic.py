"""End-to-end stitching into the Zarr mosaic: accuracy, QC report, outliers, fallback, seams,
resume after an interruption, bad tiles and the manifest entry point."""
import json

import numpy as np
import pytest
import zarr
from scipy import ndimage

import wsi_stitching.stitcher as stitcher_module
from wsi_common.scan_files import ManifestError
from wsi_stitching.compose import CHUNK_PX, PlacedTile, compose_chunk
from wsi_stitching.errors import BadTileError, DuplicateTileError, ResumeError
from wsi_stitching.layout import TileGridLayout
from wsi_stitching.registration import PairRegistration, register_pair
from wsi_stitching.simulation import SyntheticScan, border_steps
from wsi_stitching.stitcher import MosaicStitcher, StitchParameters, stitch_manifest

EMPTY = (3, 4)


@pytest.fixture(scope="module")
def scan():
    return SyntheticScan(4, 5, tile_px=384, overlap_fraction=0.2, jitter_px=10, seed=3, empty_cells=(EMPTY,))


@pytest.fixture(scope="module")
def tiles(scan):
    return {cell: scan.tile(cell) for cell in scan.nominal_positions_px}


def _stitch(scan, tiles, path, parameters=StitchParameters(flat_field_min_tiles=12), order=None, stop_after=None):
    layout = scan.layout()
    stitcher = MosaicStitcher(layout, path, parameters)
    in_memory = []
    for count, cell in enumerate(order or layout.cells):
        if stop_after is not None and count == stop_after:
            return stitcher, None, in_memory
        x_um, y_um = scan.stage_position_um(cell)
        stitcher.add_tile(*cell, tiles[cell], x_um, y_um)
        in_memory.append(stitcher.tiles_in_memory)
    return stitcher, stitcher.finish(), in_memory


def _position_errors(scan, result, cells):
    error = np.array([np.subtract(result.positions_px[c], scan.true_positions_px[c]) for c in cells])
    return np.linalg.norm(error - error.mean(axis=0), axis=1)


@pytest.fixture(scope="module")
def stitched(scan, tiles, tmp_path_factory):
    path = tmp_path_factory.mktemp("mosaic") / "slide.zarr"
    return _stitch(scan, tiles, path)


def test_positions_are_sub_pixel_accurate(scan, stitched):
    _, result, _ = stitched
    textured = [c for c in scan.nominal_positions_px if c != EMPTY]
    errors = _position_errors(scan, result, textured)
    assert np.sqrt(np.mean(errors ** 2)) < 0.15
    assert errors.max() < 0.5


def test_mosaic_follows_the_shared_contract(scan, stitched):
    _, result, _ = stitched
    group = zarr.open_group(str(result.mosaic_path), mode="r")
    image = group["image"]
    assert image.shape == (result.height_px, result.width_px, 3) and image.dtype == np.uint8
    assert image.chunks == (CHUNK_PX, CHUNK_PX, 3) and image.fill_value == 255
    attributes = group.attrs["wsi_mosaic"]
    assert attributes["complete"] is True and attributes["pixel_size_um"] == scan.pixel_size_um
    assert {"version", "objective_magnification", "numerical_aperture", "acquisition_datetime",
            "scan_id"} <= set(attributes)
    assert image[0, 0].tolist() == [255, 255, 255]  # margin outside every tile is fill


def test_memory_stays_bounded_by_about_two_rows(scan, stitched):
    stitcher, _, in_memory = stitched
    assert max(in_memory) <= 2 * scan.cols + 4   # + 1: the last tile's chunks are written while the next registers
    assert in_memory[-1] < max(in_memory) and stitcher.tiles_in_memory == 0


def test_empty_glass_tile_falls_back_to_its_stage_position(scan, stitched):
    stitcher, result, _ = stitched
    report = json.loads(result.report_path.read_text())
    placement = {(t["row"], t["col"]): t["placement"] for t in report["tiles"]}
    assert placement[EMPTY] == "stage_position"
    assert result.tiles_at_stage_position == 1
    assert np.allclose(result.positions_px[EMPTY], stitcher._stage_px[EMPTY])
    glass_edges = [e for e in report["edges"] if EMPTY in (tuple(e["a"]), tuple(e["b"]))]
    assert glass_edges and all(e["status"] == "dropped" and e["reason"] == "low_texture" for e in glass_edges)


def test_qc_report_lists_every_pair_with_confidence_and_residual(stitched):
    _, result, _ = stitched
    report = json.loads(result.report_path.read_text())
    assert len(report["edges"]) == result.pairs_total == 4 * 4 + 3 * 5
    kept = [e for e in report["edges"] if e["status"] == "kept"]
    assert all(e["residual_px"] < 0.5 and e["ncc"] > 0.5 for e in kept)
    assert report["summary"]["residual_rms_px"] == pytest.approx(result.residual_rms_px)


def test_injected_wrong_link_is_dropped_and_does_not_propagate(scan, tiles, tmp_path, monkeypatch):
    wrong_pair = ((1, 1), (1, 2))

    def register_with_one_wrong_link(image_a, image_b, stage_offset_px, search_limit_px, parameters):
        result = register_pair(image_a, image_b, stage_offset_px, search_limit_px, parameters)
        if np.allclose(stage_offset_px, np.subtract(scan.nominal_positions_px[wrong_pair[1]],
                                                    scan.nominal_positions_px[wrong_pair[0]])) \
                and image_a is tiles[wrong_pair[0]]:
            dy, dx = result.offset_px
            return PairRegistration((dy + 7.0, dx - 5.0), result.stage_offset_px, 50.0, 0.95,
                                    result.texture, result.overlap_px, True, "")
        return result

    monkeypatch.setattr(stitcher_module, "register_pair", register_with_one_wrong_link)
    _, result, _ = _stitch(scan, tiles, tmp_path / "outlier.zarr")
    report = json.loads(result.report_path.read_text())
    edge = next(e for e in report["edges"] if (tuple(e["a"]), tuple(e["b"])) == wrong_pair)
    assert edge["status"] == "dropped" and edge["reason"] == "outlier_residual" and edge["residual_px"] > 5
    textured = [c for c in scan.nominal_positions_px if c != EMPTY]
    assert _position_errors(scan, result, textured).max() < 0.5


def _seam_statistics(scan, result):
    image = zarr.open_group(str(result.mosaic_path), mode="r")["image"][:]
    offsets = [np.subtract(scan.true_positions_px[c], np.round(result.positions_px[c])) for c in result.positions_px]
    offset = tuple(int(v) for v in np.round(np.median(offsets, axis=0)))
    return border_steps(image, scan, result.positions_px, offset)


def test_feathered_flat_field_corrected_seams_are_within_noise(scan, tiles, stitched, tmp_path):
    _, result, _ = stitched
    steps = _seam_statistics(scan, result)
    assert steps["seam"].mean() < 1.5 * steps["interior"].mean() + 0.5
    raw_path = tmp_path / "raw.zarr"
    _, raw, _ = _stitch(scan, tiles, raw_path, StitchParameters(blending="none", flat_field="none"))
    raw_steps = _seam_statistics(scan, raw)
    assert raw_steps["seam"].mean() > 2 * steps["seam"].mean()  # the metric does see real seams


def test_sharpness_blending_prefers_the_sharper_tile():
    rng = np.random.default_rng(0)
    sharp = np.clip(rng.normal(128, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
    blurred = ndimage.uniform_filter(sharp, size=(5, 5, 1))
    maps = {id(sharp): np.full((32, 32), 100.0, np.float32), id(blurred): np.full((32, 32), 10.0, np.float32)}
    placed = [PlacedTile(sharp, 0, 0, maps[id(sharp)]), PlacedTile(blurred, 0, 32, maps[id(blurred)])]
    block = compose_chunk(0, 0, 64, 96, placed, None, "sharpness", 32.0).astype(float)
    overlap = (slice(8, 56), slice(36, 60))
    assert np.abs(block[overlap] - sharp[overlap]).mean() < 0.5 * np.abs(block[overlap] - blurred[:, 4:28][8:56]).mean() + 1


def test_resume_after_interruption_continues_and_matches(scan, tiles, stitched, tmp_path):
    _, reference, _ = stitched
    path = tmp_path / "resumed.zarr"
    interrupted, _, _ = _stitch(scan, tiles, path, stop_after=14)
    interrupted._writers.shutdown(wait=True)   # the last tile's chunks reach the store but not the journal
    interrupted.journal.close()
    journal_path = interrupted.journal.path
    with open(journal_path, "a") as journal:
        journal.write('{"type": "chunks", "indi')  # torn line from a crash mid-write
    composed_before = len(interrupted._composed)
    assert composed_before > 0
    resumed = MosaicStitcher(scan.layout(), path, StitchParameters(flat_field_min_tiles=12))
    assert len(resumed._composed) == composed_before
    written = 0
    for cell in scan.layout().cells:
        x_um, y_um = scan.stage_position_um(cell)
        written += resumed.add_tile(*cell, tiles[cell], x_um, y_um)
    result = resumed.finish()
    first = zarr.open_group(str(reference.mosaic_path), mode="r")["image"][:]
    second = zarr.open_group(str(result.mosaic_path), mode="r")["image"][:]
    assert np.array_equal(first, second)
    assert result.positions_px == reference.positions_px
    total_chunks = len(resumed._composed)
    assert written + composed_before <= total_chunks + 1  # finish() may add the final chunks
    assert written < total_chunks


def test_resume_with_a_different_layout_is_refused(scan, tiles, tmp_path):
    path = tmp_path / "other.zarr"
    _stitch(scan, tiles, path, stop_after=3)
    other = SyntheticScan(4, 5, tile_px=384, overlap_fraction=0.25, seed=3).layout()
    with pytest.raises(ResumeError, match="different layout"):
        MosaicStitcher(other, path, StitchParameters(flat_field_min_tiles=12))
    with pytest.raises(ResumeError, match="resume=False"):
        MosaicStitcher(scan.layout(), path, StitchParameters(flat_field_min_tiles=12), resume=False)


def test_bad_tiles_raise_specific_errors_and_are_skipped(scan, tiles, tmp_path):
    layout = scan.layout()
    stitcher = MosaicStitcher(layout, tmp_path / "bad.zarr", StitchParameters(flat_field_min_tiles=12))
    x_um, y_um = scan.stage_position_um((0, 0))
    with pytest.raises(BadTileError, match="shape"):
        stitcher.add_tile(0, 0, tiles[(0, 0)][:100], x_um, y_um)
    with pytest.raises(BadTileError, match="dtype"):
        stitcher.add_tile(0, 0, tiles[(0, 0)].astype(np.uint16), x_um, y_um)
    with pytest.raises(BadTileError, match="not a planned grid cell"):
        stitcher.add_tile(9, 9, tiles[(0, 0)], x_um, y_um)
    with pytest.raises(BadTileError, match="planned position"):
        stitcher.add_tile(0, 0, tiles[(0, 0)], x_um + 1000.0, y_um)
    stitcher.add_tile(0, 0, tiles[(0, 0)], x_um, y_um)
    with pytest.raises(DuplicateTileError):
        stitcher.add_tile(0, 0, tiles[(0, 0)], x_um, y_um)
    for cell in layout.cells[1:]:
        stitcher.add_tile(*cell, tiles[cell], *scan.stage_position_um(cell))
    assert stitcher.finish().tiles_composed == len(layout.cells)


def test_manifest_entry_point_stitches_a_finished_scan(scan, tiles, tmp_path):
    entries = []
    for (row, col), image in tiles.items():
        name = f"tile_{row}_{col}.npy"
        np.save(tmp_path / name, image)
        x_um, y_um = scan.stage_position_um((row, col))
        entries.append({"row": row, "col": col, "measured_x_um": x_um, "measured_y_um": y_um, "image": name})
    manifest = {"scan_id": "manifest-scan", "pixel_size_um": scan.pixel_size_um,
                "tile_width_px": scan.tile_px, "tile_height_px": scan.tile_px, "tiles": entries}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    result = stitch_manifest(tmp_path / "manifest.json", tmp_path / "from_manifest.zarr")
    textured = [c for c in scan.nominal_positions_px if c != EMPTY]
    assert _position_errors(scan, result, textured).max() < 0.5
    del manifest["tile_width_px"]
    (tmp_path / "broken.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="tile_width_px"):
        stitch_manifest(tmp_path / "broken.json", tmp_path / "broken.zarr")


def test_layout_rejects_cells_outside_the_grid():
    with pytest.raises(ValueError, match="outside"):
        TileGridLayout("s", 2, 2, 64, 64, 0.5, {(2, 0): (0.0, 0.0)})


def test_two_tile_scan_is_composed_without_flat_field_estimate(scan, tiles, tmp_path):
    cells = [(0, 0), (0, 1)]
    full = scan.layout()
    layout = TileGridLayout(full.scan_id, 1, 2, full.tile_height_px, full.tile_width_px, full.pixel_size_um,
                            {cell: full.nominal_positions_um[cell] for cell in cells})
    stitcher = MosaicStitcher(layout, tmp_path / "two.zarr")
    for cell in cells:
        stitcher.add_tile(*cell, tiles[cell], *scan.stage_position_um(cell))
    result = stitcher.finish()
    image = zarr.open_group(str(result.mosaic_path), mode="r")["image"][:]
    assert result.tiles_composed == 2 and result.tiles_at_stage_position == 0
    for cell in cells:
        top, left = (int(round(v)) for v in result.positions_px[cell])
        footprint = image[top:top + scan.tile_px, left:left + scan.tile_px]
        assert (footprint != 255).any(axis=2).mean() > 0.99


class _DiskFullOnce:
    """The mosaic's chunk writer, except that storing the first chunk fails once, as on a full disk."""

    def __init__(self, chunk_writer, chunk):
        self.chunk_writer, self.chunk, self.failed = chunk_writer, chunk, False

    def write(self, chunk_row, chunk_col, block):
        if (chunk_row, chunk_col) == self.chunk and not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        self.chunk_writer.write(chunk_row, chunk_col, block)


def test_a_chunk_that_cannot_be_stored_is_reported_and_written_with_the_next_tile(scan, tiles, stitched, tmp_path):
    _, reference, _ = stitched
    stitcher = MosaicStitcher(scan.layout(), tmp_path / "full.zarr", StitchParameters(flat_field_min_tiles=12))
    stitcher._chunk_writer = _DiskFullOnce(stitcher._chunk_writer, (0, 0))
    failures = []
    for cell in scan.layout().cells:
        try:
            stitcher.add_tile(*cell, tiles[cell], *scan.stage_position_um(cell))
        except OSError as error:
            failures.append((cell, error))
            assert (0, 0) not in stitcher._composed   # not journaled: a resume would compose it again
    result = stitcher.finish()
    assert len(failures) == 1 and "No space left" in str(failures[0][1])
    chunks = [tuple(c) for line in stitcher.journal.path.read_text().splitlines()
              if json.loads(line)["type"] == "chunks" for c in json.loads(line)["indices"]]
    assert sorted(chunks) == sorted(set(chunks)) and (0, 0) in chunks
    np.testing.assert_array_equal(zarr.open_group(str(result.mosaic_path), mode="r")["image"][:],
                                  zarr.open_group(str(reference.mosaic_path), mode="r")["image"][:])
