import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import DEFAULT_CONDENSER_FILL
from wsi_autofocus.data import (SPLITS, DatasetSpec, fields_showing_tissue,
                                in_focus_tissue_fraction, render_specimen, specimen_for_seed, tissue_points)
from wsi_autofocus.evaluate import EvaluationSpec, error_statistics, format_table, run_evaluation, summarize
from wsi_autofocus.inference import (CPU_PATCHES_PER_RUN, BackendUnavailableError, FocusEstimator, FocusInputError,
                                     aggregate, default_model_dir, load_backend)
from wsi_autofocus.model import ARCHITECTURES, RadialLogSpectrum, UnknownArchitectureError, architecture, build_model
from wsi_autofocus.model_card import (calibration_draws_target_check, calibration_target_check, record_reproduction,
                                     render, target_statement)
from wsi_autofocus.model_io import MODEL_INPUTS, MODEL_OUTPUTS, OPTICS_FEATURES
from wsi_autofocus.patches import context_corner, patch_grid, select_patches
from wsi_autofocus.training import (InlineFocusDataset, TrainingConfig, anneal_factor, fit_uncertainty_calibration,
                                   focus_loss, load_checkpoint, optics_columns, seed_everything, train, training_loss,
                                   uncertainty_calibration)
from wsi_common.focus_metrics import MIN_FIELD_TISSUE_FRACTION, SHARPNESS_METRICS, brenner, tissue_fraction


TWENTY_X = torch.tensor([[0.75, 0.325, 0.7, 0.0]])        # NA, pixel size µm, condenser fill and inner fill


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_maps_patch_and_context_to_distance_variance_and_side(name):
    model = build_model(name, 64).eval()
    patches, context = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        output = model(patches, context, TWENTY_X.repeat(3, 1))
        other_context = model(patches, torch.rand(3, 3, 64, 64), TWENTY_X.repeat(3, 1))
    assert output.shape == (3, len(MODEL_OUTPUTS)) and torch.isfinite(output).all()
    assert not torch.allclose(output, other_context)          # the context view reaches the head


def test_near_focus_head_trains_on_the_patch_alone_and_stays_out_of_inference():
    model = build_model("resnet_small", 64).eval()
    patches, context = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    both = model.forward_with_near_head(patches, context, TWENTY_X.repeat(3, 1))
    other_context = model.forward_with_near_head(patches, torch.rand(3, 3, 64, 64), TWENTY_X.repeat(3, 1))
    assert both.shape == (3, 5)
    torch.testing.assert_close(both[:, :3], model(patches, context, TWENTY_X.repeat(3, 1)))
    torch.testing.assert_close(both[:, 3:], other_context[:, 3:])       # the near head never sees the context
    training_loss(both, torch.tensor([0.5, -2.0, 4.0]), beta=0.5).backward()
    assert model.near_head[0].weight.grad.abs().sum() > 0 and model.head[0].weight.grad.abs().sum() > 0


def test_radial_spectrum_is_the_binned_power_of_the_windowed_patch():
    spectrum = RadialLogSpectrum(48, bins=16)
    patches = torch.rand(2, 3, 48, 48, dtype=torch.float64)
    centred = (patches - patches.mean(dim=(2, 3), keepdim=True)) * spectrum.window.double()
    power = (torch.fft.fft2(centred).abs() ** 2).flatten(2)
    frequency = torch.fft.fftfreq(48, dtype=torch.float64)
    bin_index = ((frequency[:, None] ** 2 + frequency[None, :] ** 2).sqrt() / 0.5 * 16).long().flatten()
    expected = torch.stack([power[..., bin_index == b].mean(-1) for b in range(16)], dim=-1).log()
    torch.testing.assert_close(spectrum(patches.float()).double(), expected, atol=1e-4, rtol=1e-4)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(UnknownArchitectureError, match="expected one of"):
        architecture("vgg16")


def test_exposure_does_not_change_the_prediction():
    model = build_model("resnet_small", 64).eval()
    patch, context = torch.rand(1, 3, 64, 64) * 0.5 + 0.2, torch.rand(1, 3, 64, 64) * 0.5 + 0.2
    with torch.inference_mode():
        np.testing.assert_allclose(model(patch, context, TWENTY_X).numpy(),
                                   model(patch * 1.4, context * 1.4, TWENTY_X).numpy(), rtol=1e-3, atol=1e-4)


def test_aggregate_is_a_robust_weighted_median_with_honest_uncertainty():
    sure_above = np.full(5, 8.0)
    agreeing = aggregate(np.array([1.0, 1.1, 0.9, 1.0, 15.0]), np.log(np.full(5, 0.04)), sure_above)
    assert agreeing.distance_um == pytest.approx(1.0, abs=0.11)       # the outlier patch does not drag it
    disagreeing = aggregate(np.array([1.0, 7.0, 2.0, 6.0, 4.0]), np.log(np.full(5, 0.04)), sure_above)
    assert disagreeing.distance_uncertainty_um > 3 * agreeing.distance_uncertainty_um
    trusted = aggregate(np.array([2.0, 8.0, 8.0]), np.log(np.array([0.01, 25.0, 25.0])), np.full(3, 8.0))
    assert trusted.distance_um == 2.0                        # the confident patch outweighs two unsure ones


def test_a_tile_whose_side_is_in_doubt_is_never_certain():
    """Distance known to 0.1 µm, side a coin toss: the signed estimate must say +-distance, not +-0.1 µm."""
    sure = aggregate(np.full(4, 5.0), np.log(np.full(4, 0.01)), np.full(4, 9.0))
    assert sure.defocus_um == 5.0 and sure.uncertainty_um < 0.2 and sure.above_focus_probability > 0.99
    below = aggregate(np.full(4, 5.0), np.log(np.full(4, 0.01)), np.full(4, -9.0))
    assert below.defocus_um == -5.0
    doubtful = aggregate(np.full(4, 5.0), np.log(np.full(4, 0.01)), np.array([0.3, -0.2, 0.1, -0.1]))
    assert doubtful.distance_uncertainty_um < 0.2
    assert doubtful.uncertainty_um == pytest.approx(5.0, rel=0.02)    # sqrt(4 d^2 p (1 - p)), p ~ 0.5


def test_patches_are_taken_where_the_tissue_is():
    image = np.full((256, 512, 3), 200, np.uint8)
    image[:, 256:] = [180, 90, 170]                         # stained right half
    selection = select_patches(image, 64, 4)
    assert selection.patches.shape == (4, 3, 64, 64) and selection.patches.dtype == np.float32
    assert selection.context.shape == (4, 3, 64, 64) and selection.context.dtype == np.float32
    assert np.all(selection.tissue_fractions == 1.0)
    assert np.allclose(selection.patches[:, 1].mean(axis=(1, 2)), 90 / 255)
    assert selection.image_tissue_fraction == pytest.approx(0.5) == tissue_fraction(image)


def test_context_is_the_field_around_each_patch_averaged_down():
    image = np.random.default_rng(0).integers(0, 256, (320, 448, 3), dtype=np.uint8)
    selection = select_patches(image, 64, 35)               # every patch of the 5 x 7 grid
    assert len(selection.patches) == 35
    for patch, context in zip(selection.patches, selection.context):
        pixels = np.rint(patch * 255).astype(np.uint8).transpose(1, 2, 0)
        (top, left), = [(t, l) for t, l in patch_grid(320, 448, 64)
                        if np.array_equal(image[t:t + 64, l:l + 64], pixels)]
        field_top, field_left = context_corner(top, left, 64, 128, 320, 448)
        field = image[field_top:field_top + 128, field_left:field_left + 128]
        field = torch.from_numpy(field.transpose(2, 0, 1) / 255.0)
        np.testing.assert_allclose(context, torch.nn.functional.avg_pool2d(field, 2).numpy(), atol=1e-6)


def test_context_field_is_centred_on_the_patch_and_moved_inside_the_image():
    assert context_corner(160, 200, 64, 128, 400, 600) == (128, 168)      # centred
    assert context_corner(0, 0, 64, 128, 400, 600) == (0, 0)              # corner: moved in
    assert context_corner(336, 536, 64, 128, 400, 600) == (272, 472)      # far corner: moved in
    with pytest.raises(ValueError, match="expected at least 128 px on each side"):
        select_patches(np.zeros((100, 400, 3), np.uint8), 64, 4)


def test_augmentation_keeps_labels_and_focus_ordering():
    microscope = VirtualMicroscope(seed=3)
    x, y = 43_200.0, 12_300.0
    focal = microscope.focal_z_um(x, y)
    roi = (416, 416, 192, 192)
    sharp = microscope.capture(x, y, focal, 20, roi=roi, noise_seed=1).image_rgb8
    blurred = microscope.capture(x, y, focal + 3, 20, roi=roi, noise_seed=1).image_rgb8
    optics = np.array([[0.75, 0.325, 0.7, 0.0]] * 2)
    dataset = InlineFocusDataset(np.stack([sharp, blurred]), optics, np.array([0.0, 3.0]), 96, augment=True, seed=4)
    seen_optics = set()
    to_image = lambda t: (t.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)  # noqa: E731
    for _ in range(40):
        (sharp_patch, sharp_context, sharp_optics, sharp_label) = dataset[0]
        (blurred_patch, blurred_context, _, blurred_label) = dataset[1]
        assert (sharp_label.item(), blurred_label.item()) == (0.0, 3.0)
        seen_optics.add(tuple(np.round(sharp_optics.numpy().astype(float), 3)))
        assert brenner(to_image(sharp_patch)) > brenner(to_image(blurred_patch))
        assert brenner(to_image(sharp_context)) > brenner(to_image(blurred_context))
    # Optics mostly given, sometimes "unknown", and sometimes all but the condenser.
    assert seen_optics == {(0.75, 0.325, 0.7, 0.0), (0.0, 0.0, 0.0, 0.0), (0.75, 0.325, 0.0, 0.0)}


def test_dataset_crops_the_patch_from_its_context_anywhere_in_training_and_centred_otherwise():
    fields = np.random.default_rng(1).integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    args = (fields, TWENTY_X.numpy(), np.array([1.0]), 64)
    patch, context, _, _ = InlineFocusDataset(*args, augment=False)[0]
    field = torch.from_numpy(fields[0].transpose(2, 0, 1) / np.float32(255))
    assert torch.equal(patch, field[:, 32:96, 32:96])
    assert torch.equal(context, torch.nn.functional.avg_pool2d(field, 2))       # as `select_patches` gives it
    training = InlineFocusDataset(*args, augment=True, seed=0)
    offsets = set()
    for _ in range(120):
        patch, context, _, _ = training[0]
        assert context.shape == patch.shape == (3, 64, 64)
        # A patch at an even offset in the field is, averaged down, a window of the context.
        pooled_patch = torch.nn.functional.avg_pool2d(patch, 2).numpy()
        windows = np.lib.stride_tricks.sliding_window_view(context.numpy(), (3, 32, 32))[0]
        found = np.argwhere(np.all(np.isclose(windows, pooled_patch, atol=1e-6), axis=(-3, -2, -1)))
        offsets.update(tuple(offset) for offset in found)
    assert len(offsets) > 10
    with pytest.raises(ValueError, match="a 96 px model expects 192 px fields"):
        InlineFocusDataset(fields, TWENTY_X.numpy(), np.array([1.0]), 96, augment=False)


def test_training_exports_checkpoint_onnx_and_torchscript(tiny_model):
    for name in ("model.pt", "model.onnx", "model.torchscript.pt", "metadata.json"):
        assert (tiny_model / name).stat().st_size > 0
    scripted = torch.jit.load(str(tiny_model / "model.torchscript.pt"))
    assert scripted(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), TWENTY_X.repeat(2, 1)).shape == (2, len(MODEL_OUTPUTS))


def test_available_backends_agree(tiny_model):
    """Also on more patches than ONNX Runtime takes in one run (it runs them in slices)."""
    rng = np.random.default_rng(0)
    count = 2 * CPU_PATCHES_PER_RUN + 5
    patches = rng.random((count, 3, 64, 64), dtype=np.float32)
    context = rng.random((count, 3, 64, 64), dtype=np.float32)
    optics = np.resize(np.array([[0.75, 0.325, 0.7, 0.0], [0.3, 0.65, 0.0, 0.0], [0.95, 0.1625, 0.8, 0.5],
                                 [0.0, 0.0, 0.0, 0.0]], np.float32), (count, len(OPTICS_FEATURES)))
    torch_backend, _ = load_backend("torch-cpu", tiny_model)
    onnx_backend, _ = load_backend("onnxruntime", tiny_model)
    np.testing.assert_allclose(onnx_backend.predict(patches, context, optics),
                               torch_backend.predict(patches, context, optics), rtol=1e-3, atol=1e-3)


def test_auto_falls_back_and_says_why(tiny_model):
    backend, skipped = load_backend("auto", tiny_model)
    if not torch.cuda.is_available():
        assert backend.name == "onnxruntime"
        assert any("tensorrt" in reason for reason in skipped) and any("torch-cuda" in r for r in skipped)


def test_missing_model_and_unknown_backend_are_clear_errors(tmp_path, tiny_model):
    with pytest.raises(BackendUnavailableError, match="no focus model in"):
        load_backend("onnxruntime", tmp_path)
    with pytest.raises(ValueError, match="unknown autofocus backend 'cuda'"):
        load_backend("cuda", tiny_model)


class MeanOfEveryInput(torch.nn.Module):
    def forward(self, patches, context, optics):
        return torch.stack([patches.mean(dim=(1, 2, 3)), context.mean(dim=(1, 2, 3)) + optics.sum(dim=1)], dim=1)


def _export_with_inputs(tiny_model, model_dir, example):
    shutil.copytree(tiny_model, model_dir)
    torch.onnx.export(MeanOfEveryInput(), example, model_dir / "model.onnx", input_names=list(MODEL_INPUTS),
                      dynamic_axes={name: {0: "batch"} for name in MODEL_INPUTS},
                      opset_version=17, dynamo=False)
    return model_dir


def test_an_onnx_export_with_other_inputs_is_refused_and_auto_falls_back(tiny_model, tmp_path):
    full_field = (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 128, 128), TWENTY_X)    # the context before averaging
    model_dir = _export_with_inputs(tiny_model, tmp_path / "model", full_field)
    with pytest.raises(BackendUnavailableError, match=r"'context': \[3, 128, 128\].*re-export it from its model.pt"):
        load_backend("onnxruntime", model_dir)
    backend, skipped = load_backend("auto", model_dir)
    assert backend.name == "torch-cpu" and any("re-export" in reason for reason in skipped)


def test_a_model_not_told_the_condenser_is_refused_with_what_to_do(tiny_model, tmp_path):
    """Version 5 models took (NA, pixel size) only; a scanner's calibration made from one says to calibrate
    again instead of failing on a matrix shape."""
    na_and_pixel = (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64), TWENTY_X[:, :2])
    model_dir = _export_with_inputs(tiny_model, tmp_path / "model", na_and_pixel)
    with pytest.raises(BackendUnavailableError, match="takes 2 optics columns, expected 4.*calibrate again"):
        load_backend("onnxruntime", model_dir)
    checkpoint = torch.load(model_dir / "model.pt", weights_only=False)
    checkpoint["metadata"]["version"] = "5"
    torch.save(checkpoint, model_dir / "model.pt")
    with pytest.raises(BackendUnavailableError, match="is focus model version 5.*calibrate again"):
        load_backend("torch-cpu", model_dir)


def test_estimator_refuses_images_it_cannot_evaluate(tiny_model):
    backend, _ = load_backend("onnxruntime", tiny_model)
    estimator = FocusEstimator(backend, tiny_model)
    with pytest.raises(FocusInputError, match=r"shape \(64, 64\).*expected an \(H, W, 3\) uint8"):
        estimator.estimate(np.zeros((64, 64), np.uint8))
    with pytest.raises(FocusInputError, match=r"200x100 px is smaller than the model's 128 px field \(a 64 px patch"):
        estimator.estimate(np.zeros((100, 200, 3), np.uint8))
    results = estimator.estimate_many([np.full((128, 128, 3), 200, np.uint8)] * 3, [(0.75, 0.325)] * 3)
    assert len(results) == 3 and all(r.patches_used == 4 for r in results)
    with pytest.raises(FocusInputError, match="3 images but 1"):
        estimator.estimate_many([np.full((128, 128, 3), 200, np.uint8)] * 3, [(0.75, 0.325)])
    for numerical_aperture, pixel_size_um in ((float("nan"), 0.325), (-0.1, 0.325), (1e30, 0.325), (0.75, float("inf")),
                                              (0.75, -1.0), (0.75, 1e3)):
        with pytest.raises(FocusInputError, match="expected 0 \\(unknown\\) or up to"):
            estimator.estimate(np.full((128, 128, 3), 200, np.uint8), numerical_aperture, pixel_size_um)
    assert estimator.estimate(np.full((128, 128, 3), 200, np.uint8), 0.0, 0.0).patches_used == 4     # unknown optics


class _ConstantPrediction(torch.nn.Module):
    """Predicts distance 0 with sigma 1 µm, and "above focus" with log-odds 4, whatever the patch."""
    def forward(self, patches, context, optics):
        return torch.tensor([[0.0, 0.0, 4.0]]).repeat(len(patches), 1)


def test_uncertainty_scale_is_the_ratio_of_held_out_errors_to_predicted_sigma():
    targets = torch.tensor([2.0, -2.0, 2.0, -2.0])            # every distance error is 2 sigma
    loader = DataLoader(TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 16, 16), torch.zeros(4, 2), targets),
                        batch_size=3)
    calibration = uncertainty_calibration(_ConstantPrediction(), loader)
    assert calibration["uncertainty_scale"] == pytest.approx(2.0)
    # Half the sides are wrong: the sure logit of 4 must be cooled until it says "no idea".
    assert calibration["side_temperature"] > 10


def test_side_temperature_sharpens_a_timid_logit_that_is_always_right():
    target = torch.tensor([3.0, -3.0, 5.0, -5.0] * 8)
    output = torch.stack([target.abs(), torch.zeros(32), 0.3 * torch.sign(target)], dim=1)
    assert fit_uncertainty_calibration(output, target)["side_temperature"] < 0.5


def test_estimator_applies_the_calibrated_uncertainty_scale(tiny_model, tmp_path):
    metadata = json.loads((tiny_model / "metadata.json").read_text())
    assert np.isfinite(metadata["uncertainty_scale"]) and metadata["uncertainty_scale"] > 0
    rescaled = tmp_path / "rescaled"
    shutil.copytree(tiny_model, rescaled)
    (rescaled / "metadata.json").write_text(json.dumps(metadata | {"uncertainty_scale": 3 * metadata["uncertainty_scale"]}))
    microscope = VirtualMicroscope(seed=200)
    image = microscope.capture(43_000.0, 12_500.0, microscope.focal_z_um(43_000.0, 12_500.0) + 2.0, 20,
                               roi=(384, 384, 128, 128)).image_rgb8
    backend, _ = load_backend("onnxruntime", tiny_model)
    base = FocusEstimator(backend, tiny_model).estimate(image, 0.75, 0.325)
    wider = FocusEstimator(backend, rescaled).estimate(image, 0.75, 0.325)
    assert wider.defocus_um == pytest.approx(base.defocus_um)
    assert wider.distance_uncertainty_um > 1.5 * base.distance_uncertainty_um


def test_loss_keeps_uncertain_samples_in_the_fit():
    def mean_gradients(beta):
        # Two samples, each one predicted sigma off: an easy one (sigma 0.5 µm), a hard one (sigma 5 µm).
        output = torch.tensor([[0.0, math.log(0.25), 0.0], [0.0, math.log(25.0), 0.0]], requires_grad=True)
        focus_loss(output, torch.tensor([0.5, 5.0]), beta).backward()
        return output.grad[:, 0].abs()

    easy, hard = mean_gradients(0.0)
    assert hard < 0.5 * easy                     # plain NLL: the hard sample barely moves the mean
    easy, hard = mean_gradients(0.5)
    assert hard == pytest.approx(easy)           # β-NLL: both pull as hard


def test_the_side_of_focus_weighs_with_the_distance_it_would_cost():
    output = torch.zeros(3, 3, requires_grad=True)          # undecided about the side of every sample
    focus_loss(output, torch.tensor([0.2, -3.0, 15.0]), 0.5).backward()
    pull = output.grad[:, 2].abs()
    assert pull[0] < pull[1] < pull[2] and pull[2] == pytest.approx(pull[1] * 10 / 3)    # capped at 10 µm


def test_learning_rate_anneals_linearly_over_the_last_part_of_the_run():
    assert anneal_factor(0.0, 0.35) == anneal_factor(0.65, 0.35) == 1.0
    assert anneal_factor(0.825, 0.35) == pytest.approx(0.5)
    assert anneal_factor(1.0, 0.35) == anneal_factor(1.5, 0.35) == 0.02      # floor, never 0
    assert anneal_factor(0.99, 0.0) == 1.0


@pytest.fixture(scope="module")
def tiny_sets():
    return (render_specimen((DatasetSpec((1,), 32, patch_px=64, seed=1), 1)),
            render_specimen((DatasetSpec((101,), 16, patch_px=64, seed=2), 101)))


def test_rendered_samples_record_the_condenser_they_were_imaged_under():
    """The model is told the condenser (`OPTICS_FEATURES`), so every sample records its own: the virtual
    microscope's, or the one drawn for its randomised microscope (a ring source with its inner edge)."""
    spec = DatasetSpec((3,), 24, patch_px=64, seed=4, randomised_fraction=0.5, samples_per_microscope=4)
    samples = render_specimen((spec, 3))
    own, randomised = samples["source"] == 0, samples["source"] == 1
    assert own.any() and randomised.any()
    assert np.all(samples["condenser_fill"][own] == np.float32(DEFAULT_CONDENSER_FILL))
    assert np.all(samples["condenser_inner_fill"][own] == 0.0)
    drawn = samples["condenser_fill"][randomised]
    assert np.all((drawn >= 0.3) & (drawn <= 1.0)) and len(np.unique(drawn)) > 1
    assert np.all(samples["condenser_inner_fill"][randomised] < drawn)
    assert optics_columns(samples).shape == (24, len(OPTICS_FEATURES))


def test_training_ends_on_a_low_learning_rate(tiny_sets, tmp_path):
    config = TrainingConfig(epochs=4, batch_size=16, patch_px=64, anneal_fraction=0.5, early_stopping_patience=10)
    history = train(*tiny_sets, config, tmp_path, log=lambda line: None)["history"]
    rates = [epoch["lr"] for epoch in history]
    assert len(rates) == 4 and rates[0] == config.learning_rate
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:]))
    assert rates[-1] < 0.3 * config.learning_rate


def test_the_model_kept_is_the_moving_average_of_the_trained_weights(tiny_sets, tmp_path):
    """The average starts at the weights after the first step, which moves none by more than the learning rate
    (Adam): a decay of nearly 1 keeps it there however far training goes on; a decay of 0 keeps the trained weights."""
    def largest_change_of_a_weight(decay: float) -> float:
        config = TrainingConfig(epochs=4, batch_size=16, patch_px=64, anneal_fraction=0.0, weight_average_decay=decay)
        seed_everything(config.seed)
        initial = dict(build_model(config.architecture, config.patch_px).named_parameters())
        train(*tiny_sets, config, tmp_path / str(decay), log=lambda line: None)
        kept = dict(load_checkpoint(tmp_path / str(decay) / "model.pt").named_parameters())
        return max(float((kept[name] - initial[name]).abs().max()) / config.learning_rate for name in initial)

    assert largest_change_of_a_weight(1.0 - 1e-9) < 1.01
    assert largest_change_of_a_weight(0.0) > 3.0


def test_training_starts_no_epoch_that_would_overrun_the_time_budget(tiny_sets, tmp_path):
    config = TrainingConfig(epochs=50, batch_size=16, patch_px=64, time_budget_s=1e-3)
    result = train(*tiny_sets, config, tmp_path, log=lambda line: None)
    assert len(result["history"]) == 1                # one epoch always runs: there is a model to export
    assert (tmp_path / "model.onnx").stat().st_size > 0


def test_model_card_says_whether_the_20x_target_is_met():
    def summary(mae_10, mae_20, sign):
        return {"20x_within_10um": {"mae_um": mae_10, "sign_accuracy_beyond_1um": sign},
                "20x_within_20um": {"mae_um": mae_20}}

    assert target_statement(summary(0.21, 0.55, 0.99)).startswith("- The project's 20× target is met")
    missed = target_statement(summary(0.31, 0.55, 0.97))
    assert "not met" in missed and "MAE 0.310 µm within ±10 µm" in missed and "sign 97.0%" in missed
    assert "±20 µm" not in missed


def test_the_calibration_target_is_judged_against_best_focus_and_shows_the_tiles_sweep_focus_beside():
    """A calibration that reads every tile's own sweep focus to 0.2 µm still misses the target where that focus
    lies off the evaluation's best focus: the card says both, and judges by the evaluation's."""
    rows = {"scope-a": {"after": {"mae_um": 0.25}, "after_mae_tile_sweep_focus_um": 0.21},
            "scope-b": {"after": {"mae_um": 0.45}, "after_mae_tile_sweep_focus_um": 0.22}}
    text, met = calibration_target_check("the slide itself", rows, "wsi-autofocus eval")
    assert not met and "scope-a 0.25, scope-b 0.45" in text and "own sweep focus 0.21, 0.22" in text
    rows["scope-b"]["after"]["mae_um"] = 0.3
    assert calibration_target_check("the slide itself", rows, "wsi-autofocus eval")[1]


def test_the_calibration_target_over_draws_of_sweeps_is_judged_by_their_mean_not_by_a_lucky_draw():
    """One draw of nine sweeps under the target says little when the next reads well over it: the card judges the
    mean over the draws and says how many single draws were within it."""
    over = {"seeds": [23, 24, 25], "sweeps": 9, "microscopes": {
        "scope-a": {"mae_after_um": [0.28, 0.36, 0.38], "mean_mae_after_um": 0.34, "sd_mae_after_um": 0.053},
        "scope-b": {"mae_after_um": [0.20, 0.22, 0.24], "mean_mae_after_um": 0.22, "sd_mae_after_um": 0.02}}}
    text, met = calibration_draws_target_check("other specimens", over)
    assert not met
    assert "on other specimens mean MAE over 3 draws of 9 sweeps scope-a 0.34 ± 0.05, scope-b 0.22 ± 0.02 µm" in text
    assert "single draws within it 1/3, 3/3" in text
    over["microscopes"]["scope-a"] |= {"mae_after_um": [0.36, 0.27, 0.27], "mean_mae_after_um": 0.30}
    assert calibration_draws_target_check("other specimens", over)[1]


def test_model_card_reports_another_run_of_the_recipe(tmp_path):
    shipped = default_model_dir()
    model_dir, other_run = tmp_path / "model", tmp_path / "other_run"
    model_dir.mkdir()
    for name in ("metadata.json", "evaluation.json"):
        shutil.copy(shipped / name, model_dir / name)
    other_run.mkdir()
    (other_run / "metadata.json").write_text(json.dumps(
        {"history": [{"epoch": 0, "elapsed_s": 600.0}, {"epoch": 1, "elapsed_s": 1200.0}], "best_val_loss": 9.1}))
    held_out = {"split": "test",
                "20x_within_10um": {"mae_um": 0.26, "mae_ci95_um": [0.18, 0.35], "sign_accuracy_beyond_1um": 0.99},
                "20x_within_20um": {"mae_um": 0.58}}
    (other_run / "evaluation.json").write_text(json.dumps(held_out))
    assert "Run to run" not in render(model_dir)
    record_reproduction(model_dir, other_run)
    card = render(model_dir)
    assert "Another run of `make train-autofocus` (2 epochs in 20 min, best validation loss 9.100" in card
    assert "20× MAE 0.260 µm within ±10 µm (95 % interval 0.18–0.35), 0.580 µm within ±20 µm" in card
    assert "it misses the 20× target: MAE 0.260 µm within ±10 µm (target ≤ 0.25)" in card
    held_out["20x_within_10um"]["mae_um"] = 0.24
    (other_run / "evaluation.json").write_text(json.dumps(held_out))
    record_reproduction(model_dir, other_run)
    assert "it meets the 20× target too" in render(model_dir)
    (other_run / "evaluation.json").write_text(json.dumps(held_out | {"split": "val"}))
    with pytest.raises(ValueError, match="evaluates the 'val' specimens"):
        record_reproduction(model_dir, other_run)


def test_error_statistics_report_the_median_beside_an_outlier_driven_mae():
    rows = [{"true_um": true, "predicted_um": predicted, "uncertainty_um": sigma}
            for true, predicted, sigma in [(2.0, 2.1, 0.2), (-3.0, -3.1, 0.2), (0.5, 0.3, 0.1), (6.0, 1.0, 2.0)]]
    statistics = error_statistics(rows)
    assert statistics["mae_um"] == pytest.approx((0.1 + 0.1 + 0.2 + 5.0) / 4)
    assert statistics["median_abs_error_um"] == pytest.approx(0.15)
    assert statistics["rmse_um"] == pytest.approx(np.sqrt((0.01 + 0.01 + 0.04 + 25.0) / 4))
    assert statistics["sign_accuracy_beyond_1um"] == 1.0          # the 0.5 µm tile is not signed
    assert statistics["within_1_sigma"] == 0.5 and statistics["within_2_sigma"] == 0.75
    low, high = statistics["mae_ci95_um"]
    assert 0.1 <= low < statistics["mae_um"] < high <= 5.0      # one 5 µm error in four tiles: a wide interval
    assert error_statistics([]) == {"n": 0}


def test_summary_reports_the_estimates_a_scan_would_act_on():
    def tile(true, predicted, sigma, sparse=False, tissue=0.5):
        return {"specimen": 200, "objective": 20.0, "sparse": sparse, "depth_of_field_um": 2.0, "true_um": true,
                "predicted_um": predicted, "predicted_optics_unknown_um": predicted,
                "predicted_condenser_unknown_um": predicted, "uncertainty_um": sigma,
                "tissue_fraction": tissue, "latency_ms": 1.0}
    tiles = [tile(2.0, 2.1, 0.3), tile(-3.0, -3.2, 0.5), tile(6.0, 1.0, 4.0), tile(15.0, 12.0, 0.8),
             tile(4.0, 0.0, 9.0, sparse=True, tissue=0.01)]
    sweep = {"start_defocus_um": 1.0, "images": 41} | {name: {"error_um": 0.1, "compute_ms": 1.0}
                                                         for name in SHARPNESS_METRICS}
    summary = summarize({"spec": EvaluationSpec().__dict__, "split": "test", "tiles": tiles, "sweeps": [sweep]},
                        "onnxruntime")
    near, far = summary["20x_within_10um_trusted_by_scan"], summary["20x_within_20um_trusted_by_scan"]
    assert near["fraction_of_tiles"] == pytest.approx(2 / 3) and near["mae_um"] == pytest.approx(0.15)
    assert far["fraction_of_tiles"] == pytest.approx(3 / 4) and far["mae_um"] == pytest.approx((0.1 + 0.2 + 3.0) / 3)
    assert summary["sparse_fields"]["trusted_by_scan"] == 0
    assert "20x within 10 µm: 67% of tiles, MAE 0.150 µm" in format_table(summary)


def test_evaluation_of_the_validation_split_never_touches_the_test_specimens(tiny_model):
    estimator = FocusEstimator(load_backend("onnxruntime", tiny_model)[0], tiny_model, patches_per_tile=2)
    spec = EvaluationSpec(tiles_per_specimen_and_objective=1, sparse_tiles_per_specimen=1,
                          sweep_tiles_per_specimen=1, sweep_range_um=1.0, tile_px=128)
    evaluation = run_evaluation(estimator, spec, split="val", log=lambda line: None)
    assert {tile["specimen"] for tile in evaluation["tiles"]} == set(SPLITS["val"].specimen_seeds)
    summary = summarize(evaluation, "onnxruntime")
    assert summary["split"] == "val" and summary["specimens"] == list(SPLITS["val"].specimen_seeds)
    assert summary["20x_within_20um"]["n"] == len(SPLITS["val"].specimen_seeds)


def test_the_shipped_model_card_is_rendered_from_its_evaluation():
    """MODEL_CARD.md is what `wsi-autofocus card` makes of the shipped evaluation.json, every table in it,
    the self-calibration on the slide itself included."""
    shipped = default_model_dir()
    card = (shipped / "MODEL_CARD.md").read_text()
    assert card == render(shipped), "MODEL_CARD.md is stale: run wsi-autofocus card --model <shipped model>"
    on_the_slide = json.loads((shipped / "evaluation.json").read_text())["calibration_on_the_slide"]
    assert on_the_slide and all(f"\n{cell} " in card for cell in on_the_slide)
    assert "self-calibration on the slide itself: not in this evaluation" not in card


def test_evaluation_fields_are_drawn_again_where_the_tissue_mask_shows_glass():
    """The overview's tissue mask (40 µm pixels) admits bare glass inside a section's outline: 4 of 16 fields of
    this specimen drawn on it show no tissue in focus. The evaluations' fields are drawn again until they do."""
    microscope = VirtualMicroscope(specimen=specimen_for_seed(102), seed=102)
    on_mask = tissue_points(microscope, np.random.default_rng(0), 16)
    assert sum(in_focus_tissue_fraction(microscope, x, y, 20.0, 128) < MIN_FIELD_TISSUE_FRACTION
               for x, y in on_mask) >= 2
    fields = fields_showing_tissue(microscope, np.random.default_rng(0), 16, 20.0, 128)
    assert fields.shape == (16, 2)
    assert min(in_focus_tissue_fraction(microscope, x, y, 20.0, 128) for x, y in fields) >= MIN_FIELD_TISSUE_FRACTION
    with pytest.raises(ValueError, match="show 101% tissue"):
        fields_showing_tissue(microscope, np.random.default_rng(0), 1, 20.0, 128, min_tissue_fraction=1.01,
                              max_draws_per_field=2)
