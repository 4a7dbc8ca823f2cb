"""Choosing the patches of a tile that the focus model looks at, and the field around each."""
from dataclasses import dataclass

import numpy as np

from wsi_autofocus.model_io import CONTEXT_FACTOR, context_px
from wsi_common.focus_metrics import TISSUE_SAMPLE_STEP, tissue_mask


@dataclass(frozen=True)
class PatchSelection:
    patches: np.ndarray             # (N, 3, P, P) float32 RGB in [0, 1]
    context: np.ndarray             # (N, 3, P, P) float32: the field of context_px(P) around each patch, averaged down
    tissue_fractions: np.ndarray    # (N,) stained fraction of each patch
    image_tissue_fraction: float    # stained fraction of the whole image (`wsi_common.focus_metrics.tissue_fraction`)


def patch_grid(height_px: int, width_px: int, patch_px: int) -> list[tuple[int, int]]:
    """Top-left corners of non-overlapping patches covering the image, centred."""
    rows, cols = height_px // patch_px, width_px // patch_px
    top0 = (height_px - rows * patch_px) // 2
    left0 = (width_px - cols * patch_px) // 2
    return [(top0 + r * patch_px, left0 + c * patch_px) for r in range(rows) for c in range(cols)]


def context_corner(top: int, left: int, patch_px: int, field_px: int, height_px: int, width_px: int) -> tuple[int, int]:
    """Top-left corner of the `field_px` square around a patch: centred on it, moved inside the image."""
    offset = (field_px - patch_px) // 2
    return (min(max(top - offset, 0), height_px - field_px), min(max(left - offset, 0), width_px - field_px))


def patch_tissue_fractions(stained: np.ndarray, corners, patch_px: int, step: int = TISSUE_SAMPLE_STEP) -> np.ndarray:
    """Stained fraction of every patch, from a tissue mask sampled on every `step`-th pixel."""
    size = max(patch_px // step, 1)
    return np.array([stained[t // step:t // step + size, l // step:l // step + size].mean() for t, l in corners])


def _as_model_input(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]. One ufunc pass: a cast and then a
    division allocate two full-size temporaries and took ten times as long (measured)."""
    return np.multiply(pixels.transpose(0, 3, 1, 2), np.float32(1 / 255), dtype=np.float32)


def downsampled_fields(image: np.ndarray, corners, field_px: int, factor: int = CONTEXT_FACTOR) -> np.ndarray:
    """(N, 3, F, F) float32 in [0, 1], F = field_px / factor: each `field_px` square of the image at
    `corners` averaged over factor x factor blocks.

    Summed in uint16 before any float is made: the model's context input at full resolution was
    four times as many floats to make and to pass, the largest share of preparing a small image."""
    size = field_px // factor
    fields = np.empty((len(corners), 3, size, size), np.float32)
    for field, (top, left) in zip(fields, corners):
        blocks = image[top:top + field_px, left:left + field_px].transpose(2, 0, 1).astype(np.uint16)
        blocks = blocks.reshape(3, size, factor, size, factor)
        rows = sum(blocks[:, :, i] for i in range(factor))
        np.multiply(sum(rows[..., j] for j in range(factor)), np.float32(1 / (255 * factor * factor)),
                    out=field, dtype=np.float32)
    return fields


def select_patches(image: np.ndarray, patch_px: int, count: int) -> PatchSelection:
    """The `count` patches with the most tissue and their surroundings (the model inputs `patches` and
    `context`); the image must be at least context_px(patch_px) on each side.

    With little tissue the emptiest patches are still used: the model's uncertainty then says so.
    """
    height, width = image.shape[:2]
    field_px = context_px(patch_px)
    if min(height, width) < field_px:
        raise ValueError(f"image of {width}x{height} px; expected at least {field_px} px on each side")
    corners = patch_grid(height, width, patch_px)
    stained = tissue_mask(image, step=TISSUE_SAMPLE_STEP)
    fractions = patch_tissue_fractions(stained, corners, patch_px)
    most_tissue = np.argsort(-fractions, kind="stable")[:count]
    chosen = [corners[i] for i in most_tissue]
    fields = [context_corner(t, l, patch_px, field_px, height, width) for t, l in chosen]
    return PatchSelection(
        patches=_as_model_input(np.stack([image[t:t + patch_px, l:l + patch_px] for t, l in chosen])),
        context=downsampled_fields(image, fields, field_px),
        tissue_fractions=fractions[most_tissue], image_tissue_fraction=float(stained.mean()))
