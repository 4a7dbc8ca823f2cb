"""Scanning a slide: overview → tissue detection → tile plan → focus map → tiles, with a manifest.

ROS-free: the orchestrator node gives the runner a hardware backend and callbacks (publish a tile,
ask the autofocus for an estimate, report progress, check for cancel). Every captured tile is
recorded in the manifest (its journal line written and flushed to the disk after each tile; see
`wsi_common.scan_files`) and its image saved, so a cancelled, failed or killed scan leaves everything
captured so far readable. Every file is written atomically, so a disk that fills up leaves no truncated
file under a final name, and the manifest lists only tiles whose files are complete.
"""
import contextlib
import enum
import json
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import tifffile

from wsi_acquisition.focus import (AUTOFOCUS, AUTOFOCUS_PROBE, AUTOFOCUS_TWO_SHOT, BRACKET, FOCUS_MAP, OTHER_WAY,
                                   correction_captures, focus_action, kept_capture, probe_step_um, sharpness_gain,
                                   side_from_probe, two_shot_offset)
from wsi_acquisition.hardware import CameraError, Frame, MicroscopeBackend, ReadOut
from wsi_acquisition.planning import (FocusMap, NoTissueError, PlanningError, TilePlan, choose_focus_points,
                                      default_focus_point_count, detect_tissue, focus_sweeps, plan_tiles)
from wsi_acquisition.scan_request import FocusStrategy, ScanError, ScanErrorCode, ScanRequest
from wsi_acquisition.stage import StageFault, StageLimitError
from wsi_common.focus_metrics import MIN_FOCUS_PEAK_CONTRAST, brenner, refine_peak, unclear_peak, unstained_at_focus
from wsi_common.scan_files import JOURNAL_NAME, plan_record


class State(enum.IntEnum):
    """Mirrors ScanStatus.STATE_*."""
    IDLE = 0
    OVERVIEW = 1
    PLANNING = 2
    FOCUS_MAP = 3
    ACQUIRING = 4
    FINISHING = 5
    SUCCEEDED = 6
    CANCELED = 7
    FAILED = 8
    CALIBRATING = 9


@dataclass(frozen=True)
class FocusReply:
    """What the autofocus said about one image: the signed defocus and, separately, how far from focus
    and on which side (the side can be in doubt while the distance is not). Replies that give only
    the signed estimate have distance |defocus| with the same uncertainty and a side taken as known."""
    defocus_um: float
    uncertainty_um: float
    distance_um: float | None = None
    distance_uncertainty_um: float | None = None
    above_focus_probability: float | None = None

    def __post_init__(self):
        if self.distance_um is None:
            object.__setattr__(self, "distance_um", abs(self.defocus_um))
        if self.distance_uncertainty_um is None:
            object.__setattr__(self, "distance_uncertainty_um", self.uncertainty_um)
        if self.above_focus_probability is None:
            object.__setattr__(self, "above_focus_probability", 1.0 if self.defocus_um > 0 else 0.0)


@dataclass
class TileRecord:
    sequence: int
    row: int
    col: int
    is_recapture: bool
    commanded_x_um: float
    commanded_y_um: float
    commanded_z_um: float
    measured_x_um: float
    measured_y_um: float
    measured_z_um: float
    focus_map_z_um: float
    applied_focus_offset_um: float
    pixel_size_um: float
    exposure_ms: float
    gain: float
    captured_s: float = 0.0                # seconds since the scan started
    image: str = ""                        # path relative to the scan directory
    predicted_defocus_um: float | None = None
    predicted_uncertainty_um: float | None = None
    ground_truth: dict | None = None       # simulation: true pose, focal z, defocus
    focus_source: str = FOCUS_MAP       # where this image's z came from: one of focus.FOCUS_SOURCES
    sharpness: float | None = None         # normalised Brenner gradient (`wsi_common.focus_metrics.brenner`)
    sharpness_gain: float | None = None    # a correction: its sharpness over the focus map capture's, - 1
    # A capture where a correction and the focus map's capture bracket focus: that correction's z offset.
    bracketed_from_offset_um: float | None = None
    # A capture the same distance the other way after a correction lost sharpness: that correction's z offset.
    other_way_from_offset_um: float | None = None


@dataclass
class ScanProgress:
    state: State
    tiles_done: int = 0
    tiles_total: int = 0
    refocus_count: int = 0
    elapsed_s: float = 0.0
    eta_s: float = -1.0
    current: tuple[int, int] = (0, 0)


@dataclass
class ScanOutcome:
    scan_dir: Path
    manifest_path: Path
    plan: TilePlan | None
    records: list[TileRecord] = field(default_factory=list)
    # Images that are not tiles: corrections not kept (not sharper) and side probes; none is lost.
    focus_checks: list[dict] = field(default_factory=list)
    focus_sweeps: list[dict] = field(default_factory=list)    # the focus map's z-sweeps, kept on disk
    autofocus_calibration: dict | None = None
    refocus_count: int = 0
    tiles_failed: int = 0
    duration_s: float = 0.0


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through a hidden temporary beside it, flushed to the disk, then renamed over it: a
    reader, or a scan killed or out of space half-way, finds the old file or the whole new one, never a
    truncated one. A failed write removes its temporary."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def _write_tiff(path: Path, image: np.ndarray) -> None:
    _write_atomically(path, lambda handle: tifffile.imwrite(handle, image, photometric="rgb"))


def _storage_error(what: str, path: Path, error: OSError) -> ScanError:
    """What could not be written, where, why, and the space left there (a short write from numpy carries
    no errno, so a full disk shows only through the free space)."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB free there"
    except OSError:
        free = "free space unknown"
    return ScanError(ScanErrorCode.STORAGE, f"cannot save {what} as {path}: {error.strerror or error} ({free})")


def _ground_truth(frame: Frame) -> dict | None:
    """Simulation only: the true pose, focal z and defocus of a frame."""
    if math.isnan(frame.ground_truth_defocus_um):
        return None
    return {"x_um": frame.true_x_um, "y_um": frame.true_y_um, "z_um": frame.true_z_um,
            "focal_z_um": frame.focal_z_um, "defocus_um": frame.ground_truth_defocus_um}


class ScanRunner:
    def __init__(self, backend: MicroscopeBackend, request: ScanRequest,
                 publish_tile: Callable[[TileRecord, Frame], None] = lambda record, frame: None,
                 estimate_focus: Callable[[TileRecord, Frame], FocusReply | None] | None = None,
                 on_progress: Callable[[ScanProgress], None] = lambda progress: None,
                 should_cancel: Callable[[], bool] = lambda: False,
                 on_plan: Callable[[TilePlan], None] = lambda plan: None,
                 estimate_image: Callable[..., FocusReply | None] | None = None,
                 calibrate_focus: Callable[[Path], dict] | None = None,
                 retries: int = 2, z_approach_um: float = 5.0, min_focus_contrast: float = MIN_FOCUS_PEAK_CONTRAST,
                 clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self.request = request
        self.publish_tile = publish_tile
        self.estimate_focus = estimate_focus
        self.on_progress = on_progress
        self.should_cancel = should_cancel
        self.on_plan = on_plan
        # An image that is not a tile (a side probe, a correction before it is kept): estimate_image(frame), or
        # with a second exposure of the same field step µm higher, estimate_image(frame, frame_above, step).
        self.estimate_image = estimate_image
        self.calibrate_focus = calibrate_focus      # scan directory -> what the calibration reported
        self.retries = retries
        self.z_approach_um = z_approach_um
        self.min_focus_contrast = min_focus_contrast     # coarse-sweep peak over its median
        self.clock = clock
        self.scan_dir = request.scan_dir
        self.outcome = ScanOutcome(self.scan_dir, request.manifest_path, None)
        self._progress = ScanProgress(State.IDLE)
        self._started = clock()
        self._status, self._error = "running", ""
        self._overview: dict | None = None
        self._journal_lines = 0
        self._recorded = (0, 0)         # the tiles and focus checks the manifest and its journal hold
        self._stage_at: tuple[float, float, float] | None = None   # the last target reached; None: not known
        # The stage heads for the next tile while the camera reads the last one out.
        self._mover = ThreadPoolExecutor(1, "scan-stage")
        self._moving: Future | None = None

    # -- planning ------------------------------------------------------------------------------
    def plan(self) -> TilePlan:
        request = self.request
        self._report(State.OVERVIEW)
        overview = self.backend.overview() if (request.region_um is None or request.skip_empty_tiles) else None
        if overview is not None:
            self._save_overview(overview)
        self._report(State.PLANNING)
        tissue = None
        if overview is not None:
            tissue = detect_tissue(overview.image_rgb8, overview.pixel_size_um, overview.origin_x_um,
                                   overview.origin_y_um)
        region = request.region_um
        if region is None:
            box = tissue.bounding_box_um if tissue is not None else None
            if box is None:
                raise ScanError(ScanErrorCode.NO_TISSUE, "tissue detection found no tissue on the slide")
            region = box
        limits = self.backend.stage.limits
        fov_width, fov_height = self.backend.field_of_view_um()
        try:
            plan = plan_tiles(*region, fov_width, fov_height, request.overlap_fraction,
                              (limits.x_min_um, limits.y_min_um, limits.x_max_um, limits.y_max_um),
                              tissue=tissue if request.skip_empty_tiles else None)
        except PlanningError as error:
            raise ScanError(ScanErrorCode.INVALID_GOAL, str(error)) from error
        if not plan.tiles:
            raise ScanError(ScanErrorCode.NO_TISSUE, f"no tissue in the region {region} µm")
        return plan

    def _save_overview(self, overview) -> None:
        """The macro image goes beside the tiles: the QC report and the export's overview series use it."""
        self._save_image("overview.tif", overview.image_rgb8, "the overview")
        self._overview = {"image": "overview.tif", "pixel_size_um": overview.pixel_size_um,
                          "origin_x_um": overview.origin_x_um, "origin_y_um": overview.origin_y_um}

    # -- hardware with retries -----------------------------------------------------------------
    def _move(self, x_um: float, y_um: float, z_um: float) -> None:
        """Move and wait (after a move started in the background has ended)."""
        self._wait_for_stage()
        self._move_now(x_um, y_um, z_um)

    def _move_later(self, x_um: float, y_um: float, z_um: float) -> None:
        """Start moving in the background; the next move, or `_wait_for_stage`, waits for it."""
        self._wait_for_stage()
        self._moving = self._mover.submit(self._move_now, x_um, y_um, z_um)

    def _wait_for_stage(self) -> None:
        """Wait for a background move to end; its failure (a ScanError) is raised here."""
        moving, self._moving = self._moving, None
        if moving is not None:
            moving.result()

    def _move_now(self, x_um: float, y_um: float, z_um: float) -> None:
        """z is always approached from below: a downward move first goes past the target by
        `z_approach_um`, so z backlash is taken up the same way on every tile. A move to where the
        stage already went is not made again."""
        target = (x_um, y_um, z_um)
        if target == self._stage_at:
            return
        self._stage_at = None
        z_now = self.backend.stage.position_um()[2]
        if z_um < z_now - 1e-6:
            z_min = self.backend.stage.limits.bounds("z")[0]
            self._move_once(x_um, y_um, max(z_um - self.z_approach_um, z_min))
        self._move_once(x_um, y_um, z_um)
        self._stage_at = target

    def _move_once(self, x_um: float, y_um: float, z_um: float) -> None:
        stage = self.backend.stage
        for attempt in range(self.retries + 1):
            try:
                duration = stage.start_move(x_um, y_um, z_um)
                deadline = self.clock() + duration + 5.0
                while stage.is_moving():
                    if self.clock() > deadline:
                        stage.stop()
                        raise StageFault(f"move to ({x_um:.1f}, {y_um:.1f}, {z_um:.2f}) µm timed out")
                    time.sleep(min(0.005, max(duration, 0.0)))
                return
            except StageLimitError as error:
                raise ScanError(ScanErrorCode.STAGE, str(error)) from error
            except StageFault as error:
                if attempt == self.retries:
                    raise ScanError(ScanErrorCode.STAGE, f"stage failed {attempt + 1} times: {error}") from error

    def _exposure(self, roi=None, then_move_to: tuple[float, float, float] | None = None) -> ReadOut:
        """Expose where the stage is (the camera retried when it fails); with `then_move_to` the stage
        heads there as soon as the exposure ends, while the image is read out."""
        for attempt in range(self.retries + 1):
            try:
                read_out = self.backend.expose(self.request.exposure_ms, self.request.gain, roi=roi)
                break
            except CameraError as error:
                if attempt == self.retries:
                    raise ScanError(ScanErrorCode.CAMERA, f"camera failed {attempt + 1} times: {error}") from error
        if then_move_to is not None:
            self._move_later(*then_move_to)
        return read_out

    def _read(self, read_out: ReadOut, position: tuple[float, float, float] | None, roi=None) -> Frame:
        """The image of an exposure made at `position`; a failed read-out is exposed again there."""
        for attempt in range(self.retries + 1):
            try:
                return read_out()
            except CameraError as error:
                if attempt == self.retries:
                    raise ScanError(ScanErrorCode.CAMERA, f"camera failed {attempt + 1} times: {error}") from error
                if position is not None:
                    self._move(*position)
                read_out = self._exposure(roi)

    def _snap(self, roi=None, then_move_to: tuple[float, float, float] | None = None) -> Frame:
        position = self._stage_at
        return self._read(self._exposure(roi, then_move_to), position, roi)

    def _sweep(self, x_um: float, y_um: float, z_values, roi) -> list[np.ndarray]:
        """Images of (x, y) at each z: in one strobed z pass where the scanner can, else stepping z and
        exposing at rest, each image read out while the stage steps on. A lost image is taken again at rest."""
        self._wait_for_stage()
        self._stage_at = None
        try:
            passed = self.backend.z_pass(x_um, y_um, z_values, self.request.exposure_ms, self.request.gain, roi)
        except (StageFault, StageLimitError) as error:
            raise ScanError(ScanErrorCode.STAGE, f"z pass at ({x_um:.1f}, {y_um:.1f}) µm failed: {error}") from error
        except CameraError:
            passed = None      # exposed at rest instead, with the camera's retries
        if passed is not None:
            exposures = [((x_um, y_um, z), read_out) for z, read_out in passed]
        else:
            exposures = []
            for z in z_values:
                self._move(x_um, y_um, z)
                exposures.append(((x_um, y_um, z), self._exposure(roi)))
        return [self._read(read_out, position, roi).image_rgb8 for position, read_out in exposures]

    # -- focus ---------------------------------------------------------------------------------
    def _centre_roi(self, size_px: int = 256):
        width, height = self.backend.sensor_size_px()
        size = min(size_px, width, height)
        return ((height - size) // 2, (width - size) // 2, size, size)

    def find_focus(self, x_um: float, y_um: float, z_guess_um: float) -> float | None:
        """Best-focus z at (x, y): coarse then fine z-sweep of a central crop, Brenner sharpness.

        None when the coarse sweep shows no clear peak (glass, a hole, a fold) or its image at focus shows no
        stained tissue (`unstained_at_focus`: dust or debris on glass): such a point would tilt the whole focus
        map, so the caller measures another one instead. A sweep that found focus
        is kept (`outcome.focus_sweeps`, images on disk): it is labelled data for calibrating the autofocus.
        """
        roi = self._centre_roi()
        dof = self.backend.depth_of_field_um()
        z_min, z_max = self.backend.stage.limits.bounds("z")
        sweeps = focus_sweeps(dof)
        coarse_step = sweeps[0][1]
        best = z_guess_um
        images, z_values = [], []
        for half_range, step in sweeps:
            offsets = np.arange(-half_range, half_range + 1e-9, step)
            zs = np.clip(best + offsets, z_min, z_max)
            sweep = self._sweep(x_um, y_um, [float(z) for z in zs], roi)
            scores = np.array([brenner(image) for image in sweep])
            images += sweep
            z_values += [float(z) for z in zs]
            if step == coarse_step and unclear_peak(zs, scores, self.min_focus_contrast) is not None:
                return None
            best = refine_peak(zs, scores)
        if unstained_at_focus(images, z_values, best) is not None:
            return None
        self._save_sweep(x_um, y_um, float(best), images, z_values)
        return float(best)

    def _save_sweep(self, x_um: float, y_um: float, best_z_um: float, images: list, z_values: list) -> None:
        relative = f"focus_map/sweep_{len(self.outcome.focus_sweeps):03d}.tif"
        self._save_image(relative, np.stack(images), f"the focus sweep {relative}")
        self.outcome.focus_sweeps.append({"x_um": x_um, "y_um": y_um, "best_z_um": best_z_um, "images": relative,
                                          "z_um": z_values})

    def focus_map(self, plan: TilePlan) -> FocusMap | None:
        """Focus measured at `count` points spread over the tiles; points without a clear focus
        peak are replaced by the next candidates (up to three times as many)."""
        if self.request.focus_strategy == FocusStrategy.NONE:
            return None
        self._report(State.FOCUS_MAP)
        count = self.request.focus_points or default_focus_point_count(len(plan.tiles))
        candidates = choose_focus_points(plan, 3 * count)
        z_guess = float(np.mean(self.backend.stage.limits.bounds("z")))
        points, measured = [], []
        for point in candidates:
            if len(points) == count:
                break
            if self.should_cancel():
                raise ScanError(ScanErrorCode.CANCELED, "canceled while measuring the focus map")
            z = self.find_focus(point.x_um, point.y_um, measured[-1] if measured else z_guess)
            if z is not None:
                points.append(point)
                measured.append(z)
        if not points:
            raise ScanError(ScanErrorCode.NO_TISSUE, f"no focus found at any of {len(candidates)} points: "
                                                     "no tissue with enough contrast in the region")
        return FocusMap([p.x_um for p in points], [p.y_um for p in points], measured)

    # -- acquisition ---------------------------------------------------------------------------
    def _report(self, state: State, **changes) -> None:
        progress = self._progress
        progress.state = state
        for key, value in changes.items():
            setattr(progress, key, value)
        progress.elapsed_s = self.clock() - self._started
        self.on_progress(progress)

    def _write_manifest(self, final: bool = False) -> None:
        """The whole manifest; until the final one, its journal continues it (`_journal_tiles`)."""
        plan = self.outcome.plan
        request = self.request
        width, height = self.backend.sensor_size_px()
        payload = {
            "format": "wsi-scan-manifest", "version": 1, "scan_id": request.scan_id, "status": self._status,
            "error": self._error, "objective_magnification": request.objective_magnification,
            "numerical_aperture": self.backend.numerical_aperture(), "pixel_size_um": self.backend.pixel_size_um(),
            "tile_width_px": width, "tile_height_px": height, "overlap_fraction": request.overlap_fraction,
            "exposure_ms": request.exposure_ms, "focus_strategy": request.focus_strategy.name.lower(),
            "calibration_only": request.calibration_only,
            "started_unix_s": time.time() - (self.clock() - self._started),
            "duration_s": self.clock() - self._started, "refocus_count": self.outcome.refocus_count,
            "overview": self._overview,
            "focus_map": {"sweeps": self.outcome.focus_sweeps, "roi_px": list(self._centre_roi())},
            "focus_checks": self.outcome.focus_checks,
            "autofocus_calibration": self.outcome.autofocus_calibration,
            "plan": None if plan is None else plan_record(plan, [(t.row, t.col) for t in plan.tiles], plan.skipped),
            "tiles": [asdict(r) for r in self.outcome.records],
        }
        if not final:
            payload["journal"] = {"path": JOURNAL_NAME, "lines_included": self._journal_lines}
        text = json.dumps(payload, indent=1).encode()
        try:
            _write_atomically(self.outcome.manifest_path, lambda handle: handle.write(text))
        except OSError as error:
            raise _storage_error("the manifest", self.outcome.manifest_path, error) from error
        self._recorded = (len(self.outcome.records), len(self.outcome.focus_checks))
        if final:
            with contextlib.suppress(FileNotFoundError):
                (self.scan_dir / JOURNAL_NAME).unlink()

    def _journal_tiles(self) -> None:
        """Append the captures and focus checks since the last record to the journal, on the disk before
        the next tile: one short line per tile where a whole manifest grows with the scan."""
        tiles, checks = self._recorded
        line = json.dumps({"tiles": [asdict(r) for r in self.outcome.records[tiles:]],
                           "focus_checks": self.outcome.focus_checks[checks:],
                           "refocus_count": self.outcome.refocus_count,
                           "duration_s": self.clock() - self._started}) + "\n"
        path = self.scan_dir / JOURNAL_NAME
        try:
            with open(path, "ab") as handle:
                handle.write(line.encode())
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise _storage_error("the manifest's journal", path, error) from error
        self._journal_lines += 1
        self._recorded = (len(self.outcome.records), len(self.outcome.focus_checks))

    def _capture(self, sequence: int, row: int, col: int, x: float, y: float, map_z: float, offset: float,
                 is_recapture: bool, then_move_to: tuple[float, float, float] | None = None
                 ) -> tuple[TileRecord, Frame]:
        z = map_z + offset
        self._move(x, y, z)
        frame = self._snap(then_move_to=then_move_to)
        record = TileRecord(sequence, row, col, is_recapture, x, y, z, frame.measured_x_um, frame.measured_y_um,
                            frame.measured_z_um, map_z, offset, frame.pixel_size_um, frame.exposure_ms, frame.gain,
                            captured_s=self.clock() - self._started)
        record.sharpness = brenner(frame.image_rgb8)
        record.ground_truth = _ground_truth(frame)
        return record, frame

    def _save_image(self, relative: str, image: np.ndarray, what: str) -> None:
        path = self.scan_dir / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_tiff(path, image)
        except OSError as error:
            raise _storage_error(what, path, error) from error

    def acquire(self, plan: TilePlan, focus_map: FocusMap | None) -> None:
        request = self.request
        inline = request.focus_strategy == FocusStrategy.MAP_INLINE and self.estimate_focus is not None
        z_default = float(self.backend.stage.position_um()[2])
        acquisition_started = self.clock()
        total = len(plan.tiles)

        map_zs = [float(focus_map.z_um(tile.x_um, tile.y_um)) if focus_map is not None else z_default
                  for tile in plan.tiles]
        for done, (tile, map_z) in enumerate(zip(plan.tiles, map_zs)):
            if self.should_cancel():
                raise ScanError(ScanErrorCode.CANCELED, f"canceled after {done} of {total} tiles")
            # The stage heads for the next tile while this one is read out and judged; a correction of this
            # one brings it back.
            following = (plan.tiles[done + 1].x_um, plan.tiles[done + 1].y_um, map_zs[done + 1]) \
                if done + 1 < total else None
            record, frame = self._capture(len(self.outcome.records), tile.row, tile.col, tile.x_um, tile.y_um,
                                          map_z, 0.0, False, then_move_to=following)
            self._emit(record, frame)
            if inline:
                self._refocus(tile, map_z, record, frame)
            self._journal_tiles()
            elapsed = self.clock() - acquisition_started
            self._report(State.ACQUIRING, tiles_done=done + 1, tiles_total=total,
                         refocus_count=self.outcome.refocus_count, current=(tile.row, tile.col),
                         eta_s=elapsed / (done + 1) * (total - done - 1))

    def _refocus(self, tile, map_z: float, record: TileRecord, frame: Frame) -> None:
        """Act on the autofocus's estimate of a tile taken at the focus map's z. Every tile starts at
        the focus map's z and a correction replaces that capture only when it is measurably sharper, so
        the scan is never less in focus than the focus map alone; a side probe first settles which way
        to move when the estimate knows the distance but not the side."""
        reply = self.estimate_focus(record, frame)
        if reply is None:
            return
        record.predicted_defocus_um, record.predicted_uncertainty_um = reply.defocus_um, reply.uncertainty_um
        depth_of_field_um = self.backend.depth_of_field_um()
        action = focus_action(reply.defocus_um, reply.uncertainty_um, reply.distance_um,
                              reply.distance_uncertainty_um, depth_of_field_um)
        if action == "correct":
            self._try_correction(tile, map_z, -reply.defocus_um, AUTOFOCUS, record, reply, depth_of_field_um)
        elif action == "probe":
            decided = self._probe(tile, map_z, reply, record, frame, depth_of_field_um)
            if decided is not None:
                self._try_correction(tile, map_z, *decided, record, reply, depth_of_field_um)

    def _probe(self, tile, map_z: float, reply: FocusReply, record: TileRecord, frame: Frame,
               depth_of_field_um: float) -> tuple[float, str] | None:
        """A second exposure one probe step higher; the z offset to try and its source, or None to keep
        the tile. The two exposures together give the defocus on any microscope (`focus.two_shot_offset`);
        when they leave it in doubt, the probe settles only the side of the single shot's distance."""
        step = probe_step_um(depth_of_field_um, reply.distance_um)
        self._move(tile.x_um, tile.y_um, map_z + step)
        probe_frame = self._snap()
        check = {"kind": "side-probe", "row": tile.row, "col": tile.col, "z_um": map_z + step, "step_um": step,
                 "captured_s": self.clock() - self._started, "sharpness": brenner(probe_frame.image_rgb8),
                 "ground_truth": _ground_truth(probe_frame)}
        pair = self.estimate_image(frame, probe_frame, step) if self.estimate_image is not None else None
        if pair is not None:
            check |= {"two_shot_defocus_um": pair.defocus_um, "two_shot_uncertainty_um": pair.uncertainty_um}
            offset = two_shot_offset(pair.defocus_um, pair.uncertainty_um, pair.above_focus_probability,
                                     depth_of_field_um)
            if offset is not None:
                self._keep_focus_check(check, probe_frame)
                return offset, AUTOFOCUS_TWO_SHOT
        probe = self.estimate_image(probe_frame) if self.estimate_image is not None else None
        above, posterior = side_from_probe(reply, probe, step, record.sharpness, check["sharpness"])
        check |= {"probe_distance_um": probe.distance_um if probe is not None else None,
                  "above_focus_probability": posterior, "above_focus": above}
        self._keep_focus_check(check, probe_frame)
        if above is None:
            return None
        return (-reply.distance_um if above else reply.distance_um), AUTOFOCUS_PROBE

    def _try_correction(self, tile, map_z: float, offset_um: float, source: str, original: TileRecord,
                        reply: FocusReply, depth_of_field_um: float) -> None:
        """Capture at the corrected z; when that capture still reads surely out of focus, once more where the
        two bracket focus; when it lost sharpness, once more the same distance the other way
        (`focus.correction_captures`). The sharpest capture becomes the tile's re-capture if it is measurably
        sharper than the focus map's (`focus.kept_capture`); the others are kept as focus checks."""
        taken = correction_captures(
            offset_um, reply.distance_um, depth_of_field_um,
            lambda offset: self._capture(len(self.outcome.records), tile.row, tile.col, tile.x_um, tile.y_um, map_z,
                                         offset, True),
            lambda taken: self.estimate_image(taken[1]) if self.estimate_image is not None else None,
            lambda taken: taken[0].sharpness, original.sharpness)
        records = []
        for kind, _, (record, frame) in taken:
            record.focus_source = source
            record.sharpness_gain = sharpness_gain(record.sharpness, original.sharpness)
            record.bracketed_from_offset_um = offset_um if kind == BRACKET else None
            record.other_way_from_offset_um = offset_um if kind == OTHER_WAY else None
            records.append((record, frame))
        kept = kept_capture(original.sharpness, [record.sharpness for record, _ in records])
        for index, (record, frame) in enumerate(records):
            if index == kept:
                self.outcome.refocus_count += 1
                self._emit(record, frame)
                continue
            check = {"kind": "correction", "row": tile.row, "col": tile.col, "z_um": record.commanded_z_um,
                     "offset_um": record.applied_focus_offset_um, "source": source, "captured_s": record.captured_s,
                     "sharpness": record.sharpness, "sharpness_gain": record.sharpness_gain,
                     "bracketed_from_offset_um": record.bracketed_from_offset_um,
                     "other_way_from_offset_um": record.other_way_from_offset_um,
                     "ground_truth": record.ground_truth}
            self._keep_focus_check(check, frame)

    def _keep_focus_check(self, check: dict, frame: Frame) -> None:
        relative = f"focus_checks/{len(self.outcome.focus_checks):05d}_r{check['row']:04d}_c{check['col']:04d}_{check['kind']}.tif"
        self._save_image(relative, frame.image_rgb8, f"focus check {relative}")
        self.outcome.focus_checks.append(check | {"image": relative})

    def _emit(self, record: TileRecord, frame: Frame) -> None:
        """A capture becomes (the latest image of) its tile: saved, recorded, published."""
        if self.request.save_tiles:
            relative = f"tiles/r{record.row:04d}_c{record.col:04d}.tif"
            self._save_image(relative, frame.image_rgb8, f"tile ({record.row}, {record.col})")
            record.image = relative
        self.outcome.records.append(record)
        self.publish_tile(record, frame)

    def run(self) -> ScanOutcome:
        """Scan; on any ScanError the manifest records the tiles so far and the error, then it is raised.

        An invalid request raises before anything moves or is written (no scan folder is made for it)."""
        self.request.validate(self.backend)
        try:
            (self.scan_dir / "tiles").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ScanError(ScanErrorCode.STORAGE, f"cannot create {self.scan_dir}: {error}") from error
        try:
            self.backend.set_objective(self.request.objective_magnification)
            try:
                self.outcome.plan = self.plan()
                if not self.request.calibration_only:   # the plan announces tiles to come (a stitcher opens a mosaic)
                    self.on_plan(self.outcome.plan)
                self._report(State.PLANNING, tiles_total=len(self.outcome.plan.tiles))
                focus = self.focus_map(self.outcome.plan)
            except NoTissueError as error:
                raise ScanError(ScanErrorCode.NO_TISSUE, str(error)) from error
            self._write_manifest()
            if self.request.calibrates_autofocus:
                self.outcome.autofocus_calibration = self._calibrate_autofocus()
                self._write_manifest()
            if self.request.calibration_only:
                self._end_after_calibration()
            else:
                self.acquire(self.outcome.plan, focus)
        except ScanError as error:
            self._status = "canceled" if error.code == ScanErrorCode.CANCELED else "failed"
            self._error = str(error)
            try:
                self._finish(State.CANCELED if error.code == ScanErrorCode.CANCELED else State.FAILED)
            except ScanError as unrecorded:
                # A full disk fails the tile first and then this manifest too: the caller needs the first
                # failure; the manifest on disk is still the last one written, listing complete tiles only.
                raise ScanError(error.code, f"{error}; the manifest could not record this: {unrecorded}") from error
            raise
        self._status = "complete"
        self._finish(State.SUCCEEDED)
        return self.outcome

    def _calibrate_autofocus(self) -> dict:
        """What the autofocus reported of its calibration on the sweeps of the manifest just written (the
        manifest records it); one that could not be made leaves the autofocus as it was, and says why."""
        if self.calibrate_focus is None:
            return {"success": False, "error": "no autofocus is connected to this scan to calibrate"}
        if not self.outcome.focus_sweeps:
            return {"success": False, "error": "the focus map kept no z-sweep to calibrate on: none of its points "
                                               "found a focus on tissue"}
        self._report(State.CALIBRATING)
        return self.calibrate_focus(self.scan_dir)

    def _end_after_calibration(self) -> None:
        """A calibration-only scan ends here, with the calibration's outcome as its own."""
        if self.should_cancel():
            raise ScanError(ScanErrorCode.CANCELED, "canceled during the autofocus calibration")
        calibration = self.outcome.autofocus_calibration
        if not calibration["success"]:
            raise ScanError(ScanErrorCode.CALIBRATION, f"the autofocus was not calibrated (the models in use are "
                                                       f"kept): {calibration['error']}")

    def _finish(self, state: State) -> None:
        if state != State.SUCCEEDED:
            # A move started before the failure (or the cancel) is let end, so that the stage is at rest; the
            # first error is the one to report, so a failure of that move is not raised over it.
            with contextlib.suppress(ScanError):
                self._wait_for_stage()
        self._mover.shutdown()
        self.outcome.duration_s = self.clock() - self._started
        try:
            self._write_manifest(final=True)
        finally:
            self._report(state)
