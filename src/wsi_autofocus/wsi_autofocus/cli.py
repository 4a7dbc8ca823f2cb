"""wsi-autofocus: make the data, train, evaluate and benchmark the focus model.

    wsi-autofocus generate [--data-dir D]          render train/val/test splits with the virtual microscope
    wsi-autofocus train [--data-dir D] [--output M]  train and export (model.pt, model.onnx, TorchScript)
    wsi-autofocus eval [--model M] [--backend B]   held-out specimens: metrics, baselines, plots; the table
                                                   over content sources x held-out microscopes x objectives;
                                                   self-calibration under each held-out microscope
    wsi-autofocus calibrate --scan SCAN_DIR [--scanner NAME] [--store DIR]
                                                   fine-tune the models on a scan's focus-map sweeps and
                                                   store them for that scanner, objective and camera (the
                                                   single-shot model only while that scan's tiles are to come)
    wsi-autofocus train-two-shot [--data-dir D] [--output F]
                                                   render exposure pairs and train the two-shot model
    wsi-autofocus eval-two-shot [--model F]        the held-out imaging table for two exposures a step apart, and
                                                   what a scan makes of both models' estimates (scan outcome)
    wsi-autofocus card [--model M] [--reproduction R]  write MODEL_CARD.md from the model's metadata and
                                                   evaluation (R: another run of the recipe, recorded beside it)
"""
import argparse
import json
import sys
from pathlib import Path

from wsi_autofocus import data, shift_evaluation, slide_calibration
from wsi_autofocus.inference import FocusEstimator, default_model_dir, load_backend
from wsi_autofocus.two_shot import CondenserDeclaration, TwoShotError, TwoShotModel
from wsi_autofocus.two_shot import default_model_path as default_two_shot_path

DEFAULT_DATA_DIR = Path("build/autofocus-data")


def command_generate(args) -> int:
    for split in args.splits:
        path = args.data_dir / f"{split}.npz"
        if data.is_current(path, data.split_description(data.SPLITS[split])) and not args.force:
            print(f"{path} is current (use --force to render again)")
            continue
        data.generate(data.SPLITS[split], path, workers=args.workers)
        print(f"wrote {path}")
    return 0


def command_train(args) -> int:
    from wsi_autofocus.training import TrainingConfig, train

    splits = {name: data.load(args.data_dir / f"{name}.npz") for name in ("train", "val")}
    config = TrainingConfig(time_budget_s=args.time_budget, epochs=args.epochs, seed=args.seed)
    result = train(splits["train"], splits["val"], config, args.output, log=lambda line: print(line, flush=True))
    print(f"best validation loss {result['best_val_loss']:.4f}; model written to {args.output}")
    return 0


def command_eval(args) -> int:
    from wsi_autofocus.evaluate import EvaluationSpec, format_table, plot, run_evaluation, summarize, write_report

    backend, skipped = load_backend(args.backend, args.model, threads=args.threads)
    for reason in skipped:
        print(f"skipped backend: {reason}")
    estimator = FocusEstimator(backend, args.model, patches_per_tile=args.patches_per_tile)
    spec = EvaluationSpec(tiles_per_specimen_and_objective=args.tiles)
    evaluation = run_evaluation(estimator, spec, split=args.split)
    summary = summarize(evaluation, backend.name)
    if args.split == "test" and not args.skip_shift:
        # Held-out microscopes and real content are test data too: never evaluated while tuning (--split val).
        shift_spec = shift_evaluation.ShiftSpec(tiles_per_cell=args.shift_tiles)
        tiles = shift_evaluation.render_tiles(shift_spec, args.cache_dir, workers=args.workers)
        tiles = shift_evaluation.with_sweep_focus(shift_spec, tiles, shift_evaluation.CalibrationSpec(),
                                                  args.cache_dir, args.workers)
        estimates = shift_evaluation.estimate_tiles(estimator, tiles)
        summary["shift"] = shift_evaluation.summarize(tiles, estimates)
        summary["calibration_under_held_out_imaging"] = shift_evaluation.calibration_check(
            args.model, shift_evaluation.CalibrationSpec(), tiles, args.cache_dir, args.backend)
        summary["calibration_on_the_slide"] = slide_calibration.slide_calibration_check(
            args.model, slide_calibration.SlideCalibrationSpec(), args.cache_dir, args.backend)
    report = write_report(evaluation, summary, args.output)
    plots = plot(evaluation, summary, args.output)
    print(format_table(summary))
    if "shift" in summary:
        print()
        print(shift_evaluation.format_table(summary["shift"]))
        print(shift_evaluation.format_calibration(summary["calibration_under_held_out_imaging"]))
        print(slide_calibration.format_slide_calibration(summary["calibration_on_the_slide"]))
    print(f"report: {report}; plots: {', '.join(map(str, plots))}")
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=1))
    return 0


def command_calibrate(args) -> int:
    """Both models on a scan's sweeps, each on its own (as the autofocus node's CalibrateAutofocus)."""
    from wsi_autofocus.calibration import calibrate_both
    from wsi_autofocus.calibration_store import CalibrationStore, stacks_from_scan

    try:
        declaration = CondenserDeclaration(args.condenser_fill, args.condenser_inner_fill, args.condenser_na,
                                           args.condenser_inner_na)
        sweeps = stacks_from_scan(args.scan)
        condenser = declaration.for_objective(sweeps.optics["numerical_aperture"])
    except TwoShotError as error:
        print(f"wsi-autofocus calibrate: {error}", file=sys.stderr)
        return 2
    optics, scan_id = sweeps.optics, sweeps.scan_id
    key = (optics["objective_magnification"], optics["numerical_aperture"], optics["pixel_size_um"])
    output = args.output or CalibrationStore(args.store, args.scanner).model_dir(*key)
    # Into the store a single-shot model serves only its own scan's tiles; one asked for by --output is the user's.
    result = calibrate_both(sweeps.stacks, output, args.model, args.two_shot_model, {"name": args.scanner} | optics,
                            print, condenser, scan_id, tiles_follow=sweeps.tiles_follow or args.output is not None)
    if result.single_shot is not None:
        single = result.single_shot
        print(f"single-shot model calibrated on {single.stacks} sweeps ({single.images} images) in "
              f"{single.fit_s:.0f} s: held-back sweeps MAE {single.held_back_mae_before_um:.2f} -> "
              f"{single.held_back_mae_after_um:.2f} µm; model: {single.model_dir} (the autofocus node serves it to "
              f"scan {scan_id}'s tiles only: a slide's side cue need not carry over to the next slide)")
    if result.two_shot is not None:
        pair = result.two_shot
        print(f"two-shot model calibrated on {pair.pairs} pairs of {pair.stacks} sweeps in {pair.fit_s:.1f} s: "
              f"held-back sweeps MAE {pair.held_back_mae_before_um:.2f} -> {pair.held_back_mae_after_um:.2f} µm; "
              f"model: {pair.path} (served to every scan with these optics)")
    if result.not_fitted:
        print(result.not_fitted)
    for error in result.errors:
        print(f"not calibrated: {error}")
    return 0 if result.single_shot is not None or result.two_shot is not None else 1


def command_train_two_shot(args) -> int:
    from wsi_autofocus.two_shot_training import PAIR_SPLITS, split_pairs, train_two_shot

    splits = {split: split_pairs(sets, args.data_dir, split, args.workers, log=lambda line: print(line, flush=True))
              for split, sets in PAIR_SPLITS.items()}
    model = train_two_shot(splits["train"], splits["val"], log=lambda line: print(line, flush=True))
    print(f"wrote {model.save(args.output)}")
    return 0


def command_eval_two_shot(args) -> int:
    from wsi_autofocus.model_card import TARGET_CALIBRATED_MAE_UM

    model = TwoShotModel.load(args.model)
    spec = shift_evaluation.ShiftSpec(tiles_per_cell=args.shift_tiles)
    tiles = shift_evaluation.render_tiles(spec, args.cache_dir, workers=args.workers)
    tiles = shift_evaluation.with_sweep_focus(spec, tiles, shift_evaluation.CalibrationSpec(), args.cache_dir,
                                              args.workers)
    refocuser = shift_evaluation.Refocuser(spec, args.cache_dir)
    estimates = shift_evaluation.two_shot_estimates(model, tiles, refocuser, args.workers)
    evaluation = shift_evaluation.two_shot_evaluation(tiles, estimates)
    evaluation["condenser_not_known"] = shift_evaluation.two_shot_evaluation(
        tiles, shift_evaluation.two_shot_estimates(model, tiles, refocuser, args.workers, condenser_known=False))
    # Each calibration is shown in full for one draw of sweeps and judged over `calibration_draws`.
    sweep_specs = shift_evaluation.calibration_draws(shift_evaluation.CalibrationSpec())
    draws = [shift_evaluation.two_shot_calibration_check(args.model, draw_spec, tiles, refocuser, estimates,
                                                         args.cache_dir) for draw_spec in sweep_specs]
    evaluation["calibration_under_held_out_imaging"] = draws[0]
    evaluation["calibration_draws"] = shift_evaluation.over_draws([spec.seed for spec in sweep_specs],
                                                                  sweep_specs[0].sweeps, draws)
    slide_specs = shift_evaluation.calibration_draws(slide_calibration.SlideCalibrationSpec())
    slide_draws = [slide_calibration.two_shot_slide_calibration_check(args.model, slide_spec, args.cache_dir,
                                                                      tiles_sweep_focus=slide_spec == slide_specs[0])
                   for slide_spec in slide_specs]
    evaluation["calibration_on_the_slide"] = slide_draws[0]
    evaluation["calibration_on_the_slide_draws"] = shift_evaluation.over_draws(
        [spec.seed for spec in slide_specs], slide_specs[0].sweeps.sweeps, slide_draws)
    backend, _ = load_backend(args.backend, args.single_shot_model, threads=args.threads)
    estimator = FocusEstimator(backend, args.single_shot_model)
    evaluation["scan_outcome_20x"] = shift_evaluation.scan_outcome_table(
        spec, tiles, estimator, shift_evaluation.estimate_tiles(estimator, tiles), args.cache_dir, two_shot_model=model)
    evaluation["scan_outcome_models"] = shift_evaluation.scan_outcome_models(args.single_shot_model, args.model)
    evaluation["scan_outcome_on_the_slide"] = slide_calibration.self_calibrated_scan_outcomes(
        slide_calibration.SlideCalibrationSpec(), args.cache_dir, args.single_shot_model, args.model, args.workers)
    print(shift_evaluation.format_two_shot(evaluation))
    print(f"with the condenser not known:\n{shift_evaluation.format_two_shot(evaluation['condenser_not_known'])}")
    print(shift_evaluation.format_scan_outcomes(evaluation["scan_outcome_20x"]))
    print(shift_evaluation.format_calibration(evaluation["calibration_under_held_out_imaging"],
                                              shift_evaluation.TWO_SHOT_CALIBRATION_TITLE))
    print(shift_evaluation.format_over_draws(evaluation["calibration_draws"], TARGET_CALIBRATED_MAE_UM,
                                             shift_evaluation.DRAWS_TITLE))
    print(slide_calibration.format_slide_calibration(evaluation["calibration_on_the_slide"],
                                                     slide_calibration.TWO_SHOT_TITLE))
    print(shift_evaluation.format_over_draws(evaluation["calibration_on_the_slide_draws"], TARGET_CALIBRATED_MAE_UM,
                                             slide_calibration.DRAWS_TITLE))
    print(shift_evaluation.format_calibrated_scan_outcomes(evaluation["scan_outcome_on_the_slide"],
                                                           slide_calibration.SCAN_OUTCOME_TITLE))
    if args.card:
        from wsi_autofocus.model_card import render_two_shot

        evaluation_path = args.model.parent / "evaluation.json" if args.model.suffix else args.model / "evaluation.json"
        evaluation_path.write_text(json.dumps(evaluation, indent=1))
        card = evaluation_path.with_name("MODEL_CARD.md")
        card.write_text(render_two_shot(args.model, evaluation))
        print(f"wrote {evaluation_path} and {card}")
    return 0


def command_card(args) -> int:
    from wsi_autofocus.model_card import record_reproduction, render

    if args.reproduction:
        print(f"wrote {record_reproduction(args.model, args.reproduction)}")
    path = args.model / "MODEL_CARD.md"
    path.write_text(render(args.model))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wsi-autofocus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="render the data sets")
    generate.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    generate.add_argument("--splits", nargs="+", default=list(data.SPLITS), choices=list(data.SPLITS))
    generate.add_argument("--workers", type=int, default=2)
    generate.add_argument("--force", action="store_true")
    generate.set_defaults(run=command_generate)
    train = commands.add_parser("train", help="train and export the model")
    train.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    train.add_argument("--output", type=Path, default=default_model_dir())
    train.add_argument("--epochs", type=int, default=40)
    train.add_argument("--time-budget", type=float, default=2400.0, help="seconds of training at most")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=command_train)
    evaluate = commands.add_parser("eval", help="evaluate on held-out specimens")
    evaluate.add_argument("--model", type=Path, default=default_model_dir())
    evaluate.add_argument("--backend", default="onnxruntime")
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.add_argument("--tiles", type=int, default=40, help="tiles per specimen and objective")
    evaluate.add_argument("--split", default="test", choices=("test", "val"),
                          help="held-out test specimens (reported numbers) or validation specimens (tuning)")
    evaluate.add_argument("--patches-per-tile", type=int, help="override the model's patches per tile")
    evaluate.add_argument("--output", type=Path, default=Path("build/autofocus-eval"))
    evaluate.add_argument("--summary-json", type=Path)
    evaluate.add_argument("--shift-tiles", type=int, default=shift_evaluation.ShiftSpec.tiles_per_cell,
                          help="tiles per (content, microscope, objective) cell of the held-out imaging table")
    evaluate.add_argument("--skip-shift", action="store_true", help="only the own-simulator evaluation")
    evaluate.add_argument("--cache-dir", type=Path, default=Path("build/autofocus-eval-cache"),
                          help="rendered held-out tiles and sweeps, reused by later evaluations")
    evaluate.add_argument("--workers", type=int, default=2)
    evaluate.set_defaults(run=command_eval)
    calibrate = commands.add_parser("calibrate", help="fine-tune on a scan's focus-map sweeps")
    calibrate.add_argument("--scan", type=Path, required=True, help="scan directory (with manifest.json)")
    calibrate.add_argument("--scanner", default="default", help="name of the scanner the sweeps come from")
    calibrate.add_argument("--store", type=Path, default=Path("out/autofocus-calibration"),
                           help="calibrated models, one per scanner, objective and camera (the autofocus node's "
                                "calibration_root)")
    calibrate.add_argument("--model", type=Path, default=None, help="model to start from (default: the shipped one)")
    calibrate.add_argument("--two-shot-model", type=Path, default=None,
                           help="two-shot model to start from (default: the shipped one)")
    calibrate.add_argument("--output", type=Path, help="write the models here instead of into the store (both, "
                                                        "whether or not the scan's tiles are still to come)")
    calibrate.add_argument("--condenser-fill", type=float, default=0.0,
                           help="the microscope's condenser aperture as a fraction of the objective NA, as the "
                                "autofocus node's condenser_fill declares it (0: not known)")
    calibrate.add_argument("--condenser-inner-fill", type=float, default=0.0,
                           help="inner edge of a ring source, fraction of the objective NA (0: a disc)")
    calibrate.add_argument("--condenser-na", type=float, default=0.0,
                           help="instead of --condenser-fill: the condenser's NA, one setting for every objective, "
                                "as the autofocus node's condenser_numerical_aperture declares it")
    calibrate.add_argument("--condenser-inner-na", type=float, default=0.0,
                           help="with --condenser-na: inner edge of a ring source as an NA (0: a disc)")
    calibrate.set_defaults(run=command_calibrate)
    train_two_shot = commands.add_parser("train-two-shot", help="render exposure pairs, train the two-shot model")
    train_two_shot.add_argument("--data-dir", type=Path, default=Path("build/two-shot-data"))
    train_two_shot.add_argument("--output", type=Path, default=default_two_shot_path())
    train_two_shot.add_argument("--workers", type=int, default=2)
    train_two_shot.set_defaults(run=command_train_two_shot)
    eval_two_shot = commands.add_parser("eval-two-shot", help="evaluate the two-shot model under held-out imaging")
    eval_two_shot.add_argument("--model", type=Path, default=default_two_shot_path())
    eval_two_shot.add_argument("--shift-tiles", type=int, default=shift_evaluation.ShiftSpec.tiles_per_cell)
    eval_two_shot.add_argument("--cache-dir", type=Path, default=Path("build/autofocus-eval-cache"))
    eval_two_shot.add_argument("--workers", type=int, default=2)
    eval_two_shot.add_argument("--single-shot-model", type=Path, default=default_model_dir(),
                               help="the single-shot model of the scan outcome table (the table's one home: both "
                                    "cards show it)")
    eval_two_shot.add_argument("--backend", default="onnxruntime")
    eval_two_shot.add_argument("--threads", type=int, default=2)
    eval_two_shot.add_argument("--card", action="store_true",
                               help="write evaluation.json and MODEL_CARD.md beside the model")
    eval_two_shot.set_defaults(run=command_eval_two_shot)
    card = commands.add_parser("card", help="write the model card")
    card.add_argument("--model", type=Path, default=default_model_dir())
    card.add_argument("--reproduction", type=Path, metavar="MODEL_DIR",
                      help="another trained and evaluated run of the recipe, recorded beside the model for the card")
    card.set_defaults(run=command_card)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
