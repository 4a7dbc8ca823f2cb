"""Shared fixtures: one small textured mosaic (2000 x 3000 px) in the shared Zarr contract."""
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_export.synthetic import write_synthetic_mosaic

MOSAIC_HEIGHT_PX = 2000
MOSAIC_WIDTH_PX = 3000
MOSAIC_PIXEL_SIZE_UM = 0.25


@pytest.fixture(scope="session")
def mosaic_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mosaic") / "slide-0001.zarr"
    write_synthetic_mosaic(path, MOSAIC_HEIGHT_PX, MOSAIC_WIDTH_PX, pixel_size_um=MOSAIC_PIXEL_SIZE_UM, seed=3)
    return path


@pytest.fixture(scope="session")
def mosaic_pixels(mosaic_path) -> np.ndarray:
    return zarr.open_group(str(mosaic_path), mode="r")["image"][:]


def _reference_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Independent float reference: mean of each 2x2 group (edges replicated), rounded half up."""
    pyramid = [image]
    for _ in range(levels - 1):
        previous = pyramid[-1].astype(np.float64)
        h, w = previous.shape[:2]
        padded = np.pad(previous, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        mean = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 3).mean(axis=(1, 3))
        pyramid.append(np.floor(mean + 0.5).astype(np.uint8))
    return pyramid


def _psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="session")
def reference_pyramid():
    return _reference_pyramid


@pytest.fixture(scope="session")
def psnr_db():
    return _psnr_db
