"""Benchmark (a diagnosis): through which features the two-shot model reads one content differently from another.

    .venv/bin/python bench/two_shot_content_offset.py [--model FILE] [--cache-dir D] [--output JSON]

On each held-out microscope's 20x tiles of the shift evaluation (procedural test specimens, real H&E and IHC, with
their second exposures), the model's mean signed error and MAE per content: as read; with every tile's band levels
(`two_shot.LEVEL_FEATURES`, the content's spectrum shape beside the bands' through-focus ratios) replaced by one
content's mean, so that the contents differ only in their band ratios (if the offset between contents came through
the levels, they would then read alike); and after the card's calibration on nine sweeps of validation specimens
(`shift_evaluation.CalibrationSpec`). Uses the evaluation's caches (`wsi-autofocus eval-two-shot` fills them).
Prints a table and writes bench/results/two_shot_content_offset.json (or --output).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from wsi_autofocus import heldout_imaging
from wsi_autofocus.calibration_store import CalibrationError
from wsi_autofocus.shift_evaluation import (CalibrationSpec, Refocuser, ShiftSpec, imaging_condenser, render_all_sweeps,
                                            render_tiles, second_exposures, z_stacks)
from wsi_autofocus.two_shot import (LEVEL_FEATURES, TwoShotModel, default_model_path, depth_unit_um, model_inputs,
                                    pair_features)
from wsi_autofocus.two_shot_calibration import calibrate_two_shot

RESULTS = Path(__file__).resolve().parent / "results"
MAGNIFICATION = CalibrationSpec().magnification


def read_um(model: TwoShotModel, features: np.ndarray, apertures: np.ndarray, condenser) -> np.ndarray:
    depths, _ = model.predict_depths(model_inputs(features, condenser.fill, condenser.inner_fill))
    return depths * depth_unit_um(apertures)


def by_content(errors_um: np.ndarray, content: np.ndarray) -> dict:
    return {name: {"tiles": int((content == name).sum()), "bias_um": float(errors_um[content == name].mean()),
                   "mae_um": float(np.abs(errors_um[content == name]).mean())} for name in np.unique(content)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--cache-dir", type=Path, default=Path("build/autofocus-eval-cache"))
    parser.add_argument("--output", type=Path, default=RESULTS / "two_shot_content_offset.json")
    args = parser.parse_args(argv)
    spec = ShiftSpec()
    tiles = render_tiles(spec, args.cache_dir)
    refocuser = Refocuser(spec, args.cache_dir)
    sweeps = render_all_sweeps(CalibrationSpec(), args.cache_dir)
    model = TwoShotModel.load(args.model)
    results = {}
    for name in heldout_imaging.HELD_OUT_SCOPES:
        indices = np.flatnonzero((tiles["imaging"] == name) & (tiles["objective"] == MAGNIFICATION))
        above, steps = second_exposures(tiles, refocuser, indices)
        apertures, truth = tiles["numerical_aperture"][indices], tiles["true_um"][indices]
        content = tiles["content"][indices].astype(str)
        features = np.array([pair_features(tiles["images"][index], image_above, float(aperture),
                                           float(tiles["pixel_size_um"][index]), step)
                             for index, image_above, aperture, step in zip(indices, above, apertures, steps)])
        condenser = imaging_condenser(name)
        rows = {"as read": by_content(read_um(model, features, apertures, condenser) - truth, content)}
        for source in np.unique(content):
            levelled = features.copy()
            levelled[:, LEVEL_FEATURES] = features[content == source][:, LEVEL_FEATURES].mean(axis=0)
            rows[f"levels of {source}"] = by_content(read_um(model, levelled, apertures, condenser) - truth, content)
        with tempfile.TemporaryDirectory() as work:
            try:
                calibrated = TwoShotModel.load(calibrate_two_shot(z_stacks(sweeps[name]), Path(work) / "two_shot.npz",
                                                                  args.model, condenser=condenser).path)
            except CalibrationError as error:
                print(f"{name}: calibration refused ({error}); the row after it reads with the model as given")
                calibrated = model
        rows["calibrated on other specimens"] = by_content(read_um(calibrated, features, apertures, condenser) - truth,
                                                           content)
        results[name] = rows
    contents = list(next(iter(next(iter(results.values())).values())))
    print(f"two-shot model {args.model}: mean signed error / MAE µm per content, {MAGNIFICATION:g}x tiles within "
          f"{spec.max_defocus_um:g} µm of focus")
    print(f"{'microscope':<16}{'features':<34}" + "".join(f"{name:>22}" for name in contents))
    for name, rows in results.items():
        for label, row in rows.items():
            print(f"{name:<16}{label:<34}" + "".join(f"{row[c]['bias_um']:+11.2f} / {row[c]['mae_um']:<8.2f}"
                                                     for c in contents))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": str(args.model), "magnification": MAGNIFICATION, "results": results},
                                      indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
