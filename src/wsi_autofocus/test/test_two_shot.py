"""Two-shot defocus: features that cancel the specimen, and the shipped model on a microscope and on
real content it was never trained on."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.specimen import GLASS_OD, pixel_centres_um
from wsi_autofocus import data, heldout_imaging, shift_evaluation, training_optics, two_shot, two_shot_training
from wsi_autofocus.content import EVALUATION_IMAGES, RealImageSpecimen
from wsi_autofocus.inference import default_model_dir
from wsi_autofocus.model_card import render_two_shot
from wsi_autofocus.two_shot import TwoShotError, TwoShotModel, pair_features
from wsi_common.focus_metrics import TISSUE_SAMPLE_STEP, tissue_fraction

PIXEL_UM, APERTURE = 0.325, 0.75


def _specimen(kind: str, rng) -> np.ndarray:
    noise = rng.standard_normal((256, 256))
    if kind == "fine":
        return noise
    return ndimage.gaussian_filter(noise, 1.5) + 0.3 * ndimage.gaussian_filter(rng.standard_normal((256, 256)), 6)


def _exposure(specimen: np.ndarray, blur_px: float) -> np.ndarray:
    blurred = ndimage.gaussian_filter(specimen, blur_px, mode="wrap")
    gray = np.clip(128 + 40 * blurred / specimen.std(), 0, 255)
    return np.repeat(np.round(gray).astype(np.uint8)[..., None], 3, axis=2)


def _features(specimen, blurs):
    first, second = (_exposure(specimen, blur) for blur in blurs)
    return pair_features(first, second, APERTURE, PIXEL_UM, 2.0)


def _ratios(specimen, blurs):
    return _features(specimen, blurs)[two_shot.RATIO_FEATURES][:5]


def test_band_ratios_depend_on_the_blur_not_on_the_specimen():
    rng = np.random.default_rng(0)
    fine, coarse = _specimen("fine", rng), _specimen("coarse", rng)
    sharper_second = _ratios(fine, (2.0, 1.0))
    assert np.allclose(_ratios(coarse, (2.0, 1.0)), sharper_second, rtol=0.1, atol=0.05)
    # The same specimens blurred the other way round: the second exposure is the blurrier one.
    assert np.all(_ratios(fine, (1.0, 2.0))[1:] < 0) and np.all(sharper_second[1:] > 0)
    # The band levels are what tells the specimens apart: the coarse one's power falls faster with frequency.
    fine_levels, coarse_levels = (_features(specimen, (2.0, 1.0))[two_shot.LEVEL_FEATURES]
                                  for specimen in (fine, coarse))
    assert fine_levels[0] == coarse_levels[0] == 0.0
    assert np.all(coarse_levels[6:12] < fine_levels[6:12] - 0.5)


def _stained(texture: np.ndarray) -> np.ndarray:
    """A pink-stained RGB field of `texture` (relative contrast around 0)."""
    density = np.clip(0.4 + 0.15 * texture / texture.std(), 0.0, None)
    rgb = 230.0 * np.exp(-density[..., None] * np.array([0.3, 1.2, 0.6]))
    return np.round(rgb).astype(np.uint8)


def _top_right_sub_field(field_px: int) -> tuple[slice, slice]:
    """The sub-field `field_window` reads in the top-right corner: the last place of its grid, which starts on the
    tissue mask's sampling grid."""
    side = round(field_px * two_shot.SUB_WINDOW_FRACTION)
    left = (field_px - side) // TISSUE_SAMPLE_STEP * TISSUE_SAMPLE_STEP
    return slice(0, side), slice(left, left + side)


def test_a_field_is_read_where_its_tissue_is():
    """The Hann window over the whole field leaves a corner almost unseen: a field whose tissue lies only in its
    top-right corner is read through the sub-field over that corner, a field full of tissue whole."""
    rng = np.random.default_rng(3)
    full = _stained(_specimen("coarse", rng))
    assert two_shot.field_window(full) == (slice(0, 256), slice(0, 256))
    corner = np.full_like(full, 225)
    corner[:72, -72:] = full[:72, -72:]
    assert two_shot.field_window(corner) == _top_right_sub_field(256)


def test_a_sub_field_reads_stationary_content_as_the_whole_field_does():
    """The band powers of a region are scaled by the windows' energies: the same texture gives the same mean
    log powers, so the model reads a sub-field on the scale it was trained on."""
    rng = np.random.default_rng(4)
    image = _stained(_specimen("coarse", rng))
    whole, valid = two_shot.band_log_power(image, APERTURE, PIXEL_UM)
    part, _ = two_shot.band_log_power(image, APERTURE, PIXEL_UM, (slice(64, 192), slice(64, 192)))
    # Unscaled, a window of a quarter of the area reads every band log10(4) = 0.6 lower. The sub-field is a
    # sample of the texture, so each band scatters a little; the lowest hold a handful of frequencies at 128 px.
    difference = (part - whole)[valid & (two_shot.BAND_EDGES[:-1] >= 0.06)]
    assert abs(difference.mean()) < 0.1 and np.abs(difference).max() < 0.3, difference


class _CornerOfTissue:
    """`base` where x >= left_um and y < bottom_um (the corner of a section with straight edges), glass elsewhere."""

    def __init__(self, base, left_um: float, bottom_um: float):
        self.base, self.left_um, self.bottom_um = base, left_um, bottom_um
        self.width_um, self.height_um = base.width_um, base.height_um

    def tissue_bounds_um(self):
        return self.base.tissue_bounds_um()

    def optical_density(self, *region):
        return self.optical_density_and_path(*region)[0]

    def optical_density_and_path(self, x0_um, y0_um, width_px, height_px, pixel_size_um):
        od, path = self.base.optical_density_and_path(x0_um, y0_um, width_px, height_px, pixel_size_um)
        glass = ((pixel_centres_um(x0_um, width_px, pixel_size_um)[None, :] < self.left_um)
                 | (pixel_centres_um(y0_um, height_px, pixel_size_um)[:, None] >= self.bottom_um))
        return (np.where(glass[..., None], GLASS_OD, od).astype(np.float32),
                np.where(glass, 0.0, path).astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("corner_px", [60, 36])
def test_a_field_whose_tissue_lies_in_a_corner_is_read_through_a_window_on_it(corner_px):
    """Tissue only in the top-right `corner_px` x `corner_px` of a 256 px field (5 % or 2 % of it), imaged by the
    virtual microscope (validation specimens): through the whole field's window the shipped model sees mostly
    glass and answers with a sigma of several µm; through `field_window` it reads the defocus as on a field full
    of tissue (through a half-width sub-field, as before a third, the model then shipped read the 2 % corner to
    1.7 µm)."""
    model = TwoShotModel.load(two_shot.default_model_path())
    rng = np.random.default_rng(8)
    errors = {"field window": [], "whole field": []}
    for seed in (100, 101, 102, 103):
        base = data.specimen_for_seed(seed)
        full = VirtualMicroscope(specimen=base, seed=seed)
        roi, pixel_um = full.camera.centre_roi(256), full.pixel_size_um(20.0)
        # The densest of a few fields on the section, so that the corner holds tissue.
        x, y = max(data.tissue_points(full, rng, 8), key=lambda point: tissue_fraction(
            full.capture(*point, full.focal_z_um(*point), 20.0, roi=roi).image_rgb8))
        corner = _CornerOfTissue(base, x + (128 - corner_px) * pixel_um, y - (128 - corner_px) * pixel_um)
        microscope = VirtualMicroscope(specimen=corner, seed=seed, focal_surface=full.focal_surface)
        aperture = microscope.objective(20.0).numerical_aperture
        step, condenser = two_shot.default_step_um(aperture), two_shot.Condenser(microscope.condenser_fill)
        for defocus in (-5.0, -3.0, -1.5, 1.5, 3.0, 5.0):
            first, second = (microscope.capture(x, y, microscope.focal_z_um(x, y) + z, 20.0, roi=roi).image_rgb8
                             for z in (defocus, defocus + step))
            assert two_shot.field_window(first) == _top_right_sub_field(256)
            windowed = model.estimate(first, second, aperture, pixel_um, step, condenser).defocus_um
            whole = two_shot.features_from_bands(two_shot.band_log_power(first, aperture, pixel_um),
                                                 two_shot.band_log_power(second, aperture, pixel_um),
                                                 aperture, pixel_um, step)
            depths, _ = model.predict_depths(two_shot.model_inputs(whole, condenser.fill, condenser.inner_fill))
            errors["field window"].append(abs(windowed - defocus))
            errors["whole field"].append(abs(depths[0] * two_shot.depth_unit_um(aperture) - defocus))
    mae = {name: float(np.mean(values)) for name, values in errors.items()}
    assert mae["field window"] < 0.5 and mae["field window"] < 0.5 * mae["whole field"], mae


def test_pairs_that_cannot_be_compared_are_refused_with_the_reason():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(TwoShotError, match="differ in shape"):
        pair_features(image, image[:32], APERTURE, PIXEL_UM, 2.0)
    with pytest.raises(TwoShotError, match="above the first"):
        pair_features(image, image, APERTURE, PIXEL_UM, -2.0)


def test_a_stack_is_one_draw_of_specimen_and_camera():
    """The exposures of a randomised microscope's stack share the specimen's density and phase and the
    camera (drawn as for a single field, so the single-shot data renders as before); only the defocus and
    the noise differ."""
    specimen = data.specimen_for_seed(0)
    optics = training_optics.sample_optics(20.0, np.random.default_rng(1))
    x, y = specimen.sections[0].center_x_um, specimen.sections[0].center_y_um
    single = data.randomised_field(specimen, x, y, optics, 0.3, 4.0, 64, np.random.default_rng(2))
    stack = data.randomised_stack(specimen, x, y, optics, 0.3, (4.0, 6.0), 64, np.random.default_rng(2))
    def difference(a, b):
        return np.abs(a.astype(np.float32) - b).mean()

    # The stack's wider border (for its larger defocus) leaves only the noise of the field's edge.
    assert difference(single, stack[0]) < 0.5 and difference(stack[0], stack[1]) > 1.5


def test_shipped_model_reads_defocus_on_a_held_out_microscope_and_real_content():
    """The shipped model never saw this microscope's image formation nor this H&E image: it must tell
    the side of focus of every field beyond 2 µm and their distance to within a couple of µm."""
    model = TwoShotModel.load(two_shot.default_model_path())
    scope = heldout_imaging.HELD_OUT_SCOPES["abbe-astigmatic"]
    specimen = RealImageSpecimen(EVALUATION_IMAGES["real-he"])
    rng = np.random.default_rng(5)
    step = two_shot.default_step_um(scope.objective(20.0).numerical_aperture)
    errors = []
    for (x, y), defocus in zip(specimen.tissue_points(rng, 6), (-8.0, -5.0, -2.5, 2.5, 5.0, 8.0)):
        first, second = (heldout_imaging.capture(scope, specimen, x, y, d, 20.0, 256, rng)
                         for d in (defocus, defocus + step))
        estimate = model.estimate(first.image_rgb8, second.image_rgb8, first.numerical_aperture,
                                  first.pixel_size_um, step, scope.illumination.declared_condenser())
        assert np.sign(estimate.defocus_um) == np.sign(defocus), (defocus, estimate)
        errors.append(abs(estimate.defocus_um - defocus))
    assert np.mean(errors) < 1.5, errors


def test_every_split_holds_pairs_from_ring_lit_microscopes_only(monkeypatch):
    """Ring illumination blurs like a wider disc, so the pairs must show it often enough to be told from
    distance: each split's "ring" set images every pair through a random microscope with an annular condenser."""
    drawn = []
    sample_optics = training_optics.sample_optics

    def recording(*args, **kwargs):
        drawn.append(sample_optics(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(training_optics, "sample_optics", recording)
    for split in ("train", "val"):
        spec = two_shot_training.PAIR_SPLITS[split]["ring"]
        small = dataclasses.replace(spec, pairs_per_specimen=6, pairs_per_microscope=2, field_px=64)
        pairs = two_shot_training.render_specimen_pairs(small, spec.specimen_seeds[0])
        assert (pairs["source"] > 0).all() and np.isfinite(pairs["features"]).all()
    assert len(drawn) == 6 and all(0 < optics.condenser_inner_fill < optics.condenser_fill for optics in drawn)


def test_data_rendered_by_an_earlier_image_formation_is_rendered_again(tmp_path):
    """A pair file or a training split records what rendered it: one imaged before a change of the image formation
    (here: the phase weighted by T, as before sqrt(T)) is not taken for this version's data."""
    spec = dataclasses.replace(two_shot_training.PAIR_SPLITS["val"]["near"], specimen_seeds=(
        two_shot_training.PAIR_SPLITS["val"]["near"].specimen_seeds[0],), pairs_per_specimen=2, field_px=64)
    path = two_shot_training.generate_pairs(spec, tmp_path / "near.npz", workers=1)
    assert two_shot_training.pairs_are_current(path, spec)
    assert not two_shot_training.pairs_are_current(path, dataclasses.replace(spec, seed=spec.seed + 1))
    recorded = json.loads(path.with_suffix(".json").read_text())
    data.write_description(path, recorded | {"rendering": "weak object, phase term T phi"})
    assert not two_shot_training.pairs_are_current(path, spec)
    split = data.SPLITS["val"]
    data.write_description(path, data.description(split))
    assert data.is_current(path, data.description(split))
    data.write_description(path, data.description(split) | {"rendering": "weak object, phase term T phi"})
    assert not data.is_current(path, data.description(split))


def test_the_same_blur_under_a_wider_declared_condenser_is_read_as_less_defocus():
    """A defocused absorber's blur is the shadow of the illumination cone: the shipped model reads a pair of
    the virtual microscope farther from focus when told the condenser is narrower than it is, nearer when told
    it is wider, and with the condenser not known somewhere in between."""
    model = TwoShotModel.load(two_shot.default_model_path())
    microscope = VirtualMicroscope(seed=3)
    rng = np.random.default_rng(3)
    step = two_shot.default_step_um(APERTURE)
    for (x, y), defocus in zip(data.tissue_points(microscope, rng, 3), (-6.0, 5.0, 8.0)):
        focal = microscope.focal_z_um(x, y)
        first, second = (microscope.capture(x, y, focal + d, 20.0, roi=(384, 384, 256, 256)).image_rgb8
                         for d in (defocus, defocus + step))
        read = {fill: abs(model.estimate(first, second, APERTURE, PIXEL_UM, step, two_shot.Condenser(fill)).defocus_um)
                for fill in (0.35, 0.95)}
        unknown = abs(model.estimate(first, second, APERTURE, PIXEL_UM, step, two_shot.UNKNOWN_CONDENSER).defocus_um)
        assert read[0.35] > unknown > read[0.95], (defocus, read, unknown)


def test_a_condenser_is_a_disc_or_a_ring_inside_the_objective_aperture():
    assert two_shot.Condenser(0.7).inner_fill == 0.0 and two_shot.UNKNOWN_CONDENSER.fill == 0.0
    for fill, inner in ((1.2, 0.0), (0.5, 0.6), (0.0, 0.3), (-0.1, 0.0)):
        with pytest.raises(TwoShotError, match="expected 0 <= inner < fill <= 1"):
            two_shot.Condenser(fill, inner)
    # Points sampling a uniform disc's area evenly: the equivalent disc is that disc; brighter at the centre: smaller.
    radii = 0.6 * np.sqrt((np.arange(2000) + 0.5) / 2000)
    assert two_shot.Condenser.equivalent_disc(radii, np.ones_like(radii)).fill == pytest.approx(0.6, abs=1e-3)
    assert two_shot.Condenser.equivalent_disc(radii, np.exp(-(radii / 0.3) ** 2)).fill < 0.45


def test_a_condenser_declared_by_its_na_fills_less_of_a_higher_na_objective():
    shared = two_shot.CondenserDeclaration(numerical_aperture=0.45)
    assert shared.for_objective(0.75).fill == pytest.approx(0.6) and shared.for_objective(0.75).inner_fill == 0.0
    assert shared.for_objective(0.95).fill == pytest.approx(0.45 / 0.95)
    assert shared.for_objective(0.3) == two_shot.Condenser(1.0)      # beyond a low-NA objective's aperture
    ring = two_shot.CondenserDeclaration(numerical_aperture=0.6, inner_numerical_aperture=0.3)
    assert (ring.for_objective(0.75).fill, ring.for_objective(0.75).inner_fill) == pytest.approx((0.8, 0.4))
    with pytest.raises(TwoShotError, match="dark field"):
        ring.for_objective(0.25)
    # Set per objective as a fraction of its NA, or not known: the same condenser under every objective.
    assert two_shot.CondenserDeclaration(0.7).for_objective(0.95) == two_shot.Condenser(0.7)
    assert two_shot.CondenserDeclaration().for_objective(0.75) == two_shot.UNKNOWN_CONDENSER
    with pytest.raises(TwoShotError, match="declare one"):
        two_shot.CondenserDeclaration(fill=0.7, numerical_aperture=0.5)
    with pytest.raises(TwoShotError, match="expected 0 <= inner < NA"):
        two_shot.CondenserDeclaration(numerical_aperture=0.3, inner_numerical_aperture=0.4)
    with pytest.raises(TwoShotError, match="needs it"):
        shared.for_objective(0.0)
    # The single-shot model still reads a tile sent without its NA: as with the condenser not known.
    assert shared.for_objective_if_known(0.0) == two_shot.UNKNOWN_CONDENSER
    assert shared.for_objective_if_known(0.75) == shared.for_objective(0.75)
    assert two_shot.CondenserDeclaration(0.7).for_objective_if_known(0.0) == two_shot.Condenser(0.7)


def test_training_hides_the_condenser_of_a_share_of_the_pairs():
    n = 4000
    pairs = {"features": np.zeros((n, two_shot.FEATURE_COUNT), np.float32),
             "condenser_fill": np.full(n, 0.8, np.float32), "condenser_inner_fill": np.full(n, 0.4, np.float32)}
    inputs = two_shot_training.with_model_inputs(pairs, 0.25, 0)["features"]
    assert inputs.shape == (n, two_shot.MODEL_INPUT_COUNT)
    hidden = np.all(inputs[:, two_shot.FEATURE_COUNT:] == 0.0, axis=1)
    assert abs(hidden.mean() - 0.25) < 0.03
    assert np.all(inputs[~hidden, two_shot.FEATURE_COUNT:] == np.float32([0.8, 0.4]))


def test_a_model_trained_without_the_condenser_input_is_refused_with_what_to_do(tmp_path):
    model = TwoShotModel.load(two_shot.default_model_path())
    model.arrays["mean"] = model.arrays["mean"][:two_shot.FEATURE_COUNT]
    path = model.save(tmp_path / "old.npz")
    with pytest.raises(TwoShotError, match=f"reads {two_shot.FEATURE_COUNT} inputs.*calibrate the scanner again"):
        TwoShotModel.load(path)


def test_the_shipped_two_shot_card_is_rendered_from_its_evaluation():
    """MODEL_CARD.md is what `wsi-autofocus eval-two-shot --card` makes of the shipped evaluation.json, its
    targets included: one that no tile of the scan outcome ends further from focus than the focus map left it, the
    project's 20x target on held-out specimens through its own simulator, and the calibration targets judged over
    independent draws of the sweeps."""
    path = two_shot.default_model_path()
    evaluation = json.loads((path.parent / "evaluation.json").read_text())
    card = (path.parent / "MODEL_CARD.md").read_text()
    assert card == render_two_shot(path, evaluation), "MODEL_CARD.md is stale: run wsi-autofocus eval-two-shot --card"
    assert "left further from focus by the scan than by the focus map alone (target 0)" in card
    assert "own simulator, held-out specimens MAE" in card
    for where in ("other specimens", "the slide itself"):
        assert f"after self-calibration on {where} mean MAE over 6 draws of 9 sweeps" in card


def test_the_scan_outcome_on_the_slide_itself_is_judged_for_each_pair_of_models():
    """The card's "never worse" target on the slide itself holds for the models a scan that calibrates itself
    uses only if no slide left a tile further from focus, and is judged apart for the shipped pair."""
    from wsi_autofocus.model_card import self_calibrated_scan_outcome_checks

    def outcomes(shipped_worse: int, calibrated_worse: int) -> dict:
        return {"refused": [], "outcomes": {"shipped models": {"n": 30, "tiles_worse": shipped_worse},
                                           "both calibrated": {"n": 30, "tiles_worse": calibrated_worse}}}

    checks = self_calibrated_scan_outcome_checks({"scope-a / slide-1": outcomes(1, 0),
                                                  "scope-b / slide-2": outcomes(0, 2)})
    assert checks == [("on the slide itself with shipped models: 1 of 60 tiles left further from focus by the scan "
                       "than by the focus map alone (target 0)", False),
                      ("on the slide itself with both calibrated: 2 of 60 tiles left further from focus by the scan "
                       "than by the focus map alone (target 0)", False)]
    assert all(met for _, met in self_calibrated_scan_outcome_checks({"scope-a / slide-1": outcomes(0, 0)}))


def test_the_scan_outcome_is_measured_with_the_shipped_pair_and_shown_only_for_it(tmp_path):
    """A scan uses both models: its outcome has one home, the two-shot evaluation, which records the pair it was
    measured with. Both shipped models are that pair; a single-shot model it was not measured with gets no table on
    its card, but the command that measures it."""
    from wsi_autofocus.model_card import render, shipped_scan_outcome

    evaluation = json.loads((two_shot.default_model_path().parent / "evaluation.json").read_text())
    assert evaluation["scan_outcome_models"] == shift_evaluation.scan_outcome_models(
        default_model_dir(), two_shot.default_model_path()), "run wsi-autofocus eval-two-shot --card, then card"
    assert shipped_scan_outcome(default_model_dir()) == evaluation["scan_outcome_20x"]
    retrained = tmp_path / "retrained"
    shutil.copytree(default_model_dir(), retrained)
    with open(retrained / "model.pt", "ab") as checkpoint:
        checkpoint.write(b"\0")
    assert shipped_scan_outcome(retrained) is None
    card = render(retrained)
    assert f"wsi-autofocus eval-two-shot --card --single-shot-model {retrained}" in card
    assert "scan outcome not measured with this model" in card.split("Targets not met")[1]
