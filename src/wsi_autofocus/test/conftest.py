import pytest

from wsi_autofocus.data import DatasetSpec, render_specimen
from wsi_autofocus.training import TrainingConfig, train
from wsi_autofocus.two_shot import TwoShotModel, default_model_path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A model trained for one epoch on a tiny rendered set: enough to test export, backends and the node."""
    directory = tmp_path_factory.mktemp("model")
    train_data = render_specimen((DatasetSpec((1,), 48, patch_px=64, seed=1), 1))
    val_data = render_specimen((DatasetSpec((101,), 16, patch_px=64, seed=2), 101))
    train(train_data, val_data, TrainingConfig(epochs=1, batch_size=16, patch_px=64, patches_per_tile=4),
          directory, log=lambda line: None)
    return directory


@pytest.fixture(scope="session")
def mismatched_two_shot_model(tmp_path_factory):
    """The shipped two-shot model reading every defocus 40 % short and a depth of focus high: as if a
    microscope's optics mapped onto defocus otherwise than the training simulators' (a model to calibrate)."""
    model = TwoShotModel.load(default_model_path())
    for member in model.members:
        model.arrays[f"m{member}_w_out"][:, 0] *= 0.6
        model.arrays[f"m{member}_b_out"][0] = model.arrays[f"m{member}_b_out"][0] * 0.6 + 1.0
    return model.save(tmp_path_factory.mktemp("two-shot") / "mismatched.npz")
