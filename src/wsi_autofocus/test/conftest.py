import pytest

from wsi_autofocus.data import DatasetSpec, render_specimen
from wsi_autofocus.training import TrainingConfig, train


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A model trained for one epoch on a tiny rendered set: enough to test export, backends and the node."""
    directory = tmp_path_factory.mktemp("model")
    train_data = render_specimen((DatasetSpec((1,), 48, patch_px=64, seed=1), 1))
    val_data = render_specimen((DatasetSpec((101,), 16, patch_px=64, seed=2), 101))
    train(train_data, val_data, TrainingConfig(epochs=1, batch_size=16, patch_px=64, patches_per_tile=4),
          directory, log=lambda line: None)
    return directory
