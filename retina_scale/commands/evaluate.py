"""Evaluate a trained model on graded images: quadratic weighted kappa, confusion matrix, the
paper's Table IV rows (No DR, any DR, mild DR), referable-DR sensitivity, specificity and AUC, each
with a bootstrap 95 % interval over patients.

--model takes an export (saved_models/NAME/VERSION, or saved_models/NAME for its newest version), a
stage folder of a run (runs/NAME/stages/2-small) or a .keras file. The images are preprocessed
exactly as for training (a cache at the model's input size is made, or reused, under --cache).

--tta N averages the continuous grade over N test-time augmentation views of each image (the identity, flips,
90-degree rotations, then the training augmentation at half strength; retina_scale.data.tta), and the output
says what it cost in images per second. A model with recorded operating points (an export's metadata, a stage's
state.json) is also measured at its referable-DR operating points.

--ensemble (a run folder, or a stage folder of a run) averages the continuous grade of the stage and the stage
below it, each fed the cached image at its own input size (retina_scale.evidence.ensemble). The run's cache and
splits.csv are used unless --cache/--data and --splits say otherwise; the split evaluated is --split (default
test). The four cut-offs are optimised for the averaged grade on the validation split, and the output shows the
top stage alone on the same images beside it, with the images per second of each.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from retina_scale.config import FORMATS, SPLIT_NAMES
from retina_scale.run_layout import StageLayout
from retina_scale.utils.console import bar_interval
from retina_scale.utils.errors import UserError


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="export folder, stage folder or .keras file")
    parser.add_argument("--data", help="a data folder (EyePACS, APTOS, one folder per grade, CSV)")
    parser.add_argument("--labels", help="the labels CSV, if not where the format expects it")
    parser.add_argument("--format", choices=FORMATS)
    parser.add_argument("--cache", help="cache folder to use or fill (default: a temporary folder)")
    parser.add_argument("--split", choices=SPLIT_NAMES,
                        help="evaluate only this split of --splits (a run's splits.csv)")
    parser.add_argument("--splits", help="a run's splits.csv (with --split)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="preprocessing processes (default: all cores)")
    parser.add_argument("--tta", type=int, default=None,
                        help="average the grade over N test-time augmentation views (default 1 = off)")
    parser.add_argument("--ensemble", action="store_true",
                        help="average the stage with the stage below it (a run or stage folder; cut-offs fitted "
                             "on validation; default --split test)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", help="also write the JSON result to this file")


def _stage_folder(folder: Path) -> StageLayout:
    """The files of a stage folder (``stages/<i>-<name>``, or any folder holding a best.keras)."""
    index, _, name = folder.name.partition("-")
    return StageLayout(folder, int(index) if index.isdigit() else 0, name or folder.name)


def load_predictor(path):
    """``(predict(images) -> scores, thresholds, input_size, description)`` for any model form.

    ``predict.tta_draws`` is how many test-time augmentation views the model averages itself (an export made
    with ``--tta``; else 1) and ``predict.operating_points`` its recorded operating points (or None)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    if path.is_dir() and not (path / "saved_model.pb").exists() and not _stage_folder(path).best_keras.exists():
        from retina_scale.serving.export import list_versions

        versions = list_versions(path)
        if versions:
            path = path / str(versions[-1])
    if path.is_dir() and (path / "saved_model.pb").exists():
        return _export_predictor(path)
    keras_file = _stage_folder(path).best_keras if path.is_dir() else path
    if keras_file.suffix != ".keras" or not keras_file.exists():
        raise UserError(f"{path} is not a model: expected an export folder (saved_model.pb), a stage folder "
                        "(best.keras) or a .keras file")
    return _keras_predictor(keras_file)


def _export_predictor(path: Path):
    import numpy as np

    from retina_scale.serving.export import load_export

    serve, meta = load_export(path)

    def predict(images):
        return np.asarray(serve(images=images)["grade_continuous"])

    predict.tta_draws = (meta.get("tta") or {}).get("draws", 1)
    predict.operating_points = meta.get("operating_points")
    return predict, tuple(meta["thresholds"]), int(meta["input_size"]), f"export {path}"


def _keras_predictor(keras_file: Path):
    """A .keras model, with the thresholds of the stage's state.json beside it (default 0.5 ... 3.5)."""
    import keras
    import numpy as np

    import retina_scale.models  # noqa: F401  (registers our layers for safe_mode loading)
    from retina_scale.grading.thresholds import DEFAULT_THRESHOLDS
    from retina_scale.models.convnet import regression_model

    model = regression_model(keras.saving.load_model(keras_file, safe_mode=True))  # the grade alone (issue 14's aux)
    thresholds = tuple(DEFAULT_THRESHOLDS)
    state = _stage_folder(keras_file.parent).state
    result = {}
    if state.exists():
        result = json.loads(state.read_text()).get("result") or {}
        thresholds = tuple(result.get("thresholds") or thresholds)

    def predict(images):
        return np.asarray(model(images, training=False)).reshape(-1)

    predict.tta_draws = 1
    predict.operating_points = result.get("operating_points")
    return predict, thresholds, int(model.input_size), f"{keras_file}"


def with_tta(predict, draws: int, normalize: str):
    """``predict`` averaged over ``draws`` test-time augmentation views (``retina_scale.data.tta``); ``predict``
    itself when ``draws`` is 1."""
    import numpy as np

    from retina_scale.data.tta import tta_scores, view_options

    if draws == 1:
        return predict
    return lambda images: np.asarray(tta_scores(predict, images, draws, **view_options(normalize)))


def _predict_all(inp, predict, args):
    """Every image of ``inp`` through ``predict``: ``(scores, labels, ids, seconds in predict)``."""
    import time

    import numpy as np
    from tqdm import tqdm

    scores, ids, labels, seconds = [], [], [], 0.0
    batches = inp.dataset(args.batch_size, training=False, include_ids=True)
    for images, y, image_ids in tqdm(batches, total=-(-len(inp) // args.batch_size), unit="batch",
                                     disable=args.json, desc="predict", mininterval=bar_interval()):
        start = time.perf_counter()
        scores.append(predict(images))
        seconds += time.perf_counter() - start
        labels.append(y.numpy())
        ids.extend(i.decode() for i in image_ids.numpy())
    return np.concatenate(scores), np.concatenate(labels), np.array(ids), seconds


def _check_arguments(args) -> int:
    """The arguments' one-line errors, before any work; returns the TTA views asked (1 without --tta)."""
    from retina_scale.data.tta import check_draws

    if args.split and not args.splits and not args.ensemble:
        raise UserError("--split needs --splits (the splits.csv of the run)")
    if not args.data and not args.cache and not args.ensemble:
        raise UserError("give --data (images to preprocess) or --cache (an existing cache)")
    if args.bootstrap < 0 or args.batch_size < 1:
        raise UserError("--bootstrap must be >= 0 and --batch-size >= 1")
    return 1 if args.tta is None else check_draws(args.tta, "--tta")


def _fill_cache(args, cache: Path, sizes) -> None:
    """Preprocesses ``--data`` into ``cache`` at ``sizes`` (reusing what is there)."""
    from retina_scale.data.cache import prepare_cache
    from retina_scale.data.sources import read_dataset

    dataset = read_dataset(args.data, labels=args.labels, format=args.format)
    result = prepare_cache(dataset, cache, sizes=tuple(sizes), workers=args.workers or None, progress=not args.json)
    if not args.json:
        print(result.summary())


def _member_pass(predict, size: int, cache: Path, split: str, splits: Path, draws: int, args):
    """One ensemble member over one split, fed from the cache at its own ``size``: ``_predict_all``'s tuple. One
    batch goes through first, untimed, so that neither member's images/s carries the first call's set-up."""
    from retina_scale.data.pipeline import CacheInput

    inp = CacheInput(cache, size, split=split, split_file=splits, augment=None, resample=None)
    predict = with_tta(predict, draws, "graham" if inp.graham else "none")
    predict(next(iter(inp.dataset(args.batch_size, training=False, include_ids=True)))[0])  # untimed warm-up
    return _predict_all(inp, predict, args)


def _run_ensemble(args, draws: int) -> int:
    """``--ensemble``: the stage and the stage below it averaged, cut-offs fitted on validation
    (``retina_scale.evidence.ensemble``), with the images per second of the ensemble and of the top stage alone."""
    from retina_scale.evidence.ensemble import ensemble_text, evaluate_ensemble, resolve_members

    members = resolve_members(args.model)
    loaded = [load_predictor(stage.dir) for stage in (members.lower, members.top)]
    split, splits = args.split or "test", Path(args.splits) if args.splits else members.run.splits
    if not splits.is_file():
        raise UserError(f"--ensemble fits its cut-offs on the validation split of a splits.csv; {splits} does not "
                        "exist, give --splits")
    with tempfile.TemporaryDirectory(prefix="retina-eval-") as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache" if args.data else members.run.cache
        if args.data:
            _fill_cache(args, cache, sorted({m[2] for m in loaded}))
        passes = {name: [_member_pass(m[0], m[2], cache, name, splits, draws, args) for m in loaded]
                  for name in dict.fromkeys(("val", split))}
    evaluation = evaluate_ensemble([p[:3] for p in passes["val"]], [p[:3] for p in passes[split]],
                                   loaded[1][1], splits, args.bootstrap)
    (lower, top), images = passes[split], int(passes[split][1][0].size)
    evaluation["model"] = f"ensemble of {loaded[0][3]} and {loaded[1][3]}"
    evaluation["tta_draws"] = draws
    evaluation["prediction"] = {"images": images, "seconds": round(lower[3] + top[3], 3), "batch_size": args.batch_size,
                                "images_per_second": _rate(images, lower[3] + top[3])}
    evaluation["ensemble"] = {
        "lower": members.lower.dir.name, "top": members.top.dir.name, "lower_size": loaded[0][2],
        "top_size": loaded[1][2], "split": split, "tta_draws": draws, "images": images,
        "images_per_second": _rate(images, lower[3] + top[3]), "top_images_per_second": _rate(images, top[3])}
    return _report(args, evaluation, f"Model: {evaluation['model']}", "\n" + ensemble_text(evaluation))


def _rate(images: int, seconds: float):
    return round(images / seconds, 2) if seconds > 0 else None


def _report(args, evaluation: dict, heading: str, tail: str) -> int:
    """``--out`` (the JSON result, written atomically), then the result on the console: JSON with ``--json``, else
    ``heading``, the evaluation's text and ``tail``."""
    from retina_scale.grading.operating_points import evaluation_text
    from retina_scale.utils.fileio import atomic_path

    if args.out:
        with atomic_path(args.out) as tmp_out, open(tmp_out, "w", encoding="utf-8") as f:
            json.dump(evaluation, f, indent=2)
    if args.json:
        print(json.dumps(evaluation, indent=2))
    else:
        print(heading)
        print(evaluation_text(evaluation))
        print(tail)
    return 0


def run(args) -> int:
    import numpy as np

    from retina_scale.data.pipeline import CacheInput
    from retina_scale.data.sources import parse_patient_eye
    from retina_scale.grading.evaluation import evaluate_predictions
    from retina_scale.grading.operating_points import evaluate_operating_points

    draws = _check_arguments(args)
    if args.ensemble:
        return _run_ensemble(args, draws)
    predict, thresholds, size, description = load_predictor(args.model)
    if draws > 1 and predict.tta_draws > 1:
        raise UserError(f"{description} averages {predict.tta_draws} test-time augmentation views already (made "
                        "with --tta); leave out --tta, or give a model made without it")
    with tempfile.TemporaryDirectory(prefix="retina-eval-") as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache"
        if args.data:
            _fill_cache(args, cache, (size,))
        inp = CacheInput(cache, size, split=args.split, split_file=args.splits, augment=None, resample=None)
        labelled = ~np.isnan(inp.labels)
        if not labelled.any():
            raise UserError(f"no graded image to evaluate in {cache}")
        scores, labels, ids, seconds = _predict_all(
            inp, with_tta(predict, draws, "graham" if inp.graham else "none"), args)
    keep = ~np.isnan(labels)
    groups = np.array([parse_patient_eye(i)[0] for i in ids[keep]])
    evaluation = evaluate_predictions(labels[keep].astype(int), scores[keep], thresholds,
                                      n_boot=args.bootstrap, groups=groups)
    evaluation["model"] = description
    evaluation["tta_draws"] = max(draws, predict.tta_draws)
    evaluation["prediction"] = {"images": int(scores.size), "seconds": round(seconds, 3), "batch_size": args.batch_size,
                                "images_per_second": round(scores.size / seconds, 2) if seconds > 0 else None}
    if predict.operating_points:
        evaluation["operating_points"] = evaluate_operating_points(
            predict.operating_points, labels[keep].astype(int), scores[keep], groups, n_boot=args.bootstrap)
    cost = evaluation["prediction"]
    return _report(args, evaluation, f"Model: {description} ({size} px)",
                   f"\nPrediction: {evaluation['tta_draws']} view(s) per image, {cost['images_per_second']} images/s "
                   f"({cost['images']} images in {cost['seconds']:.1f} s of model time, batch {args.batch_size})")
