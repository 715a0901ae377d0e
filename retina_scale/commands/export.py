"""Export a stage of a training run as a new SavedModel version for TensorFlow Serving.

Takes the stage's best.keras and its validation thresholds (the stage's state.json,
result.thresholds); by default the last finished stage. The preprocessing the run trained with (the
normalisation, the circular mask and the cache's sizes, from the run's config.yaml and the cache's
cache.json) is recorded so that the predict_images signature repeats it in the graph. The version is
written into a temporary folder and renamed into place (TF Serving never sees half a model);
--keep N then prunes all but the N newest versions.

The stage's referable-DR operating points (chosen on validation, in its state.json) go into the metadata, and
predict_images answers refer_high_sensitivity / refer_high_specificity for those that were met. --tta N bakes
test-time augmentation into the graph: both signatures average the grade over N views of each image (default:
the run's tta.draws, 1 = off).

Example:
    retina-scale export --run runs/quick --model-name retina --base saved_models --keep 3
"""

from __future__ import annotations

import json
from pathlib import Path

from retina_scale.run_layout import RunLayout, StageLayout
from retina_scale.utils.errors import UserError


def add_arguments(parser):
    parser.add_argument("--run", required=True, help="the run folder (runs/NAME)")
    parser.add_argument("--stage", help="stage name (e.g. tiny, small); default: the last finished stage")
    parser.add_argument("--model-name", required=True, help="the model's folder name under --base")
    parser.add_argument("--base", default="saved_models", help="folder of exported models (default saved_models)")
    parser.add_argument("--keep", type=int, help="keep only the N newest versions (the new one included)")
    parser.add_argument("--tta", type=int, help="average the grade over N test-time augmentation views in the "
                        "graph (default: the run's tta.draws, 1 = off)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def finished_stages(run: RunLayout) -> list[tuple[StageLayout, dict]]:
    """``(stage folder, state)`` of every stage of the run whose state.json says done, by index."""
    out = []
    for stage in run.stages():
        if not stage.state.is_file():
            continue
        try:
            state = json.loads(stage.state.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{stage.state} is not JSON ({err})") from None
        if state.get("status") == "done":
            out.append((stage, state))
    return out


def choose_stage(run_dir: Path, stage: str | None) -> tuple[StageLayout, dict]:
    """The stage to export and its state; clear errors for a missing or unfinished one."""
    run = RunLayout(run_dir)
    if not run.root.is_dir():
        raise FileNotFoundError(f"no such run folder: {run_dir}")
    if not run.stages_dir.is_dir():
        raise UserError(f"{run_dir} is not a training run (no stages/ folder); pass runs/NAME")
    done = finished_stages(run)
    if stage is None:
        if not done:
            raise UserError(f"run {run_dir} has no finished stage yet; train it first (retina-scale train)")
        return done[-1]
    for item in done:
        if item[0].name == stage:
            return item
    present = {s.name for s in run.stages()}
    finished = [item[0].name for item in done]
    if stage in present:
        raise UserError(f"stage {stage!r} of {run_dir} has not finished; finished stages: {finished or 'none'}")
    raise UserError(f"run {run_dir} has no stage {stage!r}; accepted: {', '.join(finished) or 'none finished'}")


def run_tta_draws(run_dir: Path) -> int:
    """The run's ``tta.draws`` (its config.yaml), 1 when it has none."""
    from retina_scale.utils.typed_config import load_mapping

    layout = RunLayout(run_dir)
    config = (load_mapping(layout.config) or {}) if layout.config.is_file() else {}
    draws = (config.get("tta") or {}).get("draws", 1)
    return draws if isinstance(draws, int) and not isinstance(draws, bool) and draws >= 1 else 1


def _notes(result: dict, tta: int) -> list[str]:
    """What a person should know about the export's TTA and operating points."""
    notes = []
    chosen_with = result.get("tta_draws", 1)
    if chosen_with != tta:
        notes.append(f"the stage's thresholds and operating points were chosen on scores averaged over "
                     f"{chosen_with} view(s); this export averages {tta}")
    points = result.get("operating_points")
    if not points:
        notes.append("the stage records no operating points (trained before they existed): predict_images has "
                     "no refer_high_sensitivity / refer_high_specificity outputs")
    else:
        notes += [f"operating point {name} was not met on validation ({p['reason']}): no refer_{name} output"
                  for name, p in points["points"].items() if not p["met"] and name != "youden"]
    return notes


def run(args) -> int:
    if args.keep is not None and args.keep < 1:
        raise UserError(f"--keep must be a positive integer; got {args.keep}")
    from retina_scale.data.tta import check_draws

    if args.tta is not None:
        check_draws(args.tta, "--tta")
    run_dir = Path(args.run)
    stage, state = choose_stage(run_dir, args.stage)
    tta = args.tta if args.tta is not None else run_tta_draws(run_dir)
    result = state.get("result") or {}
    thresholds = result.get("thresholds")
    if not thresholds:
        raise UserError(f"{stage.state} has no result.thresholds; the stage did not finish cleanly")
    keras_file = stage.best_keras
    if not keras_file.is_file():
        raise FileNotFoundError(f"{keras_file} is missing; the stage's best model is needed to export it")

    import keras

    import retina_scale.models  # noqa: F401  (registers our layers for safe_mode loading)
    from retina_scale.serving.export import export_saved_model, run_preprocessing

    model = keras.saving.load_model(keras_file, safe_mode=True)
    metadata = {
        "run": run_dir.resolve().name,
        "stage_folder": stage.dir.name,
        "val_kappa": result.get("val_kappa"),
        "test_kappa": result.get("test_kappa"),
        "preprocessing": run_preprocessing(run_dir),
        "thresholds_tta_draws": result.get("tta_draws", 1),
    }
    path = export_saved_model(model, args.base, args.model_name, thresholds=thresholds, metadata=metadata,
                              keep=args.keep, operating_points=result.get("operating_points"), tta=tta)
    summary = {"export": str(path), "run": str(run_dir), "stage": stage.name, "stage_index": stage.index,
               "input_size": int(model.input_size), "thresholds": thresholds,
               "preprocessing": metadata["preprocessing"], "tta": tta, "notes": _notes(result, tta),
               "operating_points": {name: p["threshold"] for name, p in
                                    ((result.get("operating_points") or {}).get("points") or {}).items()}}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"Exported stage {stage.index} {stage.name} ({summary['input_size']} px) of {run_dir} to {path}")
        print(f"  thresholds {', '.join(f'{t:.3f}' for t in thresholds)}; preprocessing "
              f"{json.dumps(metadata['preprocessing'], sort_keys=True)}")
        points = ", ".join(f"{name} {'not met' if t is None else f'{t:.4f}'}"
                           for name, t in summary["operating_points"].items())
        print(f"  test-time augmentation: {tta} view(s)" + (f"; operating points (refer when score >=): {points}"
                                                             if points else ""))
        for note in summary["notes"]:
            print(f"  note: {note}")
    return 0
