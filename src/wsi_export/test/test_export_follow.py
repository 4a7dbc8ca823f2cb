"""An export that follows a mosaic while it is stitched: it starts before the first tile, writes most of the
slide while tiles still arrive, and ends with the same file an export after stitching writes."""
import threading
import time

import numpy as np
import pytest
import tifffile

from wsi_export.errors import ExportCancelled, ExportOptionsError
from wsi_export.export import ExportOptions, export_slide
from wsi_export.follow import StitchingStalledError
from wsi_export.mosaic import open_mosaic
from wsi_export.scratch import ScratchLevel
from wsi_stitching.simulation import SyntheticScan
from wsi_stitching.stitcher import MosaicStitcher, StitchParameters

# Narrow blocks and one worker: the full-resolution level has many more blocks than the export keeps in flight.
FOLLOW = ExportOptions(tile_size_px=256, write_thumbnail=False, follow_stitching=True, stitching_stall_timeout_s=30.0,
                       block_width_tiles=2, local_workers=1)


@pytest.fixture(scope="module")
def scan():
    """6 rows of 512 px tiles: the top block rows of the slide are final long before the last tile."""
    return SyntheticScan(6, 3, tile_px=512, overlap_fraction=0.1, jitter_px=6, seed=4)


def feed(stitcher, scan, cells, pause_s=0.0):
    for cell in cells:
        stitcher.add_tile(*cell, scan.tile(cell), *scan.stage_position_um(cell))
        time.sleep(pause_s)


def levels(path):
    with tifffile.TiffFile(path) as tiff:
        return [level.asarray() for level in tiff.series[0].levels]


def test_an_export_that_follows_the_stitcher_writes_the_slide_an_export_afterwards_writes(scan, tmp_path,
                                                                                         monkeypatch):
    import wsi_export.executors as executors
    mosaic_path = tmp_path / "slide.zarr"
    # The flat field from the first 6 tiles: chunks are composed from then on, not only at the last tile.
    stitcher = MosaicStitcher(scan.layout(), mosaic_path, StitchParameters(flat_field_min_tiles=6))
    (tmp_path / "following").mkdir()
    (tmp_path / "after").mkdir()
    blocks_done_at, reduced_blocks_run_at, outcome = [], [], {}

    def run_and_note_reduced_levels(job):
        result = run_block_job(job)
        if isinstance(job.source, ScratchLevel):
            reduced_blocks_run_at.append(time.monotonic())
        return result

    run_block_job = executors.run_block_job
    monkeypatch.setattr(executors, "run_block_job", run_and_note_reduced_levels)

    def follow():
        outcome["result"] = export_slide(mosaic_path, tmp_path / "following", "slide", ("ome-tiff",), FOLLOW,
                                         progress=lambda progress: blocks_done_at.append(time.monotonic()))

    exporter = threading.Thread(target=follow)
    exporter.start()                    # before the first tile: the mosaic exists, all fill colour
    *cells, last = scan.nominal_positions_px
    feed(stitcher, scan, cells, pause_s=0.2)
    last_tile_at = time.monotonic()
    feed(stitcher, scan, [last])
    stitcher.finish()
    exporter.join(timeout=120)
    assert not exporter.is_alive() and "result" in outcome
    assert sum(t < last_tile_at for t in blocks_done_at) >= 2      # slide written while tiles still arrived
    assert any(t < last_tile_at for t in reduced_blocks_run_at)     # and reduced levels encoded, too
    export_slide(mosaic_path, tmp_path / "after", "slide", ("ome-tiff",),
                 ExportOptions(tile_size_px=256, write_thumbnail=False))
    following, after = levels(tmp_path / "following" / "slide.ome.tif"), levels(tmp_path / "after" / "slide.ome.tif")
    assert [level.shape for level in following] == [level.shape for level in after]
    assert all(np.array_equal(a, b) for a, b in zip(following, after))
    assert outcome["result"].missing_regions == []
    assert open_mosaic(mosaic_path).metadata.complete


def test_a_stitcher_that_stops_storing_fails_the_export_after_the_stall_timeout_and_leaves_nothing(scan, tmp_path):
    mosaic_path = tmp_path / "slide.zarr"
    stitcher = MosaicStitcher(scan.layout(), mosaic_path)
    feed(stitcher, scan, [(0, 0), (0, 1)])     # then the scan dies: no more tiles, no finish
    (tmp_path / "out").mkdir()
    started = time.monotonic()
    with pytest.raises(StitchingStalledError, match="has stored nothing for"):
        export_slide(mosaic_path, tmp_path / "out", "slide", ("ome-tiff",),
                     ExportOptions(tile_size_px=256, follow_stitching=True, stitching_stall_timeout_s=1.0))
    assert time.monotonic() - started < 10
    assert list((tmp_path / "out").iterdir()) == []


def test_a_following_export_cancelled_while_it_waits_ends_at_once_and_leaves_nothing(scan, tmp_path):
    mosaic_path = tmp_path / "slide.zarr"
    MosaicStitcher(scan.layout(), mosaic_path)
    (tmp_path / "out").mkdir()
    cancel_at = time.monotonic() + 1.0
    with pytest.raises(ExportCancelled):
        export_slide(mosaic_path, tmp_path / "out", "slide", ("ome-tiff",), FOLLOW,
                     should_cancel=lambda: time.monotonic() > cancel_at)
    assert time.monotonic() - cancel_at < 5
    assert list((tmp_path / "out").iterdir()) == []


def test_following_needs_the_mosaic_path_and_local_threads(scan, tmp_path):
    mosaic_path = tmp_path / "slide.zarr"
    MosaicStitcher(scan.layout(), mosaic_path)
    with pytest.raises(ExportOptionsError, match="local threads"):
        export_slide(mosaic_path, tmp_path, "slide", ("ome-tiff",),
                     ExportOptions(follow_stitching=True, scheduler_address="tcp://127.0.0.1:8786"))
    with pytest.raises(ExportOptionsError, match="the mosaic's path"):
        export_slide(open_mosaic(mosaic_path), tmp_path, "slide", ("ome-tiff",), FOLLOW)
