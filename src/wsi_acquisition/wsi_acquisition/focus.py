"""How a scan acts on a single-shot defocus estimate: trust it, probe the side of focus, keep a correction.

The focus measures these rules compare (sharpness, tissue, z-sweep peaks) and the tolerance they hold a
tile to (`focus_tolerance_um`) are in `wsi_common.focus_metrics`.
"""
import numpy as np

from wsi_common.focus_metrics import focus_tolerance_um

# Where a tile's z came from: the focus map; a correction by the autofocus kept because it is sharper than
# the focus map's capture; the same after a second exposure told the side of focus from blur, or read
# together with the tile by the two-shot model.
FOCUS_MAP, AUTOFOCUS, AUTOFOCUS_PROBE, AUTOFOCUS_TWO_SHOT = FOCUS_SOURCES = (
    "focus-map", "autofocus", "autofocus+probe", "autofocus+two-shot")


def trusts_estimate(uncertainty_um: float, depth_of_field_um: float) -> bool:
    """Whether a scan acts on a single-shot defocus estimate: when its one-sigma uncertainty is below
    half the depth of field, moving by the estimate lands within focus. The 1 µm floor keeps a high-NA
    objective, whose depth of field is thinner than the model's precision, from ignoring every estimate."""
    return bool(uncertainty_um < focus_tolerance_um(depth_of_field_um))


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
    if trusts_estimate(uncertainty_um, depth_of_field_um):
        return "correct" if abs(defocus_um) > depth_of_field_um / 2 else "keep"
    return "probe" if surely_out_of_focus(distance_um, distance_uncertainty_um, depth_of_field_um) else "keep"


def surely_out_of_focus(distance_um: float, distance_uncertainty_um: float, depth_of_field_um: float) -> bool:
    """Whether an image's estimated distance from focus puts it beyond half the depth of field by more than
    one sigma."""
    return distance_um - distance_uncertainty_um > depth_of_field_um / 2


def probe_step_um(depth_of_field_um: float, distance_um: float) -> float:
    """z step of the side probe (upwards): the estimated distance from focus, so that below focus the
    probe lands near focus and above it twice as far (the two hypotheses differ by 2 d); at least two
    depths of field and 2 µm, so that near focus they still differ clearly."""
    return max(distance_um, 2.0 * depth_of_field_um, 2.0)


def two_shot_offset(defocus_um: float, uncertainty_um: float, above_focus_probability: float,
                    depth_of_field_um: float) -> float | None:
    """The z offset an estimate from two exposures (the tile and its side probe) asks for, or None: to its
    focus when it is trusted or at least sure of the side (two exposures tell the side on microscopes the
    model never saw, where the distance may be off by a depth of field or two; the corrected capture is
    kept only if sharper) and the tile is out of focus by more than half the depth of field."""
    decided = trusts_estimate(uncertainty_um, depth_of_field_um) or side_decision(above_focus_probability) is not None
    return -defocus_um if decided and abs(defocus_um) > depth_of_field_um / 2 else None


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


def bracketing_offset(offset_um: float, distance_um: float, corrected_distance_um: float,
                      corrected_distance_uncertainty_um: float, depth_of_field_um: float) -> float | None:
    """Where to look next when a correction by `offset_um` still reads surely out of focus: the z offset
    (from the first capture) that divides the correction in the ratio of the two captures' estimated
    distances from focus, or None when the correction may have landed in focus.

    A correction of the right side but the wrong length went through focus (too long: the distance read on
    a microscope the model never saw can be off by a factor of two or more) or stopped short of it. Through
    focus, the two captures bracket it at distances in the ratio of their estimates, whatever factor both
    estimates are off by, since both come from the same microscope and model. Short of focus, this point
    lies between the two captures and is less sharp than the correction, which a scan then keeps
    (`kept_capture`)."""
    if not surely_out_of_focus(corrected_distance_um, corrected_distance_uncertainty_um, depth_of_field_um):
        return None
    return offset_um * distance_um / (distance_um + corrected_distance_um)


# What each capture of a correction is (`correction_captures`): the correction itself; one more where it and the
# focus map's capture bracket focus; the same move the other way, after the correction lost sharpness.
CORRECTION, BRACKET, OTHER_WAY = "correction", "bracket", "other-way"


def correction_captures(offset_um: float, distance_um: float, depth_of_field_um: float, capture, estimate, sharpness,
                        focus_map_sharpness: float) -> list:
    """A correction's captures as a scan takes them: `capture(offset_um)`; when `estimate` of that capture
    (anything with distance_um and distance_uncertainty_um, or None) reads it surely out of focus, one more
    where it and the first capture (`distance_um` from focus) bracket focus (`bracketing_offset`); and when
    neither would be kept (`kept_capture`) and the correction's capture is measurably less sharp than the focus
    map's (`sharpness` of a capture against `focus_map_sharpness`), the same move the other way: a move that
    blurred the tile went away from focus, the side it was told was wrong. Returns (kind, offset, capture)
    triples, kind one of `CORRECTION`, `BRACKET`, `OTHER_WAY`; `kept_capture` chooses among them."""
    captures = [(CORRECTION, offset_um, capture(offset_um))]
    corrected = estimate(captures[0][2])
    if corrected is not None:
        bracket = bracketing_offset(offset_um, distance_um, corrected.distance_um, corrected.distance_uncertainty_um,
                                    depth_of_field_um)
        if bracket is not None:
            captures.append((BRACKET, bracket, capture(bracket)))
    sharpnesses = [sharpness(taken) for _, _, taken in captures]
    moved_away = sharpness_gain(sharpnesses[0], focus_map_sharpness) <= -MIN_SHARPNESS_GAIN
    if moved_away and kept_capture(focus_map_sharpness, sharpnesses) is None:
        captures.append((OTHER_WAY, -offset_um, capture(-offset_um)))
    return captures


def kept_capture(focus_map_sharpness: float, sharpnesses: list[float]) -> int | None:
    """Which of a tile's corrected captures replaces the focus map's: the sharpest, if it is measurably
    sharper than the focus map's (`keeps_correction`); None keeps the focus map's."""
    if not sharpnesses:
        return None
    best = int(np.argmax(sharpnesses))
    return best if keeps_correction(sharpnesses[best], focus_map_sharpness) else None


def sharpness_gain(sharpness: float, reference_sharpness: float) -> float:
    """Relative sharpness of an image over a reference image of the same field (0 = equal)."""
    return sharpness / max(reference_sharpness, 1e-12) - 1.0


def keeps_correction(sharpness: float, focus_map_sharpness: float) -> bool:
    """Whether a corrected capture replaces the focus map's: only when measurably sharper."""
    return sharpness_gain(sharpness, focus_map_sharpness) >= MIN_SHARPNESS_GAIN


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
        decided = side_decision(posterior)
        if decided is not None:
            return decided, posterior
    if keeps_correction(probe_sharpness, sharpness):
        return False, posterior
    if keeps_correction(sharpness, probe_sharpness):
        return True, posterior
    return None, posterior
