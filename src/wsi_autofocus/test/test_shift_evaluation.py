"""The evaluation's scan outcome runs the scan's own rules on held-out imaging: a confident, wrong
estimate is tried, found not sharper and refused, so no tile ends further from focus. Its calibration tables
say how far the sweeps' own focus lies from the evaluation's and how far a calibrated model reads off on average."""
import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_autofocus import shift_evaluation
from wsi_autofocus.calibration_store import ZStack, stacks_with_focus
from wsi_autofocus.inference import TileEstimate
from wsi_autofocus.two_shot import Condenser
from wsi_common.focus_metrics import tissue_fraction

CONFIDENT_DEFOCUS_UM = 5.0


class ConfidentlyAbove:
    """Says every image is 5 µm above focus, sure of it to 0.1 µm, whatever the image shows; keeps the
    condensers it was told."""

    def __init__(self):
        self.condensers = []

    def estimate_many(self, images, optics, condensers=None):
        self.condensers += condensers
        return [TileEstimate(CONFIDENT_DEFOCUS_UM, 0.1, CONFIDENT_DEFOCUS_UM, 0.1, 1.0) for _ in images]


def test_tiles_are_estimated_under_the_condenser_their_microscope_declares():
    images = np.zeros((3, 8, 8, 3), np.uint8)
    tiles = {"images": images, "numerical_aperture": np.full(3, 0.75), "pixel_size_um": np.full(3, 0.325),
             "imaging": np.array(["own-simulator", "abbe-annular", "abbe-gaussian"])}
    estimator = ConfidentlyAbove()
    shift_evaluation.estimate_tiles(estimator, tiles)
    assert estimator.condensers == [shift_evaluation.imaging_condenser(name) for name in tiles["imaging"]]
    assert estimator.condensers[1].inner_fill > 0                    # the annular microscope's ring
    # Tiles of one microscope (a slide's calibration check) need not name it.
    one_microscope = ConfidentlyAbove()
    shift_evaluation.estimate_tiles(one_microscope, {key: tiles[key] for key in tiles if key != "imaging"},
                                    condenser=Condenser(0.6))
    assert one_microscope.condensers == [Condenser(0.6)] * 3


def test_scan_outcome_refuses_corrections_that_are_not_sharper(tmp_path):
    spec = shift_evaluation.ShiftSpec(tile_px=128, tiles_per_cell=6, objectives=(20.0,), imaging=("abbe-gaussian",),
                                      content=("real-he",))
    tiles = shift_evaluation.render_tiles(spec, tmp_path, workers=1)
    estimator = ConfidentlyAbove()
    estimates = shift_evaluation.estimate_tiles(estimator, tiles)
    table = shift_evaluation.scan_outcome_table(spec, tiles, estimator, estimates, tmp_path)

    outcome = table["abbe-gaussian"]
    assert outcome["n"] == 6 and outcome["corrections"] == 6
    assert outcome["tiles_worse"] == 0
    # Moving 5 µm down helps the tiles that were well above focus, and only those are kept.
    helped = np.sum(np.abs(tiles["true_um"] - CONFIDENT_DEFOCUS_UM) < np.abs(tiles["true_um"]) - 1.0)
    assert helped >= 1 and outcome["tiles_improved"] >= 1
    assert outcome["scan_mean_abs_um"] <= outcome["focus_map_mean_abs_um"]
    # The re-imaged fields were cached: a second run renders nothing new and agrees.
    again = shift_evaluation.scan_outcome_table(spec, tiles, estimator, estimates, tmp_path)
    assert again == table


class _NumpyNoiseMicroscope(VirtualMicroscope):
    """The virtual microscope with the camera-noise draw it had before (numpy's ziggurat): the same law, other
    pixels, and other overview tissue masks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, camera_noise=lambda rng, shape: rng.standard_normal(shape, np.float32), **kwargs)


def test_a_cache_of_another_renderers_images_is_not_read_as_this_ones(tmp_path, monkeypatch):
    """Cached tiles are keyed by their spec and by what the renderers draw: after a renderer change the
    evaluation renders its tiles again instead of reading the old ones."""
    spec = shift_evaluation.ShiftSpec(tile_px=64, tiles_per_cell=2, objectives=(20.0,),
                                      imaging=(shift_evaluation.OWN_SIMULATOR,), content=("real-he",))
    tiles = shift_evaluation.render_tiles(spec, tmp_path, workers=1)
    key = shift_evaluation.cache_key(spec)
    assert shift_evaluation.cache_key(dataclasses.replace(spec)) == key
    monkeypatch.setattr(shift_evaluation, "VirtualMicroscope", _NumpyNoiseMicroscope)
    shift_evaluation.rendering_fingerprint.cache_clear()
    try:
        assert shift_evaluation.cache_key(spec) != key
        other = shift_evaluation.render_tiles(spec, tmp_path, workers=1)
    finally:
        shift_evaluation.rendering_fingerprint.cache_clear()
    assert len(list(tmp_path.glob("shift-tiles-*.npz"))) == 2
    assert np.array_equal(other["true_um"], tiles["true_um"]) and not np.array_equal(other["images"], tiles["images"])


@pytest.mark.slow
def test_procedural_tiles_are_fields_that_show_tissue_in_focus():
    """The overview's tissue mask admits bare glass inside a section's outline (one of this cell's fields
    before), where no focus can be found: such fields are drawn again."""
    spec = shift_evaluation.ShiftSpec()
    in_focus = shift_evaluation._FieldCamera(spec, shift_evaluation.OWN_SIMULATOR, 20.0)

    def field_tissue(min_fraction):
        _, positions, _ = shift_evaluation._cell_layout(
            dataclasses.replace(spec, min_field_tissue_fraction=min_fraction), shift_evaluation.PROCEDURAL,
            shift_evaluation.OWN_SIMULATOR, 20.0)
        return np.array([tissue_fraction(in_focus.capture(specimen, x, y, 0.0, None).image_rgb8)
                         for specimen, x, y in positions])

    assert np.sum(field_tissue(0.0) < 0.01) >= 1
    assert field_tissue(spec.min_field_tissue_fraction).min() >= spec.min_field_tissue_fraction


def _sweep_sharpest_at(peak_um: float, rng) -> ZStack:
    """A z-sweep of one textured field, blurred in proportion to the distance from peak_um."""
    field = rng.uniform(40, 220, (64, 64, 3))
    z = np.arange(-3.0, 3.01, 0.5)
    images = np.stack([np.clip(ndimage.gaussian_filter(field, (0.2 + 1.5 * abs(value - peak_um),) * 2 + (0,)), 0, 255)
                       for value in z]).astype(np.uint8)
    return ZStack(images, z, 0.325, 0.75)


CONDENSER = Condenser(0.7)


def test_the_calibration_table_shows_how_far_the_sweeps_sharpest_images_and_labels_lie_from_best_focus():
    """Sweeps are labelled from the specimen plane found about their sharpness peaks; the evaluation's best focus is
    z = 0 of each sweep."""
    rng = np.random.default_rng(0)
    usable, _ = stacks_with_focus([_sweep_sharpest_at(0.4, rng), _sweep_sharpest_at(0.2, rng)], lambda message: None,
                                  CONDENSER)
    sharpest, labels = shift_evaluation.sharpest_offset_um(usable), shift_evaluation.label_offset_um(usable)
    assert abs(sharpest - 0.3) < 0.1
    assert labels == pytest.approx(np.mean([stack.best_focus_z_um for stack in usable]))
    stats = {"mae_um": 0.5, "median_abs_error_um": 0.4, "sign_accuracy_beyond_1um": 1.0, "fraction_acted_on": 0.5,
             "confidently_wrong": 0}
    result = {"before": stats, "after": stats, "fit_s": 1.0, "sweeps": 2, "refused": None}
    table = shift_evaluation.format_calibration({"scope": result | {"label_offset_um": labels,
                                                                    "sharpest_offset_um": sharpest}})
    assert "sharpest off" in table and "labels off" in table
    assert table.splitlines()[-1].split()[3:5] == [f"{sharpest:+.2f}", f"{labels:+.2f}"]
    older = shift_evaluation.format_calibration({"scope": result})      # results from before the columns
    assert "labels off" not in older and "sharpest off" not in older


def test_the_calibration_table_counts_the_sweeps_a_calibration_left_out():
    """A sweep of glass (no stain at its sharpness peak) is left out of a calibration, and of its labels' offset."""
    rng = np.random.default_rng(0)
    stained = [_sweep_sharpest_at(0.4, rng), _sweep_sharpest_at(0.2, rng)]
    images = stained[0].images
    grey = np.repeat(images.mean(axis=3, keepdims=True), 3, axis=3) + rng.normal(0, 1, images.shape)
    glass = ZStack(np.clip(np.round(grey), 0, 255).astype(np.uint8), stained[0].z_um, 0.325, 0.75)
    true = np.array([-4.0, 2.0])
    tiles = {"true_um": true, "depth_of_field_um": np.full(2, 1.4)}
    estimates = {"predicted_um": true, "uncertainty_um": np.full(2, 0.5), "distance_um": np.abs(true)}
    result = shift_evaluation.calibration_result(tiles, estimates, estimates, stained + [glass], CONDENSER, 1.0, None)
    assert result["sweeps"] == 3 and result["sweeps_used"] == 2
    assert result["label_offset_um"] == shift_evaluation.label_offset_um(
        stacks_with_focus(stained, lambda message: None, CONDENSER)[0])
    assert shift_evaluation.format_calibration({"scope": result}).splitlines()[-1].split()[1] == "2/3"


def test_calibration_draws_differ_only_in_their_seed_and_the_first_is_the_cards():
    """The seed draws the sweeps' fields, start offsets and camera noise (`render_sweeps`); the rest of a draw is the
    card's calibration."""
    spec = shift_evaluation.CalibrationSpec()
    draws = shift_evaluation.calibration_draws(spec, 3)
    assert draws[0] == spec and len({draw.seed for draw in draws}) == 3
    assert all(dataclasses.replace(draw, seed=spec.seed) == spec for draw in draws)


def _check(mae_before: float, mae_after: float, refused: bool) -> dict:
    """A calibration row as `two_shot_calibration_check` makes it (a refused one reads as before)."""
    after = mae_before if refused else mae_after
    return {"before": {"mae_um": mae_before, "bias_um": 0.0}, "after": {"mae_um": after, "bias_um": after / 2},
            "refused": "no better on held-back sweeps" if refused else None}


def test_calibrations_over_draws_give_each_draws_mae_their_mean_and_spread_and_count_the_refused():
    """A refused calibration leaves the model as it was: that draw's MAE is the one before, and it counts. Draws on a
    slide test other fields each: the MAE before is their mean."""
    checks = [{"scope": _check(0.7, 0.3, False)}, {"scope": _check(0.8, 0.4, False)}, {"scope": _check(0.6, 0.2, True)}]
    over = shift_evaluation.over_draws([23, 24, 25], 9, checks)
    row = over["microscopes"]["scope"]
    assert over["seeds"] == [23, 24, 25] and over["sweeps"] == 9
    assert row["mae_after_um"] == [0.3, 0.4, 0.6] and row["refused"] == 1
    assert row["mae_before_um"] == [0.7, 0.8, 0.6] and row["mean_mae_before_um"] == pytest.approx(0.7)
    assert row["mean_mae_after_um"] == pytest.approx(1.3 / 3)
    assert row["sd_mae_after_um"] == pytest.approx(np.std([0.3, 0.4, 0.6], ddof=1))
    assert row["bias_after_um"] == [0.15, 0.2, 0.3]
    title, header, line = shift_evaluation.format_over_draws(over, 0.3, shift_evaluation.DRAWS_TITLE).splitlines()
    assert "on 3 independent draws of 9 sweeps" in title
    assert header.split()[3:6] == ["seed", "23", "seed"]
    assert line.split() == ["scope", "0.70", "0.30", "0.40", "0.60", "0.43", "0.15", "1", "1/3"]


def test_the_calibration_table_shows_the_mean_signed_error_after_calibration():
    """A calibration that learnt another focus reads every field off the same way: the MAE cannot tell that
    from scatter, the mean signed error can."""
    true = np.array([-4.0, -1.0, 2.0, 6.0])
    tiles = {"true_um": true, "depth_of_field_um": np.full(4, 1.4)}
    shifted = {"predicted_um": true + 0.3, "uncertainty_um": np.full(4, 0.5), "distance_um": np.abs(true + 0.3)}
    scattered = shifted | {"predicted_um": true + np.array([0.3, -0.3, 0.3, -0.3])}
    after, before = (shift_evaluation.cell_statistics(tiles, estimates) for estimates in (shifted, scattered))
    assert after["mae_um"] == pytest.approx(before["mae_um"]) == pytest.approx(0.3)
    assert after["bias_um"] == pytest.approx(0.3) and before["bias_um"] == pytest.approx(0.0, abs=1e-9)
    table = shift_evaluation.format_calibration({"scope": {"before": before, "after": after, "fit_s": 1.0,
                                                           "sweeps": 9, "refused": None}})
    assert "bias after" in table and "+0.30" in table.splitlines()[-1]


def test_the_pooled_rows_show_a_distance_read_long_far_from_focus_per_distance_bin():
    """A model right near focus that reads far fields 30 % too far, on either side: the pooled MAE mixes both;
    per bin of true distance the far bins show it, with its sign."""
    true = np.array([-0.5, 0.8, -2.0, 2.5, -4.0, 5.0, -7.0, 9.0, 10.0])
    far = np.abs(true) > 3.0
    predicted = np.where(far, 1.3 * true, true)
    count = len(true)
    tiles = {"true_um": true, "depth_of_field_um": np.full(count, 1.4), "objective": np.full(count, 20.0),
             "content": np.array(["real-he"] * count), "imaging": np.array(["abbe-annular"] * count)}
    summary = shift_evaluation.summarize(tiles, {"predicted_um": predicted, "uncertainty_um": np.full(count, 5.0),
                                                 "distance_um": np.abs(predicted)})
    bins = summary["pooled_20x"]["held_out_imaging_real_content"]["by_distance"]
    assert [b["n"] for b in bins] == [2, 2, 2, 3]                 # 10 µm lies in the last bin
    assert [b["distance_bias_um"] for b in bins] == pytest.approx([0.0, 0.0, 0.3 * 4.5, 0.3 * 26 / 3])
    assert [b["mae_um"] for b in bins] == pytest.approx([0.0, 0.0, 0.3 * 4.5, 0.3 * 26 / 3])
    reversed_far = {"predicted_um": np.where(far, 0.7 * true, true), "uncertainty_um": np.full(count, 5.0),
                    "distance_um": np.abs(np.where(far, 0.7 * true, true))}
    short = shift_evaluation.summarize(tiles, reversed_far)["pooled_20x"]["held_out_imaging_real_content"]
    assert short["by_distance"][3]["distance_bias_um"] == pytest.approx(-0.3 * 26 / 3)
    table = shift_evaluation.format_table(summary)
    assert "2.60 / +2.60" in table.splitlines()[-1] and "6-10 µm" in table


def test_the_calibration_table_shows_the_error_against_each_tiles_own_sweep_focus():
    """The focus a sweep finds (its sharpness peak) may lie off the evaluation's best focus by how the specimen
    images. A model that reads every tile against its own sweep's focus is off by the evaluation's definition and
    not off at all by the sweeps'; tiles whose sweep shows no clear focus are left out of that column."""
    true = np.array([-4.0, -1.0, 2.0, 6.0])
    sweep_focus = np.array([0.4, 0.2, np.nan, 0.3])
    tiles = {"true_um": true, "depth_of_field_um": np.full(4, 1.4), "sweep_focus_um": sweep_focus}
    learnt = np.where(np.isfinite(sweep_focus), true - np.nan_to_num(sweep_focus), true - 1.0)
    after = {"predicted_um": learnt, "uncertainty_um": np.full(4, 0.5), "distance_um": np.abs(learnt)}
    stacks = [_sweep_sharpest_at(0.4, np.random.default_rng(0)), _sweep_sharpest_at(0.2, np.random.default_rng(1))]
    result = shift_evaluation.calibration_result(tiles, after, after, stacks, CONDENSER, 1.0, None)
    assert result["after"]["mae_um"] == pytest.approx((0.4 + 0.2 + 1.0 + 0.3) / 4)
    assert result["after_mae_tile_sweep_focus_um"] == pytest.approx(0.0, abs=1e-9)
    assert result["tiles_focus_offset_um"] == pytest.approx(0.3) and result["tiles_with_sweep_focus"] == 3
    header, row = shift_evaluation.format_calibration({"scope": result}).splitlines()[1:]
    assert "tiles' focus off" in header and "MAE after, tile's sweep focus" in header
    assert row.split()[5] == "+0.30" and row.split()[9] == "0.00"
    masked = shift_evaluation.calibration_result(tiles, after, after, stacks, CONDENSER, 1.0, None, mask=true > 0)
    assert masked["tiles_with_sweep_focus"] == 1 and masked["tiles_focus_offset_um"] == pytest.approx(0.3)
    unswept = {key: value for key, value in tiles.items() if key != "sweep_focus_um"}
    assert "tiles' focus off" not in shift_evaluation.format_calibration(
        {"scope": shift_evaluation.calibration_result(unswept, after, after, stacks, CONDENSER, 1.0, None)})


def test_each_calibration_tile_is_swept_about_the_evaluations_best_focus_once(tmp_path):
    """The sweep of a tile's field is centred on best focus, not on the tile's defocus (up to 10 µm off): its
    sharpness peak lies within a depth of field of best focus. Only tiles a calibration is judged on (held-out
    imaging at the sweeps' magnification) are swept, and a second evaluation reads them from the cache."""
    spec = shift_evaluation.ShiftSpec(tile_px=128, tiles_per_cell=2, objectives=(10.0, 20.0),
                                      imaging=("own-simulator", "abbe-astigmatic"), content=("real-he",))
    tiles = shift_evaluation.render_tiles(spec, tmp_path, workers=1)
    sweep_spec = shift_evaluation.CalibrationSpec()
    logged = []
    swept = shift_evaluation.with_sweep_focus(spec, tiles, sweep_spec, tmp_path, workers=1, log=logged.append)
    judged = (tiles["imaging"] == "abbe-astigmatic") & (tiles["objective"] == 20.0)
    assert judged.sum() == 2 and len(logged) == 1
    assert np.all(np.isnan(swept["sweep_focus_um"][~judged]))
    assert np.all(np.abs(swept["sweep_focus_um"][judged]) < tiles["depth_of_field_um"][judged])
    assert np.abs(tiles["true_um"][judged]).max() > 2 * tiles["depth_of_field_um"][judged].max()
    again = shift_evaluation.with_sweep_focus(spec, tiles, sweep_spec, tmp_path, workers=1, log=logged.append)
    assert len(logged) == 1
    np.testing.assert_array_equal(again["sweep_focus_um"], swept["sweep_focus_um"])
