"""Pairwise registration of two neighbouring tiles on their overlap.

Phase correlation on the nominal overlap (from the stage poses), restricted to the shifts the stage
error allows (the search limit, which the stitcher derives from the stage's specified error), and
again on a widened overlap when the stage error may have hidden most of the shared specimen. The
whitened cross-power spectrum is multiplied by a Gaussian low-pass, which turns the correlation peak
into a sampled Gaussian whose sub-pixel centre a log-parabola through three samples per axis recovers
(no upsampled DFT needed; that was the slowest step). Each pair gets a confidence (peak ratio,
normalised cross-correlation at the found shift) and a texture measure, so that pairs over empty
glass are recognised instead of trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.signal.windows import tukey

FFT_WORKERS = 2
_LOW_PASS_SIGMA_CYCLES = 0.15  # cycles/px: the correlation peak becomes a Gaussian of σ ≈ 1 px
_PEAK_EXCLUSION_RADIUS_PX = 3


@dataclass(frozen=True)
class RegistrationParameters:
    min_overlap_px: int = 16         # narrower overlaps are not registered
    min_texture: float = 1.5         # gray levels (0-255) of mid-frequency structure; below: empty glass
    min_ncc: float = 0.3             # normalised cross-correlation at the found shift
    min_peak_ratio: float = 1.3      # main peak over the strongest peak elsewhere in the search window


@dataclass(frozen=True)
class PairRegistration:
    """Measured offset of tile b's top-left corner relative to tile a's, px (dy, dx), and its quality."""
    offset_px: tuple[float, float]
    stage_offset_px: tuple[float, float]
    peak_ratio: float
    ncc: float
    texture: float
    overlap_px: tuple[int, int]
    reliable: bool
    reason: str  # "" when reliable, otherwise why not

    @property
    def weight(self) -> float:
        """Least-squares weight: grows with the correlation's signal-to-noise ratio."""
        ncc = min(max(self.ncc, 0.0), 0.99)
        return ncc * ncc / (1.0 - ncc * ncc)


def to_gray(image: np.ndarray) -> np.ndarray:
    """Mean of the channels, float32. Summed channel by channel: a mean over the last axis of three
    visits every pixel with numpy's slow short-axis reduction."""
    if image.ndim == 2:
        return image.astype(np.float32)
    gray = image[..., 0].astype(np.float32)
    gray += image[..., 1]
    gray += image[..., 2]
    gray /= 3
    return gray


def overlap_windows(shape_a: tuple[int, int], shape_b: tuple[int, int], offset_px: tuple[int, int]):
    """Slices of a and of b covering the same specimen area when b sits at offset_px from a."""
    dy, dx = offset_px
    y0, y1 = max(0, dy), min(shape_a[0], dy + shape_b[0])
    x0, x1 = max(0, dx), min(shape_a[1], dx + shape_b[1])
    if y1 <= y0 or x1 <= x0:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - dy, y1 - dy), slice(x0 - dx, x1 - dx))


def high_pass(window: np.ndarray) -> np.ndarray:
    """The window without its shading: best-fit plane and then a 31 px box average removed (the plane
    goes first, else a shading ramp reflected at the window border would look like structure)."""
    height, width = window.shape
    rows = np.arange(height, dtype=np.float32) - (height - 1) / 2
    cols = np.arange(width, dtype=np.float32) - (width - 1) / 2
    slope_y = float((window.mean(axis=1) * rows).sum() / max((rows * rows).sum(), 1e-6))
    slope_x = float((window.mean(axis=0) * cols).sum() / max((cols * cols).sum(), 1e-6))
    detrended = window - window.mean() - slope_y * rows[:, None] - slope_x * cols[None, :]
    return detrended - ndimage.uniform_filter(detrended, 31)


def mid_frequency_texture(high_passed: np.ndarray) -> float:
    """Std of the structure between ~2 px and ~30 px scale (pixel noise smoothed away), gray levels."""
    return float(np.std(ndimage.gaussian_filter(high_passed, 2.0, truncate=3.0)))


def _fast_length(n: int) -> int:
    return scipy.fft.next_fast_len(n, real=False)


def _refine_peak(surface: np.ndarray, peak: tuple[int, int]) -> tuple[float, float]:
    """Sub-pixel peak location. The whitened cross-power spectrum is a pure phase ramp times the
    Gaussian low-pass, so the correlation peak is a sampled Gaussian: a parabola through the logs
    of the peak and its two neighbours along each axis locates its centre exactly (up to noise)."""
    refined = []
    for axis in (0, 1):
        n = surface.shape[axis]
        index = [peak[0] % surface.shape[0], peak[1] % surface.shape[1]]
        values = []
        for step in (-1, 0, 1):
            position = list(index)
            position[axis] = (index[axis] + step) % n
            values.append(surface[position[0], position[1]])
        left, centre, right = values
        offset = 0.0
        if centre > 0 and left > 0 and right > 0:
            left, centre, right = np.log(left), np.log(centre), np.log(right)
        curvature = left - 2 * centre + right
        if curvature < 0:
            offset = float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))
        refined.append(peak[axis] + offset)
    return refined[0], refined[1]


@lru_cache(maxsize=8)
def _taper(shape: tuple[int, int]) -> np.ndarray:
    taper = np.outer(tukey(shape[0], 0.5), tukey(shape[1], 0.5)).astype(np.float32)
    taper.flags.writeable = False
    return taper


@lru_cache(maxsize=8)
def _low_pass(padded: tuple[int, int]) -> np.ndarray:
    """Gaussian low-pass on the half spectrum of a real transform of shape padded. Noise dominates the
    highest frequencies after whitening; a gentle low-pass keeps the peak smooth."""
    fy = scipy.fft.fftfreq(padded[0])[:, None]
    fx = scipy.fft.rfftfreq(padded[1])[None, :]
    low_pass = np.exp(-(fy * fy + fx * fx) / (2 * _LOW_PASS_SIGMA_CYCLES ** 2)).astype(np.float32)
    low_pass.flags.writeable = False
    return low_pass


def phase_correlate(window_a: np.ndarray, window_b: np.ndarray, max_shift_px: float,
                    centre_px: tuple[int, int] = (0, 0)):
    """Shift s (dy, dx) such that window_a(p) ≈ window_b(p - s), searched within ±max_shift_px of
    centre_px (and within the windows). Returns (shift, peak_ratio, at_search_limit). The windows are
    real, so real transforms (half the spectrum) carry all of it, in float32 like the windows."""
    shape = window_a.shape
    taper = _taper(shape)
    search = int(np.ceil(max_shift_px))
    bounds = [(max(c - search, 1 - n), min(c + search, n - 1)) for c, n in zip(centre_px, shape)]
    # Padded so that every searched shift has its own, unwrapped place in the correlation.
    padded = tuple(_fast_length(n + max(-low, high) + 1) for n, (low, high) in zip(shape, bounds))
    a = (window_a - window_a.mean()) * taper
    b = (window_b - window_b.mean()) * taper
    cross = scipy.fft.rfft2(a, s=padded, workers=FFT_WORKERS)
    spectrum_b = scipy.fft.rfft2(b, s=padded, workers=FFT_WORKERS)
    cross *= np.conjugate(spectrum_b, out=spectrum_b)
    magnitude = np.abs(cross)
    magnitude += 1e-12
    cross *= np.divide(_low_pass(padded), magnitude, out=magnitude)  # whitened, then low-passed
    surface = scipy.fft.irfft2(cross, s=padded, workers=FFT_WORKERS)
    # Keep only the shifts the stage error allows (negative shifts wrap to the end of each axis).
    shifts_y = np.arange(bounds[0][0], bounds[0][1] + 1)
    shifts_x = np.arange(bounds[1][0], bounds[1][1] + 1)
    region = surface[np.ix_(shifts_y % padded[0], shifts_x % padded[1])]
    iy, ix = np.unravel_index(int(np.argmax(region)), region.shape)
    signed_peak = (int(shifts_y[iy]), int(shifts_x[ix]))
    at_limit = iy in (0, len(shifts_y) - 1) or ix in (0, len(shifts_x) - 1)
    far = (np.abs(shifts_y[:, None] - signed_peak[0]) > _PEAK_EXCLUSION_RADIUS_PX) | \
          (np.abs(shifts_x[None, :] - signed_peak[1]) > _PEAK_EXCLUSION_RADIUS_PX)
    second = float(region[far].max()) if far.any() else 0.0
    peak_ratio = float(region[iy, ix] / second) if second > 0 else float("inf")
    refined = _refine_peak(surface, signed_peak)
    return refined, peak_ratio, at_limit


def widened_windows(shape_a: tuple[int, int], shape_b: tuple[int, int], offset_px: tuple[int, int],
                    margin_px: int):
    """The overlap windows of overlap_windows, each extended by margin_px into its own tile along the
    axis the tiles are offset on, where the stage error may hide more shared specimen than the nominal
    overlap: a tile of the pair may sit up to margin_px closer to the other than the stage says.
    None when there is nothing to extend."""
    windows = overlap_windows(shape_a, shape_b, offset_px)
    if windows is None:
        return None
    axis = 0 if abs(offset_px[0]) > abs(offset_px[1]) else 1
    a, b = list(windows[0]), list(windows[1])
    if offset_px[axis] >= 0:  # b lies after a: a's window grows backwards, b's forwards
        grow = min(margin_px, a[axis].start, shape_b[axis] - b[axis].stop)
        a[axis] = slice(a[axis].start - grow, a[axis].stop)
        b[axis] = slice(b[axis].start, b[axis].stop + grow)
    else:
        grow = min(margin_px, shape_a[axis] - a[axis].stop, b[axis].start)
        a[axis] = slice(a[axis].start, a[axis].stop + grow)
        b[axis] = slice(b[axis].start - grow, b[axis].stop)
    return (tuple(a), tuple(b)) if grow > 0 else None


def normalized_cross_correlation(window_a: np.ndarray, window_b: np.ndarray, shift_px) -> float:
    """NCC of the parts of the two windows that coincide under the (rounded) shift."""
    sy, sx = (int(round(s)) for s in shift_px)
    h, w = window_a.shape
    if abs(sy) >= h or abs(sx) >= w:
        return 0.0
    a = window_a[max(sy, 0):h + min(sy, 0), max(sx, 0):w + min(sx, 0)]
    b = window_b[max(-sy, 0):h + min(-sy, 0), max(-sx, 0):w + min(-sx, 0)]
    a = a - a.mean()
    b = b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


# A wider window cannot help a pair over glass or one without any overlap, but it finds a neighbour the
# stage put much closer than planned, whose shared specimen the nominal window shows only in part.
_WIDER_WINDOW_HELPS = ("low_confidence", "overlap_too_small", "shift_at_search_limit")


def register_pair(image_a: np.ndarray, image_b: np.ndarray, stage_offset_px: tuple[float, float],
                  search_limit_px: float, parameters: RegistrationParameters = RegistrationParameters()
                  ) -> PairRegistration:
    """Offset of b relative to a (px, dy dx), starting from the offset the stage reports and searched
    within ±search_limit_px of it per axis; a peak on that limit is not trusted (shift_at_search_limit).
    Registered on the nominal overlap first; a pair that fails there for a reason a wider window can fix
    is registered again on widened_windows (as ASHLAR grows its window when the stage error is large
    against the overlap)."""
    nominal = (int(round(stage_offset_px[0])), int(round(stage_offset_px[1])))
    stage_offset = (float(stage_offset_px[0]), float(stage_offset_px[1]))
    windows = overlap_windows(image_a.shape[:2], image_b.shape[:2], nominal)
    if windows is None:
        return PairRegistration(stage_offset, stage_offset, 0.0, 0.0, 0.0, (0, 0), False, "no_overlap")
    result = _register_windows(image_a, image_b, windows, stage_offset, search_limit_px, parameters)
    if result.reliable or result.reason not in _WIDER_WINDOW_HELPS:
        return result
    wider = widened_windows(image_a.shape[:2], image_b.shape[:2], nominal, int(np.ceil(search_limit_px)))
    if wider is None:
        return result
    retried = _register_windows(image_a, image_b, wider, stage_offset, search_limit_px, parameters)
    return retried if retried.reliable else result


def _register_windows(image_a: np.ndarray, image_b: np.ndarray, windows, stage_offset: tuple[float, float],
                      search_limit_px: float, parameters: RegistrationParameters) -> PairRegistration:
    """Register a's window on b's; offset = shift + (a's window origin - b's window origin)."""
    origin_delta = (windows[0][0].start - windows[1][0].start, windows[0][1].start - windows[1][1].start)
    centre = tuple(int(round(o - d)) for o, d in zip(stage_offset, origin_delta))

    def unreliable(reason, overlap, texture=0.0, ncc=0.0, peak_ratio=0.0, offset=stage_offset):
        return PairRegistration(offset, stage_offset, peak_ratio, ncc, texture, overlap, False, reason)

    window_a = to_gray(image_a[windows[0]])
    window_b = to_gray(image_b[windows[1]])
    overlap = window_a.shape
    if min(overlap) < parameters.min_overlap_px:
        return unreliable("overlap_too_small", overlap)
    detail_a, detail_b = high_pass(window_a), high_pass(window_b)
    texture = min(mid_frequency_texture(detail_a), mid_frequency_texture(detail_b))
    shift, peak_ratio, at_limit = phase_correlate(window_a, window_b, search_limit_px, centre)
    # Shading (vignetting) correlates between any two windows; judge the match on structure only.
    ncc = normalized_cross_correlation(detail_a, detail_b, shift)
    offset = (origin_delta[0] + shift[0], origin_delta[1] + shift[1])
    if texture < parameters.min_texture:
        return unreliable("low_texture", overlap, texture, ncc, peak_ratio, offset)
    if at_limit:
        return unreliable("shift_at_search_limit", overlap, texture, ncc, peak_ratio, offset)
    shared = (overlap[0] - abs(shift[0]), overlap[1] - abs(shift[1]))
    if min(shared) < parameters.min_overlap_px:
        return unreliable("overlap_too_small", overlap, texture, ncc, peak_ratio, offset)
    if ncc < parameters.min_ncc or peak_ratio < parameters.min_peak_ratio:
        return unreliable("low_confidence", overlap, texture, ncc, peak_ratio, offset)
    return PairRegistration(offset, stage_offset, peak_ratio, ncc, texture, overlap, True, "")
