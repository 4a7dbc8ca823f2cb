"""Two-shot defocus: features that cancel the specimen, and the shipped model on a microscope and on
real content it was never trained on."""
import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from wsi_autofocus import data, heldout_imaging, training_optics, two_shot, two_shot_training
from wsi_autofocus.content import EVALUATION_IMAGES, RealImageSpecimen
from wsi_autofocus.two_shot import TwoShotError, TwoShotModel, pair_features

PIXEL_UM, APERTURE = 0.325, 0.75
RATIO_BANDS = slice(0, len(two_shot.BAND_EDGES) - 1)


def _specimen(kind: str, rng) -> np.ndarray:
    noise = rng.standard_normal((256, 256))
    if kind == "fine":
        return noise
    return ndimage.gaussian_filter(noise, 1.5) + 0.3 * ndimage.gaussian_filter(rng.standard_normal((256, 256)), 6)


def _exposure(specimen: np.ndarray, blur_px: float) -> np.ndarray:
    blurred = ndimage.gaussian_filter(specimen, blur_px, mode="wrap")
    gray = np.clip(128 + 40 * blurred / specimen.std(), 0, 255)
    return np.repeat(np.round(gray).astype(np.uint8)[..., None], 3, axis=2)


def _ratios(specimen, blurs):
    first, second = (_exposure(specimen, blur) for blur in blurs)
    return pair_features(first, second, APERTURE, PIXEL_UM, 2.0)[RATIO_BANDS][:5]


def test_band_ratios_depend_on_the_blur_not_on_the_specimen():
    rng = np.random.default_rng(0)
    fine, coarse = _specimen("fine", rng), _specimen("coarse", rng)
    sharper_second = _ratios(fine, (2.0, 1.0))
    assert np.allclose(_ratios(coarse, (2.0, 1.0)), sharper_second, rtol=0.1, atol=0.05)
    # The same specimens blurred the other way round: the second exposure is the blurrier one.
    assert np.all(_ratios(fine, (1.0, 2.0))[1:] < 0) and np.all(sharper_second[1:] > 0)


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
                                  first.pixel_size_um, step)
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
