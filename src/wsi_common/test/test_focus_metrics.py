"""The focus measures on synthetic arrays; on rendered fields of the virtual microscope they are tested in
wsi_acquisition/test/test_focus.py."""
import numpy as np
import pytest

from wsi_common.focus_metrics import brenner, luminance, refine_peak, tissue_fraction, unclear_peak


def test_a_sweep_has_a_focus_when_its_peak_lies_inside_and_stands_out():
    z = np.linspace(-5.0, 5.0, 11)
    assert unclear_peak(z, 1.0 + 4.0 * np.exp(-z ** 2)) is None
    assert "sharpest at its end" in unclear_peak(z, 1.0 + 4.0 * np.exp(-(z - 5.0) ** 2))
    flat = np.ones_like(z)
    flat[5] = 1.2
    assert "peaks at only 1.20x its median" in unclear_peak(z, flat)
    assert unclear_peak(z, flat, min_contrast=1.1) is None      # the scan's threshold is a parameter


def test_refine_peak_finds_the_vertex_between_samples():
    z = np.arange(-5.0, 5.1, 1.0)
    assert refine_peak(z, -(z - 0.3) ** 2) == pytest.approx(0.3)
    assert refine_peak(z, z) == 5.0          # monotonic: the end of the sweep
    uneven = np.array([-4.0, -2.0, -0.5, 0.0, 0.5, 2.0, 4.0])       # a coarse and a fine sweep together
    assert refine_peak(uneven, -(uneven - 0.3) ** 2) == pytest.approx(0.3)


def test_luminance_scales_every_integer_type_to_one():
    white8 = np.full((4, 4, 3), 255, np.uint8)
    white16 = np.full((4, 4), 65535, np.uint16)
    assert luminance(white8) == pytest.approx(np.ones((4, 4))) and luminance(white16) == pytest.approx(np.ones((4, 4)))
    with pytest.raises(ValueError, match="expected"):
        luminance(np.zeros((2, 2, 2, 2)))


def test_stain_is_told_from_grey_glass_and_sharpness_ignores_exposure():
    rng = np.random.default_rng(0)
    glass = np.full((64, 64, 3), 220, np.uint8)
    stained = glass.copy()
    stained[:, :32] = (150, 60, 160)                   # half the field: a purple stain
    assert tissue_fraction(glass) == 0.0 and tissue_fraction(stained) == pytest.approx(0.5)
    texture = rng.integers(60, 200, (64, 64, 3)).astype(np.uint8)
    dimmer = (texture * 0.5).astype(np.uint8)
    assert brenner(dimmer) == pytest.approx(brenner(texture), rel=0.05)
