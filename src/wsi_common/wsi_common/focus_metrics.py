"""Classical focus measures: sharpness of an image, tissue content, the peak of a z-sweep, and how far from
focus a tile may be left.

The scan builds its focus map with them, the autofocus reports them beside its estimate and picks its
patches by tissue, the evaluation uses them as baselines. They live here rather than in wsi_acquisition
so that inference on a device needs numpy and scipy, not the virtual microscope.

All take an RGB or grey image (uint8/uint16/float) and work on its luminance; sharpness values are
normalised by the squared mean intensity so that exposure changes do not change them.
"""
import numpy as np
from scipy import ndimage

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def focus_tolerance_um(depth_of_field_um):
    """How far from focus a tile may be left: half the depth of field, at least 1 µm. An estimate whose
    one sigma is under it is trusted (`wsi_acquisition.focus.trusts_estimate`); a trusted estimate off by
    more is confidently wrong."""
    return np.maximum(np.asarray(depth_of_field_um) / 2, 1.0)


def luminance(image: np.ndarray) -> np.ndarray:
    """float32 luminance in [0, 1] of an (H, W) or (H, W, 3) image. float32 resolves 16-bit pixels and
    made the per-tile sharpness of the focus estimate three times faster than float64 (measured)."""
    image = np.asarray(image)
    scale = np.float32(np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0)
    if image.ndim == 3:
        return (image.astype(np.float32) @ LUMA_WEIGHTS) / scale
    if image.ndim == 2:
        return image.astype(np.float32) / scale
    raise ValueError(f"image of shape {image.shape}; expected (H, W) or (H, W, 3)")


def _normalise(energy: float, grey: np.ndarray) -> float:
    return float(energy / max(grey.mean() ** 2, 1e-12))


def brenner(image: np.ndarray) -> float:
    """Mean squared difference of pixels two apart (horizontal and vertical)."""
    grey = luminance(image)
    dx = grey[:, 2:] - grey[:, :-2]
    dy = grey[2:, :] - grey[:-2, :]
    return _normalise((np.mean(dx ** 2) + np.mean(dy ** 2)) / 2, grey)


def tenengrad(image: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude."""
    grey = luminance(image)
    gx = ndimage.sobel(grey, axis=1)
    gy = ndimage.sobel(grey, axis=0)
    return _normalise(np.mean(gx ** 2 + gy ** 2), grey)


def variance_of_laplacian(image: np.ndarray) -> float:
    grey = luminance(image)
    return _normalise(np.var(ndimage.laplace(grey)), grey)


SHARPNESS_METRICS = {"brenner": brenner, "tenengrad": tenengrad, "variance_of_laplacian": variance_of_laplacian}


def tissue_mask(image: np.ndarray, chroma_threshold: float = 0.1, step: int = 1) -> np.ndarray:
    """Pixels showing stain, on every `step`-th row and column. Stains are coloured and
    bright-field glass is neutral grey, so the chroma (max - min channel, relative to the mean)
    separates them whatever the exposure."""
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image of shape {rgb.shape}; expected (H, W, 3) RGB")
    # Channel by channel: numpy's reductions over a last axis of three were ten times slower (measured).
    red, green, blue = (rgb[::step, ::step, channel].astype(np.float32) for channel in range(3))
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    total = red + green + blue
    return spread * 3 > chroma_threshold * np.maximum(total, 1e-6)


# Tissue content is estimated on every 4th row and column: a fraction needs no full-resolution mask.
TISSUE_SAMPLE_STEP = 4


def tissue_fraction(image: np.ndarray) -> float:
    """Fraction of the image showing stain (estimated on every TISSUE_SAMPLE_STEP-th row and column)."""
    return float(tissue_mask(image, step=TISSUE_SAMPLE_STEP).mean())


# A field shows at least this much tissue in focus (`tissue_fraction`) to have a focus to find or to learn from:
# the overview's tissue mask (40 µm pixels) also admits fields of bare glass inside a section's outline.
MIN_FIELD_TISSUE_FRACTION = 0.02


def unstained_at_focus(images, z_um, focus_z_um: float, min_fraction: float = MIN_FIELD_TISSUE_FRACTION) -> str | None:
    """Why a z-sweep's image nearest its focus shows no tissue to focus on, or None when it does or when a
    monochrome camera took it (equal channels show no stain to judge by). Dust or debris on glass can peak
    clearly enough for `unclear_peak`, at a z that is not the section's."""
    rgb = np.asarray(images[int(np.argmin(np.abs(np.asarray(z_um, dtype=float) - focus_z_um)))])
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return None
    tissue = tissue_fraction(rgb)
    if tissue < min_fraction:
        return (f"its image at focus shows {tissue:.1%} stained tissue (at least {min_fraction:.0%} expected): "
                "a field of glass, its sharpness peak dust or debris")
    return None


# A z-sweep's sharpness peak stands at least this far above the sweep's median where the field has a focus to
# find; glass, a hole or a fold give a flat sweep whose noise may peak anywhere.
MIN_FOCUS_PEAK_CONTRAST = 1.3


def peak_contrast(scores: np.ndarray) -> float:
    """A z-sweep's highest sharpness over its median (`MIN_FOCUS_PEAK_CONTRAST`)."""
    scores = np.asarray(scores, dtype=float)
    return float(scores.max() / max(float(np.median(scores)), 1e-12))


def unclear_peak(z_um: np.ndarray, scores: np.ndarray, min_contrast: float = MIN_FOCUS_PEAK_CONTRAST) -> str | None:
    """Why a z-sweep (z ascending, a sharpness per z) shows no focus to find, or None when it does: its sharpest
    image must lie inside the sweep and stand at least `min_contrast` times above the sweep's median."""
    z_um, scores = np.asarray(z_um, dtype=float), np.asarray(scores, dtype=float)
    best = int(np.argmax(scores))
    if best in (0, len(scores) - 1):
        return (f"the sweep over z {z_um[0]:.1f}..{z_um[-1]:.1f} µm is sharpest at its end ({z_um[best]:.1f} µm): "
                "its focus is not inside the sweep")
    contrast = peak_contrast(scores)
    if contrast < min_contrast:
        return (f"the sweep over z {z_um[0]:.1f}..{z_um[-1]:.1f} µm peaks at only {contrast:.2f}x its median "
                f"sharpness (at least {min_contrast} expected): no clear focus, as over glass, a hole or a fold")
    return None


def refine_peak(z_um: np.ndarray, scores: np.ndarray) -> float:
    """Peak of a sampled focus curve (z ascending, evenly spaced or not: a coarse and a fine sweep
    together), refined by a parabola through the best sample and its neighbours; the best sample
    itself when it lies at an end of the sweep."""
    z_um, scores = np.asarray(z_um, dtype=float), np.asarray(scores, dtype=float)
    best = int(np.argmax(scores))
    if 0 < best < len(scores) - 1:
        curvature, slope, _ = np.polyfit(z_um[best - 1:best + 2], scores[best - 1:best + 2], 2)
        if curvature < 0:
            return float(np.clip(-slope / (2 * curvature), z_um[best - 1], z_um[best + 1]))
    return float(z_um[best])
