"""What a scan is asked to do: the ScanSlide goal's defaults and rules, and the request the scan core runs.

ROS-free: `ScanRequest.from_goal` reads any object with the fields of a ScanSlide goal. Every rule a goal
must meet is checked here, before anything moves, by `ScanRequest.validate`; its ScanError names the bad
value and what was expected, and the orchestrator hands that message to the caller (ERROR_INVALID_GOAL).
"""
import enum
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from wsi_common.objective import DEFAULT_OBJECTIVE_MAGNIFICATION
from wsi_common.paths import OutsideRootError, resolve_under
from wsi_common.scan_files import MANIFEST_NAME


class ScanErrorCode(enum.IntEnum):
    """Mirrors ScanSlide.Result.ERROR_*."""
    NONE = 0
    INVALID_GOAL = 1
    STAGE = 2
    CAMERA = 3
    NO_TISSUE = 4
    STORAGE = 5
    STITCHING = 6
    EXPORT = 7
    CANCELED = 8
    INTERNAL = 9
    BUSY = 10
    CALIBRATION = 11


class ScanError(RuntimeError):
    def __init__(self, code: ScanErrorCode, message: str):
        super().__init__(message)
        self.code = code


class FocusStrategy(enum.IntEnum):
    """Mirrors ScanSlide.Goal.FOCUS_*."""
    NONE = 0
    MAP = 1
    MAP_INLINE = 2


# The one table of scan defaults: what a zero goal field stands for, and the orchestrator's parameters.
DEFAULTS = {
    "objective_magnification": DEFAULT_OBJECTIVE_MAGNIFICATION,    # goal 0: the node's default_objective
    "overlap_fraction": 0.1,            # goal overlap_fraction 0
    "exposure_ms": 8.0,
    "gain": 1.0,
    "save_tiles": True,
}
SCAN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
OUTPUT_FORMATS = ("ome-tiff", "ome-zarr", "dicom")  # the export node's (wsi_export.export.FORMATS)
# Each focus point is a coarse and a fine z-sweep (about 40 exposures at 20x); the automatic choice takes
# at most 25, enough for the smooth surface the focus map fits. 100 already cost ~4000 exposures, longer
# than the tiles of most scans; far more would hold the microscope for hours and add nothing.
MAX_FOCUS_POINTS = 100


def _invalid(message: str) -> ScanError:
    return ScanError(ScanErrorCode.INVALID_GOAL, message)


@dataclass(frozen=True)
class ScannerSettings:
    """The orchestrator's configuration a goal is read against (its node parameters)."""
    output_root: Path
    default_objective: float = DEFAULTS["objective_magnification"]
    exposure_ms: float = DEFAULTS["exposure_ms"]
    gain: float = DEFAULTS["gain"]
    save_tiles: bool = DEFAULTS["save_tiles"]


@dataclass(frozen=True)
class ScanRequest:
    scan_id: str
    output_dir: Path
    region_um: tuple[float, float, float, float] | None   # (x, y, width, height); None: tissue detection
    objective_magnification: float = DEFAULTS["objective_magnification"]
    overlap_fraction: float = DEFAULTS["overlap_fraction"]
    focus_strategy: FocusStrategy = FocusStrategy.MAP_INLINE
    focus_points: int = 0                  # 0: about one per 9 tiles, 5..25
    skip_empty_tiles: bool = True
    exposure_ms: float = DEFAULTS["exposure_ms"]
    gain: float = DEFAULTS["gain"]
    save_tiles: bool = DEFAULTS["save_tiles"]
    calibrate_autofocus: bool = False      # fine-tune the autofocus on this scan's focus map before the tiles
    calibration_only: bool = False         # calibrate (as above, whether asked or not) and end: no tiles
    output_formats: tuple[str, ...] = ()   # exported after the scan; empty: tiles and manifest only

    @property
    def calibrates_autofocus(self) -> bool:
        return self.calibrate_autofocus or self.calibration_only

    @property
    def scan_dir(self) -> Path:
        return Path(self.output_dir) / self.scan_id

    @property
    def manifest_path(self) -> Path:
        return self.scan_dir / MANIFEST_NAME

    @classmethod
    def from_goal(cls, goal, settings: ScannerSettings, backend,
                  now: time.struct_time | None = None) -> "ScanRequest":
        """The validated request of a ScanSlide goal; ScanError(INVALID_GOAL) naming what is wrong.

        `backend` (a MicroscopeBackend) says which objectives, stage limits and overview camera there are.
        An empty scan_id becomes one from the time `now` that no scan under the output directory has yet.
        """
        try:
            output_dir = resolve_under(settings.output_root, goal.output_dir)
        except OutsideRootError as error:
            raise _invalid(f"output_dir {error}") from error
        if goal.pixel_size_um != 0.0:
            raise _invalid(f"pixel_size_um {goal.pixel_size_um}: tiles are taken at the objective's native pixel "
                           "size; give 0 and choose the objective")
        if goal.focus_strategy not in tuple(FocusStrategy):
            raise _invalid(f"focus_strategy {goal.focus_strategy}; expected one of {[int(f) for f in FocusStrategy]}")
        region = None if goal.auto_detect_tissue else (
            goal.region_x_um, goal.region_y_um, goal.region_width_um, goal.region_height_um)
        if region is not None and goal.region_width_um == 0 and goal.region_height_um == 0:
            limits = backend.stage.limits
            region = (limits.x_min_um, limits.y_min_um, limits.x_max_um - limits.x_min_um,
                      limits.y_max_um - limits.y_min_um)
        request = cls(
            scan_id=goal.scan_id or _fresh_scan_id(output_dir, now or time.localtime()), output_dir=output_dir,
            region_um=region, objective_magnification=goal.objective_magnification or settings.default_objective,
            overlap_fraction=goal.overlap_fraction or DEFAULTS["overlap_fraction"],
            focus_strategy=FocusStrategy(goal.focus_strategy), focus_points=goal.focus_points,
            skip_empty_tiles=goal.skip_empty_tiles,
            calibrate_autofocus=goal.calibrate_autofocus, calibration_only=goal.calibration_only,
            exposure_ms=settings.exposure_ms, gain=settings.gain, save_tiles=settings.save_tiles,
            output_formats=tuple(goal.output_formats))
        request.validate(backend)
        return request

    def validate(self, backend) -> None:
        """Raise ScanError(INVALID_GOAL) naming the first bad value, before anything moves or is written."""
        if not SCAN_ID_PATTERN.fullmatch(self.scan_id):
            raise _invalid(f"scan_id {self.scan_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
        unknown = [f for f in self.output_formats if f not in OUTPUT_FORMATS]
        if unknown or len(set(self.output_formats)) != len(self.output_formats):
            raise _invalid(f"output formats {list(self.output_formats)}; expected each of {OUTPUT_FORMATS} "
                           "at most once")
        if float(self.objective_magnification) not in backend.objectives():
            raise _invalid(f"no {self.objective_magnification}x objective; available: {backend.objectives()}")
        if not 0.0 <= self.overlap_fraction <= 0.5:
            raise _invalid(f"overlap {self.overlap_fraction}; expected 0 <= overlap <= 0.5")
        if not (math.isfinite(self.exposure_ms) and self.exposure_ms > 0):
            raise _invalid(f"exposure {self.exposure_ms} ms; expected > 0")
        if not 0 <= self.focus_points <= MAX_FOCUS_POINTS:
            raise _invalid(f"focus_points {self.focus_points}; expected 0 (automatic) to {MAX_FOCUS_POINTS}: "
                           "each point is a z-sweep of some 40 exposures")
        if self.calibrates_autofocus and self.focus_strategy == FocusStrategy.NONE:
            raise _invalid("an autofocus calibration learns from the focus map's z-sweeps; with FOCUS_NONE there are "
                           "none: choose FOCUS_MAP or FOCUS_MAP_INLINE")
        if self.calibration_only and self.output_formats:
            raise _invalid(f"output formats {list(self.output_formats)} with calibration_only, which captures no "
                           "tiles to export; give none")
        if self.region_um is not None:
            self._validate_region(backend.stage.limits)
        elif not backend.has_overview():
            raise _invalid("automatic tissue detection needs an overview camera; give a region instead")
        if self.scan_dir.exists() and any(self.scan_dir.iterdir()):
            raise _invalid(f"scan_id {self.scan_id!r}: {self.scan_dir} already holds the files of an earlier scan, "
                           "and a scan never writes into another's folder; give a new scan_id (or move that "
                           "folder away)")

    def _validate_region(self, limits) -> None:
        x, y, width, height = self.region_um
        if not all(math.isfinite(v) for v in self.region_um):
            raise _invalid(f"region x={x}, y={y}, {width} x {height} µm; expected finite numbers")
        if not (width > 0 and height > 0):
            raise _invalid(f"region size {width} x {height} µm; expected > 0")
        if x < limits.x_min_um or y < limits.y_min_um or x + width > limits.x_max_um or y + height > limits.y_max_um:
            raise _invalid(f"region x={x}, y={y}, {width} x {height} µm is outside the stage limits "
                           f"x {limits.x_min_um}..{limits.x_max_um}, y {limits.y_min_um}..{limits.y_max_um} µm")


def _fresh_scan_id(output_dir: Path, now: time.struct_time) -> str:
    """A scan id from the time, with a suffix when a scan of the same second already has that folder."""
    stem = time.strftime("scan-%Y%m%d-%H%M%S", now)
    scan_id, n = stem, 1
    while (output_dir / scan_id).exists():
        n += 1
        scan_id = f"{stem}-{n}"
    return scan_id
