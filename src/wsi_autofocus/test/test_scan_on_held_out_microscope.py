"""A whole scan (focus map, inline autofocus with the shipped models, side probes read as two exposures)
on a microscope the models never trained on: no tile may end less in focus than the focus map alone left it."""
import numpy as np
import pytest

from wsi_acquisition.scan import FocusReply, FocusStrategy, ScanRequest, ScanRunner
from wsi_autofocus import heldout_imaging
from wsi_autofocus.content import EVALUATION_IMAGES, RealImageSpecimen
from wsi_autofocus.heldout_scanner import HeldOutScanner, abs_defocus_first_and_final_um, max_abs_defocus_gain_um
from wsi_autofocus.inference import FocusEstimator, load_backend
from wsi_autofocus.two_shot import TwoShotModel, default_model_path, with_second_exposure

pytestmark = pytest.mark.slow


def _reply(result) -> FocusReply:
    return FocusReply(result.defocus_um, result.uncertainty_um, result.distance_um, result.distance_uncertainty_um,
                      result.above_focus_probability)


def test_inline_autofocus_never_leaves_a_tile_worse_than_the_focus_map(tmp_path):
    specimen = RealImageSpecimen(EVALUATION_IMAGES["real-he"])
    (x, y), = specimen.tissue_points(np.random.default_rng(5), 1)
    scope = heldout_imaging.HELD_OUT_SCOPES["abbe-annular"]
    scanner = HeldOutScanner(scope, specimen, sensor_px=256,
                             centre_um=(x, y), warp_um=3.0,
                             tilt_um_per_mm=(20.0, -12.0))
    estimator = FocusEstimator(load_backend("onnxruntime")[0])
    pairs = TwoShotModel.load(default_model_path())
    condenser = scope.illumination.declared_condenser()

    def estimate(frame, frame_above=None, step_um=0.0):
        result = estimator.estimate(frame.image_rgb8, frame.numerical_aperture, frame.pixel_size_um, condenser)
        if frame_above is not None:
            result = with_second_exposure(pairs, result, frame.image_rgb8, frame_above.image_rgb8,
                                          frame.numerical_aperture, frame.pixel_size_um, step_um, condenser)
        return _reply(result)

    field = scanner.field_of_view_um()[0]
    # One focus point for a steeply tilted slide: the focus map leaves most tiles out of focus.
    request = ScanRequest(scan_id="held-out", output_dir=tmp_path, region_um=(x - field, y - field, 2.7 * field, 2.7 * field),
                          focus_strategy=FocusStrategy.MAP_INLINE, focus_points=1, skip_empty_tiles=False)
    outcome = ScanRunner(scanner, request, estimate_focus=lambda record, frame: estimate(frame),
                         estimate_image=estimate).run()
    assert len({(r.row, r.col) for r in outcome.records}) == 9
    # Every tile's first image is the focus map's; whatever the autofocus did afterwards, the final image
    # is at least as close to focus (0.1 µm: the stage's z repeatability).
    assert max_abs_defocus_gain_um(outcome.records) <= 0.1
    # The single focus point leaves the tilted slide's tiles off by up to ~3 µm: the side probes are read as
    # two exposures, and the scan ends nearer focus than the focus map on average.
    assert any("two_shot_defocus_um" in check for check in outcome.focus_checks)
    focus_map, final = abs_defocus_first_and_final_um(outcome.records)
    assert final.mean() < focus_map.mean()
