"""The shipped model's card, written from its metadata and its evaluation (no number typed by hand)."""
import json
from pathlib import Path

from wsi_acquisition.optics import STANDARD_OBJECTIVES, Camera
from wsi_autofocus.data import OBJECTIVES, SPLITS
from wsi_autofocus import heldout_imaging, shift_evaluation, slide_calibration
from wsi_autofocus.content import EVALUATION_IMAGES, TRAINING_IMAGES
from wsi_autofocus.data import DENSITY_SCALE_RANGE, NO_PHASE_FRACTION, PHASE_SCALE_RANGE
from wsi_autofocus.evaluate import format_table
from wsi_autofocus.model_io import (CONTEXT_FACTOR, MODEL_OUTPUTS, UNKNOWN_CONDENSER_FRACTION, UNKNOWN_OPTICS_FRACTION,
                                   context_px)
from wsi_autofocus.two_shot_calibration import FINE_TUNE_BATCH, FINE_TUNE_LAYERS, FIT_SUB_FIELD_FRACTION


# The project's accuracy target at 20x/0.75 on held-out specimens (MAE µm within ±10 and ±20 µm, sign).
TARGET_MAE_10_UM, TARGET_MAE_20_UM, TARGET_SIGN_ACCURACY = 0.25, 0.6, 0.98


# Targets on microscopes and content the training never saw (20x, |defocus| <= 10 µm, pooled over the
# held-out imaging models and the real images): MAE µm, sign accuracy, confidently wrong estimates; and the
# MAE after self-calibration from the held-out microscope's own focus-map sweeps.
TARGET_SHIFT_MAE_UM, TARGET_SHIFT_SIGN_ACCURACY, TARGET_SHIFT_CONFIDENTLY_WRONG = 1.0, 0.95, 0
TARGET_CALIBRATED_MAE_UM = 0.3


# Beside the model: how an independent run of the same recipe scored (`record_reproduction`).
REPRODUCTION_FILE = "reproduction.json"


def _target_checks(summary: dict) -> list[tuple[str, bool]]:
    ten, twenty = summary["20x_within_10um"], summary["20x_within_20um"]
    return [(f"MAE {ten['mae_um']:.3f} µm within ±10 µm (target ≤ {TARGET_MAE_10_UM})", ten["mae_um"] <= TARGET_MAE_10_UM),
            (f"MAE {twenty['mae_um']:.3f} µm within ±20 µm (target ≤ {TARGET_MAE_20_UM})",
             twenty["mae_um"] <= TARGET_MAE_20_UM),
            (f"sign {ten['sign_accuracy_beyond_1um']:.1%} beyond 1 µm (target ≥ {TARGET_SIGN_ACCURACY:.0%})",
             ten["sign_accuracy_beyond_1um"] >= TARGET_SIGN_ACCURACY)]


def target_statement(summary: dict) -> str:
    """Whether the evaluation meets the project's 20x target, and by how much it misses where it does not."""
    checks = _target_checks(summary)
    missed = [text for text, met in checks if not met]
    if not missed:
        return "- The project's 20× target is met on the held-out specimens: " + "; ".join(t for t, _ in checks) + "."
    return ("- The project's 20× target is not met: " + "; ".join(missed) + ". The z-sweep baselines above are "
            "more accurate but need 41 images per tile.")


def _held_out_evaluation(model_dir: Path) -> dict:
    """A model's evaluation summary, which must be of the held-out test specimens: the card reports
    and compares nothing else."""
    summary = json.loads((model_dir / "evaluation.json").read_text())
    if summary.get("split", "test") != "test":
        raise ValueError(f"{model_dir / 'evaluation.json'} evaluates the {summary['split']!r} specimens; "
                         "the model card reports the held-out 'test' specimens (wsi-autofocus eval --split test)")
    return summary


def record_reproduction(model_dir: Path, other_run_dir: Path) -> Path:
    """Keep, beside the model, the held-out 20x results of another run of the same recipe (a model
    directory written by `make train-autofocus MODEL_DIR=...`): training is seeded but not bitwise
    deterministic, so a user who retrains gets a model from that spread, not this one."""
    metadata = json.loads((other_run_dir / "metadata.json").read_text())
    summary = _held_out_evaluation(other_run_dir)
    record = {"epochs": len(metadata["history"]), "training_s": metadata["history"][-1]["elapsed_s"],
              "best_val_loss": metadata["best_val_loss"],
              **{key: summary[key] for key in ("20x_within_10um", "20x_within_20um")}}
    path = model_dir / REPRODUCTION_FILE
    path.write_text(json.dumps(record, indent=1))
    return path


def reproduction_statement(record: dict, shipped_best_val_loss: float) -> str:
    ten, twenty = record["20x_within_10um"], record["20x_within_20um"]
    missed = [text for text, met in _target_checks(record) if not met]
    verdict = ("it meets the 20× target too" if not missed else
               "it misses the 20× target: " + "; ".join(missed) + " — the recipe sits at the target, "
               "and a retrained model may land on either side of it")
    return ("- Run to run: training is seeded but not bitwise deterministic (multi-threaded CPU kernels; the time "
            "budget sets the epoch count). Another run of `make train-autofocus` "
            f"({record['epochs']} epochs in {record['training_s'] / 60:.0f} min, best validation loss "
            f"{record['best_val_loss']:.3f} against {shipped_best_val_loss:.3f} here) scored on the same held-out "
            f"tiles: 20× MAE {ten['mae_um']:.3f} µm within ±10 µm (95 % interval {ten['mae_ci95_um'][0]:.2f}–"
            f"{ten['mae_ci95_um'][1]:.2f}), {twenty['mae_um']:.3f} µm within ±20 µm, sign "
            f"{ten['sign_accuracy_beyond_1um']:.1%}; {verdict}.")


def shipped_scan_outcome(single_shot_model_dir: Path) -> dict | None:
    """The scan outcome table, from its one home (the shipped two-shot model's evaluation, `wsi-autofocus
    eval-two-shot`), when it was measured with this single-shot model (its checkpoint) and the shipped two-shot
    model; else None."""
    from wsi_autofocus.two_shot import default_model_path

    path = default_model_path()
    evaluation = json.loads((path.parent / "evaluation.json").read_text())
    if (not (Path(single_shot_model_dir) / "model.pt").exists() or evaluation.get("scan_outcome_models")
            != shift_evaluation.scan_outcome_models(single_shot_model_dir, path)):
        return None
    return evaluation["scan_outcome_20x"]


def shift_statement(shift: dict, calibration: dict, slide_calibration_results: dict | None,
                    scan_outcome: dict | None, model_dir: Path) -> list[str]:
    """Card lines for the evaluation under held-out imaging: the table, the pooled 20x figures against the
    targets, and self-calibration, all from the evaluation summary; the scan outcome (`shipped_scan_outcome`)
    where it was measured with this model."""
    checks = shift_target_checks(shift["pooled_20x"]["held_out_imaging_real_content"])
    calibrations = (("other specimens", calibration), ("the slide itself", slide_calibration_results))
    checks += [calibration_target_check(where, results, "wsi-autofocus eval") for where, results in calibrations]
    remeasure = f"wsi-autofocus eval-two-shot --card --single-shot-model {model_dir}"
    checks.append(scan_outcome_target_check(scan_outcome) if scan_outcome is not None else
                  (f"scan outcome not measured with this model (`{remeasure}`)", False))
    met = [text for text, ok in checks if ok]
    missed = [text for text, ok in checks if not ok]
    scopes = "; ".join(f"`{scope.name}`: {scope.description}" for scope in heldout_imaging.HELD_OUT_SCOPES.values())
    return [
        "## Microscopes and content it never trained on (`wsi-autofocus eval`, `wsi_autofocus.shift_evaluation`)",
        "Held-out imaging: a second image formation written apart from training's (`wsi_autofocus.heldout_imaging`: "
        "Abbe summation over condenser points of the full complex transmission, Seidel aberrations with "
        f"apodisation, Bayer sensors with demosaicing, Poisson noise), three microscopes: {scopes}. "
        f"Real content: {', '.join(f'`{name}`' for name in EVALUATION_IMAGES)} (real bright-field images from "
        "pinned wheels), used as specimens only here. Neither is used in training or in tuning on `--split val`. "
        "Each tile is estimated as the autofocus node does it (the tile's NA and pixel size, the condenser its "
        "microscope declares: `shift_evaluation.imaging_condenser`); `acted` is the share "
        "a scan would act on, `wrong` those of them off by more than max(1 µm, half the depth of field).",
        "",
        "```",
        shift_evaluation.format_table(shift),
        "",
        shift_evaluation.format_calibration(calibration),
        "",
        slide_calibration.format_slide_calibration(slide_calibration_results) if slide_calibration_results
        else f"{slide_calibration.TITLE}: not in this evaluation",
        "```",
        "",
        "Calibrating on sweeps of the slide being scanned (as `ScanSlide.calibrate_autofocus` does from the scan's "
        "own focus map; `wsi_autofocus.slide_calibration`: sweep and test fields never overlap) teaches the side "
        "cue of that microscope on that tissue; sweeps of other specimens teach a cue that need not carry over. "
        + shift_evaluation.CALIBRATION_COLUMNS_NOTE,
        "",
        "What a scan makes of these estimates (`scan_outcome_table`, measured by `wsi-autofocus eval-two-shot` with "
        "this model and the shipped two-shot model): each 20× tile is taken at its defocus as "
        "if the focus map had left it there, then the scan's own rules run (`wsi_acquisition.focus`: correct "
        "a trusted estimate; for a tile surely out of focus whose side is in doubt, one more exposure as far "
        "above as the estimated distance, read together with the tile by the two-shot model (`two_shot`, its own "
        "card) when that is trusted or sure of the side, else its distance estimate or sharpness tells the side; "
        "a correction whose capture still reads surely out of focus is followed by one more capture where the "
        "two bracket focus, at the point dividing the correction in the ratio of their estimated distances, and one "
        "whose capture lost sharpness by one more the same distance the other way; the "
        "sharpest correction kept only if sharper than the focus map's capture), re-imaging the field under the "
        "same microscope. `map |d|` and `scan |d|` are "
        "the mean distance from focus before and after; `in focus` the tiles within half the depth of field, "
        "before -> after; `worse` the tiles left further from focus than the focus map left them; "
        "`bracketed` the tiles that took the bracketing capture, `other way` those whose correction was tried the "
        "other way; "
        "`shots/tile` the exposures per tile (1: the focus map's capture alone).",
        "",
        "```",
        shift_evaluation.format_scan_outcomes(scan_outcome) if scan_outcome is not None else
        f"not measured with this model and the shipped two-shot model: {remeasure}",
        "```",
        *[f"- `{imaging}`: {o['tiles_worse']} tile(s) ended up to {o['worst_change_um']:.2f} µm further from this "
          "microscope's best focus (as the evaluation defines it) than the focus map left them, in images the "
          "scan's sharpness measure (Brenner) found sharper: keep-if-sharper follows sharpness, which need not "
          "peak at that focus nor fall equally on both sides of it."
          for imaging, o in (scan_outcome or {}).items() if o["tiles_worse"]],
        "",
        *([f"- Targets met: {'; '.join(met)}."] if met else []),
        *([f"- Targets not met: {'; '.join(missed)}."] if missed else []),
    ]


def render(model_dir: Path) -> str:
    metadata = json.loads((model_dir / "metadata.json").read_text())
    summary = _held_out_evaluation(model_dir)
    patch_px = metadata["patch_px"]
    field_px = context_px(patch_px)
    forty_x_pixel_um = Camera().specimen_pixel_size_um(STANDARD_OBJECTIVES[40.0])
    history = metadata["history"]
    training = metadata["training"]
    best = min(history, key=lambda h: h["val_loss"])
    train, val, test = SPLITS["train"], SPLITS["val"], SPLITS["test"]
    twenty = summary["20x_within_10um"]
    trusted = summary["20x_within_10um_trusted_by_scan"]
    lines = [
        f"# Model card: {metadata['name']} v{metadata['version']}",
        "",
        "Single-shot autofocus for bright-field whole-slide scanning: predicts, from one RGB tile, how far the",
        "stage is from the focal plane (µm) with a one-sigma uncertainty, and the probability that it is above",
        "focus; a scan combines them into a signed defocus (positive = stage above focus) whose uncertainty",
        "includes the doubt about the side.",
        "",
        "## Model",
        f"- Architecture: `{metadata['architecture']}` (plain torch.nn ResNet, `wsi_autofocus.model`). Inputs: "
        f"a {patch_px}×{patch_px} px RGB patch in [0, 1], the {field_px}×{field_px} px field around it averaged "
        f"down {CONTEXT_FACTOR}× to {field_px // CONTEXT_FACTOR}×{field_px // CONTEXT_FACTOR} px, and the "
        "optics (objective NA, pixel size µm, the condenser's outer and inner fill as fractions of the NA as the "
        "scanner declares it; 0 = unknown). The ResNet reads the patch; radially averaged log power "
        "spectra of the patch and of the field join it in the head. "
        f"Output columns: {', '.join(f'`{name}`' for name in MODEL_OUTPUTS)}.",
        f"- Per tile: the {metadata['patches_per_tile']} most tissue-rich patches, inverse-variance weighted median, "
        "uncertainty from the model's variance and the patches' spread; side from the patches' weighted mean "
        "logit. Temperatures fitted on the validation set (never trained on): the distance's sigma is scaled by "
        f"{metadata['uncertainty_scale']:.2f}, the side's logit divided by {metadata['side_temperature']:.2f}. "
        "The signed estimate's sigma adds 4 d² p (1 − p) for a side known with probability p.",
        "- Files: `model.pt` (checkpoint), `model.onnx` (opset 17, dynamic batch), `model.torchscript.pt`.",
        "",
        "## Data (all simulated: the virtual microscope and randomised optics)",
        "- Bright field with partially coherent Köhler illumination (condenser at 70 % of the objective NA); "
        "specimens that absorb (stains) and delay the light (weak phase, 0.2–0.5 rad), so defocus shows as "
        "blur and as phase contrast whose sign flips through focus (see `src/wsi_acquisition/README.md`).",
        f"- Train: specimens (slide seeds) {train.specimen_seeds[0]}–{train.specimen_seeds[-1]}, "
        f"{train.samples_per_specimen} {field_px} px fields each; validation: seeds {val.specimen_seeds[0]}–{val.specimen_seeds[-1]}, "
        f"{val.samples_per_specimen} each. Held-out test specimens: seeds {test.specimen_seeds[0]}–{test.specimen_seeds[-1]}, "
        "never seen in training or validation (split by specimen).",
        f"- Objectives {', '.join(f'{m:g}× ({w / sum(train.objective_weights):.0%})' for m, w in zip(OBJECTIVES, train.objective_weights))}; defocus uniform over ±{train.max_defocus_um:g} µm "
        "(half the samples within ±10 µm); exposure 3–10 ms; H&E and IHC stains; "
        f"{train.sparse_fraction:.0%} of samples at random positions including bare glass.",
        f"- {train.randomised_fraction:.0%} of the fields are imaged instead through a microscope drawn at random "
        "per 8 samples (`wsi_autofocus.training_optics`: 2-D weak-object transfer; NA within the objective's class, "
        "camera pixel, condenser fill, Zernike aberrations of random sign, pupil taper, channel wavelengths and "
        "chromatic focus shifts; camera photon budget, read noise, white balance, response curve, illumination "
        "fall-off, Bayer mosaic, JPEG), with the specimen's phase scaled by "
        f"{PHASE_SCALE_RANGE[0]}–{PHASE_SCALE_RANGE[1]} (none for {NO_PHASE_FRACTION:.0%}) and its density by "
        f"{DENSITY_SCALE_RANGE[0]}–{DENSITY_SCALE_RANGE[1]}; {train.texture_fraction:.0%} of those show textures re-stained as tissue instead of procedural "
        f"tissue ({len(TRAINING_IMAGES)} images: scikit-image's photographs and StarDist's H&E crop, "
        f"{len(val.texture_images)} of them kept for validation).",
        "- Augmentation that keeps the focus ordering: flips, 90° rotations, exposure, per-channel gain, mild contrast. "
        f"No blur or sharpening. {UNKNOWN_OPTICS_FRACTION:.0%} of samples are shown with unknown optics (all 0), "
        f"{UNKNOWN_CONDENSER_FRACTION:.0%} with the condenser not declared (its fills 0); the others with the "
        "condenser each field was imaged under.",
        "",
        "## Training",
        "- Reproduce: `make train-autofocus` (renders the data, trains, exports, evaluates, writes this card).",
        f"- Loss: Gaussian negative log-likelihood, each sample weighted by its predicted variance to the power "
        f"{training.get('loss_beta', 0)} (β-NLL: hard fields stay in the fit), plus 0.2 × L1; beside it a "
        "training-only head on the patch alone with a plain NLL keeps the ResNet precise near focus "
        "(`training.training_loss`).",
        f"- AdamW (lr {training['learning_rate']}, weight decay {training['weight_decay']}), ReduceLROnPlateau "
        f"with a linear decay to 2 % over the last {training.get('anneal_fraction', 0):.0%} of the run, "
        f"early stopping (patience {training['early_stopping_patience']}), batch {training['batch_size']}, "
        f"seed {training['seed']}, {training['threads']} CPU threads."
        + (f" The model judged each epoch, kept and exported is the exponential moving average of the weights and the "
           f"batch norms' statistics (decay {training['weight_average_decay']} per step)."
           if training.get("weight_average_decay") else ""),
        f"- {len(history)} epochs in {history[-1]['elapsed_s'] / 60:.0f} min; best epoch {best['epoch']} "
        f"(validation MAE {best['val_mae_um']:.3f} µm on patches).",
        *([reproduction_statement(json.loads((model_dir / REPRODUCTION_FILE).read_text()), metadata["best_val_loss"])]
          if (model_dir / REPRODUCTION_FILE).exists() else []),
        "",
        "## Held-out evaluation (`wsi-autofocus eval`)",
        f"20×/0.75, |defocus| ≤ 10 µm: MAE {twenty['mae_um']:.3f} µm (95 % bootstrap interval over the tiles "
        f"{twenty['mae_ci95_um'][0]:.2f}–{twenty['mae_ci95_um'][1]:.2f} µm; "
        f"median {twenty['median_abs_error_um']:.3f} µm), RMSE {twenty['rmse_um']:.3f} µm, "
        f"p95 {twenty['p95_abs_error_um']:.3f} µm, sign correct {twenty['sign_accuracy_beyond_1um']:.1%} "
        "for |defocus| > 1 µm; "
        "the virtual microscope's condenser declared, as the bring-up graph declares it to the autofocus node "
        "(not declared: the line below the table).",
        "",
        f"A scan moves the stage only on estimates it trusts (`wsi_acquisition.focus.trusts_estimate`): within "
        f"±10 µm that is {trusted['fraction_of_tiles']:.0%} of the 20× tiles, with MAE {trusted['mae_um']:.3f} µm. "
        "Where it trusts the distance but not the side it takes one more exposure higher up; the two exposures "
        "together give the defocus (the two-shot model, `models/two_shot/MODEL_CARD.md`) or at least settle the side "
        "from blur alone (`wsi_acquisition.focus.side_after_probe`); the others stay at the focus map's z, and any "
        "correction is kept only if the corrected capture is sharper.",
        "",
        "```",
        format_table(summary),
        "```",
        "",
        "## Limits",
        "- Trained on simulated optics only. A real scanner's optics differ from all of them; calibrate on its "
        "own focus-map sweeps (`wsi-autofocus calibrate`, or `wsi scan --calibrate-autofocus`), and the scan "
        "keeps a correction only when the corrected capture is sharper than the focus map's.",
        "- Bright-field, RGB, H&E/IHC-like stains; not fluorescence.",
        f"- 40×/0.95 beyond a few µm: the {field_px} px context field is {field_px * forty_x_pixel_um:.0f} µm wide at 40× "
        "and the blur disc grows by 3 µm per µm of defocus, so far from focus the field holds little structure "
        "to read; check the 40× rows above before relying on 40× estimates away from focus.",
        target_statement(summary),
        "",
        *shift_statement(summary["shift"], summary["calibration_under_held_out_imaging"],
                         summary.get("calibration_on_the_slide"), shipped_scan_outcome(model_dir), model_dir),
    ]
    return "\n".join(lines) + "\n"


def shift_target_checks(pooled: dict) -> list[tuple[str, bool]]:
    """The held-out imaging x real content targets (20x pooled) as (statement, met)."""
    return [(f"MAE {pooled['mae_um']:.2f} µm (target ≤ {TARGET_SHIFT_MAE_UM})",
             pooled["mae_um"] <= TARGET_SHIFT_MAE_UM),
            (f"sign {pooled['sign_accuracy_beyond_1um']:.0%} beyond 1 µm (target ≥ {TARGET_SHIFT_SIGN_ACCURACY:.0%})",
             pooled["sign_accuracy_beyond_1um"] >= TARGET_SHIFT_SIGN_ACCURACY),
            (f"{pooled['confidently_wrong']} confidently wrong (target {TARGET_SHIFT_CONFIDENTLY_WRONG})",
             pooled["confidently_wrong"] <= TARGET_SHIFT_CONFIDENTLY_WRONG)]


def own_simulator_target_check(pooled: dict) -> tuple[str, bool]:
    """The held-out specimens through the training's own virtual microscope (20x pooled) against the project's
    20x target, as (statement, met): generalising must not cost what the model reads at home."""
    return (f"own simulator, held-out specimens MAE {pooled['mae_um']:.2f} µm (target ≤ {TARGET_MAE_10_UM})",
            pooled["mae_um"] <= TARGET_MAE_10_UM)


def calibration_target_check(where: str, results: dict | None, command: str) -> tuple[str, bool]:
    """The MAE after self-calibration under each held-out microscope (`calibrated_statistics` results by
    name) against its target, as (statement, met)."""
    if not results:
        return f"self-calibration on {where}: not in this evaluation (re-run `{command}`)", False
    after = [(name, result["after"]["mae_um"]) for name, result in results.items()]
    against_sweeps = ""
    if all("after_mae_tile_sweep_focus_um" in result for result in results.values()):
        against_sweeps = "; against each tile's own sweep focus " + ", ".join(
            f"{result['after_mae_tile_sweep_focus_um']:.2f}" for result in results.values())
    return (f"after self-calibration on {where} MAE {', '.join(f'{name} {mae:.2f}' for name, mae in after)} "
            f"µm (target ≤ {TARGET_CALIBRATED_MAE_UM}{against_sweeps})",
            all(mae <= TARGET_CALIBRATED_MAE_UM for _, mae in after))


def calibration_draws_target_check(where: str, over: dict) -> tuple[str, bool]:
    """The mean MAE after self-calibration on `where` over independent draws (`shift_evaluation.over_draws`) of each
    calibration against its target, as (statement, met)."""
    results = over["microscopes"]
    means = ", ".join(f"{name} {r['mean_mae_after_um']:.2f} ± {r['sd_mae_after_um']:.2f}"
                      for name, r in results.items())
    single = ", ".join(f"{sum(mae <= TARGET_CALIBRATED_MAE_UM for mae in r['mae_after_um'])}/{len(r['mae_after_um'])}"
                       for r in results.values())
    return (f"after self-calibration on {where} mean MAE over {len(over['seeds'])} draws of {over['sweeps']} "
            f"sweeps {means} µm (target ≤ {TARGET_CALIBRATED_MAE_UM}; single draws within it {single})",
            all(r["mean_mae_after_um"] <= TARGET_CALIBRATED_MAE_UM for r in results.values()))


def scan_outcome_target_check(scan_outcome: dict) -> tuple[str, bool]:
    """The scan with inline autofocus against focus-map-only on every microscope of the scan outcome table:
    no tile may end further from focus, as (statement, met)."""
    worse = sum(outcome["tiles_worse"] for outcome in scan_outcome.values())
    return (f"{worse} of {sum(outcome['n'] for outcome in scan_outcome.values())} tiles left further from focus by "
            "the scan than by the focus map alone (target 0)", worse == 0)


def self_calibrated_scan_outcome_checks(results: dict) -> list[tuple[str, bool]]:
    """`scan_outcome_target_check` of the scan outcome on the slide itself
    (`slide_calibration.self_calibrated_scan_outcomes`), once per pair of models it was measured with."""
    configurations = next(iter(results.values()))["outcomes"]
    return [(f"on the slide itself with {configuration}: {text}", met) for configuration in configurations
            for text, met in [scan_outcome_target_check({name: result["outcomes"][configuration]
                                                         for name, result in results.items()})]]


def render_two_shot(model_path: Path, evaluation: dict) -> str:
    """The two-shot model's card, from its metadata and its evaluation under held-out imaging."""
    from wsi_autofocus import two_shot, two_shot_training

    model = two_shot.TwoShotModel.load(model_path)
    meta = model.metadata
    near, wide = (two_shot_training.PAIR_SPLITS["train"][name] for name in ("near", "wide"))
    windowed = ("its training pairs were read so too" if meta.get("sub_window") else
                "its training pairs were read through the whole field's window, before the sub-fields")
    ring_pairs = sum(spec.pairs_per_specimen for name, spec in two_shot_training.PAIR_SPLITS["train"].items()
                     if name.startswith("ring"))
    calibration = evaluation.get("calibration_under_held_out_imaging")
    on_the_slide = evaluation.get("calibration_on_the_slide")
    checks = shift_target_checks(evaluation["pooled_20x"]["held_out_imaging_real_content"])
    checks.append(own_simulator_target_check(evaluation["pooled_20x"]["own_simulator_procedural"]))
    draws, slide_draws = evaluation.get("calibration_draws"), evaluation.get("calibration_on_the_slide_draws")
    checks += [calibration_draws_target_check(where, over) if over else
               calibration_target_check(where, results, "wsi-autofocus eval-two-shot")
               for where, results, over in (("other specimens", calibration, draws),
                                            ("the slide itself", on_the_slide, slide_draws))]
    checks.append(scan_outcome_target_check(evaluation["scan_outcome_20x"]))
    scan_on_the_slide = evaluation.get("scan_outcome_on_the_slide")
    checks += self_calibrated_scan_outcome_checks(scan_on_the_slide) if scan_on_the_slide else []
    lines = [
        "# Model card: two-shot defocus",
        "",
        "Predicts the signed defocus of a field (µm, positive = stage above focus) and its one-sigma uncertainty "
        "from two exposures of it, the second a known step higher (`wsi_autofocus.two_shot`). The ratio of the two "
        "images' power spectra in bands of spatial frequency (units of NA/λ) cancels the specimen; an ensemble of "
        f"{meta['config']['members']} perceptrons ({meta['config']['layers']} hidden layers of "
        f"{meta['config']['hidden']}) maps the ratios, the bands' power, the step (in depths of focus λ/NA²) and the "
        "condenser the scanner declares (`two_shot.Condenser`: the source's outer and inner edge as fractions of the "
        "objective NA, or not known) to the defocus in depths of focus; the members' spread joins their own "
        "variance. The condenser matters because a defocused absorber's blur is the shadow of the illumination "
        "cone: the same blur is less defocus under a wider condenser.",
        "",
        "## Data and training (`make train-two-shot`)",
        f"- {meta['train_pairs']} training pairs, {meta['val_pairs']} validation pairs of {wide.field_px} px fields "
        f"(`two_shot_training.PAIR_SPLITS`): steps {near.step_depths[0]:g}-{near.step_depths[1]:g} depths of focus "
        f"(a third of them) and {wide.step_depths[0]:g}-{wide.step_depths[1]:g} (log-uniform), defocus within "
        f"±{wide.max_defocus_um:g} µm; {wide.virtual_microscope_fraction:.0%} through the virtual microscope, the rest "
        f"through microscopes drawn at random (`training_optics`; {wide.annular_fraction:.0%} of them with ring "
        f"illumination, {wide.rim_weighted_fraction:.0%} with pupils brighter at the rim), {wide.texture_fraction:.0%} "
        f"of those showing re-stained training textures; {ring_pairs} pairs per training specimen more "
        "as the wide ones but every microscope ring-lit. Specimens and textures split as the single-shot model's; "
        "the held-out microscopes and the real images below are never seen. Features: per band of spatial "
        f"frequency ({len(two_shot.BAND_EDGES) - 1} bands from {two_shot.BAND_EDGES[0]:g} to "
        f"{two_shot.BAND_EDGES[-1]:g} NA/λ, spaced by ratio below 0.3) the log power ratio of the two exposures, "
        "their mean log power, whether the band is sampled, through a Hann window over the field or, where the "
        f"field's tissue lies off its centre, over the sub-field {two_shot.SUB_WINDOW_FRACTION:.0%} of its width "
        f"that holds the most of it (`two_shot.field_window`; {windowed}). Each pair's condenser as drawn, hidden "
        f"(not known) for {meta['config'].get('unknown_condenser_fraction', 0):.0%} of the pairs.",
        f"- Gaussian negative log-likelihood, AdamW, early stopping on the validation pairs, {meta['train_s']:.0f} s "
        f"for the ensemble on 2 CPU cores; sigma scaled by {meta['sigma_temperature']:.2f} on the validation pairs.",
        "",
        "## Microscopes and content it never trained on (`wsi-autofocus eval-two-shot`)",
        "The same tiles as the single-shot model's table (`wsi_autofocus.shift_evaluation`); the second exposure "
        "is the same field imaged again by the same microscope one step higher. Each microscope declares its "
        "condenser (`shift_evaluation.imaging_condenser`): the virtual microscope's disc, the held-out disc and "
        "ring as they are, the Gaussian-weighted source as the uniform disc of the same rms radius; the next table "
        "reads the same pairs with the condenser not known.",
        "",
        "```",
        shift_evaluation.format_two_shot(evaluation),
        "```",
        "",
        "The same pairs with the condenser not known (`two_shot.UNKNOWN_CONDENSER`, as a scanner that does not "
        "declare it):",
        "",
        "```",
        shift_evaluation.format_two_shot(evaluation["condenser_not_known"]) if "condenser_not_known" in evaluation
        else "not in this evaluation",
        "```",
        "",
        "A scan reads its side probes (`wsi_acquisition.focus`: a second exposure above a tile whose distance from "
        "focus the single shot knows but not the side) with this model and moves to the estimated focus when the "
        "estimate is trusted or sure of the side (`focus.two_shot_offset`); a correction that still reads surely out "
        "of focus went through focus or stopped short, and one more capture where the two bracket it "
        "(`focus.bracketing_offset`) finds it when it went through (distances read on a microscope the models never "
        "saw can be off by a factor); a correction whose capture lost sharpness went the wrong way and is tried the "
        "other way (`focus.correction_captures`); the sharpest capture is kept only if sharper than the focus map's. "
        "What that makes of the same tiles (columns as in the single-shot card):",
        "",
        "```",
        shift_evaluation.format_scan_outcomes(evaluation["scan_outcome_20x"]),
        "```",
        "",
        "## Self-calibration (`wsi_autofocus.two_shot_calibration`, `wsi-autofocus calibrate`)",
        "Every two images of a focus-map sweep 1-12 depths of focus apart are a labelled pair, read through the "
        "field window and, for the fit, again through the field's four corner sub-fields of "
        f"{FIT_SUB_FIELD_FRACTION:.0%} of its size (`two_shot_calibration.FIT_SUB_FIELD_FRACTION`); each "
        f"member's last {FINE_TUNE_LAYERS} hidden layers and defocus output are fine-tuned on them, each step on "
        f"{FINE_TUNE_BATCH} pairs drawn at random, pulled towards the trained weights "
        "(`two_shot_calibration.fine_tune`), sigma's temperature on the held-back third of the sweeps, read through "
        "the field window only (never below the trained one). Nine sweeps of validation "
        "specimens under each held-out microscope, judged on that microscope's 20x tiles above (other specimens and "
        "real content); then nine sweeps of a slide, judged on other fields of it. Each is shown in full for one draw "
        "of the sweeps, then as the same calibration on independent draws (which fields are swept, and on a slide "
        "which are tested; where each sweep starts; the camera's noise), by whose mean its target is judged "
        "(`shift_evaluation.calibration_draws`): one draw's MAE moves by more than the recipes differ.",
        "",
        "```",
        shift_evaluation.format_calibration(calibration, shift_evaluation.TWO_SHOT_CALIBRATION_TITLE) if calibration
        else "not in this evaluation",
        "",
        shift_evaluation.format_over_draws(draws, TARGET_CALIBRATED_MAE_UM, shift_evaluation.DRAWS_TITLE) if draws
        else "calibration over independent draws of sweeps: not in this evaluation",
        "",
        slide_calibration.format_slide_calibration(on_the_slide, slide_calibration.TWO_SHOT_TITLE) if on_the_slide
        else f"{slide_calibration.TWO_SHOT_TITLE}: not in this evaluation",
        "",
        shift_evaluation.format_over_draws(slide_draws, TARGET_CALIBRATED_MAE_UM, slide_calibration.DRAWS_TITLE)
        if slide_draws else "calibration on the slide itself over independent draws: not in this evaluation",
        "```",
        "",
        "On the slide itself is how a scan calibrates (`ScanSlide.calibrate_autofocus`: the focus map's sweeps of the "
        "slide being scanned; `wsi_autofocus.slide_calibration`: sweep and test fields never overlap). "
        + shift_evaluation.CALIBRATION_COLUMNS_NOTE,
        "",
        "What a scan that calibrates itself makes of the slide's other fields (`ScanSlide.calibrate_autofocus`: both "
        "models calibrated on the nine sweeps, `calibration.calibrate_both`; the single-shot calibration serves that "
        "scan's tiles only), beside the shipped models and the calibrated two-shot model alone (what a later scan is "
        "served), measured as the scan outcome above (`slide_calibration.self_calibrated_scan_outcomes`; the fields "
        "re-imaged for each correction):",
        "",
        "```",
        shift_evaluation.format_calibrated_scan_outcomes(scan_on_the_slide, slide_calibration.SCAN_OUTCOME_TITLE)
        if scan_on_the_slide else f"{slide_calibration.SCAN_OUTCOME_TITLE}: not in this evaluation",
        "```",
        "",
        "- Targets met: " + ("; ".join(text for text, ok in checks if ok) or "none"),
        "- Targets not met: " + ("; ".join(text for text, ok in checks if not ok) or "none"),
    ]
    return "\n".join(lines) + "\n"
