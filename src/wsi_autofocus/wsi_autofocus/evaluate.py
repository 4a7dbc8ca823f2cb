"""Held-out evaluation of single-shot autofocus against classical z-sweep baselines.

Tiles are rendered by the virtual microscope from specimens never used in training, at known
defocus, on fields that show tissue in focus (`data.fields_showing_tissue`; near-empty fields are a
check of their own). Our estimate uses one image per tile; each baseline sweeps z, scores every image with a
sharpness measure and takes the refined peak.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_acquisition.microscope import VirtualMicroscope
from wsi_acquisition.stage import StageDynamics, trapezoid_duration_s
from wsi_autofocus.data import OBJECTIVES, SPLITS, fields_showing_tissue, specimen_for_seed
from wsi_acquisition.focus import trusts_estimate
from wsi_autofocus.inference import FocusEstimator
from wsi_autofocus.two_shot import Condenser
from wsi_common.focus_metrics import SHARPNESS_METRICS, refine_peak

DEFOCUS_BIN_EDGES_UM = (-20, -15, -10, -6, -3, -1, 1, 3, 6, 10, 15, 20)
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class EvaluationSpec:
    tile_px: int = 384
    tiles_per_specimen_and_objective: int = 40
    sparse_tiles_per_specimen: int = 10          # near-empty fields, for the robustness check
    sweep_tiles_per_specimen: int = 4            # tiles (20x) that also get the z-sweep baselines
    sweep_range_um: float = 20.0
    sweep_step_um: float = 1.0
    exposure_ms: float = 8.0
    seed: int = 5


def render_tile(microscope: VirtualMicroscope, x, y, defocus_um, magnification, spec: EvaluationSpec):
    """A centred `spec.tile_px` square of the sensor at a known defocus from the true focal surface."""
    roi = microscope.camera.centre_roi(spec.tile_px)
    focal = float(microscope.focal_z_um(x, y))
    return microscope.capture(x, y, focal + defocus_um, magnification, exposure_ms=spec.exposure_ms, roi=roi)


def sweep_time_s(images: int, step_um: float, exposure_ms: float, dynamics: StageDynamics = StageDynamics()) -> float:
    """Acquisition time of a z-sweep: every image needs a z step, a settle and an exposure."""
    step_s = trapezoid_duration_s(step_um, dynamics.z_speed_um_s, dynamics.z_accel_um_s2) + dynamics.settle_s
    return images * (step_s + exposure_ms / 1e3)


def estimate_capture(estimator: FocusEstimator, microscope: VirtualMicroscope, capture):
    """The estimate for a simulated capture, with the optics the capture was taken with and the microscope's
    condenser, as the bring-up graph declares it to the autofocus node."""
    return estimator.estimate(capture.image_rgb8, capture.numerical_aperture, capture.pixel_size_um,
                              Condenser(microscope.condenser_fill))


def _record(specimen_seed: int, microscope: VirtualMicroscope, capture, result, sparse: bool) -> dict:
    return {"specimen": specimen_seed, "objective": capture.objective_magnification, "sparse": sparse,
            "depth_of_field_um": microscope.depth_of_field_um(capture.objective_magnification),
            "true_um": capture.defocus_um, "predicted_um": result.defocus_um,
            "uncertainty_um": result.uncertainty_um, "tissue_fraction": result.tissue_fraction,
            "latency_ms": result.latency_ms}


def run_evaluation(estimator: FocusEstimator, spec: EvaluationSpec = EvaluationSpec(), split: str = "test",
                   log=print) -> dict:
    """Tiles of the specimens of `split`: "test" (held out, for the reported numbers) or "val" (for
    choosing settings such as the patches per tile without looking at the test specimens)."""
    records, sweeps = [], []
    for specimen_seed in SPLITS[split].specimen_seeds:
        rng = np.random.default_rng([spec.seed, specimen_seed])
        microscope = VirtualMicroscope(specimen=specimen_for_seed(specimen_seed), seed=specimen_seed)
        count = spec.tiles_per_specimen_and_objective
        for magnification in OBJECTIVES:
            points = fields_showing_tissue(microscope, rng, count, magnification, spec.tile_px)
            for (x, y), defocus in zip(points, rng.uniform(-20, 20, count)):
                capture = render_tile(microscope, x, y, defocus, magnification, spec)
                # Also as a caller that does not send the optics (EstimateFocus with NA and pixel size 0), and
                # as a scanner that declares no condenser.
                blind = estimator.estimate(capture.image_rgb8)
                no_condenser = estimator.estimate(capture.image_rgb8, capture.numerical_aperture,
                                                  capture.pixel_size_um)
                records.append(_record(specimen_seed, microscope, capture,
                                       estimate_capture(estimator, microscope, capture), sparse=False)
                               | {"predicted_optics_unknown_um": blind.defocus_um,
                                  "predicted_condenser_unknown_um": no_condenser.defocus_um})
        # Near-empty fields: positions off the tissue section, on bare glass or its ragged edge.
        for _ in range(spec.sparse_tiles_per_specimen):
            x, y = rng.uniform(0.03, 0.2) * microscope.specimen.width_um, rng.uniform(0.1, 0.9) * microscope.specimen.height_um
            capture = render_tile(microscope, x, y, rng.uniform(-10, 10), 20.0, spec)
            records.append(_record(specimen_seed, microscope, capture, estimate_capture(estimator, microscope, capture),
                                   sparse=True))
        for x, y in fields_showing_tissue(microscope, rng, spec.sweep_tiles_per_specimen, 20.0, spec.tile_px):
            sweeps.append(_sweep(microscope, x, y, float(rng.uniform(-10, 10)), spec))
        log(f"specimen {specimen_seed}: {len(records)} tiles, {len(sweeps)} sweeps")
    return {"spec": spec.__dict__, "split": split, "tiles": records, "sweeps": sweeps}


def _sweep(microscope, x, y, start_defocus_um: float, spec: EvaluationSpec) -> dict:
    """Single shot vs z-sweeps at one position whose current defocus is `start_defocus_um`."""
    offsets = np.arange(-spec.sweep_range_um, spec.sweep_range_um + 1e-9, spec.sweep_step_um)
    images, truth = [], None
    for offset in offsets:
        capture = render_tile(microscope, x, y, start_defocus_um + offset, 20.0, spec)
        images.append(capture.image_rgb8)
        truth = capture.focal_z_um
    start_z = truth + start_defocus_um
    outcome = {"start_defocus_um": start_defocus_um, "images": len(offsets)}
    for name, metric in SHARPNESS_METRICS.items():
        started = time.perf_counter()
        scores = np.array([metric(image) for image in images])
        peak_z = start_z + refine_peak(offsets, scores)
        outcome[name] = {"error_um": float(peak_z - truth), "compute_ms": (time.perf_counter() - started) * 1e3}
    return outcome


def error_statistics(rows: list[dict]) -> dict:
    """Accuracy and calibration of tile records (`true_um`, `predicted_um`, `uncertainty_um`).

    The median error and a bootstrap 95 % interval of the MAE sit beside the MAE because a few
    uncertain tiles can carry most of it."""
    if not rows:
        return {"n": 0}
    true = np.array([r["true_um"] for r in rows])
    predicted = np.array([r["predicted_um"] for r in rows])
    sigma = np.array([r["uncertainty_um"] for r in rows])
    abs_error = np.abs(predicted - true)
    signed = np.abs(true) > 1.0
    # Resampling the tiles: with ~100 tiles and a few large errors the MAE itself is uncertain.
    resampled = np.random.default_rng(0).choice(abs_error, size=(BOOTSTRAP_RESAMPLES, len(abs_error))).mean(axis=1)
    return {"n": len(rows), "mae_um": float(np.mean(abs_error)),
            "mae_ci95_um": [float(v) for v in np.percentile(resampled, [2.5, 97.5])],
            "median_abs_error_um": float(np.median(abs_error)),
            "rmse_um": float(np.sqrt(np.mean(abs_error ** 2))),
            "p95_abs_error_um": float(np.percentile(abs_error, 95)),
            "sign_accuracy_beyond_1um": float(np.mean(np.sign(predicted[signed]) == np.sign(true[signed])))
            if signed.any() else None,
            "median_uncertainty_um": float(np.median(sigma)),
            # Calibration: a one-sigma uncertainty should cover ~68 % of errors, two sigma ~95 %.
            "within_1_sigma": float(np.mean(abs_error <= sigma)),
            "within_2_sigma": float(np.mean(abs_error <= 2 * sigma))}


def summarize(evaluation: dict, estimator_backend: str) -> dict:
    tiles = evaluation["tiles"]
    dense = [t for t in tiles if not t["sparse"]]

    def within(rows, limit):
        return [r for r in rows if abs(r["true_um"]) <= limit]

    def acted_on(rows):
        """What a scan does with the estimates: it moves only on those it trusts (`trusts_estimate`)."""
        trusted = [r for r in rows if trusts_estimate(r["uncertainty_um"], r["depth_of_field_um"])]
        return error_statistics(trusted) | {"fraction_of_tiles": len(trusted) / len(rows) if rows else None}

    by_objective = {}
    for magnification in OBJECTIVES:
        rows = [t for t in dense if t["objective"] == magnification]
        by_objective[f"{magnification:g}x"] = {"within_10um": error_statistics(within(rows, 10)),
                                               "within_20um": error_statistics(within(rows, 20))}
    bins = []
    edges = DEFOCUS_BIN_EDGES_UM
    twenty = [t for t in dense if t["objective"] == 20.0]
    twenty_within_20um = error_statistics(within(twenty, 20))
    for low, high in zip(edges[:-1], edges[1:]):
        bins.append({"bin_um": [low, high], **error_statistics([t for t in twenty if low <= t["true_um"] < high])})
    sparse = [t for t in tiles if t["sparse"]]
    sparse_low = [t for t in sparse if t["tissue_fraction"] < 0.05]
    confident_wrong = [t for t in sparse_low if abs(t["predicted_um"] - t["true_um"]) > 2 * t["uncertainty_um"]
                       and abs(t["predicted_um"] - t["true_um"]) > 2.0]
    sweeps = evaluation["sweeps"]
    baselines = {}
    for name in SHARPNESS_METRICS:
        errors = np.array([s[name]["error_um"] for s in sweeps])
        images = int(np.mean([s["images"] for s in sweeps]))
        spec = evaluation["spec"]
        baselines[name] = {"n": len(errors), "mae_um": float(np.mean(np.abs(errors))),
                           "p95_abs_error_um": float(np.percentile(np.abs(errors), 95)),
                           "images_per_tile": images,
                           "acquisition_s_per_tile": sweep_time_s(images, spec["sweep_step_um"], spec["exposure_ms"]),
                           "compute_ms_per_tile": float(np.mean([s[name]["compute_ms"] for s in sweeps]))}
    single_shot = {"images_per_tile": 1,
                   "acquisition_s_per_tile": evaluation["spec"]["exposure_ms"] / 1e3,
                   "compute_ms_per_tile": float(np.median([t["latency_ms"] for t in tiles])),
                   "backend": estimator_backend}
    return {
        "split": evaluation["split"], "specimens": list(SPLITS[evaluation["split"]].specimen_seeds),
        "20x_within_10um": error_statistics(within(twenty, 10)),
        "20x_within_20um": twenty_within_20um,
        "20x_within_10um_trusted_by_scan": acted_on(within(twenty, 10)),
        "20x_within_20um_trusted_by_scan": acted_on(within(twenty, 20)),
        "20x_within_10um_optics_unknown": error_statistics(
            [t | {"predicted_um": t["predicted_optics_unknown_um"]} for t in within(twenty, 10)]),
        "20x_within_10um_condenser_unknown": error_statistics(
            [t | {"predicted_um": t["predicted_condenser_unknown_um"]} for t in within(twenty, 10)]),
        "by_objective": by_objective, "20x_by_defocus_bin": bins,
        "sparse_fields": {"n": len(sparse), "n_below_5pct_tissue": len(sparse_low),
                          "median_uncertainty_um": float(np.median([t["uncertainty_um"] for t in sparse_low]))
                          if sparse_low else None,
                          "tissue_median_uncertainty_um": twenty_within_20um.get("median_uncertainty_um"),
                          "confident_wrong": len(confident_wrong),
                          "trusted_by_scan": sum(trusts_estimate(t["uncertainty_um"], t["depth_of_field_um"])
                                                 for t in sparse_low)},
        "single_shot": single_shot, "z_sweep_baselines": baselines,
    }


def plot(evaluation: dict, summary: dict, output_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    dense = [t for t in evaluation["tiles"] if not t["sparse"]]
    figure, axis = plt.subplots(figsize=(5.5, 5))
    for magnification, colour in zip(OBJECTIVES, ("tab:blue", "tab:orange", "tab:green")):
        rows = [t for t in dense if t["objective"] == magnification]
        axis.scatter([t["true_um"] for t in rows], [t["predicted_um"] for t in rows], s=6, c=colour,
                     label=f"{magnification:g}x", alpha=0.7)
    axis.plot([-20, 20], [-20, 20], "k--", lw=0.8)
    axis.set(xlabel="true defocus (µm)", ylabel="predicted defocus (µm)", title="Held-out specimens")
    axis.legend()
    scatter = output_dir / "predicted_vs_true.png"
    figure.savefig(scatter, dpi=110, bbox_inches="tight")
    plt.close(figure)
    bins = summary["20x_by_defocus_bin"]
    figure, axis = plt.subplots(figsize=(6.5, 3.5))
    labels = [f"{b['bin_um'][0]}..{b['bin_um'][1]}" for b in bins]
    axis.bar(labels, [b.get("mae_um", 0) for b in bins], color="tab:orange")
    axis.set(xlabel="true defocus bin (µm), 20x/0.75", ylabel="MAE (µm)", title="Error by defocus")
    axis.tick_params(axis="x", rotation=45)
    by_bin = output_dir / "error_by_defocus_bin.png"
    figure.savefig(by_bin, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return [scatter, by_bin]


def write_report(evaluation: dict, summary: dict, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "evaluation.json").write_text(json.dumps({"summary": summary, "raw": evaluation}, indent=1))
    return output_dir / "evaluation.json"


def format_table(summary: dict) -> str:
    lines = ["objective  range    n    MAE µm  MAE 95% CI    median µm  RMSE µm  p95 µm  sign>1µm  in 1σ   in 2σ"]
    for objective, ranges in summary["by_objective"].items():
        for name, s in ranges.items():
            if s["n"]:
                low, high = s["mae_ci95_um"]
                lines.append(f"{objective:<10} {name[7:]:<7} {s['n']:4d}  {s['mae_um']:7.3f}  {low:5.2f}–{high:<5.2f}  "
                             f"{s['median_abs_error_um']:9.3f}  {s['rmse_um']:7.3f} "
                             f"{s['p95_abs_error_um']:7.3f}  {s['sign_accuracy_beyond_1um'] or 0:7.3f}"
                             f"  {s['within_1_sigma']:6.2f}  {s['within_2_sigma']:6.2f}")
    lines.append("")
    lines.append("method                 images/tile  acq s/tile  compute ms  MAE µm   p95 µm")
    single = summary["single_shot"]
    ours = summary["20x_within_10um"]
    lines.append(f"single shot ({single['backend']:<10}) {1:6d}  {single['acquisition_s_per_tile']:10.3f}  "
                 f"{single['compute_ms_per_tile']:10.1f}  {ours['mae_um']:6.3f}  {ours['p95_abs_error_um']:7.3f}")
    for name, b in summary["z_sweep_baselines"].items():
        lines.append(f"z-sweep {name:<22} {b['images_per_tile']:4d}  {b['acquisition_s_per_tile']:10.3f}  "
                     f"{b['compute_ms_per_tile']:10.1f}  {b['mae_um']:6.3f}  {b['p95_abs_error_um']:7.3f}")
    blind = summary["20x_within_10um_optics_unknown"]
    lines.append(f"single shot, NA and pixel size not given: 20x within 10 µm MAE {blind['mae_um']:.3f} µm, "
                 f"sign>1µm {blind['sign_accuracy_beyond_1um']:.3f}")
    no_condenser = summary["20x_within_10um_condenser_unknown"]
    lines.append(f"single shot, condenser not declared: 20x within 10 µm MAE {no_condenser['mae_um']:.3f} µm, "
                 f"sign>1µm {no_condenser['sign_accuracy_beyond_1um']:.3f}")
    for name in ("10", "20"):
        trusted = summary[f"20x_within_{name}um_trusted_by_scan"]
        if trusted["n"]:
            lines.append(f"estimates a scan acts on (sigma < max(DOF/2, 1 µm)), 20x within {name} µm: "
                         f"{trusted['fraction_of_tiles']:.0%} of tiles, MAE {trusted['mae_um']:.3f} µm, "
                         f"p95 {trusted['p95_abs_error_um']:.3f} µm")
    sparse = summary["sparse_fields"]
    lines.append("")
    lines.append(f"near-empty fields (<5% tissue): n={sparse['n_below_5pct_tissue']}, median uncertainty "
                 f"{sparse['median_uncertainty_um']:.2f} µm vs {sparse['tissue_median_uncertainty_um']:.2f} µm on tissue; "
                 f"confidently wrong: {sparse['confident_wrong']}; acted on by a scan: {sparse['trusted_by_scan']}")
    return "\n".join(lines)
