"""Self-calibration as a scan does it: fitted on the focus-map sweeps of the slide being scanned, judged
on other fields of that same slide, under each held-out microscope.

`shift_evaluation.calibration_check` calibrates on other specimens than it tests on; a scan that
calibrates itself (`ScanSlide.calibrate_autofocus`) has sweeps of the very slide its tiles come from, so
its stain, thickness and the relation of phase to absorption are the same. The sweep fields and the test
fields never overlap: on a procedural specimen the test fields lie at least a field's width from every
sweep field; on a real image (mirrored over the plane) sweeps take the top band of its height and tests
the bottom band; a procedural test field shows tissue in focus (`focus_metrics.MIN_FIELD_TISSUE_FRACTION`).
The immunohistochemistry image is not used: one 20x field shows all of it.
"""
from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import STANDARD_OBJECTIVES, depth_of_field_um
from wsi_autofocus import heldout_imaging, two_shot
from wsi_autofocus.content import EVALUATION_IMAGES, RealImageSpecimen
from wsi_autofocus.data import (SPLITS, in_focus_tissue_fraction, save_npz, specimen_for_seed, starmap_in_processes,
                               tissue_points)
from wsi_autofocus.shift_evaluation import (PROCEDURAL, CalibrationSpec, cache_key, calibrated_scan_outcomes,
                                            calibrated_statistics, describe_calibration, format_calibration,
                                            imaging_condenser, pair_estimates, refocus_rng, render_sweep,
                                            sweep_focus_um, two_shot_calibrated_statistics, z_stacks)
from wsi_common.focus_metrics import MIN_FIELD_TISSUE_FRACTION

SLIDES = (PROCEDURAL, "real-he")
# Bands of a real image's height for the sweeps and for the test fields: the gap between them is wider
# than a test field, so no test field shows tissue a sweep saw.
SWEEP_ROWS, TEST_ROWS = (0.0, 0.4), (0.6, 1.0)
TITLE = ("self-calibration on the slide itself (20x): fitted on a held-out microscope's focus-map sweeps of one "
         "slide, tested on other fields of that slide")
TWO_SHOT_TITLE = TITLE.replace("self-calibration", "two-shot self-calibration") + " with their second exposures"
DRAWS_TITLE = ("two-shot self-calibration on the slide itself (20x) on {draws} independent draws of each slide's "
               "fields ({sweeps} swept, other ones tested; start offsets and camera noise): MAE µm")
SCAN_OUTCOME_TITLE = ("scan outcome after self-calibration on the slide itself (20x): both models calibrated on nine "
                      "focus-map sweeps of one slide, the scan's inline autofocus over other fields of it")


@dataclass(frozen=True)
class SlideCalibrationSpec:
    sweeps: CalibrationSpec = field(default_factory=CalibrationSpec)
    test_tiles: int = 30
    test_tile_px: int = 384
    max_defocus_um: float = 10.0
    slides: tuple[str, ...] = SLIDES
    seed: int = 31
    second_exposure_depths: float = two_shot.DEFAULT_STEP_DEPTHS     # above each test field, for the two-shot model
    min_field_tissue_fraction: float = MIN_FIELD_TISSUE_FRACTION      # of a procedural test field, in focus


def _fields(spec: SlideCalibrationSpec, slide: str, rng: np.random.Generator, pixel_size_um: float):
    """The slide's specimen, its sweep positions and its test positions (x, y µm), never overlapping; a
    procedural test field shows tissue over the area a microscope with `pixel_size_um` images."""
    count = spec.sweeps.sweeps
    if slide == PROCEDURAL:
        seed = SPLITS["test"].specimen_seeds[0]
        microscope = VirtualMicroscope(specimen=specimen_for_seed(seed), seed=seed)
        candidates = tissue_points(microscope, rng, 20 * (count + spec.test_tiles))
        sweep_points = candidates[:count]
        widest_pixel_um = max(scope.pixel_size_um(spec.sweeps.magnification)
                              for scope in heldout_imaging.HELD_OUT_SCOPES.values())
        apart_um = (spec.test_tile_px + spec.sweeps.tile_px) * widest_pixel_um
        distance = np.abs(candidates[count:, None, :] - sweep_points[None, :, :]).max(axis=2).min(axis=1)
        # Sweeps are taken where the focus map would take them, glass or not; test fields show tissue.
        showing_tissue = (point for point in candidates[count:][distance > apart_um]
                          if in_focus_tissue_fraction(microscope, float(point[0]), float(point[1]),
                                                      spec.sweeps.magnification, spec.test_tile_px, pixel_size_um)
                          >= spec.min_field_tissue_fraction)
        test_points = np.array(list(itertools.islice(showing_tissue, spec.test_tiles)))
        if len(test_points) < spec.test_tiles:
            raise RuntimeError(f"{len(test_points)} of {spec.test_tiles} test fields of {slide} lie clear of its "
                               "sweeps and show tissue")
        return microscope.specimen, sweep_points, test_points
    specimen = RealImageSpecimen(EVALUATION_IMAGES[slide])
    return specimen, specimen.tissue_points(rng, count, SWEEP_ROWS), specimen.tissue_points(rng, spec.test_tiles, TEST_ROWS)


def _slide_seed(spec: SlideCalibrationSpec, scope_name: str, slide: str) -> list[int]:
    """The seed of one (held-out microscope, slide) pair's random draws."""
    return [spec.seed, list(heldout_imaging.HELD_OUT_SCOPES).index(scope_name), SLIDES.index(slide)]


def _slide_fields(spec: SlideCalibrationSpec, scope_name: str, slide: str):
    """The held-out microscope, the slide's random generator after drawing its fields, and `_fields`."""
    rng = np.random.default_rng(_slide_seed(spec, scope_name, slide))
    scope = heldout_imaging.HELD_OUT_SCOPES[scope_name]
    return scope, rng, *_fields(spec, slide, rng, scope.pixel_size_um(spec.sweeps.magnification))


def render_slide(spec: SlideCalibrationSpec, scope_name: str, slide: str) -> dict:
    """Sweeps and test tiles (defocus uniform over ±max_defocus_um), each with a second exposure
    `second_exposure_depths` depths of focus higher, of one slide under one held-out microscope at the sweeps'
    magnification."""
    scope, rng, specimen, sweep_points, test_points = _slide_fields(spec, scope_name, slide)
    magnification = spec.sweeps.magnification
    stacks = [render_sweep(spec.sweeps, scope, specimen, float(x), float(y), rng) for x, y in sweep_points]
    defocus = rng.uniform(-spec.max_defocus_um, spec.max_defocus_um, len(test_points))
    captures = [heldout_imaging.capture(scope, specimen, float(x), float(y), float(d), magnification, spec.test_tile_px, rng)
                for (x, y), d in zip(test_points, defocus)]
    count = len(captures)
    # Each test field once more, as a scan's second exposure: drawn after the rest, which stay as they were.
    step_um = spec.second_exposure_depths * two_shot.depth_unit_um(scope.objective(magnification).numerical_aperture)
    above = [heldout_imaging.capture(scope, specimen, float(x), float(y), float(d) + step_um, magnification,
                                     spec.test_tile_px, rng).image_rgb8 for (x, y), d in zip(test_points, defocus)]
    return {"stacks": stacks,
            "tiles": {"images": np.stack([c.image_rgb8 for c in captures]), "images_above": np.stack(above),
                      "step_above_um": np.full(count, step_um, np.float32),
                      "true_um": np.array([c.defocus_um for c in captures], np.float32),
                      "numerical_aperture": np.array([c.numerical_aperture for c in captures], np.float32),
                      "pixel_size_um": np.array([c.pixel_size_um for c in captures], np.float32),
                      "depth_of_field_um": np.full(count, depth_of_field_um(STANDARD_OBJECTIVES[float(magnification)],
                                                                            scope.camera.pixel_size_um), np.float32)}}


def _flatten(rendered: dict) -> dict:
    arrays = {f"tiles|{key}": value for key, value in rendered["tiles"].items()}
    for index, stack in enumerate(rendered["stacks"]):
        arrays |= {f"stack|{index}|{key}": np.asarray(value) for key, value in stack.items()}
    return arrays


def _unflatten(data) -> dict:
    tiles, stacks = {}, {}
    for key in data.files:
        parts = key.split("|")
        if parts[0] == "tiles":
            tiles[parts[1]] = data[key]
        else:
            value = data[key]
            stacks.setdefault(int(parts[1]), {})[parts[2]] = value if value.ndim else value.item()
    return {"tiles": tiles, "stacks": [stacks[index] for index in sorted(stacks)]}


def render_all(spec: SlideCalibrationSpec, cache_dir: Path, workers: int = 2, log=print) -> dict[tuple[str, str], dict]:
    """`render_slide` for every held-out microscope and slide, each from its cache file when rendered before."""
    paths = {(scope, slide): Path(cache_dir) / f"slide-calibration-{cache_key(spec)}-{scope}-{slide}.npz"
             for scope in heldout_imaging.HELD_OUT_SCOPES for slide in spec.slides}
    missing = [cell for cell, path in paths.items() if not path.exists()]
    if missing:
        log(f"rendering sweeps and test fields of {len(missing)} (microscope, slide) pairs into {Path(cache_dir)}")
        rendered = starmap_in_processes(render_slide, [(spec, *cell) for cell in missing], workers)
        for cell, part in zip(missing, rendered):
            save_npz(paths[cell], _flatten(part))
    out = {}
    for cell, path in paths.items():
        with np.load(path) as data:
            out[cell] = _unflatten(data)
    return out


def sweep_focus_of_test_fields(spec: SlideCalibrationSpec, scope_name: str, slide: str) -> np.ndarray:
    """Per test field of `render_slide`: where a focus-map-like sweep of it (`spec.sweeps.z_offsets_um()` around the
    evaluation's best focus) finds focus (`shift_evaluation.sweep_focus_um`)."""
    scope, _, specimen, _, test_points = _slide_fields(spec, scope_name, slide)
    magnification, z_um = spec.sweeps.magnification, spec.sweeps.z_offsets_um()
    optics = scope.pixel_size_um(magnification), scope.objective(magnification).numerical_aperture
    focus = []
    for index, (x, y) in enumerate(test_points):
        rng = np.random.default_rng([*_slide_seed(spec, scope_name, slide), index])
        images = np.stack([heldout_imaging.capture(scope, specimen, float(x), float(y), float(z), magnification,
                                                   spec.test_tile_px, rng).image_rgb8 for z in z_um])
        focus.append(sweep_focus_um(images, z_um, *optics))
    return np.array(focus)


def with_sweep_focus(spec: SlideCalibrationSpec, rendered: dict[tuple[str, str], dict], cache_dir: Path,
                     workers: int = 2, log=print) -> dict[tuple[str, str], dict]:
    """`rendered` (from `render_all`) with each slide's test tiles holding their "sweep_focus_um"
    (`sweep_focus_of_test_fields`), each from its cache file when measured before."""
    paths = {cell: Path(cache_dir) / f"slide-test-sweep-focus-{cache_key(spec)}-{cell[0]}-{cell[1]}.npz"
             for cell in rendered}
    missing = [cell for cell, path in paths.items() if not path.exists()]
    if missing:
        log(f"sweeping the test fields of {len(missing)} (microscope, slide) pairs into {Path(cache_dir)}")
        for cell, focus in zip(missing, starmap_in_processes(sweep_focus_of_test_fields,
                                                             [(spec, *cell) for cell in missing], workers)):
            save_npz(paths[cell], {"sweep_focus_um": focus})
    out = {}
    for cell, path in paths.items():
        with np.load(path) as data:
            out[cell] = rendered[cell] | {"tiles": rendered[cell]["tiles"] | {"sweep_focus_um": data["sweep_focus_um"]}}
    return out


def slide_calibration_check(model_dir: Path | None, spec: SlideCalibrationSpec, work_dir: Path,
                            backend: str = "onnxruntime", log=print) -> dict:
    """Per "microscope / slide": the test fields' statistics before and after calibrating on that slide's sweeps."""
    results = {}
    slides = with_sweep_focus(spec, render_all(spec, work_dir, log=log), work_dir, log=log)
    for (scope, slide), rendered in slides.items():
        name = f"{scope} / {slide}"
        results[name] = calibrated_statistics(model_dir, z_stacks(rendered["stacks"]), rendered["tiles"],
                                              Path(work_dir) / f"calibrated-{scope}-{slide}",
                                              {"name": scope, "objective": spec.sweeps.magnification},
                                              imaging_condenser(scope), backend)
        log(f"{name}: {describe_calibration(results[name])}")
    return results


def two_shot_slide_calibration_check(model_path: Path, spec: SlideCalibrationSpec, work_dir: Path, log=print,
                                     tiles_sweep_focus: bool = True) -> dict:
    """`slide_calibration_check` for the two-shot model: each test field read from it and its second exposure;
    without `tiles_sweep_focus` the test fields are not swept (`with_sweep_focus`) and the rows lack its columns."""
    results = {}
    slides = render_all(spec, work_dir, log=log)
    slides = with_sweep_focus(spec, slides, work_dir, log=log) if tiles_sweep_focus else slides
    for (scope, slide), rendered in slides.items():
        name, tiles = f"{scope} / {slide}", rendered["tiles"]

        def estimate(model, tiles=tiles):
            return pair_estimates(model, tiles["images"], tiles["images_above"], tiles["numerical_aperture"],
                                  tiles["pixel_size_um"], tiles["step_above_um"],
                                  [imaging_condenser(scope)] * len(tiles["images"]))

        results[name] = two_shot_calibrated_statistics(
            model_path, z_stacks(rendered["stacks"]), tiles, estimate,
            Path(work_dir) / f"two-shot-calibrated-{scope}-{slide}-seed{spec.seed}.npz",
            {"name": scope, "objective": spec.sweeps.magnification}, imaging_condenser(scope))
        log(f"{name}: {describe_calibration(results[name])}")
    return results


def format_slide_calibration(results: dict, title: str = TITLE) -> str:
    return format_calibration(results, title)


class SlideRefocuser:
    """Images a test field of one slide again at another defocus under its held-out microscope, as a scan does for a
    side probe or a correction (`shift_evaluation.scan_outcomes` reads it as the shift evaluation's `Refocuser`);
    each image is rendered once."""

    def __init__(self, spec: SlideCalibrationSpec, scope_name: str, slide: str):
        self.spec = spec
        self.scope, _, self.specimen, _, self.test_points = _slide_fields(spec, scope_name, slide)
        self._images: dict[tuple[int, float], np.ndarray] = {}

    def image(self, index: int, defocus_um: float) -> np.ndarray:
        key = (index, round(defocus_um, 3))
        if key not in self._images:
            x, y = self.test_points[index]
            rng = refocus_rng(self.spec.seed, index, key[1])
            self._images[key] = heldout_imaging.capture(self.scope, self.specimen, float(x), float(y), key[1],
                                                        self.spec.sweeps.magnification, self.spec.test_tile_px,
                                                        rng).image_rgb8
        return self._images[key]


def _self_calibrated_scan_outcome(spec: SlideCalibrationSpec, scope: str, slide: str, rendered: dict,
                                  model_dir: Path, two_shot_path: Path, work_dir: Path) -> dict:
    tiles = rendered["tiles"] | {"imaging": np.full(len(rendered["tiles"]["images"]), scope)}
    return calibrated_scan_outcomes(rendered["stacks"], tiles, SlideRefocuser(spec, scope, slide),
                                    np.ones(len(tiles["images"]), bool), imaging_condenser(scope), model_dir,
                                    two_shot_path, work_dir, threads=1)


def self_calibrated_scan_outcomes(spec: SlideCalibrationSpec, cache_dir: Path, model_dir: Path, two_shot_path: Path,
                                  workers: int = 2, log=print) -> dict:
    """Per "microscope / slide": both models calibrated on the slide's sweeps, then the scan outcome of its test
    fields with the shipped models, the calibrated two-shot model alone and both calibrated (what a scan that
    calibrates itself reads its tiles with), `shift_evaluation.calibrated_scan_outcomes`; a slide per process. The
    fields re-imaged for the scan are rendered each time: they are not cached."""
    slides = render_all(spec, cache_dir, log=log)
    with tempfile.TemporaryDirectory() as work:
        jobs = [(spec, scope, slide, rendered, model_dir, two_shot_path, Path(work) / f"{scope}-{slide}")
                for (scope, slide), rendered in slides.items()]
        results = starmap_in_processes(_self_calibrated_scan_outcome, jobs, workers)
    return dict(zip((f"{scope} / {slide}" for scope, slide in slides), results))
