"""Self-calibration of the two-shot model: a scanner's focus-map sweeps in, a refitted model the node uses out."""
import numpy as np
import pytest

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_autofocus import heldout_imaging, two_shot_calibration
from wsi_autofocus.calibration_store import (CalibratedEstimators, CalibrationError, CalibrationStore, ZStack,
                                             stacks_with_focus)
from wsi_autofocus.data import specimen_for_seed, tissue_points
from wsi_autofocus.two_shot import (FEATURE_COUNT, MODEL_INPUT_COUNT, Condenser, TwoShotModel, default_model_path,
                                    default_step_um, depth_unit_um)
from wsi_autofocus.two_shot_calibration import calibrate_two_shot, sweep_pairs

APERTURE, MAGNIFICATION = 0.75, 20.0
# A focus map's sweep, shortened: coarse steps of 2 µm and fine ones of 0.5 µm around the start.
SWEEP_OFFSETS_UM = np.unique(np.concatenate([np.arange(-8.0, 8.1, 2.0), np.arange(-1.5, 1.6, 0.5)]))


def test_sweep_pairs_are_every_two_images_a_trained_step_apart_labelled_by_the_lower():
    rng = np.random.default_rng(0)
    z = np.array([3.0, -4.0, 0.0, 1.0, 10.0, 40.0])              # unsorted, as a sweep may be stored
    stack = ZStack(rng.integers(0, 255, (len(z), 64, 64, 3), dtype=np.uint8), z, 0.325, APERTURE, best_focus_z_um=0.5)
    pairs = sweep_pairs([stack, stack], Condenser(0.6, 0.3))
    unit = depth_unit_um(APERTURE)
    expected = [(low - 0.5) for low in np.sort(z) for high in np.sort(z)
                if abs(low - 0.5) <= 20 and unit - 1e-6 <= high - low <= 12 * unit]
    assert sorted(pairs["defocus_um"][pairs["group"] == 0]) == pytest.approx(sorted(expected))
    assert np.bincount(pairs["group"]).tolist() == [len(expected)] * 2
    steps_in_depths = pairs["features"][:, FEATURE_COUNT - 2]
    assert steps_in_depths.min() >= 1.0 - 1e-5 and steps_in_depths.max() <= 12.0 + 1e-5
    assert np.all(pairs["features"][:, FEATURE_COUNT:] == np.float32([0.6, 0.3]))     # the declared condenser
    assert not pairs["sub_field"].any()


def test_sweep_pairs_read_a_field_again_in_its_corners_and_a_sparse_field_only_where_its_tissue_lies():
    rng = np.random.default_rng(1)
    z = np.arange(-6.0, 6.1, 1.5)
    tissue = np.full((len(z), 96, 96, 3), 235, np.uint8)
    tissue[:, :, :, :2] = rng.integers(60, 200, (len(z), 96, 96, 2), dtype=np.uint8)     # stained everywhere
    sparse = np.full_like(tissue, 235)
    sparse[:, :24, -24:, :2] = tissue[:, :24, -24:, :2]                                  # in one corner only
    stacks = [ZStack(images, z, 0.325, APERTURE, best_focus_z_um=0.0) for images in (tissue, sparse)]
    whole = sweep_pairs(stacks, Condenser(0.7))
    read = sweep_pairs(stacks, Condenser(0.7), two_shot_calibration.FIT_SUB_FIELD_FRACTION)
    per_stack = np.bincount(whole["group"])
    assert np.bincount(read["group"]).tolist() == [5 * per_stack[0], per_stack[1]]
    assert np.flatnonzero(read["sub_field"]).size == 4 * per_stack[0]
    # Each corner reads the field window's pairs again: the same labels and steps, other content.
    first = whole["group"] == 0
    for corner in np.split(read["features"][read["sub_field"]], 4):
        np.testing.assert_array_equal(corner[:, FEATURE_COUNT - 2:], whole["features"][first][:, FEATURE_COUNT - 2:])
        assert not np.allclose(corner[:, :FEATURE_COUNT - 2], whole["features"][first][:, :FEATURE_COUNT - 2])
    np.testing.assert_array_equal(np.split(read["defocus_um"][read["sub_field"]], 4)[2], whole["defocus_um"][first])
    np.testing.assert_array_equal(read["features"][~read["sub_field"]], whole["features"])


def test_fine_tuning_fits_the_last_hidden_layers_and_the_defocus_output_only():
    model = TwoShotModel.load(default_model_path())
    rng = np.random.default_rng(3)
    features = model.arrays["mean"] + model.arrays["scale"] * rng.normal(size=(300, MODEL_INPUT_COUNT))
    trained_depths, _ = model.predict_depths(features)
    # A microscope whose defocus the model reads 30 % long and 0.5 depths of focus high.
    pairs = {"features": features.astype(np.float32), "numerical_aperture": np.full(300, APERTURE, np.float32),
             "defocus_um": ((trained_depths / 1.3 - 0.5) * depth_unit_um(APERTURE)).astype(np.float32)}
    tuned = two_shot_calibration.fine_tune(model, pairs)

    def error(m):
        return np.mean(np.abs(m.predict_depths(features)[0] - (trained_depths / 1.3 - 0.5)))

    assert error(tuned) < 0.3 * error(model), (error(model), error(tuned))
    count = model.hidden_layer_count(model.members[0])
    tuned_layers = range(count - two_shot_calibration.FINE_TUNE_LAYERS, count)
    assert two_shot_calibration.FINE_TUNE_LAYERS == 2 and count == 3
    for key, trained in model.arrays.items():
        name = key.partition("_")[2]
        if name in [f"{kind}{layer}" for layer in tuned_layers for kind in "wb"]:
            assert not np.array_equal(tuned.arrays[key], trained), key
        elif name in ("w_out", "b_out"):
            assert not np.array_equal(tuned.arrays[key][..., 0], trained[..., 0]), key
            np.testing.assert_array_equal(tuned.arrays[key][..., 1], trained[..., 1])     # the log variance's
        else:
            np.testing.assert_array_equal(tuned.arrays[key], trained, err_msg=key)
    # Pulled hard enough towards the trained weights, it keeps them (Adam moves every weight by about its learning
    # rate at first, whatever pulls it: the full run of steps lets the pull settle them back).
    held = two_shot_calibration.fine_tune(model, pairs, penalty=1e6)
    assert error(held) == pytest.approx(error(model), rel=0.02)
    # Each step reads a random draw of the pairs: the same draws fit the same model, so a calibration repeats.
    again, repeated = (two_shot_calibration.fine_tune(model, pairs, batch=100, seed=0) for _ in range(2))
    for key in tuned.arrays:
        np.testing.assert_array_equal(again.arrays[key], repeated.arrays[key], err_msg=key)
    redrawn = two_shot_calibration.fine_tune(model, pairs, batch=100, seed=1)
    assert not np.array_equal(redrawn.arrays["m0_w_out"], again.arrays["m0_w_out"])
    assert error(redrawn) < 0.3 * error(model)


def _held_out_sweep(scope, seed: int, rng, tile_px: int = 192) -> ZStack:
    microscope = VirtualMicroscope(specimen=specimen_for_seed(seed), seed=seed)
    (x, y), = tissue_points(microscope, rng, 1)
    start = rng.uniform(-1.0, 1.0)
    images = np.stack([heldout_imaging.capture(scope, microscope.specimen, x, y, start + d, MAGNIFICATION, tile_px,
                                               rng).image_rgb8 for d in SWEEP_OFFSETS_UM])
    return ZStack(images, start + SWEEP_OFFSETS_UM, scope.pixel_size_um(MAGNIFICATION), APERTURE)


@pytest.mark.slow
def test_calibration_repairs_a_mismatched_model_on_a_held_out_microscope_and_the_node_picks_it(
        tmp_path, mismatched_two_shot_model):
    """Sweeps of validation specimens through a held-out microscope repair a model that reads distances
    wrong; pairs of other fields of a test specimen through the same microscope are then read right, and
    the store serves the calibrated model for that scanner's optics only."""
    scope = heldout_imaging.HELD_OUT_SCOPES["abbe-gaussian"]
    rng = np.random.default_rng(5)
    wrong = mismatched_two_shot_model
    stacks = [_held_out_sweep(scope, seed, rng) for seed in (100, 101, 102, 103, 104)]
    store = CalibrationStore(tmp_path / "calibration", "bench-2")
    pixel_um = scope.pixel_size_um(MAGNIFICATION)
    condenser = scope.illumination.declared_condenser()
    result = calibrate_two_shot(stacks, store.two_shot_path(MAGNIFICATION, APERTURE, pixel_um), wrong,
                                scanner={"name": "bench-2"}, condenser=condenser)
    assert result.held_back_mae_after_um < 0.5 * result.held_back_mae_before_um, result
    # A sweep drawn over glass has no focus and is left out, as a scan's calibration leaves it out.
    usable, skipped = stacks_with_focus(stacks, log=lambda message: None)
    assert list(result.skipped) == skipped
    assert result.pairs == len(sweep_pairs(usable, condenser, two_shot_calibration.FIT_SUB_FIELD_FRACTION)["group"])
    calibrated = TwoShotModel.load(result.path)
    assert calibrated.metadata["calibration"]["fine_tune"]["penalty"] == two_shot_calibration.FINE_TUNE_PENALTY
    assert calibrated.metadata["calibration"]["fine_tune"]["layers"] == two_shot_calibration.FINE_TUNE_LAYERS
    assert (calibrated.metadata["calibration"]["fine_tune"]["sub_field_fraction"]
            == two_shot_calibration.FIT_SUB_FIELD_FRACTION)
    assert calibrated.metadata["calibration"]["scanner"] == {"name": "bench-2"}

    microscope = VirtualMicroscope(specimen=specimen_for_seed(200), seed=200)
    step = default_step_um(APERTURE)
    truth = rng.uniform(-8.0, 8.0, 8)
    pairs = [[heldout_imaging.capture(scope, microscope.specimen, x, y, d + dz, MAGNIFICATION, 256, rng).image_rgb8
              for dz in (0.0, step)] for (x, y), d in zip(tissue_points(microscope, rng, len(truth)), truth)]

    def mae(model):
        return np.mean([abs(model.estimate(*pair, APERTURE, pixel_um, step, condenser).defocus_um - d)
                        for pair, d in zip(pairs, truth)])

    before, after = mae(TwoShotModel.load(wrong)), mae(calibrated)
    assert after < 0.6 * before, (before, after)
    estimators = CalibratedEstimators(store, "onnxruntime", base_two_shot_path=wrong)
    assert estimators.two_shot_for(MAGNIFICATION, APERTURE, pixel_um).metadata.get("calibration")
    assert estimators.two_shot_for(40.0, 0.95, 0.1625) is estimators.base_two_shot
    assert estimators.two_shot_for(0.0, 0.0, 0.0) is estimators.base_two_shot       # optics unknown


def _virtual_sweeps(seeds) -> list[ZStack]:
    stacks = []
    for seed in seeds:
        microscope = VirtualMicroscope(specimen=specimen_for_seed(seed), seed=seed)
        (x, y), = tissue_points(microscope, np.random.default_rng(seed), 1)
        focal = float(microscope.focal_z_um(x, y))
        images = np.stack([microscope.capture(x, y, focal + d, MAGNIFICATION, roi=(416, 416, 192, 192)).image_rgb8
                           for d in SWEEP_OFFSETS_UM])
        stacks.append(ZStack(images, focal + SWEEP_OFFSETS_UM, 0.325, APERTURE))
    return stacks


def test_a_two_shot_calibration_that_does_not_help_the_held_back_sweeps_is_refused(tmp_path, monkeypatch):
    real_fine_tune = two_shot_calibration.fine_tune

    def backwards(model, pairs):
        fitted = real_fine_tune(model, pairs)
        for member in fitted.members:
            fitted.arrays[f"m{member}_w_out"][:, 0] *= -3.0        # distance read backwards: worse on every sweep
        return fitted

    monkeypatch.setattr(two_shot_calibration, "fine_tune", backwards)
    with pytest.raises(CalibrationError, match="no better.*the model in use is kept"):
        calibrate_two_shot(_virtual_sweeps((100, 101, 102)), tmp_path / "two_shot.npz")
    assert not (tmp_path / "two_shot.npz").exists()
    with pytest.raises(CalibrationError, match="at least 2"):
        calibrate_two_shot(_virtual_sweeps((100,)), tmp_path / "two_shot.npz")


def test_sweeps_that_leave_nothing_to_judge_by_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    z = np.arange(-4.0, 4.1, 1.0)

    def stack(focus_um):
        return ZStack(rng.integers(0, 255, (len(z), 64, 64, 3), dtype=np.uint8), z, 0.325, APERTURE,
                      best_focus_z_um=focus_um)

    # The held-back sweep (the first) lies more than 20 µm from its focus: no pair of it is labelled.
    with pytest.raises(CalibrationError, match="to judge by in 0; two and one are needed"):
        calibrate_two_shot([stack(40.0), stack(0.0), stack(0.5)], tmp_path / "two_shot.npz")
    assert not (tmp_path / "two_shot.npz").exists()


@pytest.mark.parametrize("declared, reason", [
    (["--condenser-fill", "0.5", "--condenser-inner-fill", "0.6"], "condenser fill 0.5, inner fill 0.6"),
    (["--condenser-fill", "0.5", "--condenser-na", "0.4"], "declare one")])
def test_the_command_line_refuses_an_impossible_condenser_before_reading_the_scan(tmp_path, capsys, declared, reason):
    from wsi_autofocus import cli

    code = cli.main(["calibrate", "--scan", str(tmp_path / "no-such-scan"), *declared])
    assert code == 2 and reason in capsys.readouterr().err
