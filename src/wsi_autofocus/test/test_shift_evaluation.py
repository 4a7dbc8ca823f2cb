"""The evaluation's scan outcome runs the scan's own rules on held-out imaging: a confident, wrong
estimate is tried, found not sharper and refused, so no tile ends further from focus."""
import numpy as np

from wsi_autofocus import shift_evaluation
from wsi_autofocus.inference import TileEstimate

CONFIDENT_DEFOCUS_UM = 5.0


class ConfidentlyAbove:
    """Says every image is 5 µm above focus, sure of it to 0.1 µm, whatever the image shows."""

    def estimate_many(self, images, optics):
        return [TileEstimate(CONFIDENT_DEFOCUS_UM, 0.1, CONFIDENT_DEFOCUS_UM, 0.1, 1.0) for _ in images]


def test_scan_outcome_refuses_corrections_that_are_not_sharper(tmp_path):
    spec = shift_evaluation.ShiftSpec(tile_px=128, tiles_per_cell=6, objectives=(20.0,), imaging=("abbe-gaussian",),
                                      content=("real-he",))
    tiles = shift_evaluation.render_tiles(spec, tmp_path, workers=1)
    estimator = ConfidentlyAbove()
    estimates = shift_evaluation.estimate_tiles(estimator, tiles)
    table = shift_evaluation.scan_outcome_table(spec, tiles, estimator, estimates, tmp_path)

    outcome = table["abbe-gaussian"]
    assert outcome["n"] == 6 and outcome["corrections"] == 6
    assert outcome["tiles_worse"] == 0
    # Moving 5 µm down helps the tiles that were well above focus, and only those are kept.
    helped = np.sum(np.abs(tiles["true_um"] - CONFIDENT_DEFOCUS_UM) < np.abs(tiles["true_um"]) - 1.0)
    assert helped >= 1 and outcome["tiles_improved"] >= 1
    assert outcome["scan_mean_abs_um"] <= outcome["focus_map_mean_abs_um"]
    # The re-imaged fields were cached: a second run renders nothing new and agrees.
    again = shift_evaluation.scan_outcome_table(spec, tiles, estimator, estimates, tmp_path)
    assert again == table
