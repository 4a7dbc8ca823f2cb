"""Evaluation under distribution shift: content sources x imaging models x objectives.

Every cell of the table images one kind of content (held-out procedural specimens, real
immunohistochemistry, real H&E) through one microscope (the training simulator, or one of the
held-out microscopes of `heldout_imaging`, which training never sees) with one objective, at known
defocus, and asks the focus model what a scan would ask it. The table reports, per cell: MAE,
median, p95, sign accuracy, the fraction of tiles a scan would act on (`trusts_estimate`), their MAE,
and how many of those are confidently wrong (|error| > 1 µm while trusted).

Tiles are rendered once per specification and kept in a cache file: models are compared on the very
same images, and re-evaluating a model costs only its inference.
"""
from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from wsi_acquisition.focus import (BRACKET, OTHER_WAY, correction_captures, focus_action, kept_capture, probe_step_um,
                                   side_from_probe, trusts_estimate, two_shot_offset)
from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import DEFAULT_CONDENSER_FILL, STANDARD_OBJECTIVES, depth_of_field_um
from wsi_autofocus import heldout_imaging, two_shot
from wsi_autofocus.calibration_store import CalibrationError, ZStack, stacks_with_focus
from wsi_autofocus.content import EVALUATION_IMAGES, RealImageSpecimen
from wsi_autofocus.data import (OBJECTIVES, SPLITS, fields_showing_tissue, save_npz, specimen_for_seed,
                               starmap_in_processes, tissue_points)
from wsi_autofocus.evaluate import sweep_time_s
from wsi_common.focus_metrics import MIN_FIELD_TISSUE_FRACTION, brenner, focus_tolerance_um
from wsi_common.objective import DEFAULT_OBJECTIVE_MAGNIFICATION

OWN_SIMULATOR = "own-simulator"
IMAGING_MODELS = (OWN_SIMULATOR, *heldout_imaging.HELD_OUT_SCOPES)
PROCEDURAL = "procedural-heldout"
CONTENT_SOURCES = (PROCEDURAL, *EVALUATION_IMAGES)


@dataclass(frozen=True)
class ShiftSpec:
    tile_px: int = 384
    tiles_per_cell: int = 24
    max_defocus_um: float = 10.0
    objectives: tuple[float, ...] = OBJECTIVES
    imaging: tuple[str, ...] = IMAGING_MODELS
    content: tuple[str, ...] = CONTENT_SOURCES
    exposure_ms: float = 8.0
    seed: int = 11
    min_field_tissue_fraction: float = MIN_FIELD_TISSUE_FRACTION


@functools.cache
def rendering_fingerprint() -> str:
    """Digest of small images from every path the evaluation's cached images come from: the virtual microscope's
    overview (fields are drawn on its tissue mask) and capture, and each held-out microscope imaging procedural and
    real content. A spec does not say which renderer drew a cache (a faster camera-noise draw, say, moves both the
    images and the fields drawn): a cache of another renderer's images is not read as this one's."""
    procedural = specimen_for_seed(SPLITS["test"].specimen_seeds[0])
    left, top, right, bottom = procedural.tissue_bounds_um()[0]
    real = RealImageSpecimen(EVALUATION_IMAGES["real-he"])
    fields = ((procedural, (left + right) / 2, (top + bottom) / 2),
              (real, *real.tissue_points(np.random.default_rng(0), 1)[0]))
    microscope = VirtualMicroscope(specimen=procedural, seed=0)
    _, x, y = fields[0]
    images = [microscope.capture_overview(pixel_size_um=1000.0).image_rgb8,
              microscope.capture(x, y, microscope.focal_z_um(x, y) + 2.0, DEFAULT_OBJECTIVE_MAGNIFICATION,
                                 roi=microscope.camera.centre_roi(32)).image_rgb8]
    images += [heldout_imaging.capture(scope, specimen, x, y, 2.0, DEFAULT_OBJECTIVE_MAGNIFICATION, 32,
                                       np.random.default_rng(0)).image_rgb8
               for specimen, x, y in fields for scope in heldout_imaging.HELD_OUT_SCOPES.values()]
    return hashlib.sha256(b"".join(image.tobytes() for image in images)).hexdigest()


# How the test fields are drawn beyond what a spec says, in a cache file's key: a procedural test field shows tissue
# over the area its own microscope images (`data.in_focus_tissue_fraction`). Caches of fields checked over the
# virtual microscope's wider field, which a finer-pixelled held-out camera could see as bare glass, are not read.
FIELD_RULE = "tissue over the imaging microscope's own field"


def cache_key(spec) -> str:
    """Key of an evaluation cache file: the spec (a dataclass) its images were rendered for, the renderers that
    drew them (`rendering_fingerprint`) and how its fields were drawn (`FIELD_RULE`)."""
    text = json.dumps(asdict(spec), sort_keys=True) + rendering_fingerprint() + FIELD_RULE
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _procedural_specimens():
    return [specimen_for_seed(seed) for seed in SPLITS["test"].specimen_seeds]


def _positions(spec: ShiftSpec, content: str, magnification: float, rng: np.random.Generator, specimens,
               pixel_size_um: float | None) -> list[tuple[object, float, float]]:
    """(specimen, x, y) for `spec.tiles_per_cell` tiles on tissue of a content source; a procedural tile's field
    (the area a microscope with `pixel_size_um` images, None: the virtual microscope's, imaged in focus by the
    virtual microscope) shows at least `spec.min_field_tissue_fraction` of tissue."""
    if content != PROCEDURAL:
        specimen = RealImageSpecimen(EVALUATION_IMAGES[content])
        return [(specimen, float(x), float(y)) for x, y in specimen.tissue_points(rng, spec.tiles_per_cell)]
    chosen = rng.integers(0, len(specimens), spec.tiles_per_cell)
    out = []
    for index, specimen in enumerate(specimens):
        picks = int((chosen == index).sum())
        if picks:
            scope = VirtualMicroscope(specimen=specimen, seed=SPLITS["test"].specimen_seeds[index])
            out += [(specimen, float(x), float(y)) for x, y in fields_showing_tissue(
                scope, rng, picks, magnification, spec.tile_px, spec.min_field_tissue_fraction,
                pixel_size_um=pixel_size_um)]
    return out


def _cells(spec: ShiftSpec) -> list[tuple[str, str, float]]:
    """(content, imaging, objective) of every cell, in the order the tiles are stored."""
    return [(content, imaging, magnification) for content in spec.content for imaging in spec.imaging
            for magnification in spec.objectives]


def _cell_layout(spec: ShiftSpec, content: str, imaging: str, magnification: float):
    """The cell's random generator, tile positions and defocus: the same on every call."""
    rng = np.random.default_rng([spec.seed, CONTENT_SOURCES.index(content), IMAGING_MODELS.index(imaging),
                                 int(magnification)])
    specimens = _procedural_specimens() if content == PROCEDURAL else None
    pixel_um = (None if imaging == OWN_SIMULATOR
                else heldout_imaging.HELD_OUT_SCOPES[imaging].pixel_size_um(magnification))
    positions = _positions(spec, content, magnification, rng, specimens, pixel_um)
    defocus = rng.uniform(-spec.max_defocus_um, spec.max_defocus_um, spec.tiles_per_cell)
    return rng, positions, defocus


class _FieldCamera:
    """Images fields of one cell's specimens at a chosen defocus, as that cell's microscope does."""

    def __init__(self, spec: ShiftSpec, imaging: str, magnification: float):
        self.spec, self.imaging, self.magnification = spec, imaging, magnification
        self._microscopes = {}

    def _microscope(self, specimen) -> VirtualMicroscope:
        """One virtual microscope per specimen, built once, on first use."""
        if id(specimen) not in self._microscopes:
            self._microscopes[id(specimen)] = VirtualMicroscope(specimen=specimen, seed=self.spec.seed)
        return self._microscopes[id(specimen)]

    def capture(self, specimen, x: float, y: float, defocus_um: float, rng: np.random.Generator):
        if self.imaging != OWN_SIMULATOR:
            return heldout_imaging.capture(heldout_imaging.HELD_OUT_SCOPES[self.imaging], specimen, x, y, defocus_um,
                                           self.magnification, self.spec.tile_px, rng)
        microscope = self._microscope(specimen)
        roi = microscope.camera.centre_roi(self.spec.tile_px)
        return microscope.capture(x, y, float(microscope.focal_z_um(x, y)) + defocus_um, self.magnification,
                                  exposure_ms=self.spec.exposure_ms, roi=roi)

    def depth_of_field_um(self, specimen) -> float:
        if self.imaging != OWN_SIMULATOR:
            scope = heldout_imaging.HELD_OUT_SCOPES[self.imaging]
            return depth_of_field_um(STANDARD_OBJECTIVES[float(self.magnification)], scope.camera.pixel_size_um)
        microscope = self._microscope(specimen)
        return microscope.depth_of_field_um(self.magnification)


def render_cell(args: tuple[ShiftSpec, str, str, float]) -> dict:
    """Tiles of one (content, imaging, objective) cell, at defocus uniform over +-max_defocus_um."""
    spec, content, imaging, magnification = args
    rng, positions, defocus = _cell_layout(spec, content, imaging, magnification)
    camera = _FieldCamera(spec, imaging, magnification)
    images, truth, aperture, pixel, dof = [], [], [], [], []
    for (specimen, x, y), d in zip(positions, defocus):
        capture = camera.capture(specimen, x, y, float(d), rng)
        images.append(capture.image_rgb8)
        truth.append(capture.defocus_um)
        aperture.append(capture.numerical_aperture)
        pixel.append(capture.pixel_size_um)
        dof.append(camera.depth_of_field_um(specimen))
    count = len(images)
    return {"images": np.stack(images), "true_um": np.array(truth, np.float32),
            "numerical_aperture": np.array(aperture, np.float32), "pixel_size_um": np.array(pixel, np.float32),
            "depth_of_field_um": np.array(dof, np.float32), "objective": np.full(count, magnification, np.float32),
            "content": np.array([content] * count), "imaging": np.array([imaging] * count)}


def render_tiles(spec: ShiftSpec, cache_dir: Path, workers: int = 2, log=print) -> dict:
    """All cells' tiles, from the cache when this specification was rendered before."""
    path = Path(cache_dir) / f"shift-tiles-{cache_key(spec)}.npz"
    if path.exists():
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    jobs = [(spec, *cell) for cell in _cells(spec)]
    log(f"rendering {len(jobs)} cells x {spec.tiles_per_cell} tiles into {path}")
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = []
            for part in pool.imap(render_cell, jobs):
                parts.append(part)
                log(f"  {len(parts)}/{len(jobs)} cells")
    else:
        parts = [render_cell(job) for job in jobs]
    tiles = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    save_npz(path, tiles)
    (path.with_suffix(".json")).write_text(json.dumps(asdict(spec), indent=1))
    return tiles


def estimate_tiles(estimator, tiles: dict, batch: int = 16, condenser: two_shot.Condenser | None = None) -> dict:
    """The estimator's defocus and uncertainty for every tile, called as the autofocus node calls it
    (with the tile's objective NA and pixel size, and the condenser its microscope declares: `condenser` for
    tiles of one microscope, else each tile's `imaging_condenser`)."""
    results = []
    condensers = ([condenser] * len(tiles["images"]) if condenser is not None
                  else [imaging_condenser(imaging) for imaging in tiles["imaging"]])
    for start in range(0, len(tiles["images"]), batch):
        stop = start + batch
        results += estimator.estimate_many(list(tiles["images"][start:stop]),
                                           list(zip(tiles["numerical_aperture"][start:stop].tolist(),
                                                    tiles["pixel_size_um"][start:stop].tolist())),
                                           condensers[start:stop])
    return {"predicted_um": np.array([r.defocus_um for r in results]),
            "uncertainty_um": np.array([r.uncertainty_um for r in results]),
            "distance_um": np.array([r.distance_um for r in results]), "tile_estimates": results}


def cell_statistics(tiles: dict, estimates: dict, mask: np.ndarray | None = None) -> dict:
    """The table's statistics over the tiles in `mask` (all by default); `distance_mae_um` is how far
    from focus the tiles were read, whichever side (blur alone), beside the signed MAE; `bias_um` the mean
    signed error (a calibration that learnt a focus other than the evaluation's carries it here)."""
    mask = np.ones(len(tiles["true_um"]), bool) if mask is None else mask
    true, predicted, sigma = tiles["true_um"][mask], estimates["predicted_um"][mask], estimates["uncertainty_um"][mask]
    dof, distance = tiles["depth_of_field_um"][mask], estimates["distance_um"][mask]
    error = np.abs(predicted - true)
    signed = np.abs(true) > 1.0
    acted = np.array([trusts_estimate(s, d) for s, d in zip(sigma, dof)], bool)
    return {"n": int(len(true)), "mae_um": float(error.mean()), "median_abs_error_um": float(np.median(error)),
            "bias_um": float(np.mean(predicted - true)),
            "distance_mae_um": float(np.abs(distance - np.abs(true)).mean()),
            "p95_abs_error_um": float(np.percentile(error, 95)),
            "sign_accuracy_beyond_1um": float(np.mean(np.sign(predicted[signed]) == np.sign(true[signed])))
            if signed.any() else None,
            "fraction_acted_on": float(acted.mean()),
            "mae_acted_on_um": float(error[acted].mean()) if acted.any() else None,
            "confidently_wrong": int(np.sum(acted & (error > focus_tolerance_um(dof))))}


# The pooled rows are also given per bin of true distance from focus: on a microscope a model never saw it can
# read the distance right near focus and long or short far from it.
DISTANCE_BINS_UM = ((0.0, 1.0), (1.0, 3.0), (3.0, 6.0), (6.0, 10.0))


def by_distance(tiles: dict, estimates: dict, mask: np.ndarray) -> list[dict]:
    """Per bin of true |defocus| (`DISTANCE_BINS_UM`, each bin's upper edge included) of the tiles in `mask`: how
    many, their MAE and their mean |estimate| - |defocus| (`distance_bias_um` > 0: read farther from focus than
    they are)."""
    distance = np.abs(tiles["true_um"])
    bins = []
    for low, high in DISTANCE_BINS_UM:
        inside = mask & (distance > low) & (distance <= high)
        error = estimates["predicted_um"][inside] - tiles["true_um"][inside]
        bins.append({"from_um": low, "to_um": high, "n": int(inside.sum()),
                     "mae_um": float(np.abs(error).mean()) if inside.any() else None,
                     "distance_bias_um": float(np.mean(np.abs(estimates["predicted_um"][inside]) - distance[inside]))
                     if inside.any() else None})
    return bins


def summarize(tiles: dict, estimates: dict) -> dict:
    """Per (content, imaging, objective) cell, and pooled over the held-out imaging models x real content
    at 20x (the issue's headline numbers)."""
    cells = []
    keys = zip(tiles["content"], tiles["imaging"], tiles["objective"])
    key_array = np.array([f"{c}|{i}|{o:g}" for c, i, o in keys])
    for key in dict.fromkeys(key_array):
        content, imaging, objective = key.split("|")
        mask = key_array == key
        cells.append({"content": content, "imaging": imaging, "objective": f"{objective}x",
                      **cell_statistics(tiles, estimates, mask)})

    def pooled(mask) -> dict:
        return (cell_statistics(tiles, estimates, mask) | {"by_distance": by_distance(tiles, estimates, mask)}
                if mask.any() else {"n": 0})

    held_out = tiles["imaging"] != OWN_SIMULATOR
    twenty = tiles["objective"] == DEFAULT_OBJECTIVE_MAGNIFICATION
    return {"cells": cells,
            "pooled_20x": {
                "held_out_imaging_all_content": pooled(held_out & twenty),
                "held_out_imaging_real_content": pooled(held_out & twenty & (tiles["content"] != PROCEDURAL)),
                "own_simulator_procedural": pooled(~held_out & twenty & (tiles["content"] == PROCEDURAL)),
                "own_simulator_real_content": pooled(~held_out & twenty & (tiles["content"] != PROCEDURAL))}}


def format_table(summary: dict) -> str:
    header = (f"{'content':<19}{'imaging':<16}{'obj':>4} {'n':>4} {'MAE µm':>7} {'median':>7} {'p95':>6} "
              f"{'|d| MAE':>8} {'sign':>6} {'acted':>6} {'MAE act':>8} {'wrong':>6}")
    lines = [header]

    def row(label_content, label_imaging, objective, s):
        sign = f"{s['sign_accuracy_beyond_1um']:.0%}" if s.get("sign_accuracy_beyond_1um") is not None else "–"
        acted = f"{s['mae_acted_on_um']:.2f}" if s.get("mae_acted_on_um") is not None else "–"
        return (f"{label_content:<19}{label_imaging:<16}{objective:>4} {s['n']:4d} {s['mae_um']:7.2f} "
                f"{s['median_abs_error_um']:7.2f} {s['p95_abs_error_um']:6.2f} {s['distance_mae_um']:8.2f} {sign:>6} "
                f"{s['fraction_acted_on']:6.0%} {acted:>8} {s['confidently_wrong']:6d}")

    for cell in summary["cells"]:
        lines.append(row(cell["content"], cell["imaging"], cell["objective"], cell))
    lines.append("")
    for name, s in summary["pooled_20x"].items():
        if s["n"]:
            lines.append(f"20x pooled, {name.replace('_', ' '):<36} n={s['n']:4d}  MAE {s['mae_um']:.2f} µm  "
                         f"median {s['median_abs_error_um']:.2f}  |d| MAE {s['distance_mae_um']:.2f}  "
                         f"sign {s['sign_accuracy_beyond_1um'] or 0:.0%}  "
                         f"acted on {s['fraction_acted_on']:.0%} (MAE {s['mae_acted_on_um'] or 0:.2f})  "
                         f"confidently wrong {s['confidently_wrong']}")
    lines += ["", "20x pooled, by true distance from focus: MAE µm / mean |estimate| - |d| µm (> 0: read as farther "
                  "from focus than it is)",
              f"{'':<48}" + "".join(f"{f'{low:g}-{high:g} µm':>15}" for low, high in DISTANCE_BINS_UM)]

    def distance_bin(b: dict) -> str:
        return f"{b['mae_um']:.2f} / {b['distance_bias_um']:+.2f}" if b["n"] else "–"

    for name, s in summary["pooled_20x"].items():
        if s["n"]:
            lines.append(f"{name.replace('_', ' '):<48}" + "".join(f"{distance_bin(b):>15}" for b in s["by_distance"]))
    return "\n".join(lines)


def imaging_condenser(imaging: str) -> two_shot.Condenser:
    """The condenser a microscope of the evaluation declares to the two-shot model: the virtual microscope's, or
    a held-out microscope's (`heldout_imaging.Illumination.declared_condenser`)."""
    if imaging == OWN_SIMULATOR:
        return two_shot.Condenser(DEFAULT_CONDENSER_FILL)
    return heldout_imaging.HELD_OUT_SCOPES[imaging].illumination.declared_condenser()


def pair_estimates(model, images, images_above, numerical_apertures, pixel_sizes_um, steps_um, condensers) -> dict:
    """The two-shot model's estimate for each image and its second exposure `steps_um` higher under its
    microscope's declared condenser, and the compute time of each."""
    predicted, sigma, compute_s = [], [], []
    for image, above, aperture, pixel, step, condenser in zip(images, images_above, numerical_apertures,
                                                              pixel_sizes_um, steps_um, condensers):
        started = time.perf_counter()
        estimate = model.estimate(image, above, float(aperture), float(pixel), float(step), condenser)
        compute_s.append(time.perf_counter() - started)
        predicted.append(estimate.defocus_um)
        sigma.append(estimate.uncertainty_um)
    predicted = np.array(predicted)
    return {"predicted_um": predicted, "uncertainty_um": np.array(sigma), "distance_um": np.abs(predicted),
            "compute_s": np.array(compute_s)}


def second_exposures(tiles: dict, refocuser: "Refocuser", indices=None, workers: int = 2) -> tuple[list, list]:
    """(images, steps µm): for each tile (of `indices`, default all) a second exposure of its field one
    `two_shot.default_step_um` higher, imaged by the tile's own microscope and cached by `refocuser`."""
    indices = range(len(tiles["images"])) if indices is None else [int(index) for index in indices]
    steps = [two_shot.default_step_um(float(tiles["numerical_aperture"][index])) for index in indices]
    requests = [(index, float(tiles["true_um"][index]) + step) for index, step in zip(indices, steps)]
    refocuser.prefetch(requests, workers)
    above = [refocuser.image(index, z) for index, z in requests]
    refocuser.save()
    return above, steps


def two_shot_estimates(model, tiles: dict, refocuser: "Refocuser", workers: int = 2,
                       condenser_known: bool = True) -> dict:
    """The two-shot model's estimate for every tile and its `second_exposures`, under the condenser its
    microscope declares (`imaging_condenser`) or with the condenser not known."""
    above, steps = second_exposures(tiles, refocuser, workers=workers)
    return pair_estimates(model, tiles["images"], above, tiles["numerical_aperture"], tiles["pixel_size_um"], steps,
                          [imaging_condenser(imaging) if condenser_known else two_shot.UNKNOWN_CONDENSER
                           for imaging in tiles["imaging"]])


def two_shot_evaluation(tiles: dict, estimates: dict) -> dict:
    """The held-out imaging table of the two-shot model's `two_shot_estimates`, and what its second exposure
    costs at 20x beside the single shot: a z move of one step, a settle and an exposure."""
    twenty = tiles["objective"] == DEFAULT_OBJECTIVE_MAGNIFICATION
    step_um = two_shot.default_step_um(float(np.median(tiles["numerical_aperture"][twenty])))
    return summarize(tiles, estimates) | {"cost_20x": {
        "step_um": step_um, "second_exposure_s": sweep_time_s(1, step_um, ShiftSpec.exposure_ms),
        "compute_ms_median": float(np.median(estimates["compute_s"][twenty]) * 1e3),
        "tile_px": int(tiles["images"].shape[1])}}


def format_two_shot(evaluation: dict) -> str:
    cost = evaluation["cost_20x"]
    return (f"two shots: the tile and a second exposure {two_shot.DEFAULT_STEP_DEPTHS:g} depths of focus higher "
            f"({cost['step_um']:.2f} µm at 20x: +{cost['second_exposure_s'] * 1e3:.0f} ms of stage and exposure, "
            f"{cost['compute_ms_median']:.1f} ms to estimate on {cost['tile_px']} px tiles)\n"
            + format_table(evaluation))




# -- what a scan makes of the estimates ----------------------------------------------------------------


def _by_cell(spec: ShiftSpec, items: list, tile_index) -> dict[int, list]:
    """`items` grouped by the cell of their tile (`tile_index(item)`), in order: a cell's tiles share one
    specimen and camera, so one job renders them."""
    groups: dict[int, list] = {}
    for item in items:
        groups.setdefault(tile_index(item) // spec.tiles_per_cell, []).append(item)
    return groups


def refocus_rng(seed: int, index: int, defocus_um: float) -> np.random.Generator:
    """The camera-noise draw of field `index` imaged again at `defocus_um`: one per field and defocus (to the nm),
    so a field re-imaged twice at one defocus gives the same image."""
    return np.random.default_rng([seed, index, int(round(abs(defocus_um) * 1000)), int(defocus_um < 0)])


class Refocuser:
    """Images a tile's field of the shift evaluation again at another defocus, as a scan does for a side
    probe or a correction; images are kept in a cache file beside the tiles' (none without a cache_dir)."""

    def __init__(self, spec: ShiftSpec, cache_dir: Path | None):
        self.spec = spec
        self.path = Path(cache_dir) / f"refocus-{cache_key(spec)}.npz" if cache_dir is not None else None
        self._images = dict(np.load(self.path)) if self.path is not None and self.path.exists() else {}
        self._added = False
        self._cells: dict[int, tuple[list, _FieldCamera]] = {}

    @staticmethod
    def _key(index: int, defocus_um: float) -> str:
        return f"{index}|{defocus_um:.3f}"

    def prefetch(self, requests: list[tuple[int, float]], workers: int = 2) -> None:
        """Render the (tile index, defocus) images not yet cached, a cell per job in `workers` processes:
        the same images `image` would render one by one."""
        by_cell = _by_cell(self.spec, [request for request in requests if self._key(*request) not in self._images],
                           lambda request: request[0])
        jobs = [(self.spec, cell_requests) for cell_requests in by_cell.values()]
        for cell_requests, images in zip(by_cell.values(), starmap_in_processes(_refocused_images, jobs, workers)):
            for (index, defocus_um), image in zip(cell_requests, images):
                self._images[self._key(index, defocus_um)] = image
                self._added = True

    def image(self, index: int, defocus_um: float) -> np.ndarray:
        key = self._key(index, defocus_um)
        if key not in self._images:
            cell, within = divmod(index, self.spec.tiles_per_cell)
            if cell not in self._cells:
                content, imaging, magnification = _cells(self.spec)[cell]
                _, positions, _ = _cell_layout(self.spec, content, imaging, magnification)
                self._cells[cell] = positions, _FieldCamera(self.spec, imaging, magnification)
            positions, camera = self._cells[cell]
            specimen, x, y = positions[within]
            rng = refocus_rng(self.spec.seed, index, defocus_um)
            self._images[key] = camera.capture(specimen, x, y, round(defocus_um, 3), rng).image_rgb8
            self._added = True
        return self._images[key]

    def save(self) -> None:
        if self._added and self.path is not None:
            save_npz(self.path, self._images)
            self._added = False


def _refocused_images(spec: ShiftSpec, requests: list[tuple[int, float]]) -> list[np.ndarray]:
    refocuser = Refocuser(spec, None)
    return [refocuser.image(index, defocus_um) for index, defocus_um in requests]


def _with_sharpness(image: np.ndarray) -> tuple[np.ndarray, float]:
    return image, brenner(image)


def scan_outcomes(estimator, tiles: dict, estimates: dict, refocuser: Refocuser, mask: np.ndarray,
                  two_shot_model=None) -> dict:
    """For every tile in `mask`, taken at the focus map's z (its defocus), what the scan's inline
    autofocus does (`wsi_acquisition.focus`: act, or take a second exposure one probe step higher and act
    on both exposures' estimate (`two_shot_model`) when trusted, else on the side it shows, or keep; a
    correction still surely out of focus brackets focus with one more capture, one that lost sharpness is
    tried the other way) and the tile's defocus afterwards, the sharpest correction being kept only if sharper
    than the focus map's capture."""
    indices = np.flatnonzero(mask)
    final, action, probe_side_right, exposures, kinds = [], [], [], [], []
    for index in indices:
        estimate, true = estimates["tile_estimates"][index], float(tiles["true_um"][index])
        dof = float(tiles["depth_of_field_um"][index])
        optics = (float(tiles["numerical_aperture"][index]), float(tiles["pixel_size_um"][index]))
        condenser = imaging_condenser(tiles["imaging"][index])
        focus_map_sharpness = brenner(tiles["images"][index])
        chosen = focus_action(estimate.defocus_um, estimate.uncertainty_um, estimate.distance_um,
                              estimate.distance_uncertainty_um, dof)
        offset, shots, side_right = None, 1, None
        if chosen == "correct":
            offset = -estimate.defocus_um
        elif chosen == "probe":
            step = probe_step_um(dof, estimate.distance_um)
            probe_image = refocuser.image(index, true + step)
            shots += 1
            pair = (two_shot_model.estimate(tiles["images"][index], probe_image, *optics, step, condenser)
                    if two_shot_model is not None else None)
            if pair is not None:
                offset = two_shot_offset(pair.defocus_um, pair.uncertainty_um, pair.above_focus_probability, dof)
            if offset is not None:
                side_right = (pair.defocus_um > 0) == (true > 0)
            else:
                probe, = estimator.estimate_many([probe_image], [optics], [condenser])
                above, _ = side_from_probe(estimate, probe, step, focus_map_sharpness, brenner(probe_image))
                if above is not None:
                    offset = -estimate.distance_um if above else estimate.distance_um
                    side_right = above == (true > 0)
        after, taken = true, []
        if offset is not None:
            # Each capture is (image, its sharpness), measured once, as a scan's capture carries its record's.
            taken = correction_captures(offset, estimate.distance_um, dof,
                                        lambda step: _with_sharpness(refocuser.image(index, true + step)),
                                        lambda taken: estimator.estimate_many([taken[0]], [optics], [condenser])[0],
                                        lambda taken: taken[1], focus_map_sharpness)
            shots += len(taken)
            kept = kept_capture(focus_map_sharpness, [sharpness for _, _, (_, sharpness) in taken])
            if kept is not None:
                after = true + taken[kept][1]
        final.append(after)
        action.append(chosen)
        probe_side_right.append(side_right)
        exposures.append(shots)
        kinds.append({kind for kind, _, _ in taken})
    return {"index": indices, "true_um": tiles["true_um"][indices], "final_um": np.array(final),
            "depth_of_field_um": tiles["depth_of_field_um"][indices],
            "action": np.array(action), "probe_side_right": np.array(probe_side_right, dtype=object),
            "exposures": np.array(exposures),
            "bracketed": np.array([BRACKET in taken for taken in kinds], bool),
            "other_way": np.array([OTHER_WAY in taken for taken in kinds], bool)}


# The models a scan outcome after a calibration is measured with (`calibrated_scan_outcomes`).
SHIPPED_MODELS, TWO_SHOT_CALIBRATED, BOTH_CALIBRATED = "shipped models", "two-shot calib.", "both calibrated"


def scan_outcome_statistics(outcomes: dict) -> dict:
    """Focus-map-only against the scan's inline autofocus: mean |defocus| before and after, tiles made
    worse, tiles within half the depth of field before and after, side probes and how often they
    decided right, corrections that bracketed focus or were tried the other way."""
    before, after = np.abs(outcomes["true_um"]), np.abs(outcomes["final_um"])
    half_dof = outcomes["depth_of_field_um"] / 2
    decided = np.array([side is not None for side in outcomes["probe_side_right"]], bool)
    return {"n": int(len(before)), "focus_map_mean_abs_um": float(before.mean()),
            "scan_mean_abs_um": float(after.mean()),
            "tiles_worse": int(np.sum(after > before + 1e-6)),
            "worst_change_um": float(np.max(after - before)) if len(before) else 0.0,
            "tiles_improved": int(np.sum(after < before - 1e-6)),
            "in_focus_focus_map": int(np.sum(before <= half_dof)), "in_focus_scan": int(np.sum(after <= half_dof)),
            "corrections": int(np.sum(outcomes["action"] == "correct")),
            "side_probes": int(np.sum(outcomes["action"] == "probe")), "probes_decided": int(decided.sum()),
            "probes_decided_right": int(sum(bool(side) for side in outcomes["probe_side_right"][decided])),
            "bracketed": int(outcomes["bracketed"].sum()), "other_way": int(outcomes["other_way"].sum()),
            "exposures_per_tile": float(outcomes["exposures"].mean())}


def scan_outcome_table(spec: ShiftSpec, tiles: dict, estimator, estimates: dict, cache_dir: Path,
                       magnification: float = DEFAULT_OBJECTIVE_MAGNIFICATION, two_shot_model=None) -> dict:
    """`scan_outcome_statistics` per imaging model at one objective, all content sources pooled."""
    refocuser = Refocuser(spec, cache_dir)
    table = {}
    try:
        for imaging in dict.fromkeys(tiles["imaging"]):
            mask = (tiles["imaging"] == imaging) & (tiles["objective"] == magnification)
            table[str(imaging)] = scan_outcome_statistics(scan_outcomes(estimator, tiles, estimates, refocuser, mask,
                                                                        two_shot_model))
    finally:
        refocuser.save()
    return table


def scan_outcome_models(single_shot_model_dir: Path, two_shot_model_path: Path) -> dict:
    """Which pair of models a scan outcome table was measured with: the sha256 of the single-shot checkpoint
    (`model.pt`, which every backend's files are exported from) and of the two-shot model file. The table has one
    home, the two-shot evaluation (`wsi-autofocus eval-two-shot`); the single-shot card shows it only for the model
    it was measured with."""
    def sha256(path: Path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    two_shot_file = Path(two_shot_model_path)
    two_shot_file = two_shot_file / two_shot.MODEL_FILE if two_shot_file.is_dir() else two_shot_file
    return {"single_shot": sha256(Path(single_shot_model_dir) / "model.pt"), "two_shot": sha256(two_shot_file)}


def format_scan_outcomes(table: dict, magnification: float = DEFAULT_OBJECTIVE_MAGNIFICATION,
                         title: str | None = None, label: str = "imaging") -> str:
    """`scan_outcome_statistics` per row of `table` (named in a column headed `label`), under `title`."""
    width = max([16] + [len(name) + 1 for name in table])
    lines = [title or f"scan outcome ({magnification:g}x, every tile taken at the focus map's z = its defocus; inline "
             "autofocus as the scan runs it, a correction kept only if sharper)",
             f"{label:<{width}}{'n':>4} {'map |d|':>8} {'scan |d|':>9} {'in focus':>9} {'worse':>6} {'improved':>9} "
             f"{'corrected':>10} {'probes':>7} {'decided':>8} {'right':>6} {'bracketed':>10} {'other way':>10} "
             f"{'shots/tile':>11}"]
    for imaging, s in table.items():
        in_focus = f"{s['in_focus_focus_map']}->{s['in_focus_scan']}"
        lines.append(f"{imaging:<{width}}{s['n']:4d} {s['focus_map_mean_abs_um']:8.2f} {s['scan_mean_abs_um']:9.2f} "
                     f"{in_focus:>9} {s['tiles_worse']:6d} {s['tiles_improved']:9d} {s['corrections']:10d} {s['side_probes']:7d} "
                     f"{s['probes_decided']:8d} {s['probes_decided_right']:6d} {s['bracketed']:10d} "
                     f"{s['other_way']:10d} {s['exposures_per_tile']:11.2f}")
    return "\n".join(lines)


def single_shot_estimates(model_dir: Path, tiles: dict, threads: int = 2) -> tuple:
    """The single-shot model of `model_dir` (ONNX Runtime) and its estimates of `tiles` (`estimate_tiles`)."""
    from wsi_autofocus.inference import FocusEstimator, load_backend

    estimator = FocusEstimator(load_backend("onnxruntime", model_dir, threads=threads)[0], model_dir)
    return estimator, estimate_tiles(estimator, tiles)


def _scan_outcome(single_shot: tuple, two_shot_path: Path, tiles: dict, refocuser, mask: np.ndarray) -> dict:
    estimator, estimates = single_shot
    return scan_outcome_statistics(scan_outcomes(estimator, tiles, estimates, refocuser, mask,
                                                 two_shot.TwoShotModel.load(two_shot_path)))


def calibrated_scan_outcomes(stacks: list[dict], tiles: dict, refocuser, mask: np.ndarray,
                             condenser: two_shot.Condenser, model_dir: Path, two_shot_path: Path, work_dir: Path,
                             shipped: tuple | None = None, threads: int = 2) -> dict:
    """`calibration.calibrate_both` (as the autofocus node does) on the rendered `stacks`, then the scan outcome
    (`scan_outcome_statistics`) of `tiles` in `mask` with the shipped models, with the calibrated two-shot model beside
    the shipped single shot (what a later scan is served) and with both calibrated (what the scan whose sweeps they
    are is served); and why a calibration was refused (it then leaves the shipped model). `refocuser` re-images a
    tile's field (`Refocuser`, `slide_calibration.SlideRefocuser`); `shipped`: the shipped single-shot model's
    `single_shot_estimates` of `tiles`, when already made."""
    from wsi_autofocus.calibration import calibrate_both

    shipped = shipped or single_shot_estimates(model_dir, tiles, threads)
    calibrated = calibrate_both(z_stacks(stacks), work_dir, model_dir, two_shot_path, condenser=condenser)
    calibrated_single_shot = (single_shot_estimates(calibrated.single_shot.model_dir, tiles, threads)
                              if calibrated.single_shot else shipped)
    calibrated_two_shot = calibrated.two_shot.path if calibrated.two_shot else two_shot_path
    return {"refused": list(calibrated.errors), "outcomes": {
        SHIPPED_MODELS: _scan_outcome(shipped, two_shot_path, tiles, refocuser, mask),
        TWO_SHOT_CALIBRATED: _scan_outcome(shipped, calibrated_two_shot, tiles, refocuser, mask),
        BOTH_CALIBRATED: _scan_outcome(calibrated_single_shot, calibrated_two_shot, tiles, refocuser, mask)}}


def format_calibrated_scan_outcomes(results: dict, title: str) -> str:
    """`calibrated_scan_outcomes` of each calibration, a row per pair of models, under `title` (columns as
    `format_scan_outcomes`), and the calibrations refused."""
    rows = {f"{name}, {models}": statistics for name, result in results.items()
            for models, statistics in result["outcomes"].items()}
    refused = [f"{name}: calibration refused: {reason}" for name, result in results.items()
               for reason in result["refused"]]
    return "\n".join([format_scan_outcomes(rows, title=title, label="calibrated on, models"), *refused])


# -- self-calibration under a held-out microscope ----------------------------------------------------


@dataclass(frozen=True)
class CalibrationSpec:
    """Focus-map-like z-sweeps of fields of the validation specimens under each held-out microscope at
    20x: a coarse sweep and a fine one around the start (as `ScanRunner.find_focus` takes them)."""
    sweeps: int = 9
    tile_px: int = 256
    coarse_half_range_um: float = 12.0
    coarse_step_um: float = 2.0
    fine_half_range_um: float = 2.0
    fine_step_um: float = 0.5
    magnification: float = DEFAULT_OBJECTIVE_MAGNIFICATION
    seed: int = 23

    def z_offsets_um(self) -> np.ndarray:
        coarse = np.arange(-self.coarse_half_range_um, self.coarse_half_range_um + 1e-9, self.coarse_step_um)
        fine = np.arange(-self.fine_half_range_um, self.fine_half_range_um + 1e-9, self.fine_step_um)
        return np.unique(np.round(np.concatenate([coarse, fine]), 6))


def render_sweeps(spec: CalibrationSpec, scope_name: str) -> list[dict]:
    """`spec.sweeps` z-stacks under one held-out microscope: images, stage z (true focus at z = 0 plus
    an unknown start offset, as a focus map starts from a guess) and optics."""
    scope = heldout_imaging.HELD_OUT_SCOPES[scope_name]
    rng = np.random.default_rng([spec.seed, IMAGING_MODELS.index(scope_name)])
    seeds = SPLITS["val"].specimen_seeds
    stacks = []
    for index in range(spec.sweeps):
        seed = seeds[index % len(seeds)]
        microscope = VirtualMicroscope(specimen=specimen_for_seed(seed), seed=seed)
        (x, y), = tissue_points(microscope, rng, 1)
        stacks.append(render_sweep(spec, scope, microscope.specimen, float(x), float(y), rng))
    return stacks


def render_sweep(spec: CalibrationSpec, scope, specimen, x_um: float, y_um: float, rng: np.random.Generator) -> dict:
    """One focus-map-like z-stack of the field at (x, y) under a held-out microscope: images, stage z (true
    focus at z = 0 plus an unknown start offset, as a focus map starts from a guess) and optics."""
    start = float(rng.uniform(-1.5, 1.5))           # the sweep is centred on a guess, not on focus
    z = start + spec.z_offsets_um()
    images = np.stack([heldout_imaging.capture(scope, specimen, x_um, y_um, float(d), spec.magnification,
                                               spec.tile_px, rng).image_rgb8 for d in z])
    return {"images": images, "z_um": z, "pixel_size_um": scope.pixel_size_um(spec.magnification),
            "numerical_aperture": scope.objective(spec.magnification).numerical_aperture}


def z_stacks(stacks: list[dict]) -> list:
    """Rendered sweeps as the calibration API takes them."""
    return [ZStack(s["images"], s["z_um"], float(s["pixel_size_um"]), float(s["numerical_aperture"])) for s in stacks]


def sweep_focus_um(images: np.ndarray, z_um: np.ndarray, pixel_size_um: float, numerical_aperture: float) -> float:
    """The focus a focus-map sweep of one field finds, as a calibration labels its sweeps (`ZStack.focus_z_um`: the
    refined Brenner peak, which must be clear); NaN where the sweep shows no clear focus."""
    try:
        return ZStack(images, np.asarray(z_um, float), pixel_size_um, numerical_aperture).focus_z_um()
    except CalibrationError:
        return float("nan")


def _tiles_sweep_focus(spec: ShiftSpec, indices: list[int], pixel_sizes_um: list[float], apertures: list[float],
                       z_um: np.ndarray) -> list[float]:
    refocuser = Refocuser(spec, None)
    return [sweep_focus_um(np.stack([refocuser.image(index, float(z)) for z in z_um]), z_um, pixel_size_um, aperture)
            for index, pixel_size_um, aperture in zip(indices, pixel_sizes_um, apertures)]


def with_sweep_focus(spec: ShiftSpec, tiles: dict, sweep_spec: CalibrationSpec, cache_dir: Path, workers: int = 2,
                     log=print) -> dict:
    """`tiles` with "sweep_focus_um": for each tile a calibration is judged on (held-out imaging at the sweeps'
    magnification), where a sweep of its field (the shape of a focus-map sweep, `sweep_spec.z_offsets_um()` around
    the evaluation's best focus) finds focus, from that best focus; NaN for the other tiles and where the sweep
    shows no clear focus. A calibration can learn no other focus than its sweeps': this is the focus each tile's
    own sweep would have taught. Kept in a cache file; the sweeps' images are not."""
    mask = (tiles["imaging"] != OWN_SIMULATOR) & (tiles["objective"] == sweep_spec.magnification)
    z_um = sweep_spec.z_offsets_um()
    path = Path(cache_dir) / f"tile-sweep-focus-{cache_key(spec)}-{cache_key(sweep_spec)}.npz"
    focus, measured = np.full(len(tiles["true_um"]), np.nan), np.zeros(len(tiles["true_um"]), bool)
    if path.exists():
        with np.load(path) as cached:
            focus, measured = cached["sweep_focus_um"], cached["measured"]
    missing = np.flatnonzero(mask & ~measured)
    if len(missing):
        log(f"sweeping the fields of {len(missing)} tiles ({len(z_um)} images each) into {path}")
        by_cell = _by_cell(spec, [int(index) for index in missing], lambda index: index)
        jobs = [(spec, indices, [float(tiles["pixel_size_um"][i]) for i in indices],
                 [float(tiles["numerical_aperture"][i]) for i in indices], z_um) for indices in by_cell.values()]
        for indices, values in zip(by_cell.values(), starmap_in_processes(_tiles_sweep_focus, jobs, workers)):
            focus[indices], measured[indices] = values, True
        save_npz(path, {"sweep_focus_um": focus, "measured": measured})
    return tiles | {"sweep_focus_um": np.where(mask, focus, np.nan)}


def render_all_sweeps(spec: CalibrationSpec, cache_dir: Path, workers: int = 2, log=print) -> dict[str, list[dict]]:
    """Sweeps for every held-out microscope, from the cache when rendered before."""
    path = Path(cache_dir) / f"calibration-sweeps-{cache_key(spec)}.npz"
    names = list(heldout_imaging.HELD_OUT_SCOPES)
    if not path.exists():
        log(f"rendering {spec.sweeps} calibration sweeps for each of {names} into {path}")
        rendered = starmap_in_processes(render_sweeps, [(spec, name) for name in names], workers)
        arrays = {}
        for name, stacks in zip(names, rendered):
            for index, stack in enumerate(stacks):
                for key, value in stack.items():
                    arrays[f"{name}|{index}|{key}"] = np.asarray(value)
        save_npz(path, arrays)
    with np.load(path) as data:
        out: dict[str, list[dict]] = {name: [] for name in names}
        for key in data.files:
            name, index, field_name = key.split("|")
            stacks = out[name]
            while len(stacks) <= int(index):
                stacks.append({})
            value = data[key]
            stacks[int(index)][field_name] = value if value.ndim else value.item()
    return out


def calibration_check(model_dir: Path | None, spec: CalibrationSpec, tiles: dict, work_dir: Path, backend: str = "onnxruntime",
                      log=print) -> dict:
    """Calibrate the model on each held-out microscope's sweeps (validation specimens) and evaluate it on
    that microscope's 20x tiles of the shift evaluation (test specimens and real content: other fields,
    other specimens). Returns per microscope the 20x statistics before and after, and the fit time."""
    sweeps = render_all_sweeps(spec, work_dir, log=log)
    results = {}
    for name, stacks in sweeps.items():
        mask = (tiles["imaging"] == name) & (tiles["objective"] == spec.magnification)
        results[name] = calibrated_statistics(model_dir, z_stacks(stacks), {key: value[mask] for key, value in tiles.items()},
                                              Path(work_dir) / f"calibrated-{name}", {"name": name, "objective": spec.magnification},
                                              imaging_condenser(name), backend)
        log(f"{name}: {describe_calibration(results[name])}")
    return results


def calibrated_statistics(model_dir: Path | None, stacks: list, tiles: dict, output_dir: Path, scanner: dict,
                          condenser: two_shot.Condenser, backend: str = "onnxruntime") -> dict:
    """`calibrate` the model on `stacks` (under the microscope's declared `condenser`) into `output_dir`, and
    `cell_statistics` of `tiles` with the model before and after; a refused calibration leaves the model in use,
    so "after" is then "before"."""
    from wsi_autofocus.calibration import CalibrationError, calibrate
    from wsi_autofocus.inference import FocusEstimator, load_backend

    started = time.monotonic()
    try:
        calibrated_dir, refused = calibrate(stacks, output_dir, model_dir, scanner=scanner,
                                            condenser=condenser).model_dir, None
    except CalibrationError as error:
        calibrated_dir, refused = model_dir, str(error)
    fit_s = time.monotonic() - started
    before, after = (estimate_tiles(FocusEstimator(load_backend(backend, directory)[0], directory), tiles,
                                    condenser=condenser) for directory in (model_dir, calibrated_dir))
    return calibration_result(tiles, before, after, stacks, condenser, fit_s, refused)


def calibration_result(tiles: dict, before: dict, after: dict, stacks: list, condenser: two_shot.Condenser,
                       fit_s: float, refused: str | None, mask: np.ndarray | None = None) -> dict:
    """A calibration's row: `cell_statistics` of the tiles (in `mask`) before and after, and the sweeps' `label_offset_um`.
    Where the tiles hold the focus their own sweeps find ("sweep_focus_um", `with_sweep_focus`): their mean offset
    from the evaluation's best focus (`tiles_focus_offset_um`, as the labels' for the calibration's sweeps) and the
    MAE after against each tile's sweep focus (`after_mae_tile_sweep_focus_um`, over the tiles whose sweep shows a
    clear focus): the error left of what a calibration from sweeps can learn."""
    mask = np.ones(len(tiles["true_um"]), bool) if mask is None else mask
    usable = _usable_stacks(stacks, condenser)
    result = {"before": cell_statistics(tiles, before, mask), "after": cell_statistics(tiles, after, mask),
              "fit_s": fit_s, "sweeps": len(stacks), "sweeps_used": len(usable), "refused": refused,
              "label_offset_um": label_offset_um(usable), "sharpest_offset_um": sharpest_offset_um(usable)}
    if "sweep_focus_um" in tiles:
        focus = tiles["sweep_focus_um"][mask]
        clear = np.isfinite(focus)
        error = after["predicted_um"][mask][clear] - (tiles["true_um"][mask][clear] - focus[clear])
        result |= {"tiles_focus_offset_um": float(np.mean(focus[clear])), "tiles_with_sweep_focus": int(clear.sum()),
                   "after_mae_tile_sweep_focus_um": float(np.mean(np.abs(error)))}
    return result


def _usable_stacks(stacks: list, condenser: two_shot.Condenser) -> list:
    """The sweeps a calibration under `condenser` uses (`stacks_with_focus`), their focus fixed; none when too
    few are usable."""
    try:
        return stacks_with_focus(stacks, lambda message: None, condenser)[0]
    except CalibrationError:
        return []


def label_offset_um(usable: list) -> float:
    """Mean over the sweeps a calibration uses (`_usable_stacks`) of the best focus it labels them with (the specimen
    plane `stacks_with_focus` places) minus the evaluation's best focus, which is z = 0 of every sweep `render_sweep`
    makes; NaN when too few are usable. A calibration learns its labels, so this offset stays in what it reads
    against the evaluation."""
    return float(np.mean([stack.best_focus_z_um for stack in usable])) if usable else float("nan")


def sharpest_offset_um(usable: list) -> float:
    """The same as `label_offset_um` for the sweeps' sharpest images (their Brenner peaks)."""
    return (float(np.mean([replace(stack, best_focus_z_um=None).focus_z_um() for stack in usable])) if usable
            else float("nan"))


def two_shot_calibrated_statistics(model_path: Path, stacks: list, tiles: dict, estimate, output: Path,
                                   scanner: dict, condenser: two_shot.Condenser, mask: np.ndarray | None = None,
                                   before: dict | None = None) -> dict:
    """`calibrate_two_shot` the model on `stacks` (under the microscope's declared `condenser`) into `output`,
    and `cell_statistics` of `tiles` (in `mask`) as `estimate(model)` reads them before (or `before`, already
    estimated) and after; a refused calibration leaves the model in use. Statistics as `calibrated_statistics`."""
    from wsi_autofocus.two_shot_calibration import calibrate_two_shot

    before = before if before is not None else estimate(two_shot.TwoShotModel.load(model_path))
    started = time.monotonic()
    try:
        result = calibrate_two_shot(stacks, output, model_path, scanner=scanner, condenser=condenser)
    except CalibrationError as error:
        after, refused, fit_s = before, str(error), time.monotonic() - started
    else:
        after, refused, fit_s = estimate(two_shot.TwoShotModel.load(result.path)), None, result.fit_s
    return calibration_result(tiles, before, after, stacks, condenser, fit_s, refused, mask)


def two_shot_calibration_check(model_path: Path, spec: CalibrationSpec, tiles: dict, refocuser: Refocuser,
                               before: dict, work_dir: Path, log=print) -> dict:
    """The two-shot model calibrated on each held-out microscope's sweeps (validation specimens) and judged
    on that microscope's 20x tiles (test specimens and real content) with their second exposures; `before`
    holds the uncalibrated model's `two_shot_estimates` of `tiles`."""
    results = {}
    for name, stacks in render_all_sweeps(spec, work_dir, log=log).items():
        mask = (tiles["imaging"] == name) & (tiles["objective"] == spec.magnification)
        results[name] = two_shot_calibrated_statistics(
            model_path, z_stacks(stacks), tiles, lambda model: two_shot_estimates(model, tiles, refocuser),
            Path(work_dir) / f"two-shot-calibrated-{name}-seed{spec.seed}.npz",
            {"name": name, "objective": spec.magnification}, imaging_condenser(name), mask, before)
        log(f"{name}: {describe_calibration(results[name])}")
    return results


# Independent draws of a calibration's nine sweeps (`calibration_draws`) each calibration of the evaluation is judged
# over: which fields are swept, where each sweep starts and the camera's noise moved the two-shot calibration on other
# specimens' MAE on the same tiles over 0.35-0.41 µm (astigmatic), 0.20-0.24 (ring-lit) and 0.295-0.52 (Gaussian-lit)
# in six draws (2026-12-08), more than separated the recipes compared on one draw.
CALIBRATION_DRAWS = 6


def calibration_draws(spec, draws: int = CALIBRATION_DRAWS) -> list:
    """`spec` (a `CalibrationSpec`, or a `slide_calibration.SlideCalibrationSpec`) and `draws` - 1 more of the
    following seeds: other fields swept (and on a slide other test fields), other start offsets, other camera
    noise."""
    return [replace(spec, seed=spec.seed + draw) for draw in range(draws)]


def over_draws(seeds: list[int], sweeps: int, draws: list[dict]) -> dict:
    """The calibration checks of independent draws (`two_shot_calibration_check` or
    `slide_calibration.two_shot_slide_calibration_check` results on `sweeps` sweeps, one per `calibration_draws` spec,
    of those `seeds`) side by side, per calibration: each draw's MAE before (a draw on a slide tests other fields)
    and its MAE and mean signed error after (a refused calibration leaves the model in use: its MAE before), how many
    draws were refused, the mean MAE before and the mean and standard deviation of the MAE after over the draws."""
    out = {}
    for name in draws[0]:
        after = [draw[name]["after"] for draw in draws]
        mae = np.array([statistics["mae_um"] for statistics in after])
        before = [draw[name]["before"]["mae_um"] for draw in draws]
        out[name] = {"mae_before_um": before, "mean_mae_before_um": float(np.mean(before)),
                     "mae_after_um": mae.tolist(),
                     "bias_after_um": [statistics["bias_um"] for statistics in after],
                     "refused": sum(bool(draw[name]["refused"]) for draw in draws),
                     "mean_mae_after_um": float(mae.mean()),
                     "sd_mae_after_um": float(mae.std(ddof=1)) if len(mae) > 1 else 0.0}
    return {"seeds": list(seeds), "sweeps": sweeps, "microscopes": out}


def format_over_draws(over: dict, target_um: float, title: str) -> str:
    """`over_draws` results as a table under `title` (formatted with the draws and sweeps): a row per calibration, the
    mean MAE before, the MAE after of each draw (by its seed), their mean and standard deviation, and how many draws
    meet `target_um`."""
    seeds, results = over["seeds"], over["microscopes"]
    width = max(18, *(len(name) + 2 for name in results))
    lines = [title.format(draws=len(seeds), sweeps=over["sweeps"]),
             f"{'calibrated on':<{width}}{'before':>8}" + "".join(f"{'seed ' + str(seed):>9}" for seed in seeds)
             + f"{'mean':>8}{'sd':>7}{'refused':>9}{'<= ' + format(target_um, 'g'):>9}"]
    for name, r in results.items():
        met = f"{sum(mae <= target_um for mae in r['mae_after_um'])}/{len(r['mae_after_um'])}"
        lines.append(f"{name:<{width}}{r['mean_mae_before_um']:8.2f}" + "".join(f"{mae:9.2f}" for mae in r["mae_after_um"])
                     + f"{r['mean_mae_after_um']:8.2f}{r['sd_mae_after_um']:7.2f}{r['refused']:9d}{met:>9}")
    return "\n".join(lines)


DRAWS_TITLE = ("two-shot self-calibration (20x) on {draws} independent draws of {sweeps} sweeps of validation "
               "specimens (other fields, start offsets and camera noise), tested on the same tiles of other specimens: "
               "MAE µm")


def describe_calibration(result: dict) -> str:
    return (f"MAE {result['before']['mae_um']:.2f} -> {result['after']['mae_um']:.2f} µm ({result['fit_s']:.0f} s, "
            f"{result['sweeps']} sweeps{', refused: ' + result['refused'] if result['refused'] else ''})")


TWO_SHOT_CALIBRATION_TITLE = ("two-shot self-calibration (20x): fitted on a held-out microscope's focus-map sweeps of "
                              "validation specimens, tested on its tiles of the test specimens and real content with "
                              "their second exposures")
# Title of the calibration table where the sweeps come from other specimens than the tiles.
OTHER_SPECIMENS_TITLE = ("self-calibration (20x): fitted on a held-out microscope's focus-map sweeps of validation "
                         "specimens, tested on its tiles of the test specimens and real content")


TILES_FOCUS_COLUMN = "tiles' focus off"
TILE_SWEEP_COLUMN = "MAE after, tile's sweep focus"
# What a calibration table's columns beyond the plain statistics say, for the cards.
CALIBRATION_COLUMNS_NOTE = (
    "\"sharpest off\" is where the calibration's sweeps' sharpest images (their sharpness peaks) lie from the plane "
    "the evaluation calls best focus (maximum mean MTF over 0.2-1.0 NA/lambda), averaged over the sweeps; "
    "\"labels off\" the same for the focus the calibration labels them from: the specimen plane, which a fit of the "
    "weak-object transfer's through-focus band powers finds in each sweep under the declared condenser "
    "(`specimen_plane`; the sharpest images are moved by the median over the sweeps of how far they lie from it). "
    "A specimen that only absorbs is sharpest at best focus; the optical path a stain adds moves its sharpest image "
    "off its plane, by an amount set by the specimen and the microscope (`test_heldout_imaging`), which the fit "
    f"undoes in part (`test_specimen_plane`). \"{TILES_FOCUS_COLUMN}\" is \"sharpest off\" for a focus-map-like "
    "sweep of each test tile's field about best focus (`shift_evaluation.with_sweep_focus`). \"bias after\" is the "
    f"calibrated model's mean signed error on the test tiles. \"{TILE_SWEEP_COLUMN}\" is the MAE after against "
    "the sharpest image of each test tile's own sweep (tiles whose sweep shows a clear focus): the kind of "
    "reference (a z-stack's sharpest plane) single-shot results on real slides are reported against; the targets "
    "are judged against the evaluation's best focus. \"sweeps\" counts those a calibration used of those taken: a "
    "sweep without a clear focus inside it, or whose image at focus shows under 2 % stained tissue on a colour "
    "camera (glass, dust), is left out (`calibration_store.stacks_with_focus`).")


def format_calibration(results: dict, title: str = OTHER_SPECIMENS_TITLE) -> str:
    """One row per calibration (`calibration_result`s by name): before and after; "sharpest off": the sweeps'
    sharpness peaks against the evaluation's best focus (`sharpest_offset_um`), "labels off": the focus they are
    labelled from (`label_offset_um`), "tiles' focus off" the sharpness peaks of sweeps of the test tiles' fields,
    "bias after": the mean signed error after, and "MAE after, tile's sweep focus": the MAE after against the focus
    each tile's own sweep finds, where results have them (older results printed as they were)."""
    width = max(18, *(len(name) + 2 for name in results))
    offsets = all("label_offset_um" in r for r in results.values())
    sharpest = all("sharpest_offset_um" in r for r in results.values())
    biases = all("bias_um" in r["after"] for r in results.values())
    tile_sweeps = all("after_mae_tile_sweep_focus_um" in r for r in results.values())
    lines = [title,
             f"{'calibrated on':<{width}}{'sweeps':>7}{'fit s':>7}  " + (f"{'sharpest off':>12}  " if sharpest else "")
             + (f"{'labels off':>10}  " if offsets else "")
             + (f"{TILES_FOCUS_COLUMN:>16}  " if tile_sweeps else "")
             + (f"{'bias after':>10}  " if biases else "") + f"{'MAE before':>10}  {'MAE after':>9}  "
             + (f"{TILE_SWEEP_COLUMN:>29}  " if tile_sweeps else "") +
             f"{'median after':>12}  {'sign before':>11}  {'sign after':>10}  {'acted after':>11}  {'wrong before':>12}  "
             f"{'wrong after':>11}"]
    for name, r in results.items():
        before, after = r["before"], r["after"]
        sweeps = f"{r['sweeps_used']}/{r['sweeps']}" if "sweeps_used" in r else str(r["sweeps"])
        lines.append(f"{name:<{width}}{sweeps:>7}{r['fit_s']:7.0f}  "
                     + (f"{r['sharpest_offset_um']:+12.2f}  " if sharpest else "")
                     + (f"{r['label_offset_um']:+10.2f}  " if offsets else "")
                     + (f"{r['tiles_focus_offset_um']:+16.2f}  " if tile_sweeps else "")
                     + (f"{after['bias_um']:+10.2f}  " if biases else "")
                     + f"{before['mae_um']:10.2f}  {after['mae_um']:9.2f}  "
                     + (f"{r['after_mae_tile_sweep_focus_um']:29.2f}  " if tile_sweeps else "") +
                     f"{after['median_abs_error_um']:12.2f}  {before['sign_accuracy_beyond_1um'] or 0:11.0%}  "
                     f"{after['sign_accuracy_beyond_1um'] or 0:10.0%}  {after['fraction_acted_on']:11.0%}  "
                     f"{before['confidently_wrong']:12d}  {after['confidently_wrong']:11d}"
                     + ("  refused: no better on held-back sweeps" if r.get("refused") else ""))
    return "\n".join(lines)
