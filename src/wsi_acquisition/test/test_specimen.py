"""Virtual specimens: determinism, seamless lazy rendering, content, user images."""
import tracemalloc

import numpy as np
import pytest

from wsi_acquisition.specimen import (GLASS_OD, ImageSpecimen, SpecimenError, SyntheticSlide, TissueSection,
                                      fractal_noise_grid, fractal_noise_points, noise_key, value_noise_grid,
                                      value_noise_points)

SECTION_CENTER = (43_500.0, 12_500.0)


@pytest.fixture(scope="module")
def slide():
    return SyntheticSlide(seed=11)


def test_grid_and_point_noise_agree():
    xs = np.linspace(1000.0, 1400.0, 37)
    ys = np.linspace(-50.0, 300.0, 29)
    key = noise_key(4, 2)
    grid = value_noise_grid(xs, ys, 33.0, key)
    points = value_noise_points(xs[None, :], ys[:, None], 33.0, key)
    assert np.abs(grid - points).max() < 1e-5
    assert grid.min() >= -1 and grid.max() <= 1 and grid.std() > 0.2
    fractal = fractal_noise_grid(xs, ys, 200.0, 3, key, pixel_size_um=1.0)
    assert np.abs(fractal - fractal_noise_points(xs[None, :], ys[:, None], 200.0, 3, key)).max() < 1e-5


def test_same_seed_same_pixels_other_seed_different(slide):
    region = (SECTION_CENTER[0], SECTION_CENTER[1], 300, 200, 0.325)
    first = slide.optical_density(*region)
    assert np.array_equal(first, SyntheticSlide(seed=11).optical_density(*region))
    assert np.abs(first - SyntheticSlide(seed=12).optical_density(*region)).mean() > 0.05


def test_overlapping_regions_agree_so_tiles_stitch(slide):
    p = 0.325
    x0, y0 = SECTION_CENTER
    big = slide.optical_density(x0, y0, 400, 300, p)
    shifted = slide.optical_density(x0 + 100 * p, y0 + 50 * p, 200, 150, p)
    assert np.abs(big[50:200, 100:300] - shifted).max() < 1e-3


def test_tissue_has_nuclei_stroma_and_glass_around_it(slide):
    tissue = slide.optical_density(SECTION_CENTER[0] - 300, SECTION_CENTER[1] - 300, 1024, 1024, 0.5)
    glass = slide.optical_density(2000.0, 2000.0, 64, 64, 0.5)
    assert np.allclose(glass, GLASS_OD)
    green = tissue[..., 1]
    assert np.percentile(green, 90) > 0.5          # dark hematoxylin nuclei
    assert 0.1 < np.median(green) < 0.6            # eosin stroma / cytoplasm
    # Hematoxylin (nuclei) absorbs red far more than eosin does: red OD varies with the nuclei.
    assert np.corrcoef(tissue[..., 0].ravel(), green.ravel())[0, 1] > 0.5


def test_ihc_section_is_brown_where_positive():
    slide = SyntheticSlide(seed=3, sections=(TissueSection(*SECTION_CENTER, stain="ihc"),))
    od = slide.optical_density(SECTION_CENTER[0] - 1500, SECTION_CENTER[1] - 1500, 1000, 1000, 3.0)
    tissue = od.sum(axis=2) > 0.15
    # DAB absorbs blue more than red; hematoxylin the reverse.
    blue_over_red = od[..., 2][tissue] / od[..., 0][tissue]
    assert (blue_over_red > 1.5).mean() > 0.05
    assert (blue_over_red < 0.8).mean() > 0.05


def test_render_memory_scales_with_the_region_not_the_slide(slide):
    tracemalloc.start()
    slide.optical_density(SECTION_CENTER[0], SECTION_CENTER[1], 512, 512, 0.25)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 60e6   # a full-resolution slide would be 300000 x 100000 px


def test_coarse_render_averages_fine_render(slide):
    x0, y0 = SECTION_CENTER[0] - 200, SECTION_CENTER[1] - 200
    fine = slide.optical_density(x0, y0, 800, 800, 0.5).mean(axis=(0, 1))
    coarse = slide.optical_density(x0, y0, 40, 40, 10.0).mean(axis=(0, 1))
    assert np.allclose(fine, coarse, atol=0.12)


def test_sections_outside_slide_rejected():
    with pytest.raises(SpecimenError, match="outside"):
        SyntheticSlide(sections=(TissueSection(500.0, 500.0, 5000.0, 5000.0),))
    with pytest.raises(SpecimenError, match="stain"):
        TissueSection(1e4, 1e4, stain="pap")


def test_image_specimen_round_trips_intensity():
    rng = np.random.default_rng(0)
    image = rng.integers(30, 250, size=(40, 60, 3), dtype=np.uint8)
    specimen = ImageSpecimen(image, pixel_size_um=2.0, origin_x_um=1000.0, origin_y_um=500.0)
    od = specimen.optical_density(1000.0, 500.0, 60, 40, 2.0)
    assert np.abs(255 * 10 ** -od - image).max() < 0.6
    # Outside the image: glass.
    assert np.allclose(specimen.optical_density(0.0, 0.0, 8, 8, 2.0), GLASS_OD)


def test_image_specimen_resamples_and_area_averages():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, ::2] = 255                               # one-pixel stripes: half transmitting
    specimen = ImageSpecimen(image, pixel_size_um=1.0)
    x0, y0 = specimen.origin_x_um, specimen.origin_y_um
    coarse = specimen.optical_density(x0, y0, 16, 16, 4.0)
    transmission = 10 ** -coarse[4:12, 4:12]
    assert np.all(np.abs(transmission - 0.5) < 0.02)  # averaged, not aliased to all dark or all white
    assert np.ptp(coarse[4:12, 4:12]) < 0.05
    fine = specimen.optical_density(x0, y0, 128, 128, 0.5)
    assert fine.shape == (128, 128, 3)


def test_image_specimen_validation():
    with pytest.raises(SpecimenError, match="shape"):
        ImageSpecimen(np.zeros((10, 10), np.uint8), 1.0)
    with pytest.raises(SpecimenError, match="does not fit"):
        ImageSpecimen(np.zeros((10, 10, 3), np.uint8), 10_000.0)
    with pytest.raises(SpecimenError, match="0..1"):
        ImageSpecimen(np.full((4, 4, 3), 2.0), 1.0)
