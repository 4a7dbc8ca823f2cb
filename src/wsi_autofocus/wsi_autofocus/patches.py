"""Choosing the patches of a tile that the focus model looks at."""
import numpy as np

from wsi_acquisition.focus import tissue_mask


def patch_grid(height_px: int, width_px: int, patch_px: int) -> list[tuple[int, int]]:
    """Top-left corners of non-overlapping patches covering the image, centred."""
    rows, cols = height_px // patch_px, width_px // patch_px
    top0 = (height_px - rows * patch_px) // 2
    left0 = (width_px - cols * patch_px) // 2
    return [(top0 + r * patch_px, left0 + c * patch_px) for r in range(rows) for c in range(cols)]


def patch_tissue_fractions(image: np.ndarray, corners, patch_px: int, step: int = 4) -> np.ndarray:
    """Stained fraction of every patch, from a mask sampled on every `step`-th pixel."""
    stained = tissue_mask(image, step=step)
    size = max(patch_px // step, 1)
    return np.array([stained[t // step:t // step + size, l // step:l // step + size].mean() for t, l in corners])


def select_patches(image: np.ndarray, patch_px: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` patches with the most tissue, as float32 (N, 3, P, P) in [0, 1], and their fractions.

    With little tissue the emptiest patches are still used: the model's uncertainty then says so.
    """
    corners = patch_grid(image.shape[0], image.shape[1], patch_px)
    fractions = patch_tissue_fractions(image, corners, patch_px)
    chosen = np.argsort(-fractions, kind="stable")[:count]
    patches = np.stack([image[t:t + patch_px, l:l + patch_px] for t, l in (corners[i] for i in chosen)])
    return (patches.transpose(0, 3, 1, 2).astype(np.float32) / 255.0), fractions[chosen]
