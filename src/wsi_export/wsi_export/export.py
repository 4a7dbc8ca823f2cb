"""export_slide: mosaic -> pyramidal OME-TIFF, OME-Zarr and/or DICOM WSI, streamed block by block.

Each level is cut into block jobs (see blocks.py) that run on a local thread pool or on a dask.distributed
cluster (executors.py); the caller's thread hands their encoded tiles, in file order, to the OME-TIFF
(ome_tiff_output.py) and to the level's DICOM instance (dicom_output.py). A job also writes its 2x reduction
into an uncompressed scratch file of the next level, so every level is read exactly once. A reduced level's
rows are encoded as soon as the rows above them are (see _Export._plan) and wait in a spill file for their
place in the file, so memory stays bounded by the number of blocks in flight, whatever the slide size.
Everything is written inside a hidden work directory next to the outputs and renamed into place only
when complete; the work directory a killed export leaves is removed later (work_dir.py)."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .blocks import BlockJob, BlockResult, PixelSource, plan_level_blocks
from .codecs import TileCodec, resolve_codec
from .dicom_output import DicomEquipment, DicomSeriesWriter, resolve_dicom_codec
from .errors import (ExportError, ExportOptionsError, ExportStorageError, MosaicDataError, MosaicInputError,
                     UnreadableChunkError)
from .follow import FollowingReader, StitchingProgress
from .executors import (DistributedExecutor, LocalExecutor, PlannedJob, check_not_cancelled, default_local_workers,
                        ordered_results)
from .mosaic import Mosaic, MosaicRegion, describe_regions, missing_regions, open_mosaic
from .ome_tiff_output import OmeTiffWriter
from .ome_zarr_output import create_ome_zarr
from .pyramid import LOWEST_LEVEL_MAX_EDGE_PX, pyramid_level_shapes, shrink_to_fit
from .region_reader import region_reader
from .scratch import ScratchLevel
from .slide_images import SlideImage
from .work_dir import OUTPUT_NAME_PATTERN, commit, create_work_dir, remove_stale_partials

FORMATS = ("ome-tiff", "ome-zarr", "dicom")
OUTPUT_SUFFIXES = {"ome-tiff": ".ome.tif", "ome-zarr": ".ome.zarr", "dicom": ".dicom"}  # dicom: a directory


@dataclass(frozen=True)
class ExportOptions:
    compression: str = "jpeg"  # one of codecs.COMPRESSIONS; with format dicom, one of DICOM_COMPRESSIONS
    quality: int = 90  # 1..100, jpeg and lossy jpeg2000
    lossless: bool = False  # jpeg -> deflate (DICOM: JPEG 2000 reversible), jpeg2000 -> reversible
    # JPEG chroma subsampling. The default (1, 1) keeps colour at full resolution, stored as RGB JPEG
    # (codecs.JPEG_SUBSAMPLINGS): a pathologist reads stain colour at the scale of a nucleus' edge, where
    # YCbCr 4:2:0 shifts it visibly. On a real H&E region at Q90 (bench/export.py, colour table) 4:2:0 is
    # off by CIEDE2000 2.3 on average and 13 at the 99th percentile, RGB JPEG by 0.13 and 1.5 (about one
    # just-noticeable difference). (2, 1) = 4:2:2 and (2, 2) = 4:2:0, stored as YCbCr, make the tiles
    # 1.9-2.4x smaller at that cost.
    jpeg_subsampling: tuple[int, int] = (1, 1)
    tile_size_px: int = 512  # TIFF tile, DICOM frame and OME-Zarr chunk edge, multiple of 16
    write_thumbnail: bool = True  # a "thumbnail" series (of the pyramid) in the OME-TIFF, a THUMBNAIL in DICOM
    thumbnail_max_edge_px: int = 256
    lowest_level_max_edge_px: int = LOWEST_LEVEL_MAX_EDGE_PX
    scheduler_address: str | None = None  # dask.distributed scheduler; None = local threads
    scheduler_timeout_s: float = 10.0
    local_workers: int | None = None  # local job threads; None = default_local_workers()
    block_width_tiles: int = 8  # job width in tiles (even); a job is 2 tile rows high
    # The only personal data written as metadata (OME Experimenter, DICOM Operators' Name), and only if
    # given. A label photo (export_slide's label) shows whatever the slide's label shows: pass one only
    # where the output may carry it.
    experimenter_name: str | None = None
    dicom_equipment: DicomEquipment = DicomEquipment()  # the scanner, as the DICOM output names it
    file_uuid: str | None = None  # OME UUID of the TIFF; None = random
    overwrite: bool = False
    # Export a mosaic that lacks pixels: one still being stitched (complete=False), or one with chunks
    # missing from its store (mosaic.missing_regions), which come out in the fill colour and are listed
    # in ExportResult.missing_regions. A chunk that is there but does not decode fails the export anyway.
    allow_partial_mosaic: bool = False
    # Export a mosaic while it is being stitched (follow.py): each region is read once the stitcher has
    # stored it, and the export ends after the stitcher has finished. It fails (StitchingStalledError) when
    # the stitcher stores nothing for stitching_stall_timeout_s. Needs the mosaic's path and local threads.
    follow_stitching: bool = False
    stitching_stall_timeout_s: float = 300.0


@dataclass(frozen=True)
class ExportProgress:
    format: str  # formats being written in this pass, comma-separated
    level: int  # 0 = full resolution
    levels_total: int
    fraction_done: float  # 0..1 over all levels, weighted by pixel count
    bytes_written: int  # encoded OME-TIFF tile and DICOM frame bytes so far (OME-Zarr only: pixel bytes stored)


@dataclass(frozen=True)
class ExportResult:
    output_paths: list[Path]  # in the order of the requested formats
    output_sizes_bytes: list[int]
    level_shapes: list[tuple[int, int]]  # (height_px, width_px) per level, full resolution first
    pixel_size_um: float  # full-resolution pixel size; level k is 2**k times larger
    duration_s: float
    missing_regions: list[MosaicRegion]  # exported in the fill colour (allow_partial_mosaic); else empty

    @property
    def levels(self) -> int:
        return len(self.level_shapes)


@dataclass
class _ProgressTracker:
    callback: Callable[[ExportProgress], None] | None
    format_label: str
    levels_total: int
    pixels_total: int
    pixels_done: int = 0
    bytes_written: int = 0

    def block_done(self, level: int, pixels: int, nbytes: int) -> None:
        self.pixels_done += pixels
        self.bytes_written += nbytes
        if self.callback is not None:
            self.callback(ExportProgress(self.format_label, level, self.levels_total,
                                         self.pixels_done / self.pixels_total, self.bytes_written))



def validate_export(name: str | None, formats: tuple[str, ...], options: ExportOptions) -> dict[str, TileCodec]:
    """Check an export's name (None: not known yet, it comes from the mosaic), formats and options before
    any pixel is read; return the tile codec of each requested format that stores encoded tiles."""
    if name is not None and (not isinstance(name, str) or not OUTPUT_NAME_PATTERN.fullmatch(name)):
        raise ExportOptionsError(f"output name {name!r} must be a plain file stem: letters, digits, "
                                 f"'.', '_', '-', starting with a letter or digit")
    if not formats:
        raise ExportOptionsError(f"formats is empty; expected any of {FORMATS}")
    for export_format in formats:
        if export_format not in FORMATS:
            raise ExportOptionsError(f"format {export_format!r} is not supported; expected any of {FORMATS}")
    if len(set(formats)) != len(formats):
        raise ExportOptionsError(f"formats {formats} lists a format twice")
    tile = options.tile_size_px
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16 or tile % 16:
        raise ExportOptionsError(f"tile_size_px={tile!r} must be a positive multiple of 16")
    if options.block_width_tiles < 2 or options.block_width_tiles % 2:
        raise ExportOptionsError(f"block_width_tiles={options.block_width_tiles} must be even and >= 2")
    for key in ("thumbnail_max_edge_px", "lowest_level_max_edge_px"):
        if getattr(options, key) < 16:
            raise ExportOptionsError(f"{key}={getattr(options, key)} must be >= 16")
    if options.follow_stitching and options.scheduler_address:
        raise ExportOptionsError(f"follow_stitching runs on local threads; scheduler_address="
                                 f"{options.scheduler_address!r} cannot be used with it")
    if options.stitching_stall_timeout_s <= 0:
        raise ExportOptionsError(f"stitching_stall_timeout_s={options.stitching_stall_timeout_s} must be > 0")
    if options.local_workers is not None and options.local_workers < 1:
        raise ExportOptionsError(f"local_workers={options.local_workers} must be >= 1")
    if options.file_uuid is not None:
        try:
            uuid.UUID(options.file_uuid)
        except ValueError as error:
            raise ExportOptionsError(f"file_uuid={options.file_uuid!r} is not a UUID") from error
    codec_options = (options.compression, options.quality, options.lossless, options.jpeg_subsampling)
    codecs = {"ome-tiff": resolve_codec(*codec_options)}  # checked whatever the formats
    if "dicom" in formats:
        codecs["dicom"] = resolve_dicom_codec(*codec_options)
    return {export_format: codec for export_format, codec in codecs.items() if export_format in formats}


def _path_size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


class _Export:
    def __init__(self, mosaic: Mosaic, output_dir: Path, name: str, formats: tuple[str, ...],
                 options: ExportOptions, codecs: dict[str, TileCodec], slide_images: dict[str, SlideImage],
                 progress: Callable[[ExportProgress], None] | None,
                 should_cancel: Callable[[], bool] | None, stitching: StitchingProgress | None):
        self.mosaic = mosaic
        self.stitching = stitching
        self.slide_images = slide_images
        self.output_dir = output_dir
        self.name = name
        self.formats = formats
        self.options = options
        self.tile_px = options.tile_size_px
        self.codecs = codecs
        # Every tile is encoded once per distinct codec; OME-TIFF and DICOM share the default JPEG tiles.
        self.distinct_codecs = tuple(dict.fromkeys(codecs.values()))
        self.should_cancel = should_cancel
        self.level_shapes = pyramid_level_shapes(mosaic.height_px, mosaic.width_px,
                                                 options.lowest_level_max_edge_px)
        self.final_paths = {f: output_dir / f"{name}{OUTPUT_SUFFIXES[f]}" for f in formats}
        self.tracker = _ProgressTracker(progress, ",".join(formats), len(self.level_shapes),
                                        sum(h * w for h, w in self.level_shapes))

    def pixel_size_um(self, level: int) -> float:
        return self.mosaic.metadata.pixel_size_um * 2 ** level

    def codec_index(self, export_format: str) -> int:
        """Where a format's encoding of a tile is in the tuples level_tiles yields."""
        return self.distinct_codecs.index(self.codecs[export_format])

    def thumbnail_pixel_size_um(self, width_px: int) -> float:
        """The thumbnail spans the full-resolution width."""
        return self.pixel_size_um(0) * self.level_shapes[0][1] / width_px

    def run(self, work_dir: Path, executor: Any) -> dict[str, Path]:
        """Write every requested output inside work_dir; return their temporary paths."""
        written = {f: work_dir / path.name for f, path in self.final_paths.items()}
        ome_zarr_levels = (create_ome_zarr(written["ome-zarr"], self.name, self.level_shapes,
                                           self.mosaic.metadata.pixel_size_um, self.tile_px)
                           if "ome-zarr" in written else None)
        level_sources = self._level_sources(work_dir)
        plan, level_rows = self._plan(level_sources, ome_zarr_levels)
        results = _ResultsByIndex(ordered_results(executor, plan, 2 * executor.parallelism + 1, self.should_cancel),
                                  work_dir / "reduced-levels.spill")

        written_codecs = [self.codec_index(f) for f in self.codecs]  # a codec two formats share, twice

        def level_tiles(level: int) -> Iterator[tuple[bytes, ...]]:
            """The level's tiles in file order (row by row), each as its encodings by distinct_codecs."""
            for row in level_rows[level]:
                row_results = [results.take(index) for index in row]
                for result in row_results:
                    encoded = sum(len(tile[index]) for tile_row in result.tile_rows for tile in tile_row
                                  for index in written_codecs)
                    self.tracker.block_done(level, result.pixel_count,
                                            encoded if self.codecs else result.pixel_count * 3)
                for tile_row_index in range(len(row_results[0].tile_rows)):
                    for result in row_results:
                        yield from result.tile_rows[tile_row_index]

        try:
            self._write_tiles(written, level_tiles, level_sources)
        finally:
            results.close()
        return written

    def _plan(self, level_sources: list[PixelSource], ome_zarr_levels: list[Any] | None
              ) -> tuple[list[PlannedJob], list[list[list[int]]]]:
        """All block jobs, and their plan indices per level and pair of tile rows.

        Rows [2jT, 2jT + 2T) of level k + 1 are written by the jobs of tile-row pairs 2j and 2j + 1 of
        level k, so those are the dependencies of level k + 1's row pair j, and the plan puts that row pair
        right after them: a reduced level is encoded while the levels above it are still read (its tiles
        wait in a spill file for their place in the file), so that little is left to do after the last
        full-resolution row, which matters when that row is stitched last (follow_stitching)."""
        blocks = [plan_level_blocks(h, w, self.tile_px, self.options.block_width_tiles) for h, w in self.level_shapes]
        plan: list[PlannedJob] = []
        level_rows: list[list[list[int]]] = [[] for _ in blocks]

        def add_row_pair(level: int, pair: int) -> None:
            above = level_rows[level - 1] if level else []
            depends_on = tuple(index for above_pair in (2 * pair, 2 * pair + 1)
                               if above_pair < len(above) for index in above[above_pair])
            indices = []
            for r0, c0, bh, bw in blocks[level][pair]:
                indices.append(len(plan))
                plan.append(PlannedJob(BlockJob(
                    source=level_sources[level], row0_px=r0, col0_px=c0, height_px=bh, width_px=bw,
                    tile_size_px=self.tile_px, codecs=self.distinct_codecs,
                    next_level=level_sources[level + 1] if level + 1 < len(level_sources) else None,
                    ome_zarr_level=ome_zarr_levels[level] if ome_zarr_levels else None), depends_on))
            level_rows[level].append(indices)
            if level + 1 < len(blocks) and (pair % 2 == 1 or pair == len(blocks[level]) - 1):
                add_row_pair(level + 1, pair // 2)

        for pair in range(len(blocks[0])):
            add_row_pair(0, pair)
        return plan, level_rows

    def _level_sources(self, work_dir: Path) -> list[PixelSource]:
        """Level 0 is the mosaic; each lower level is a scratch file in the work directory."""
        sources: list[PixelSource] = [region_reader(self.mosaic.image)]
        if self.stitching is not None:
            sources[0] = FollowingReader(sources[0], self.stitching, self.mosaic.image.shape)
        for level, (h, w) in enumerate(self.level_shapes[1:], start=1):
            sources.append(ScratchLevel(work_dir / f"level{level}.scratch", h, w, self.tile_px).create())
        return sources

    def _drop_scratch_level(self, level: int, level_sources: list[PixelSource]) -> None:
        """A scratch level is dead once its own blocks are done; the last one feeds the thumbnails."""
        if 0 < level < len(level_sources) - 1:
            level_sources[level].remove()

    def _associated_images(self, level_sources: list[PixelSource]) -> list[tuple[str, np.ndarray, float]]:
        """(series name, pixels, pixel size µm) of the images after the pyramid, in _associated_image_shapes order."""
        images = [(name, image.pixels, image.pixel_size_um) for name, image in self.slide_images.items()]
        if self.options.write_thumbnail:
            lowest = np.asarray(level_sources[-1][:, :])
            thumbnail = shrink_to_fit(lowest, self.options.thumbnail_max_edge_px)
            images.insert(0, ("thumbnail", thumbnail, self.thumbnail_pixel_size_um(thumbnail.shape[1])))
        return images

    def _associated_image_shapes(self) -> list[tuple[str, tuple[int, int], float]]:
        """(series name, (height_px, width_px), pixel size µm) of the images _associated_images gives, known
        before the pyramid is written. shrink_to_fit halves the thumbnail as the pyramid halves its levels."""
        images = [(name, image.pixels.shape[:2], image.pixel_size_um) for name, image in self.slide_images.items()]
        if self.options.write_thumbnail:
            shape = pyramid_level_shapes(*self.level_shapes[-1], self.options.thumbnail_max_edge_px)[-1]
            images.insert(0, ("thumbnail", shape, self.thumbnail_pixel_size_um(shape[1])))
        return images

    def _write_tiles(self, written: dict[str, Path], level_tiles: Callable[[int], Iterator[tuple[bytes, ...]]],
                     level_sources: list[PixelSource]) -> None:
        """Consume every level's tiles in file order into the OME-TIFF and the DICOM levels (those requested),
        then write the thumbnail and slide photos into both."""
        with contextlib.ExitStack() as stack:
            tiff = dicom = None
            if "ome-tiff" in written:
                tiff = stack.enter_context(OmeTiffWriter(
                    written["ome-tiff"], self.final_paths["ome-tiff"].name, self.options.file_uuid or str(uuid.uuid4()),
                    self.name, self.mosaic.metadata, self.level_shapes, self._associated_image_shapes(),
                    self.codecs["ome-tiff"], self.tile_px, self.options.experimenter_name))
            if "dicom" in written:
                dicom = DicomSeriesWriter(written["dicom"], self.mosaic.metadata, self.level_shapes[0],
                                          self.codecs["dicom"], self.tile_px, self.options.dicom_equipment,
                                          self.options.experimenter_name)
            for level, (h, w) in enumerate(self.level_shapes):
                tiles = level_tiles(level)
                with (dicom.pyramid_level(level, h, w, self.pixel_size_um(level)) if dicom
                      else contextlib.nullcontext()) as frames:
                    if frames is not None:
                        tiles = _passed_to(tiles, frames.write_frame, self.codec_index("dicom"))
                    if tiff is not None:
                        tiff_index = self.codec_index("ome-tiff")
                        tiff.write_level(level, h, w, self.pixel_size_um(level), (tile[tiff_index] for tile in tiles))
                    else:
                        for _ in tiles:
                            pass
                tiles.close()
                self._drop_scratch_level(level, level_sources)
            for name, pixels, pixel_size_um in self._associated_images(level_sources):
                if tiff is not None:
                    tiff.write_image(pixels, pixel_size_um)
                if dicom is not None and name == "thumbnail":
                    dicom.write_thumbnail(pixels)
                elif dicom is not None:
                    dicom.write_slide_photo(name, pixels, pixel_size_um)


class _ResultsByIndex:
    """Block results taken in any order from results that come in plan order: one taken before its turn in
    the file (a reduced level's, encoded early) waits in a spill file, so memory holds no more results than
    the jobs in flight."""

    def __init__(self, results: Iterator[BlockResult], spill_path: Path):
        self._results = results
        self._next_index = 0
        self._spilled: dict[int, BlockResult] = {}    # tiles as (offset, length) in the spill file
        self._spill = open(spill_path, "w+b")
        self._spill_end = 0

    def take(self, index: int) -> BlockResult:
        if index in self._spilled:
            return self._read(self._spilled.pop(index))
        while True:
            taken, result = self._next_index, next(self._results)
            self._next_index += 1
            if taken == index:
                return result
            self._spilled[taken] = self._write(result)

    def _write(self, result: BlockResult) -> BlockResult:
        return BlockResult([[tuple(self._append(encoded) for encoded in tile) for tile in tile_row]
                            for tile_row in result.tile_rows], result.pixel_count)

    def _append(self, data: bytes) -> tuple[int, int]:
        os.pwrite(self._spill.fileno(), data, self._spill_end)
        self._spill_end += len(data)
        return self._spill_end - len(data), len(data)

    def _read(self, spilled: BlockResult) -> BlockResult:
        return BlockResult([[tuple(os.pread(self._spill.fileno(), length, offset) for offset, length in tile)
                             for tile in tile_row] for tile_row in spilled.tile_rows], spilled.pixel_count)

    def close(self) -> None:
        self._results.close()   # cancels whatever is still queued
        self._spill.close()


def _passed_to(tiles: Iterator[tuple[bytes, ...]], write: Callable[[bytes], None],
               index: int) -> Iterator[tuple[bytes, ...]]:
    """The tiles, each handed to `write` (its encoding at `index`) as it goes by."""
    for tile in tiles:
        write(tile[index])
        yield tile


def _checked_missing_regions(mosaic: Mosaic, options: ExportOptions) -> list[MosaicRegion]:
    """The mosaic's regions without data (mosaic.missing_regions); MosaicDataError when there are any and
    the options do not allow a partial mosaic."""
    missing = missing_regions(mosaic)
    if missing and not options.allow_partial_mosaic:
        expected = ("a chunk under every tile it lists" if mosaic.metadata.composed_tiles
                    else "every chunk, as it does not list the tiles it was composed of")
        raise MosaicDataError(f"mosaic {mosaic.source_name!r} has no data in its store for {len(missing)} "
                              f"region(s): {describe_regions(missing)}; expected {expected}; pass "
                              f"allow_partial_mosaic=True to export it with those regions in the fill colour")
    return missing


def export_slide(mosaic: str | Path | Mosaic, output_dir: str | Path, name: str | None = None,
                 formats: tuple[str, ...] | list[str] = ("ome-tiff",),
                 options: ExportOptions = ExportOptions(),
                 progress: Callable[[ExportProgress], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 macro: SlideImage | None = None, label: SlideImage | None = None) -> ExportResult:
    """Export a mosaic (path of the shared Zarr contract, or a Mosaic from mosaic_from_array).

    Outputs are `<output_dir>/<name>.ome.tif`, `<name>.ome.zarr` and/or the directory `<name>.dicom` (a
    DICOM WSI series, see dicom_output.py), created atomically. `macro` (the photo of the whole slide, e.g.
    slide_images_from_manifest) and `label` become the OME-TIFF series of those names after the thumbnail,
    and the DICOM OVERVIEW and LABEL images; OME-Zarr has no place for them (its "labels" are segmentations).
    `progress` is called after every block with an ExportProgress; `should_cancel` is polled between
    blocks and makes the export raise ExportCancelled. Raises ExportOptionsError, MosaicInputError,
    ExportStorageError or ExportCancelled; on any error no output exists under a final name."""
    started = time.perf_counter()
    formats = tuple(formats)
    mosaic_path = None if isinstance(mosaic, Mosaic) else mosaic
    if mosaic_path is not None:
        mosaic = open_mosaic(mosaic_path)
    name = mosaic.source_name if name is None else name
    codecs = validate_export(name, formats, options)
    stitching = None
    if options.follow_stitching:
        if mosaic_path is None:
            raise ExportOptionsError("follow_stitching needs the mosaic's path (its stitcher's journal lies beside "
                                     "it), not a Mosaic object")
        stitching = StitchingProgress(mosaic_path, mosaic.image.chunks[:2], options.stitching_stall_timeout_s,
                                      should_cancel)
        missing = []    # known once the stitcher has finished
    else:
        if not mosaic.metadata.complete and not options.allow_partial_mosaic:
            raise MosaicInputError(f"mosaic {mosaic.source_name!r} is marked complete=False (still being "
                                   f"stitched); pass allow_partial_mosaic=True to export it anyway, or "
                                   f"follow_stitching=True to export it as the stitcher stores it")
        missing = _checked_missing_regions(mosaic, options)
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ExportStorageError(f"output directory {str(output_dir)!r} does not exist or is not a directory")
    slide_images = {series: image for series, image in (("macro", macro), ("label", label)) if image is not None}
    export = _Export(mosaic, output_dir, name, formats, options, codecs, slide_images, progress, should_cancel,
                     stitching)
    for path in export.final_paths.values():
        if path.exists() and not options.overwrite:
            raise ExportStorageError(f"output {str(path)!r} already exists; pass overwrite=True to replace it")

    try:
        remove_stale_partials(output_dir, name)
        work_dir, work_dir_lock = create_work_dir(output_dir, name)
    except OSError as error:
        raise ExportStorageError(error.errno, f"cannot create a work directory in {str(output_dir)!r}: "
                                              f"{error.strerror or error}") from error
    executor = None
    try:
        executor = (DistributedExecutor(options.scheduler_address, options.scheduler_timeout_s)
                    if options.scheduler_address
                    else LocalExecutor(options.local_workers or default_local_workers()))
        written = export.run(work_dir, executor)
        if stitching is not None:
            stitching.wait_until_finished()
            missing = _checked_missing_regions(open_mosaic(mosaic_path), options)
        check_not_cancelled(should_cancel)
        commit(written, export.final_paths, work_dir)
    except UnreadableChunkError as error:
        raise MosaicDataError(f"mosaic {mosaic.source_name!r}: the data of {mosaic.region(*error.region_px)} "
                              f"cannot be read: {error}; expected a chunk that decodes to "
                              f"{'x'.join(map(str, mosaic.image.chunks))} uint8 pixels") from error
    except ExportError:
        raise
    except OSError as error:
        raise ExportStorageError(error.errno, f"writing the export of {name!r} into {str(output_dir)!r} "
                                              f"failed: {error.strerror or error}") from error
    finally:
        if stitching is not None:
            stitching.abort()   # a block job still waiting for the stitcher ends now
        if executor is not None:
            executor.close()
        shutil.rmtree(work_dir, ignore_errors=True)
        os.close(work_dir_lock)
    paths = [export.final_paths[f] for f in formats]
    return ExportResult(output_paths=paths, output_sizes_bytes=[_path_size_bytes(p) for p in paths],
                        level_shapes=export.level_shapes, pixel_size_um=mosaic.metadata.pixel_size_um,
                        duration_s=time.perf_counter() - started, missing_regions=missing)
