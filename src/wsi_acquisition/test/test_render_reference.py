"""The renderer stays the same simulator: captures compared with raw counts stored by an earlier renderer.

`data/render_reference.npz` holds 12-bit raw captures of the cases below (fixed noise seed), written again
by the renderer of commit adfad59 (the phase term sqrt(T) phi instead of T phi: a deliberate change of the
optics; first written by commit 80468c4's renderer, before it was made faster) with that commit's version of
this file:

    PYTHONPATH=<that commit's src/*> python src/wsi_acquisition/test/test_render_reference.py --write

Its camera noise was numpy's standard normal draw; the renderer is given the same draw here
(`camera_noise`), so what differs is the rendering alone.

The focus models and the autofocus evaluation are made on that renderer's images, so a later renderer may
differ from it by floating-point rounding only. Rewrite the file only for a deliberate
change of the optics or the specimen, together with retraining the focus model.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.optics import Camera
from wsi_acquisition.specimen import SyntheticSlide, TissueSection

REFERENCE = Path(__file__).resolve().parent / "data" / "render_reference.npz"
NOISE_SEED = 1234
CENTRE_ROI = (480, 480, 64, 64)
CORNER_ROI = (0, 960, 64, 64)

# name: (microscope keyword arguments, x_um, y_um, defocus_um, magnification, roi)
CASES = {
    "20x_near_focus": ({}, 41_500.0, 12_500.0, 0.3, 20, CENTRE_ROI),
    "20x_below_focus": ({}, 41_500.0, 12_500.0, -2.0, 20, CENTRE_ROI),
    "20x_above_focus_field_corner": ({}, 43_210.0, 11_870.0, 4.0, 20, CORNER_ROI),
    "20x_fold": ({}, 44_840.0, 14_426.0, 0.5, 20, CENTRE_ROI),
    "40x_in_focus": ({}, 42_300.0, 12_900.0, 0.0, 40, CENTRE_ROI),
    "40x_below_focus_field_corner": ({}, 42_300.0, 12_900.0, -1.2, 40, (960, 0, 64, 64)),
    "40x_far_from_focus": ({}, 42_300.0, 12_900.0, 40.0, 40, CENTRE_ROI),
    "10x_section_edge": ({}, 36_700.0, 12_500.0, 6.0, 10, CENTRE_ROI),
    "20x_incoherent": ({"condenser_fill": 1.0}, 41_500.0, 12_500.0, 1.5, 20, CENTRE_ROI),
    "20x_small_sensor_full_frame": ({"camera": Camera(width_px=96, height_px=96)}, 41_800.0, 12_700.0, 0.8, 20,
                                    None),
    "20x_ihc": ({"specimen": SyntheticSlide(seed=0, sections=(TissueSection(43_500.0, 12_500.0, stain="ihc"),))},
                41_500.0, 12_500.0, -0.6, 20, CENTRE_ROI),
}


def numpy_standard_normal(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """The camera noise draw of the reference renderer."""
    return rng.standard_normal(shape, dtype=np.float32)


def render(name: str) -> np.ndarray:
    kwargs, x, y, defocus, magnification, roi = CASES[name]
    microscope = VirtualMicroscope(seed=0, camera_noise=numpy_standard_normal, **kwargs)
    z = microscope.focal_z_um(x, y) + defocus
    return microscope.capture(x, y, z, magnification, roi=roi, noise_seed=NOISE_SEED).raw


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_matches_the_reference_renderer(name):
    reference = np.load(REFERENCE)[name].astype(np.float64)
    raw = render(name).astype(np.float64)
    assert raw.shape == reference.shape
    difference = np.abs(raw - reference)
    # Same camera noise draw: what remains is rendering. Allowed: 1/255 of the 12-bit range anywhere,
    # and on average a small fraction of one count (rounding of the irradiance to counts).
    assert difference.max() <= 4095 / 255
    assert difference.mean() <= 0.05


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, **{name: render(name) for name in CASES})
    print(f"wrote {REFERENCE}")
