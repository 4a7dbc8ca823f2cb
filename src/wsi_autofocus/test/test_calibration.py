"""Self-calibration: z-stacks of the user's microscope in, a calibrated model every backend loads out."""
import json
import re

import numpy as np
import pytest
import torch

from wsi_acquisition.hardware import SimulatedMicroscope
from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.scan import FocusStrategy, ScanRequest, ScanRunner
from wsi_autofocus import heldout_imaging
from wsi_autofocus.calibration import (PATCHES_PER_IMAGE, _samples, calibrate, calibrate_both, no_sharper_than_base,
                                      uncertainty_scale_without_confident_errors)
from wsi_autofocus.calibration_store import (CalibratedEstimators, CalibrationError, CalibrationStore, ZStack,
                                             stacks_from_scan, stacks_with_focus)
from wsi_autofocus.data import specimen_for_seed, tissue_points
from wsi_autofocus.inference import FocusEstimator, aggregate, default_model_dir, load_backend, read_model_metadata
from wsi_autofocus.patches import select_patches
from wsi_autofocus.shift_evaluation import CalibrationSpec
from wsi_autofocus.training import export, load_checkpoint, save_checkpoint
from wsi_autofocus.two_shot import Condenser
from wsi_common.focus_metrics import brenner, focus_tolerance_um, tissue_fraction


def _virtual_stack(seed: int, z_offsets, roi_px: int = 256):
    microscope = VirtualMicroscope(specimen=specimen_for_seed(seed), seed=seed)
    (x, y), = tissue_points(microscope, np.random.default_rng(seed), 1)
    focal = float(microscope.focal_z_um(x, y))
    corner = (1024 - roi_px) // 2
    images = np.stack([microscope.capture(x, y, focal + d, 20.0, roi=(corner, corner, roi_px, roi_px)).image_rgb8
                       for d in z_offsets])
    return ZStack(images, focal + np.asarray(z_offsets, float), 0.325, 0.75), focal


def test_best_focus_of_a_stack_is_its_sharpness_peak():
    stack, focal = _virtual_stack(100, CalibrationSpec().z_offsets_um() + 0.4)
    # Specimen phase moves the sharpness peak a little off the focal plane: well within the depth of field.
    assert stack.focus_z_um() == pytest.approx(focal, abs=0.5)
    assert ZStack(stack.images, stack.z_um, 0.325, 0.75, best_focus_z_um=12.0).focus_z_um() == 12.0


def test_stacks_that_cannot_calibrate_are_refused_with_the_reason():
    stack, _ = _virtual_stack(101, np.arange(0.0, 8.0, 1.0))           # focus at the first image: an end
    with pytest.raises(CalibrationError, match="sharpest at its end"):
        stack.focus_z_um()
    with pytest.raises(CalibrationError, match="at least 2"):
        calibrate([stack], default_model_dir())
    with pytest.raises(CalibrationError, match=r"0 of 2 z-stacks show tissue at a focus inside.*sharpest at its end"):
        calibrate([stack, stack], default_model_dir())
    with pytest.raises(CalibrationError, match="expected at least 5 of each"):
        calibrate([ZStack(stack.images[:3], stack.z_um[:3], 0.325, 0.75)] * 2, default_model_dir())


def test_a_sweep_over_glass_whose_noise_peaks_inside_it_has_no_focus():
    """Camera noise alone, a little stronger in the middle image: a sharpness peak inside the sweep, 1.1x its
    median, which a scan's focus map would not call focus either."""
    rng = np.random.default_rng(0)
    noise = np.array([1.6 if index == 4 else 1.5 for index in range(9)])
    images = np.clip(np.round(200 + noise[:, None, None, None] * rng.standard_normal((9, 128, 128, 3))), 0, 255)
    glass = ZStack(images.astype(np.uint8), np.arange(-4.0, 4.5, 1.0), 0.325, 0.75)
    with pytest.raises(CalibrationError, match=r"peaks at only 1\.\d\dx its median sharpness.*no clear focus"):
        glass.focus_z_um()


def test_a_sweep_that_peaks_clearly_on_an_unstained_field_is_left_out_of_a_calibration():
    """The same field without its stain, seen by a colour camera (each channel its own noise): as sharp a peak as
    the stained one, as a field of glass with dust or debris on it, whose labels would teach the model nothing of
    defocus in tissue. A monochrome camera's images (equal channels) show no stain to judge by: kept."""
    stained, _ = _virtual_stack(100, np.arange(-4.0, 4.5, 1.0) + 0.3)
    grey = np.repeat(stained.images @ np.array([0.299, 0.587, 0.114]), 3)[..., None].reshape(stained.images.shape)
    noise = np.random.default_rng(0).normal(0.0, 1.0, grey.shape)
    unstained = ZStack(np.clip(np.round(grey + noise), 0, 255).astype(np.uint8), stained.z_um, 0.325, 0.75)
    monochrome = ZStack(np.round(grey).astype(np.uint8), stained.z_um, 0.325, 0.75)
    assert unstained.focus_z_um() == pytest.approx(stained.focus_z_um(), abs=0.2)

    usable, skipped = stacks_with_focus([stained, unstained, stained, monochrome], log=lambda message: None)

    assert len(usable) == 3 and usable[2].images is monochrome.images
    assert all(tissue_fraction(stack.images[np.argmin(np.abs(stack.z_um - stack.best_focus_z_um))]) > 0.5
               for stack in usable[:2])
    assert len(skipped) == 1 and re.match(r"stack 1: .*shows 0\.\d% stained tissue.*a field of glass", skipped[0])
    with pytest.raises(CalibrationError, match="1 of 2 z-stacks show tissue"):
        stacks_with_focus([stained, unstained], log=lambda message: None)


def test_a_calibration_reads_every_image_in_its_eight_flips_and_turns_under_the_declared_condenser():
    model = load_checkpoint(default_model_dir() / "model.pt").eval()
    patch_px = int(read_model_metadata(default_model_dir())["patch_px"])
    stack = ZStack(_virtual_stack(3, [-2.0, 0.0])[0].images, np.array([-2.0, 0.0]), 0.325, 0.75, best_focus_z_um=0.0)
    condenser = Condenser(0.6, 0.2)
    samples = _samples(model, [stack], patch_px, condenser)
    for number, (image, label) in enumerate(zip(stack.images, (-2.0, 0.0))):
        selection = select_patches(image, patch_px, PATCHES_PER_IMAGE)
        optics = torch.tensor([[0.75, 0.325, 0.6, 0.2]]).expand(len(selection.patches), -1)
        expected = []
        for turn in range(4):
            for flip in (False, True):
                views = [torch.rot90(torch.from_numpy(v), turn, dims=(2, 3))
                         for v in (selection.patches, selection.context)]
                with torch.inference_mode():
                    expected.append(torch.cat(model._views(*[v.flip(3) if flip else v for v in views], optics), 1))
        rows = samples["images"] == number
        torch.testing.assert_close(samples["features"][rows], torch.cat(expected), rtol=1e-4, atol=1e-4)
        assert np.all(samples["labels"][rows].numpy() == label) and np.all(samples["groups"][rows] == 0)


def _flip_side(model_dir, destination):
    """A deliberately mismatched model: the shipped one with its side of focus reversed."""
    model = load_checkpoint(model_dir / "model.pt")
    with torch.no_grad():
        model.head[-1].weight[2].neg_()
        model.head[-1].bias[2].neg_()
    destination.mkdir()
    metadata = json.loads((model_dir / "metadata.json").read_text())
    save_checkpoint(model, destination / "model.pt", metadata)
    export(model, destination, metadata["patch_px"])
    (destination / "metadata.json").write_text(json.dumps(metadata))
    return destination


@pytest.mark.slow
def test_calibration_repairs_a_mismatched_model_on_a_held_out_microscope(tmp_path):
    """Sweeps of validation specimens through a held-out microscope fix a model that reads every side
    wrong; other fields (test specimens) through the same microscope are then read right."""
    scope = heldout_imaging.HELD_OUT_SCOPES["abbe-astigmatic"]
    wrong = _flip_side(default_model_dir(), tmp_path / "wrong")
    rng = np.random.default_rng(4)
    offsets = CalibrationSpec().z_offsets_um()

    def stack(seed):
        microscope = VirtualMicroscope(specimen=specimen_for_seed(seed), seed=seed)
        (x, y), = tissue_points(microscope, rng, 1)
        start = rng.uniform(-1.0, 1.0)
        images = np.stack([heldout_imaging.capture(scope, microscope.specimen, x, y, start + d, 20.0, 256, rng).image_rgb8
                           for d in offsets])
        return ZStack(images, start + offsets, scope.pixel_size_um(20.0), 0.75)

    result = calibrate([stack(seed) for seed in (100, 101, 102, 103, 100, 101)], tmp_path / "calibrated", wrong)
    assert result.held_back_mae_after_um < 0.5 * result.held_back_mae_before_um
    base, calibrated = (read_model_metadata(directory) for directory in (wrong, result.model_dir))
    assert all(calibrated[name] >= base[name] for name in ("uncertainty_scale", "side_temperature"))
    microscope = VirtualMicroscope(specimen=specimen_for_seed(200), seed=200)
    tests = [(x, y, d) for (x, y), d in zip(tissue_points(microscope, rng, 12), rng.uniform(-8, 8, 12))]
    images = [heldout_imaging.capture(scope, microscope.specimen, x, y, d, 20.0, 256, rng).image_rgb8 for x, y, d in tests]
    truth = np.array([d for _, _, d in tests])

    def mae(model_dir):
        estimator = FocusEstimator(load_backend("onnxruntime", model_dir)[0], model_dir)
        results = estimator.estimate_many(images, [(0.75, scope.pixel_size_um(20.0))] * len(images))
        return np.mean(np.abs(np.array([r.defocus_um for r in results]) - truth))

    before, after = mae(wrong), mae(result.model_dir)
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_a_scan_keeps_its_sweeps_and_calibrates_from_them_for_every_backend(tmp_path):
    backend = SimulatedMicroscope.create(slide_seed=0, speedup=1000.0, camera=Camera(width_px=320, height_px=320))
    request = ScanRequest(scan_id="cal", output_dir=tmp_path, region_um=(43_000.0, 12_000.0, 300.0, 250.0),
                          focus_strategy=FocusStrategy.MAP, focus_points=4, skip_empty_tiles=False)
    outcome = ScanRunner(backend, request).run()
    stacks, optics, scan_id, tiles_follow = stacks_from_scan(outcome.scan_dir)
    assert len(stacks) == len(outcome.focus_sweeps) >= 2 and scan_id == "cal"
    assert optics == {"objective_magnification": 20.0, "numerical_aperture": 0.75, "pixel_size_um": 0.325}
    assert not tiles_follow                                  # the scan is complete: no tile is left to read
    manifest_path = outcome.scan_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for status, calibration_only, follow in (("running", False, True), ("running", True, False),
                                             ("failed", False, False)):
        manifest_path.write_text(json.dumps(manifest | {"status": status, "calibration_only": calibration_only}))
        assert stacks_from_scan(outcome.scan_dir).tiles_follow == follow, (status, calibration_only)
    store = CalibrationStore(tmp_path / "calibration", "bench-scope-1")
    directory = store.model_dir(20.0, 0.75, 0.325)
    # A sweep over glass or a fold has no focus peak inside it: left out with the reason, not fatal.
    order = np.argsort(stacks[0].z_um)
    below_peak = order[:int(np.argmax([brenner(stacks[0].images[i]) for i in order])) + 1]
    no_peak = ZStack(stacks[0].images[below_peak], stacks[0].z_um[below_peak], 0.325, 0.75)
    # The flipped model, not the shipped one: whether the shipped model still has something to learn from four
    # sweeps of the virtual microscope is not what this test is about; a calibration that helps is.
    wrong = _flip_side(default_model_dir(), tmp_path / "wrong")
    result = calibrate(stacks + [no_peak], directory, wrong, scanner={"name": "bench-scope-1"}, scan_id=scan_id)
    assert result.stacks == len(stacks) and len(result.skipped) == 1
    assert result.skipped[0].startswith(f"stack {len(stacks)}: ") and "sharpest at its end" in result.skipped[0]
    assert result.model_dir == directory and store.find(20.0, 0.75, 0.325) == directory
    assert store.find(40.0, 0.95, 0.1625) is None
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["calibration"]["stacks"] == len(stacks) and metadata["calibration"]["scanner"]["name"] == "bench-scope-1"
    image = stacks[0].images[len(stacks[0].images) // 2]
    answers = [FocusEstimator(load_backend(name, directory)[0], directory).estimate(image, 0.75, 0.325)
               for name in ("onnxruntime", "torch-cpu")]
    assert answers[0].defocus_um == pytest.approx(answers[1].defocus_um, abs=0.05)
    estimators = CalibratedEstimators(store, "onnxruntime")
    assert estimators.for_optics(20.0, 0.75, 0.325, "cal").model_id.endswith("+calibrated")
    # A single-shot calibration serves the scan whose sweeps it was fitted on, not the next slide's.
    assert estimators.for_optics(20.0, 0.75, 0.325, "next-slide") is estimators.base
    assert estimators.for_optics(20.0, 0.75, 0.325) is estimators.base
    assert estimators.for_optics(40.0, 0.95, 0.1625, "cal") is estimators.base
    assert estimators.for_optics(0.0, 0.0, 0.0, "cal") is estimators.base       # optics unknown: base model


def _stacks_the_single_shot_fit_makes_worse(monkeypatch) -> list[ZStack]:
    import wsi_autofocus.calibration as calibration

    def scrambled_fit(model, features, labels, steps, seed):
        head = calibration.copy.deepcopy(model.head)
        with torch.no_grad():
            head[-1].weight[0].mul_(-3.0)                     # distance read backwards: worse on every stack
        return head.eval()

    monkeypatch.setattr(calibration, "_fit_head", scrambled_fit)
    return [_virtual_stack(seed, np.arange(-6.0, 6.1, 1.5))[0] for seed in (100, 101, 102)]


def test_a_calibration_that_does_not_help_the_held_back_stacks_is_refused(tmp_path, monkeypatch):
    stacks = _stacks_the_single_shot_fit_makes_worse(monkeypatch)
    with pytest.raises(CalibrationError, match="no better.*the model in use is kept"):
        calibrate(stacks, tmp_path / "calibrated")
    assert not (tmp_path / "calibrated").exists()


def test_one_model_refused_leaves_the_other_calibrated(tmp_path, monkeypatch, mismatched_two_shot_model):
    """As CalibrateAutofocus does it: the single-shot fit is refused, the two-shot one is kept beside it. The
    specimen plane is found once for both, and a sweep left out is recorded with the model that was kept."""
    stacks = _stacks_the_single_shot_fit_makes_worse(monkeypatch)
    below_focus = ZStack(stacks[0].images[:5], stacks[0].z_um[:5], 0.325, 0.75)         # -6 to 0 µm
    lines = []
    result = calibrate_both(stacks + [below_focus], tmp_path / "scanner", base_two_shot=mismatched_two_shot_model,
                            log=lines.append)
    assert sum("labelled from the plane" in line for line in lines) == 1
    assert result.single_shot is None and len(result.errors) == 1
    assert result.errors[0].startswith("single-shot model: ") and "no better" in result.errors[0]
    assert result.two_shot.path == tmp_path / "scanner" / "two_shot.npz" and result.two_shot.path.exists()
    assert len(result.two_shot.skipped) == 1 and result.two_shot.skipped[0].startswith("stack 3: ")
    assert not (tmp_path / "scanner" / "metadata.json").exists()


def test_no_single_shot_model_is_fitted_when_no_tiles_of_the_scan_follow(tmp_path, mismatched_two_shot_model):
    """A calibration-only goal or a finished scan: a single-shot calibration would serve no scan's tiles."""
    stacks = [_virtual_stack(seed, np.arange(-6.0, 6.1, 1.5))[0] for seed in (100, 101, 102)]
    result = calibrate_both(stacks, tmp_path / "scanner", base_two_shot=mismatched_two_shot_model, scan_id="robot-7",
                            tiles_follow=False)
    assert result.single_shot is None and result.errors == () and result.not_fitted == (
        "single-shot model not fitted: no tiles of scan 'robot-7' follow its sweeps, and a single-shot calibration "
        "serves only the tiles of the scan it was fitted on")
    assert result.two_shot.path == tmp_path / "scanner" / "two_shot.npz" and result.two_shot.path.exists()
    assert not (tmp_path / "scanner" / "metadata.json").exists()


def test_store_names_refuse_paths():
    with pytest.raises(CalibrationError, match="scanner name"):
        CalibrationStore("/tmp/x", "../elsewhere")


def test_a_store_under_a_relative_root_names_its_models_by_where_they_are(tmp_path, monkeypatch):
    """The node's default root is relative; a scan's result and manifest name the models for a reader
    elsewhere (another working directory, another process)."""
    monkeypatch.chdir(tmp_path)
    assert CalibrationStore("out/calibration", "s1").model_dir(20.0, 0.75, 0.325) == (
        tmp_path / "out" / "calibration" / "s1" / "20x_na0.75_px0.325")


def test_the_calibrated_uncertainty_leaves_no_held_back_image_confidently_wrong():
    """The fitted scale makes held-back errors one sigma on average; an image read 3 µm on the wrong side with
    a sigma of 0.3 µm would still be acted on, so the scale rises until its sigma reaches the tolerance, and
    images read right do not raise it."""
    patches = 8
    right = np.column_stack([np.full(patches, 2.0), np.full(patches, np.log(0.3 ** 2)), np.full(patches, 6.0)])
    wrong = np.column_stack([np.full(patches, 3.0), np.full(patches, np.log(0.3 ** 2)), np.full(patches, 6.0)])
    output, labels = np.vstack([right, wrong]), np.repeat([2.0, -3.0], patches)
    images, apertures = np.repeat([0, 1], patches), np.array([0.75, 0.75])
    fitted = {"uncertainty_scale": 1.2, "side_temperature": 1.0}
    assert uncertainty_scale_without_confident_errors(output[:patches], labels[:patches], images[:patches],
                                                      apertures, fitted) == 1.2
    scale = uncertainty_scale_without_confident_errors(output, labels, images, apertures, fitted)
    raised = aggregate(wrong[:, 0], wrong[:, 1] + 2 * np.log(scale), wrong[:, 2])
    tolerance = focus_tolerance_um(0.55 / 0.75 ** 2)
    assert raised.uncertainty_um >= tolerance and scale < 1.05 * tolerance / 0.3


def test_a_calibration_makes_neither_the_distance_nor_the_side_more_certain_than_the_base_model():
    """Temperatures fitted on a few held-back sweeps may come out sharper than training's (a side temperature of
    0.70 against 1.25 on the astigmatic microscope): they are raised to the base model's, never lowered."""
    base = {"uncertainty_scale": 1.28, "side_temperature": 1.25, "patch_px": 96}
    assert no_sharper_than_base({"uncertainty_scale": 3.41, "side_temperature": 0.70}, base) == {
        "uncertainty_scale": 3.41, "side_temperature": 1.25}
    assert no_sharper_than_base({"uncertainty_scale": 1.0, "side_temperature": 1.39}, base) == {
        "uncertainty_scale": 1.28, "side_temperature": 1.39}
