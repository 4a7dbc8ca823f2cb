"""Autofocus data sets, split by specimen, imaged through the virtual microscope and through
randomised optics.

Every sample is one field at a known defocus from focus: the label is physical, not painted. A field
is as wide as the model's context view (`wsi_autofocus.model_io.context_px`); training crops the
patch view from it. A share `randomised_fraction` of the samples is imaged through a microscope drawn
at random (`training_optics`: aberrations, condenser, spectra, camera), with the specimen's phase
rescaled (including none) and its density scaled (thickness); of those, `texture_fraction` show
textures (`content.TRAINING_IMAGES`) re-stained with random stain vectors instead of procedural
tissue. Specimens (slide seeds) of the test split are never used for training or validation; the
held-out microscopes and images of the evaluation (`heldout_imaging`, `content.EVALUATION_IMAGES`)
never appear here.
"""
import json
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import fft

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.specimen import SyntheticSlide, TissueSection
from wsi_acquisition.planning import detect_tissue
from wsi_autofocus import training_optics
from wsi_autofocus.content import TRAINING_IMAGES, RestainedTexture
from wsi_autofocus.model_io import OPTICS_FEATURES, context_px
from wsi_common.focus_metrics import MIN_FIELD_TISSUE_FRACTION, tissue_fraction

OBJECTIVES = (10.0, 20.0, 40.0)


@dataclass(frozen=True)
class DatasetSpec:
    specimen_seeds: tuple[int, ...]
    samples_per_specimen: int
    patch_px: int = 96
    max_defocus_um: float = 20.0
    # 10x, 20x, 40x: 20x (the scanning objective the accuracy target is set for) gets most of the samples.
    objective_weights: tuple[float, ...] = (0.2, 0.6, 0.2)
    sparse_fraction: float = 0.1          # samples taken anywhere, including near-empty glass
    seed: int = 0
    randomised_fraction: float = 0.0      # imaged through randomised optics instead of the virtual microscope
    texture_fraction: float = 0.0         # of the randomised samples: textures instead of procedural tissue
    texture_images: tuple[str, ...] = ()  # content.TRAINING_IMAGES names
    # Randomised samples share one sampled microscope per group (its best-focus search is the costly part).
    samples_per_microscope: int = 8


# Textures kept for the validation split (the temperature of the uncertainty is fitted on data the
# training never saw); the others train.
_VALIDATION_TEXTURES = ("photo-retina", "photo-hubble_deep_field", "photo-motorcycle_right")
_TRAINING_TEXTURES = tuple(name for name in TRAINING_IMAGES if name not in _VALIDATION_TEXTURES)
TEXTURE_SPLITS = {"train": _TRAINING_TEXTURES, "val": _VALIDATION_TEXTURES}

SPLITS = {
    # Seeds are disjoint between splits: the held-out specimens are never seen in training.
    "train": DatasetSpec(tuple(range(0, 24)), 900, seed=1, randomised_fraction=0.65, texture_fraction=0.35,
                         texture_images=TEXTURE_SPLITS["train"]),
    "val": DatasetSpec(tuple(range(100, 104)), 500, seed=2, randomised_fraction=0.65, texture_fraction=0.35,
                       texture_images=TEXTURE_SPLITS["val"]),
    "test": DatasetSpec(tuple(range(200, 206)), 800, seed=3),
}


def specimen_for_seed(seed: int) -> SyntheticSlide:
    """A slide whose section size, place and stain (H&E or IHC) vary with the seed."""
    rng = np.random.default_rng([7, seed])
    size_um = float(rng.uniform(6_000, 14_000))
    section = TissueSection(center_x_um=float(rng.uniform(0.35, 0.7)) * 75_000, center_y_um=12_500.0,
                            width_um=size_um, height_um=size_um * float(rng.uniform(0.8, 1.2)),
                            stain="ihc" if seed % 3 == 0 else "he")
    return SyntheticSlide(seed=seed, sections=(section,))


def tissue_points(microscope: VirtualMicroscope, rng: np.random.Generator, count: int) -> np.ndarray:
    overview = microscope.capture_overview(pixel_size_um=40.0)
    detection = detect_tissue(overview.image_rgb8, overview.pixel_size_um, overview.origin_x_um,
                              overview.origin_y_um)
    rows, cols = np.nonzero(detection.mask)
    pick = rng.integers(0, len(rows), size=count)
    jitter = rng.uniform(-0.5, 0.5, size=(count, 2)) * overview.pixel_size_um
    return np.column_stack([overview.origin_x_um + (cols[pick] + 0.5) * overview.pixel_size_um,
                            overview.origin_y_um + (rows[pick] + 0.5) * overview.pixel_size_um]) + jitter


def in_focus_tissue_fraction(microscope: VirtualMicroscope, x_um: float, y_um: float, magnification: float,
                             tile_px: int, pixel_size_um: float | None = None) -> float:
    """`tissue_fraction` of the tile_px field at (x, y) imaged in focus by the virtual microscope: whether a
    field shows tissue, whatever the microscope a test images it with. `pixel_size_um`: the pixel (at the
    specimen) of the microscope whose tile_px field is meant (default: the virtual microscope's); its field's area
    is the one checked, since a finer pixel sees less of the slide around (x, y)."""
    side = tile_px if pixel_size_um is None else max(1, round(tile_px * pixel_size_um
                                                               / microscope.pixel_size_um(magnification)))
    capture = microscope.capture(x_um, y_um, float(microscope.focal_z_um(x_um, y_um)), magnification,
                                 roi=microscope.camera.centre_roi(side))
    return tissue_fraction(capture.image_rgb8)


def fields_showing_tissue(microscope: VirtualMicroscope, rng: np.random.Generator, count: int, magnification: float,
                          tile_px: int, min_tissue_fraction: float = MIN_FIELD_TISSUE_FRACTION,
                          max_draws_per_field: int = 20, pixel_size_um: float | None = None) -> np.ndarray:
    """`count` (x, y) positions from `tissue_points` whose tile_px field (of a microscope with `pixel_size_um`,
    `in_focus_tissue_fraction`) shows at least `min_tissue_fraction` of tissue in focus, in the order drawn:
    positions are drawn again for the fields that show glass until `count` are found (ValueError after
    `max_draws_per_field` x count draws)."""
    kept, draws = [], 0
    while len(kept) < count:
        if draws > max_draws_per_field * count:
            raise ValueError(f"{draws} fields drawn on the tissue mask, {len(kept)} of {count} show "
                             f"{min_tissue_fraction:.0%} tissue at {magnification:g}x")
        fields = tissue_points(microscope, rng, count - len(kept))
        draws += len(fields)
        kept += [(float(x), float(y)) for x, y in fields
                 if in_focus_tissue_fraction(microscope, float(x), float(y), magnification, tile_px, pixel_size_um)
                 >= min_tissue_fraction]
    return np.array(kept, dtype=float).reshape(-1, 2)


def sample_fields(spec, microscope: VirtualMicroscope, rng: np.random.Generator, count: int):
    """Where and how `count` samples of a specimen are taken, for any spec with `sparse_fraction`,
    `objective_weights` and `max_defocus_um`: positions (on tissue, or anywhere for the sparse share), which
    are sparse, objectives and defocus (µm)."""
    points = tissue_points(microscope, rng, count)
    sparse = rng.random(count) < spec.sparse_fraction
    width_um, height_um = microscope.specimen.width_um, microscope.specimen.height_um
    points[sparse] = np.column_stack([rng.uniform(0.1, 0.9, sparse.sum()) * width_um,
                                      rng.uniform(0.1, 0.9, sparse.sum()) * height_um])
    objectives = rng.choice(OBJECTIVES, size=count,
                            p=np.array(spec.objective_weights) / sum(spec.objective_weights))
    # Half the samples within ±10 µm, where the accuracy matters most; the rest over the full range.
    near = rng.random(count) < 0.5
    defocus = np.where(near, rng.uniform(-10, 10, count),
                       rng.uniform(-spec.max_defocus_um, spec.max_defocus_um, count))
    return points, sparse, objectives, defocus


def render_specimen(args: tuple[DatasetSpec, int]) -> dict:
    spec, specimen_seed = args
    rng = np.random.default_rng([spec.seed, specimen_seed])
    microscope = VirtualMicroscope(specimen=specimen_for_seed(specimen_seed), seed=specimen_seed)
    n = spec.samples_per_specimen
    points, sparse, objectives, defocus = sample_fields(spec, microscope, rng, n)
    exposures = rng.uniform(3.0, 10.0, n)     # glass from ~60 to ~210 of 255: no clipping
    randomised = rng.random(n) < spec.randomised_fraction
    texture = randomised & (rng.random(n) < spec.texture_fraction) & bool(spec.texture_images)
    p = context_px(spec.patch_px)
    roi = microscope.camera.centre_roi(p)
    fields = np.empty((n, p, p, 3), np.uint8)
    labels = np.empty(n, np.float32)
    numerical_aperture = np.empty(n, np.float32)
    pixel_size_um = np.empty(n, np.float32)
    condenser_fill = np.empty(n, np.float32)
    condenser_inner_fill = np.zeros(n, np.float32)
    for i in np.flatnonzero(~randomised):
        x, y = points[i]
        focal = float(microscope.focal_z_um(x, y))
        capture = microscope.capture(x, y, focal + defocus[i], objectives[i], exposure_ms=exposures[i], roi=roi)
        fields[i] = capture.image_rgb8
        labels[i] = capture.defocus_um
        numerical_aperture[i], pixel_size_um[i] = capture.numerical_aperture, capture.pixel_size_um
        condenser_fill[i] = microscope.condenser_fill
    textures = {}
    chosen = np.flatnonzero(randomised)
    for group_start in range(0, len(chosen), spec.samples_per_microscope):
        group = chosen[group_start:group_start + spec.samples_per_microscope]
        # One microscope per group, for the group's objective class (that of its first sample).
        optics = training_optics.sample_optics(objectives[group[0]], rng)
        focus_shift = training_optics.best_focus_shift_um(optics)
        for i in group:
            objectives[i] = optics.magnification
            if texture[i]:
                name = spec.texture_images[int(rng.integers(len(spec.texture_images)))]
                if name not in textures:
                    textures[name] = RestainedTexture(TRAINING_IMAGES[name])
                specimen, x, y = textures[name].draw(rng)
            else:
                specimen = microscope.specimen
                x, y = points[i]
            fields[i] = randomised_field(specimen, x, y, optics, focus_shift, defocus[i], p, rng)
            labels[i] = defocus[i]
            numerical_aperture[i], pixel_size_um[i] = optics.numerical_aperture, optics.pixel_size_um
            condenser_fill[i], condenser_inner_fill[i] = optics.condenser_fill, optics.condenser_inner_fill
    return {"fields": fields, "defocus_um": labels, "numerical_aperture": numerical_aperture,
            "pixel_size_um": pixel_size_um, "condenser_fill": condenser_fill,
            "condenser_inner_fill": condenser_inner_fill, "objective": objectives.astype(np.float32),
            "specimen": np.full(n, specimen_seed, np.int32), "sparse": sparse,
            "exposure_ms": exposures.astype(np.float32),
            "source": np.where(texture, 2, np.where(randomised, 1, 0)).astype(np.int8)}


# Specimen phase in randomised samples: none at all for this share, else the specimen's own optical
# path scaled by a factor in this range (refractive index follows dry mass; its excess over the
# mountant varies with the mountant and the fixation).
NO_PHASE_FRACTION = 0.1
PHASE_SCALE_RANGE = (0.3, 2.5)
DENSITY_SCALE_RANGE = (0.6, 1.6)        # section thickness and stain intensity


def randomised_field(specimen, x_um: float, y_um: float, optics, focus_shift_um: float, defocus_um: float,
                     field_px: int, rng: np.random.Generator) -> np.ndarray:
    """A field_px square centred on (x, y) of `specimen`, imaged through `optics` and a random camera."""
    return randomised_stack(specimen, x_um, y_um, optics, focus_shift_um, (defocus_um,), field_px, rng)[0]


def randomised_stack(specimen, x_um: float, y_um: float, optics, focus_shift_um: float, defoci_um,
                     field_px: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same field at each of `defoci_um`: one draw of the specimen's density and phase and of the
    camera for all of them, each exposure with its own noise."""
    p = optics.pixel_size_um
    widest = max(defoci_um, key=lambda defocus: abs(defocus + focus_shift_um))
    side = fft.next_fast_len(field_px + 2 * training_optics.margin_px(optics, widest + focus_shift_um))
    margin = (side - field_px) // 2
    od, opd = specimen.optical_density_and_path(x_um - side / 2 * p, y_um - side / 2 * p, side, side, p)
    od = od * np.float32(rng.uniform(*DENSITY_SCALE_RANGE))
    phase_scale = 0.0 if rng.random() < NO_PHASE_FRACTION else rng.uniform(*PHASE_SCALE_RANGE)
    opd = opd * np.float32(phase_scale)
    camera = training_optics.sample_camera(rng)
    fields = []
    for defocus_um in defoci_um:
        irradiance = training_optics.image_irradiance(optics, od, opd, defocus_um, focus_shift_um)
        fields.append(training_optics.camera_image(irradiance[margin:margin + field_px, margin:margin + field_px],
                                                   camera, rng))
    return fields


def save_npz(path: Path, arrays: dict) -> None:
    """Write a cache file whole or not at all: a killed evaluation leaves no truncated cache behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, **arrays)
    temporary.replace(path)


def starmap_in_processes(function, jobs: list[tuple], workers: int) -> list:
    """function(*job) for every job, in `workers` spawned processes when more than one."""
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            return pool.starmap(function, jobs)
    return [function(*job) for job in jobs]


def description(spec, **extra) -> dict:
    """What a data file was rendered from, as the .json beside it records it: its spec (a dataclass), the
    version of the image formation that rendered it (`training_optics.RENDERING_VERSION`) and `extra`."""
    return json.loads(json.dumps(asdict(spec) | extra | {"rendering": training_optics.RENDERING_VERSION}))


def split_description(spec: DatasetSpec) -> dict:
    """`description` of a split's data file: its optics columns too, so data rendered before a column was
    recorded is not taken for current."""
    return description(spec, optics_columns=list(OPTICS_FEATURES))


def write_description(output: Path, recorded: dict) -> None:
    Path(output).with_suffix(".json").write_text(json.dumps(recorded, indent=1))


def is_current(path: Path, recorded: dict) -> bool:
    """Whether the data file at `path` exists and its .json records `recorded` (what this version would render)."""
    record = Path(path).with_suffix(".json")
    return Path(path).exists() and record.exists() and json.loads(record.read_text()) == recorded


def generate(spec: DatasetSpec, output: Path, workers: int = 2) -> Path:
    """Render a split into one .npz (uint8 fields + labels + metadata) and return its path."""
    parts = starmap_in_processes(render_specimen, [((spec, seed),) for seed in spec.specimen_seeds], workers)
    save_npz(output, {key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
    write_description(output, split_description(spec))
    return output


def load(path: Path) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
