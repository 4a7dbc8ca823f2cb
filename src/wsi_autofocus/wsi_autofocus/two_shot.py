"""Two-shot defocus: the signed distance from focus of a field from two exposures a known z step apart.

One image cannot tell the specimen's own softness from the blur the optics add, and the side of focus
shows in one image only through cues (phase contrast, aberrations) that differ from one microscope and
specimen to the next. Two images of the same field at z and z + step share the specimen: the ratio of
their spatial power spectra, band by band, is the ratio of the optics' transfer at the two defocus values,
which depends on the defocus, the step and the optics, not on what lies on the slide. Frequencies are
measured in units of NA / lambda and defocus in units of lambda / NA^2 (the depth of focus), in which
the transfer of a defocused objective is nearly the same for every objective. How far the blur reaches
for a given defocus is set by the illumination cone, so the scanner also declares its condenser
(`Condenser`; or that it does not know it). An ensemble of small networks (`TwoShotModel`) maps the band
ratios and the condenser to the defocus and its uncertainty. It is trained on the training simulators only
(`two_shot_training`); the two FFTs cost most of its few milliseconds per pair.

Conventions as everywhere in the project: defocus > 0 means the stage is above focus; the second
exposure is taken `step_um` higher than the first (step > 0, as in all training pairs), and the
estimate is the first exposure's defocus.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import fft

from wsi_common.focus_metrics import TISSUE_SAMPLE_STEP, focus_tolerance_um, tissue_mask

REFERENCE_WAVELENGTH_UM = 0.55
# Edges of the spatial-frequency bands, in units of NA / lambda (the coherent cut-off is 1, the
# incoherent one 2); above ~1.3 little survives a partially coherent bright-field objective. Below 0.3 the
# bands are spaced by ratio: d depths of focus from focus, the blur's transfer first falls to zero near
# 0.6 / d, so the far-defocus signal lives in the lowest bands (0.06 at 10 depths, 10 µm at 20x).
BAND_EDGES = np.concatenate([np.geomspace(0.02, 0.3, 8), np.linspace(0.3, 1.3, 11)[1:]])
# The step a scan takes for the second exposure, in depths of focus (lambda / NA^2): about 2 µm at 20x/0.75.
DEFAULT_STEP_DEPTHS = 2.0
BAND_COUNT = len(BAND_EDGES) - 1
FEATURE_COUNT = 3 * BAND_COUNT + 2
# Where `features_from_bands` puts each band's log power ratio between the exposures (the blur's change), and
# the bands' mean log power (the content's spectrum shape).
RATIO_FEATURES, LEVEL_FEATURES = slice(0, BAND_COUNT), slice(BAND_COUNT, 2 * BAND_COUNT)
# The model reads the pair's features and the microscope's condenser (`model_inputs`).
MODEL_INPUT_COUNT = FEATURE_COUNT + 2
MODEL_FILE = "two_shot.npz"
# A field is read through a Hann window, which weighs its corners down to almost nothing: a field whose tissue
# lies in a corner (a section's edge) showed mostly glass and camera noise. Such a field is read through a
# window of this fraction of its size placed on a grid of SUB_WINDOW_POSITIONS x SUB_WINDOW_POSITIONS over it,
# where that window holds more of the tissue's signal energy than the whole field's (`field_window`). About a
# third of the field's width reads the validation pairs whose reading it changes better than half of it, and a
# quarter worse (`bench/two_shot_field_window.py` with the model trained on half-width sub-fields: MAE 1.76 / 2.40 /
# 3.65 µm over those pairs, 96 of 2014 within 10 µm).
SUB_WINDOW_FRACTION = 0.35
SUB_WINDOW_POSITIONS = 5


class TwoShotError(ValueError):
    """Two images that cannot be compared (shapes differ, or no band lies below the sampling limit)."""


def depth_unit_um(numerical_aperture: float) -> float:
    """lambda / NA^2 at the reference wavelength: the unit of defocus the model works in."""
    return REFERENCE_WAVELENGTH_UM / numerical_aperture ** 2


def default_step_um(numerical_aperture: float) -> float:
    return DEFAULT_STEP_DEPTHS * depth_unit_um(numerical_aperture)


@functools.lru_cache(maxsize=16)
def _band_layout(shape: tuple[int, int], numerical_aperture: float, pixel_size_um: float):
    """Band index of every rfft2 frequency (-1 outside all bands), pixels per band, and which bands lie
    wholly below the sampling limit."""
    height, width = shape
    fy = np.fft.fftfreq(height)[:, None] / pixel_size_um
    fx = np.fft.rfftfreq(width)[None, :] / pixel_size_um
    normalised = np.hypot(fy, fx) * REFERENCE_WAVELENGTH_UM / numerical_aperture
    index = np.digitize(normalised, BAND_EDGES) - 1
    index[(index < 0) | (index >= BAND_COUNT)] = -1
    counts = np.bincount(index[index >= 0], minlength=BAND_COUNT)
    nyquist = 0.5 / pixel_size_um * REFERENCE_WAVELENGTH_UM / numerical_aperture
    valid = (BAND_EDGES[1:] <= nyquist) & (counts > 0)
    return index, counts, valid, _hann(height, width)


@functools.lru_cache(maxsize=16)
def _hann(height: int, width: int) -> np.ndarray:
    return np.outer(np.hanning(height), np.hanning(width)).astype(np.float32)


def _window_energy(height: int, width: int) -> float:
    """Sum of the squared Hann window: the band powers of stationary content grow in proportion to it."""
    return float((np.hanning(height) ** 2).sum() * (np.hanning(width) ** 2).sum())


def field_window(image_rgb8: np.ndarray, fraction: float = SUB_WINDOW_FRACTION) -> tuple[slice, slice]:
    """(rows, columns) of the field to read: the whole field, or the sub-field of `fraction` of its size, at one of
    `SUB_WINDOW_POSITIONS` x `SUB_WINDOW_POSITIONS` places, whose Hann window holds more tissue signal energy (the
    squared window summed over the pixels that show stain, `tissue_mask`)."""
    height, width = np.shape(image_rgb8)[:2]
    step = TISSUE_SAMPLE_STEP
    tissue = tissue_mask(image_rgb8, step=step)

    def energy(rows: slice, cols: slice) -> float:
        window = _hann(rows.stop - rows.start, cols.stop - cols.start)[::step, ::step]
        return float((window ** 2 * tissue[rows.start // step:, cols.start // step:][:window.shape[0],
                                                                                      :window.shape[1]]).sum())

    best = (slice(0, height), slice(0, width))
    best_energy = energy(*best)
    sub_height, sub_width = round(height * fraction), round(width * fraction)
    # Sub-windows on the tissue sample grid, so that each reads the mask from its own first pixel.
    for top in np.linspace(0, height - sub_height, SUB_WINDOW_POSITIONS) // step * step:
        for left in np.linspace(0, width - sub_width, SUB_WINDOW_POSITIONS) // step * step:
            region = (slice(int(top), int(top) + sub_height), slice(int(left), int(left) + sub_width))
            region_energy = energy(*region)
            if region_energy > best_energy:
                best, best_energy = region, region_energy
    return best


def band_log_power(image_rgb8: np.ndarray, numerical_aperture: float, pixel_size_um: float,
                   region: tuple[slice, slice] | None = None):
    """Mean log10 power of the relative contrast of the image (or of its `region`, `field_window`) in each band,
    and which bands are valid. A region's power is scaled by the windows' energy ratio, so that stationary
    content has the same band powers in any region as in the whole image."""
    height, width = np.shape(image_rgb8)[:2]
    gray = np.asarray(image_rgb8 if region is None else image_rgb8[region], np.float32).mean(axis=2)
    contrast = gray / max(float(gray.mean()), 1.0) - 1.0
    index, counts, valid, window = _band_layout(contrast.shape, float(numerical_aperture), float(pixel_size_um))
    contrast = (contrast - contrast.mean()) * window
    power = np.abs(fft.rfft2(contrast, workers=1)) ** 2
    if contrast.shape != (height, width):
        power *= _window_energy(height, width) / _window_energy(*contrast.shape)
    inside = index >= 0
    sums = np.bincount(index[inside], weights=power[inside], minlength=len(counts))
    return np.log10(sums / np.maximum(counts, 1) + 1e-12), valid


def pair_features(first_rgb8: np.ndarray, second_rgb8: np.ndarray, numerical_aperture: float,
                  pixel_size_um: float, step_um: float, window_fraction: float = SUB_WINDOW_FRACTION) -> np.ndarray:
    """The model's input for two exposures of one field, the second `step_um` above the first, both read in the
    first's `field_window` (of `window_fraction`: another only to compare windows, `bench/two_shot_field_window.py`)."""
    if np.shape(first_rgb8) != np.shape(second_rgb8):
        raise TwoShotError(f"the two exposures differ in shape: {np.shape(first_rgb8)} and {np.shape(second_rgb8)}")
    region = field_window(first_rgb8, window_fraction)
    first = band_log_power(first_rgb8, numerical_aperture, pixel_size_um, region)
    second = band_log_power(second_rgb8, numerical_aperture, pixel_size_um, region)
    return features_from_bands(first, second, numerical_aperture, pixel_size_um, step_um)


def features_from_bands(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray],
                        numerical_aperture: float, pixel_size_um: float, step_um: float) -> np.ndarray:
    """`pair_features` from the exposures' `band_log_power` (images of one size): per band the log power
    ratio (second over first), their mean log power relative to the lowest sampled band, whether the band is
    sampled; then the step in depths of focus and the NA. A z-stack's pairs share each image's bands."""
    if not step_um > 0:
        raise TwoShotError(f"the second exposure must be above the first (step > 0 µm); got step {step_um} µm")
    (first_power, valid), (second_power, _) = first, second
    if not valid.any():
        raise TwoShotError(f"no frequency band lies below the sampling limit at pixel {pixel_size_um} µm, "
                           f"NA {numerical_aperture}")
    ratio = np.where(valid, second_power - first_power, 0.0)
    level = (first_power + second_power) / 2
    level = np.where(valid, level - level[valid][0], 0.0)
    step_depths = step_um / depth_unit_um(numerical_aperture)
    extra = [step_depths, numerical_aperture]
    return np.concatenate([ratio, level, valid.astype(np.float64), extra]).astype(np.float32)


@dataclass(frozen=True)
class Condenser:
    """The illumination's source in the objective's back focal plane, as fractions of the objective NA: a disc
    filling `fill` (the aperture diaphragm; `inner_fill` 0) or a ring from `inner_fill` to `fill`. The blur of a
    defocused absorber is the shadow of the illumination cone, so the same blur means less defocus under a
    wider condenser: a scanner that declares its condenser is read closer. A source that is not uniform
    (diffused LED, Gaussian-weighted) is declared as the uniform disc of the same rms radius
    (`equivalent_disc`). Fill 0: not known (`UNKNOWN_CONDENSER`); the model then reads as for any condenser
    of its training microscopes."""
    fill: float
    inner_fill: float = 0.0

    def __post_init__(self):
        if (self.fill, self.inner_fill) != (0.0, 0.0) and not 0.0 <= self.inner_fill < self.fill <= 1.0:
            raise TwoShotError(f"condenser fill {self.fill}, inner fill {self.inner_fill}; expected 0 <= inner < "
                               f"fill <= 1 (fractions of the objective NA), or 0 and 0 when not known")

    @classmethod
    def equivalent_disc(cls, radii: np.ndarray, weights: np.ndarray) -> "Condenser":
        """The uniform disc with the rms radius of a source of points at `radii` (fractions of the objective
        NA, sampling the aperture's area evenly) of relative brightness `weights`."""
        rms = math.sqrt(float(np.sum(weights * np.square(radii)) / np.sum(weights)))
        return cls(min(1.0, math.sqrt(2.0) * rms))


UNKNOWN_CONDENSER = Condenser(0.0)


@dataclass(frozen=True)
class CondenserDeclaration:
    """How a scanner declares its condenser, one way or the other: as fractions of whichever objective's NA
    (`fill`, `inner_fill`: the aperture diaphragm set for each objective, as Köhler illumination has it), or by
    the condenser's own NA (`numerical_aperture`, `inner_numerical_aperture`: one setting shared by the
    objectives, which fills less of a higher-NA objective's aperture). All 0: not known."""
    fill: float = 0.0
    inner_fill: float = 0.0
    numerical_aperture: float = 0.0
    inner_numerical_aperture: float = 0.0

    @property
    def by_numerical_aperture(self) -> bool:
        """Whether the condenser is declared by its own NA (else by fractions of each objective's, or not at all)."""
        return (self.numerical_aperture, self.inner_numerical_aperture) != (0.0, 0.0)

    def __post_init__(self):
        if self.by_numerical_aperture and (self.fill, self.inner_fill) != (0.0, 0.0):
            raise TwoShotError(f"condenser declared both as fill {self.fill} (inner {self.inner_fill}) and as NA "
                               f"{self.numerical_aperture} (inner {self.inner_numerical_aperture}); declare one")
        if self.by_numerical_aperture and not 0.0 <= self.inner_numerical_aperture < self.numerical_aperture:
            raise TwoShotError(f"condenser NA {self.numerical_aperture}, inner NA {self.inner_numerical_aperture}; "
                               "expected 0 <= inner < NA")
        if not self.by_numerical_aperture:
            Condenser(self.fill, self.inner_fill)

    def for_objective(self, numerical_aperture: float) -> Condenser:
        """The condenser as the two-shot model reads it under an objective of `numerical_aperture`: a
        condenser NA beyond the objective's fills its aperture."""
        if not self.by_numerical_aperture:
            return Condenser(self.fill, self.inner_fill)
        if not numerical_aperture > 0:
            raise TwoShotError(f"objective NA {numerical_aperture}: a condenser declared by its NA needs it")
        inner = self.inner_numerical_aperture / numerical_aperture
        if inner >= 1.0:
            raise TwoShotError(f"a ring source from NA {self.inner_numerical_aperture} lies outside the NA "
                               f"{numerical_aperture} objective's aperture: dark field, which the two-shot model "
                               "does not read")
        return Condenser(min(self.numerical_aperture / numerical_aperture, 1.0), inner)

    def for_objective_if_known(self, numerical_aperture: float) -> Condenser:
        """`for_objective`, or not known (`UNKNOWN_CONDENSER`) when a condenser declared by its NA meets an
        objective whose NA is not known (0): the single-shot model still reads a tile sent without its optics."""
        if self.by_numerical_aperture and numerical_aperture == 0.0:
            return UNKNOWN_CONDENSER
        return self.for_objective(numerical_aperture)


def model_inputs(features: np.ndarray, condenser_fill, condenser_inner_fill) -> np.ndarray:
    """The model's input rows: `pair_features` rows and each pair's condenser (`Condenser` fields, scalars or
    one per row; 0 and 0: not known)."""
    features = np.atleast_2d(np.asarray(features, np.float32))
    condenser = np.broadcast_to(np.asarray([condenser_fill, condenser_inner_fill], np.float32).T, (len(features), 2))
    return np.concatenate([features, condenser], axis=1)


@dataclass(frozen=True)
class TwoShotEstimate:
    defocus_um: float           # of the first exposure; > 0: stage above focus
    uncertainty_um: float       # one sigma

    @property
    def above_focus_probability(self) -> float:
        return float(0.5 * (1.0 + math.erf(self.defocus_um / (self.uncertainty_um * math.sqrt(2.0)))))


class TwoShotModel:
    """An ensemble of small perceptrons over `model_inputs`, in numpy. Member k's weights are
    `m{k}_w0, m{k}_b0, ..., m{k}_w_out, m{k}_b_out`; they share the features' scaling (`mean`, `scale`).
    The ensemble's estimate is the members' mean; its variance adds their spread to their mean variance
    (members disagree on pairs unlike their training data), scaled by `sigma_temperature`. One .npz holds
    it all with the metadata of how it was trained."""

    def __init__(self, arrays: dict, metadata: dict, path: Path | None = None):
        self.arrays = {key: np.asarray(value, np.float32) for key, value in arrays.items()}
        self.metadata = metadata
        self.path = path              # the file it was loaded from or saved to
        self.members = sorted({int(key[1:key.index("_")]) for key in self.arrays
                               if key[0] == "m" and key[1].isdigit()})

    @classmethod
    def load(cls, path: Path) -> "TwoShotModel":
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files if key != "metadata"}
            metadata = json.loads(str(data["metadata"]))
        edges = metadata.get("band_edges")
        if edges is None or not np.allclose(edges, BAND_EDGES):
            raise TwoShotError(f"{path} was trained on frequency bands {edges}; this version computes "
                               f"{np.round(BAND_EDGES, 4).tolist()} (train it again: make train-two-shot)")
        if arrays["mean"].shape[-1] != MODEL_INPUT_COUNT:
            raise TwoShotError(f"{path} reads {arrays['mean'].shape[-1]} inputs; this version reads "
                               f"{MODEL_INPUT_COUNT} (the pair's features and the condenser): train it again "
                               f"(make train-two-shot), or calibrate the scanner again from the shipped model")
        return cls(arrays, metadata, path)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: a node loading the model never reads half a file.
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as file:
            np.savez(file, metadata=json.dumps(self.metadata), **self.arrays)
        partial.replace(path)
        self.path = path
        return path

    def hidden_layer_count(self, member: int) -> int:
        return sum(1 for key in self.arrays if key.startswith(f"m{member}_w") and key[len(f"m{member}_w"):].isdigit())

    def hidden(self, features: np.ndarray, layers_left_out: int = 0) -> list[np.ndarray]:
        """Each member's hidden activations for rows of features: its last hidden layer (what its linear output
        layer reads), or with `layers_left_out` > 0 the layer that many before it (what the next layer reads)."""
        a = self.arrays
        scaled = (np.atleast_2d(features) - a["mean"]) / a["scale"]
        layers = []
        for member in self.members:
            hidden = scaled
            for layer in range(self.hidden_layer_count(member) - layers_left_out):
                hidden = np.maximum(hidden @ a[f"m{member}_w{layer}"] + a[f"m{member}_b{layer}"], 0.0)
            layers.append(hidden)
        return layers

    def member_outputs(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(members, rows) defocus and log variance in depths of focus, before the temperature."""
        means, log_variances = [], []
        for member, hidden in zip(self.members, self.hidden(features)):
            output = hidden @ self.arrays[f"m{member}_w_out"] + self.arrays[f"m{member}_b_out"]
            means.append(output[:, 0])
            log_variances.append(output[:, 1])
        return np.array(means), np.array(log_variances)

    def predict_depths(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(defocus, sigma) in depths of focus for rows of features."""
        means, log_variances = self.member_outputs(features)
        variance = np.exp(log_variances).mean(axis=0) + means.var(axis=0)
        return means.mean(axis=0), np.sqrt(variance) * float(self.arrays.get("sigma_temperature", 1.0))

    def estimate(self, first_rgb8: np.ndarray, second_rgb8: np.ndarray, numerical_aperture: float,
                 pixel_size_um: float, step_um: float, condenser: Condenser) -> TwoShotEstimate:
        features = pair_features(first_rgb8, second_rgb8, numerical_aperture, pixel_size_um, step_um)
        depths, sigma = self.predict_depths(model_inputs(features, condenser.fill, condenser.inner_fill))
        unit = depth_unit_um(numerical_aperture)
        return TwoShotEstimate(float(depths[0] * unit), float(sigma[0] * unit))


def label_depths(pairs: dict) -> np.ndarray:
    """Labelled pairs' defocus (`defocus_um`, `numerical_aperture` per pair) in depths of focus."""
    return pairs["defocus_um"] / depth_unit_um(pairs["numerical_aperture"])


def sigma_temperature(model: TwoShotModel, pairs: dict) -> float:
    """The factor on the ensemble's own sigma (before any temperature) that makes labelled pairs, taken apart
    from the fit (shifted data), one sigma off on average, with no pair a scan would trust (sigma under
    `focus_tolerance_um`, a depth of focus for the depth of field) off by more than that tolerance: no
    confidently wrong move."""
    predicted, sigma = model.predict_depths(pairs["features"])
    sigma = sigma / float(model.arrays.get("sigma_temperature", 1.0))
    depths = label_depths(pairs)
    unit = depth_unit_um(pairs["numerical_aperture"])
    limit = focus_tolerance_um(unit) / unit
    wrong = np.abs(predicted - depths) > limit
    calibrated = float(np.sqrt(np.mean(((predicted - depths) / sigma) ** 2)))
    return max(calibrated, float(np.max(limit[wrong] / sigma[wrong], initial=0.0)))


def with_second_exposure(model: TwoShotModel, single, image_rgb8: np.ndarray, image_above_rgb8: np.ndarray,
                         numerical_aperture: float, pixel_size_um: float, step_um: float, condenser: Condenser):
    """A single-shot estimate of `image_rgb8` (any dataclass with the fields of `inference.FocusResult`)
    with its defocus, distance and side taken from both exposures instead."""
    if not (numerical_aperture > 0 and pixel_size_um > 0):
        raise TwoShotError("two exposures need the objective's NA and the pixel size; got NA "
                           f"{numerical_aperture}, pixel {pixel_size_um} µm")
    pair = model.estimate(image_rgb8, image_above_rgb8, numerical_aperture, pixel_size_um, step_um, condenser)
    return dataclasses.replace(single, defocus_um=pair.defocus_um, uncertainty_um=pair.uncertainty_um,
                               distance_um=abs(pair.defocus_um), distance_uncertainty_um=pair.uncertainty_um,
                               above_focus_probability=pair.above_focus_probability)


def default_model_path() -> Path:
    return Path(__file__).parent / "models" / "two_shot" / MODEL_FILE

