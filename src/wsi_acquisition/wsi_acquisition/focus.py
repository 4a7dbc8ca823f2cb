"""Classical focus measures: sharpness of an image, tissue content, and the peak of a z-sweep.

The scan uses them to build its focus map; the autofocus evaluation uses them as baselines.

All take an RGB or grey image (uint8/uint16/float) and work on its luminance; sharpness values are
normalised by the squared mean intensity so that exposure changes do not change them.
"""
import numpy as np
from scipy import ndimage

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def luminance(image: np.ndarray) -> np.ndarray:
    """float32 luminance in [0, 1] of an (H, W) or (H, W, 3) image. float32 resolves 16-bit pixels and
    made the per-tile sharpness of the focus estimate three times faster than float64 (measured)."""
    image = np.asarray(image)
    scale = np.float32(np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0)
    if image.ndim == 3:
        return (image.astype(np.float32) @ LUMA_WEIGHTS) / scale
    if image.ndim == 2:
        return image.astype(np.float32) / scale
    raise ValueError(f"image of shape {image.shape}; expected (H, W) or (H, W, 3)")


def _normalise(energy: float, grey: np.ndarray) -> float:
    return float(energy / max(grey.mean() ** 2, 1e-12))


def brenner(image: np.ndarray) -> float:
    """Mean squared difference of pixels two apart (horizontal and vertical)."""
    grey = luminance(image)
    dx = grey[:, 2:] - grey[:, :-2]
    dy = grey[2:, :] - grey[:-2, :]
    return _normalise((np.mean(dx ** 2) + np.mean(dy ** 2)) / 2, grey)


def tenengrad(image: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude."""
    grey = luminance(image)
    gx = ndimage.sobel(grey, axis=1)
    gy = ndimage.sobel(grey, axis=0)
    return _normalise(np.mean(gx ** 2 + gy ** 2), grey)


def variance_of_laplacian(image: np.ndarray) -> float:
    grey = luminance(image)
    return _normalise(np.var(ndimage.laplace(grey)), grey)


SHARPNESS_METRICS = {"brenner": brenner, "tenengrad": tenengrad, "variance_of_laplacian": variance_of_laplacian}


def tissue_mask(image: np.ndarray, chroma_threshold: float = 0.1, step: int = 1) -> np.ndarray:
    """Pixels showing stain, on every `step`-th row and column. Stains are coloured and
    bright-field glass is neutral grey, so the chroma (max - min channel, relative to the mean)
    separates them whatever the exposure."""
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image of shape {rgb.shape}; expected (H, W, 3) RGB")
    rgb = rgb[::step, ::step]
    spread = rgb.max(axis=2).astype(np.float32) - rgb.min(axis=2)
    total = rgb.sum(axis=2, dtype=np.float32)
    return spread * 3 > chroma_threshold * np.maximum(total, 1e-6)


# Tissue content is estimated on every 4th row and column: a fraction needs no full-resolution mask.
TISSUE_SAMPLE_STEP = 4


def tissue_fraction(image: np.ndarray) -> float:
    """Fraction of the image showing stain (estimated on every TISSUE_SAMPLE_STEP-th row and column)."""
    return float(tissue_mask(image, step=TISSUE_SAMPLE_STEP).mean())


def refine_peak(z_um: np.ndarray, scores: np.ndarray) -> float:
    """Peak of a sampled focus curve (z ascending, evenly spaced or not: a coarse and a fine sweep
    together), refined by a parabola through the best sample and its neighbours; the best sample
    itself when it lies at an end of the sweep."""
    z_um, scores = np.asarray(z_um, dtype=float), np.asarray(scores, dtype=float)
    best = int(np.argmax(scores))
    if 0 < best < len(scores) - 1:
        curvature, slope, _ = np.polyfit(z_um[best - 1:best + 2], scores[best - 1:best + 2], 2)
        if curvature < 0:
            return float(np.clip(-slope / (2 * curvature), z_um[best - 1], z_um[best + 1]))
    return float(z_um[best])


def sweep_sharpness(z_um, image_at, metric=brenner) -> np.ndarray:
    """Sharpness of the image taken at each z of a sweep; `image_at(z)` moves and captures."""
    return np.array([metric(image_at(z)) for z in z_um])


def trusts_estimate(uncertainty_um: float, depth_of_field_um: float) -> bool:
    """Whether a scan acts on a single-shot defocus estimate: when its one-sigma uncertainty is below
    half the depth of field, moving by the estimate lands within focus. The 1 µm floor keeps a high-NA
    objective, whose depth of field is thinner than the model's precision, from ignoring every estimate."""
    return uncertainty_um < max(depth_of_field_um / 2, 1.0)


# -- acting on a single-shot estimate ---------------------------------------------------------------
# A corrected capture replaces the focus map's only when its sharpness beats it by this fraction:
# Brenner sharpness of one field repeats to well under 1 % between exposures, while a correction that
# lands half a depth of field nearer focus gains several per cent.
MIN_SHARPNESS_GAIN = 0.02
# Posterior probability beyond which the side of focus counts as known.
SIDE_CERTAINTY = 0.95


def focus_action(defocus_um: float, uncertainty_um: float, distance_um: float, distance_uncertainty_um: float,
                 depth_of_field_um: float) -> str:
    """What a scan does with a single-shot estimate of a tile taken at the focus map's z:
    "correct" (re-capture at z - defocus) when the signed estimate is trusted and out of focus;
    "probe" when the tile is out of focus by more than one sigma of the distance but the side is not
    trusted (a second exposure one `probe_step_um` higher tells the side, `side_after_probe`); "keep"
    otherwise. Blur tells the distance on microscopes the model never saw far better than the side, so
    the probe, not the single shot, decides most moves there; a move is kept only if sharper."""
    half = depth_of_field_um / 2
    if trusts_estimate(uncertainty_um, depth_of_field_um):
        return "correct" if abs(defocus_um) > half else "keep"
    if distance_um - distance_uncertainty_um > half:
        return "probe"
    return "keep"


def probe_step_um(depth_of_field_um: float, distance_um: float) -> float:
    """z step of the side probe (upwards): the estimated distance from focus, so that below focus the
    probe lands near focus and above it twice as far (the two hypotheses differ by 2 d); at least two
    depths of field and 2 µm, so that near focus they still differ clearly."""
    return max(distance_um, 2.0 * depth_of_field_um, 2.0)


def side_after_probe(distance_um: float, distance_uncertainty_um: float, above_focus_probability: float,
                     step_um: float, probe_distance_um: float, probe_uncertainty_um: float) -> float:
    """Probability that the first image was above focus, given a second image `step_um` higher whose
    estimated distance from focus is `probe_distance_um`.

    Above focus (defocus +d) the probe sees d + step; below (-d) it sees |step - d|. Each hypothesis is
    weighed by how well it predicts the probe's distance (Gaussian, both images' uncertainties) and by
    the first image's own belief. Images share the specimen, so this needs no side cue: blur alone."""
    sigma = np.hypot(distance_uncertainty_um, probe_uncertainty_um)
    above = (probe_distance_um - (distance_um + step_um)) / sigma
    below = (probe_distance_um - abs(step_um - distance_um)) / sigma
    prior = np.clip(above_focus_probability, 1e-6, 1 - 1e-6)
    log_odds = np.log(prior / (1 - prior)) - 0.5 * (above * above - below * below)
    return float(1.0 / (1.0 + np.exp(-np.clip(log_odds, -50, 50))))


def side_decision(above_focus_probability: float) -> bool | None:
    """True (above focus) or False (below) when the side is known to `SIDE_CERTAINTY`; None otherwise."""
    if above_focus_probability >= SIDE_CERTAINTY:
        return True
    if above_focus_probability <= 1 - SIDE_CERTAINTY:
        return False
    return None


def keeps_correction(sharpness: float, focus_map_sharpness: float) -> bool:
    """Whether a corrected capture replaces the focus map's: only when measurably sharper."""
    return sharpness / max(focus_map_sharpness, 1e-12) - 1.0 >= MIN_SHARPNESS_GAIN


def side_from_probe(first, probe, step_um: float, sharpness: float, probe_sharpness: float) -> tuple[bool | None, float | None]:
    """Whether the first image was above focus, from a second image `step_um` higher: by the two images'
    distance estimates (`side_after_probe`; `first` and `probe` carry distance_um,
    distance_uncertainty_um and above_focus_probability; `probe` None when it has no estimate) when they
    settle it, else by which image is measurably sharper (moving up sharpened it: the stage was below
    focus), else None. Returns (above, the estimates' posterior or None)."""
    posterior = None
    if probe is not None:
        posterior = side_after_probe(first.distance_um, first.distance_uncertainty_um, first.above_focus_probability,
                                     step_um, probe.distance_um, probe.distance_uncertainty_um)
        if side_decision(posterior) is not None:
            return side_decision(posterior), posterior
    if keeps_correction(probe_sharpness, sharpness):
        return False, posterior
    if keeps_correction(sharpness, probe_sharpness):
        return True, posterior
    return None, posterior
