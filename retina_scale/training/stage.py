"""What every stage needs, shared by the trainer (``stepwise``), the search (``tuning``) and the evidence.

The run's data (images, cache and split, made or reused), this process's run folder, the stage's
model as the config describes it and its starting weights, its inputs (a ``CacheInput`` per split),
one pass of prediction over a split, the validation scores that pick the best epoch, the embedded
synthetic data set, the check that a run folder holds the run a config describes, and the table of
a stage's learning-rate search (the search writes it, the trainer's report repeats it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from retina_scale.config import TrainConfig
from retina_scale.run_layout import RunLayout, StageLayout, synthetic_dir, synthetic_stamp
from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import read_json, write_json
from retina_scale.utils.tables import number, text_table
from retina_scale.utils.typed_config import ConfigError, load_config, to_dict


@dataclasses.dataclass
class StageContext:
    """What a learning-rate search hook gets for one stage.

    The hook (``StepwiseScaler(lr_search=...)``) returns the learning rate for the stage's full
    fine-tuning. ``initial_weights`` holds the stage's transferred starting point, so every trial
    can start from the same weights.
    """

    index: int
    stage: object  # StageSpec
    stage_dir: Path
    initial_weights: Path
    default_lr: float
    config: TrainConfig
    strategy: object
    cache_dir: Path
    splits_file: Path

    @property
    def layout(self) -> StageLayout:
        """The stage folder's files (``state``, ``tuning``, ``search_json``, ...)."""
        return StageLayout(Path(self.stage_dir), self.index, self.stage.name)


def process_layout(config: TrainConfig, strategy) -> RunLayout:
    """This process's run folder: the chief's, or a worker's copy beside it (identical weights)."""
    from retina_scale.training.distribute import is_chief

    layout = RunLayout.of(config)
    if is_chief(strategy):
        return layout
    resolver = strategy.cluster_resolver
    return layout.worker(resolver.task_type, resolver.task_id)


def prepare_run_data(config: TrainConfig, layout: RunLayout, log: Callable[[str], None] | None = None,
                     progress: bool = True) -> tuple[Path, Path]:
    """Makes (or reuses) the run's images, the per-size cache and the patient-level split.

    Without ``data.data``, the embedded synthetic data set is made in the run folder first.

    Returns:
        ``(cache_dir, splits_file)``.

    Raises:
        UserError: no usable image, an empty train or validation split, or a single grade to train on.
    """
    from retina_scale.config import PreprocessConfig
    from retina_scale.data.cache import prepare_cache
    from retina_scale.data.sources import ensure_splits, read_dataset
    from retina_scale.models.convnet import get_stage

    log = log or (lambda text: None)
    cfg = config.data
    sizes = sorted({get_stage(s.stage).input_size for s in config.stages})
    workers = cfg.workers or os.cpu_count() or 1
    if cfg.data:
        data_dir = Path(cfg.data)
    else:
        data_dir = ensure_synthetic_data(layout.data_dir, cfg, workers, progress=progress, log=log)
    cache_dir = layout.cache
    dataset = read_dataset(data_dir, labels=cfg.labels, format=cfg.format,
                           image_col=cfg.image_col, label_col=cfg.label_col)
    if not dataset.records:
        raise UserError(f"no usable image in {data_dir}: {len(dataset.failures)} failed "
                        "(see the reasons with 'retina-scale prepare')")
    log(f"Preparing the cache at {', '.join(map(str, sizes))} px in {cache_dir} ...")
    result = prepare_cache(dataset, cache_dir, sizes=sizes, config=PreprocessConfig(normalize=cfg.normalize),
                           workers=workers, progress=progress)
    log(result.summary())
    if result.prepared + result.skipped == 0:
        raise UserError(f"no usable image in {data_dir}; see {cache_dir / 'failures.csv'}")
    splits = ensure_splits(layout.splits, dataset.records, cfg.val_fraction, cfg.test_fraction,
                           seed=cfg.split_seed)
    _check_splits(splits, {r.image_id: r.label for r in dataset.records})
    return cache_dir, layout.splits


def _check_splits(splits: dict, labels: dict) -> None:
    for split in ("train", "val"):
        grades = {labels.get(i) for i, s in splits.items() if s == split and labels.get(i) is not None}
        if not grades:
            raise UserError(f"the {split} split is empty; give more images or change data.val_fraction / "
                            "data.test_fraction")
        if split == "train" and len(grades) < 2:
            raise UserError(f"the train split holds a single grade ({grades.pop()}); a grader needs at "
                            "least two")


def ensure_synthetic_data(folder, data, workers: int, progress: bool = True, log=None) -> Path:
    """The embedded synthetic data set described by ``data`` (a ``DataConfig``) in ``<folder>/synthetic``,
    made once: a stamp ``<folder>/synthetic.json`` of its settings lets a rerun (or a second run of a
    study) reuse it, and any other settings remake it.
    """
    from retina_scale.data.synthetic import generate_dataset

    folder = Path(folder)
    out = synthetic_dir(folder)
    args = {"count": data.synth_count, "size": data.synth_size, "seed": data.synth_seed, "prior": data.synth_prior}
    stamp = synthetic_stamp(folder)
    if (out / "trainLabels.csv").exists() and stamp.exists() and read_json(stamp) == args:
        return out
    if log is not None:
        log(f"Making the synthetic data set: {data.synth_count} photos, fundus {data.synth_size} px, "
            f"prior {data.synth_prior} -> {out}")
    generate_dataset(str(out), workers=workers, overwrite=True, progress=progress, **args)
    write_json(stamp, args)
    return out


def build_stage_model(config: TrainConfig, spec, policy: str | None = None):
    """The stage's model as the config describes it (call inside the strategy's scope), built under the
    dtype ``policy`` (default: the config's ``precision`` on this machine, :func:`machine_precision`);
    Keras's global policy is left as it was."""
    from retina_scale.models.convnet import build_model

    m = config.model
    with dtype_policy(policy or machine_precision(config.precision)):
        return build_model(spec, width=m.width, dropout=m.dropout, leaky_slope=m.leaky_slope, l2=m.l2,
                           seed=config.seed if m.seed is None else m.seed, min_filters=m.min_filters,
                           head_pooling=m.head_pooling, aux=config.loss.aux)


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras's global dtype policy set to ``name`` inside the ``with`` block, and put back after it."""
    import keras

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def machine_precision(precision: str) -> str:
    """``config.resolve_precision`` on this machine's CPU flags and GPUs (``auto``: bf16 where native)."""
    from retina_scale.config import resolve_precision
    from retina_scale.utils.hardware import cpu_flags, gpu_capabilities

    if precision != "auto":
        return resolve_precision(precision)
    return resolve_precision(precision, cpu_flags(), gpu_capabilities())


def float32_model(model):
    """``model`` itself if it computes in float32, else a float32 copy with its weights (a mixed-precision
    model's variables are float32 already): what an export serves, on any hardware."""
    if model.dtype_policy.compute_dtype == "float32":
        return model
    with dtype_policy("float32"):
        copy = model.__class__.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def save_initial_weights(model, previous: Path | None, stage: StageLayout):
    """Gives a freshly built stage model its starting point and saves it as the stage's ``initial.npz``:
    the previous stage's best weights carried over by layer name (``previous``, its ``best.npz``), or,
    for the first stage (``previous`` None), the model's own orthogonal initialisation.

    Returns:
        The ``TransferReport`` of the carry-over, or None for the first stage.
    """
    from retina_scale.models.transfer import transfer_weights
    from retina_scale.training.checkpoint import model_weights_from_checkpoint, save_checkpoint

    report = None
    if previous is not None:
        report = transfer_weights(model_weights_from_checkpoint(previous), model)
        report.src_name = Path(previous).parent.name
    stage.dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, None, stage.initial)
    return report


def stage_input(config: TrainConfig, spec, stage_cfg, cache_dir, splits_file, split, training, missing_ok=False):
    """The ``CacheInput`` of one split at the stage's size; training input is augmented and resampled."""
    from retina_scale.data.pipeline import CacheInput

    augment = resample = None
    if training:
        augment = config.augment
        if stage_cfg is not None and stage_cfg.augment_strength is not None:
            augment = dataclasses.replace(augment, strength=stage_cfg.augment_strength)
        resample = config.resample if config.resample.enabled else None
    try:
        return CacheInput(cache_dir, spec.input_size, split=split, split_file=splits_file,
                          augment=augment, resample=resample, seed=config.seed)
    except ValueError:
        if missing_ok:
            return None
        raise


def predict_input(trainer, inp, with_keys=False, tta_draws: int = 1):
    """Every image of ``inp`` once through ``trainer``: ``(labels, scores[, keys])``, same on every worker.

    With ``tta_draws`` > 1 the scores are the mean over that many views of each image
    (``retina_scale.data.tta``): one pass over ``inp`` per view, matched by key.
    """
    if tta_draws == 1:
        return make_predictor(trainer, inp, with_keys)()
    from retina_scale.data.tta import tta_view, view_options

    options = view_options("graham" if inp.graham else "none")
    passes = [make_predictor(trainer, inp, True, view=lambda x, k=k: tta_view(x, k, **options))()
              for k in range(tta_draws)]  # each pass sorted by key
    labels, _, keys = passes[0]
    scores = np.mean(np.stack([p[1] for p in passes]), axis=0)
    return (labels, scores, keys) if with_keys else (labels, scores)


def make_predictor(trainer, inp, with_keys=False, view=None) -> Callable[[], tuple]:
    """``predict_input`` with its input built once: a function that runs every image of ``inp`` through
    ``trainer`` (its current weights) each time it is called, e.g. validation after every epoch. ``view``
    (a function of a batch of images) transforms the images first."""
    import tensorflow as tf

    gb = trainer.global_batch_size
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(inp.image_ids), tf.range(len(inp), dtype=tf.int64)), -1)

    def make_examples(ctx):
        ds = inp.dataset(gb, training=False, input_context=ctx, include_ids=True)
        if view is not None:
            ds = ds.map(lambda images, labels, ids: (view(images), labels, ids))
        ds = ds.unbatch()
        return ds.map(lambda image, label, image_id: (image, label, tf.constant(1.0), table.lookup(image_id)))

    dataset, steps = trainer.evaluation_dataset(make_examples, len(inp))

    def predict():
        labels, scores, keys = trainer.predict(iter(dataset), steps, with_keys=True)
        return (labels, scores, keys) if with_keys else (labels, scores)

    return predict


def make_deterministic(seed: int) -> None:
    """Seeds Python, numpy, TensorFlow and Keras's seed generators (the dropout layers' too) and turns on
    TensorFlow's op determinism, so that a run is a function of its config (``deterministic: true``)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def validation_row(labels, scores) -> dict:
    """An epoch's validation numbers: ``val_loss`` (MSE of the grade), ``val_kappa`` (cut-offs 0.5/1.5/2.5/3.5)
    and ``val_kappa_optimized`` (cut-offs optimised on these very images: a steadier measure of the ranking the
    network has learned, optimistic as an estimate; undefined kappas count as 0)."""
    from retina_scale.grading.kappa import quadratic_weighted_kappa
    from retina_scale.grading.thresholds import apply_thresholds, fit_thresholds

    val_loss, kappa = validation_scores(labels, scores)
    optimized = quadratic_weighted_kappa(labels, apply_thresholds(scores, fit_thresholds(labels, scores).thresholds))
    return {"val_loss": val_loss, "val_kappa": kappa,
            "val_kappa_optimized": float(optimized) if math.isfinite(optimized) else 0.0}


def is_better(row: dict, best: float | None, selection: str) -> bool:
    """Whether an epoch's ``row`` beats the best score so far under ``selection`` (``config.SELECTIONS``)."""
    score = row[selection]
    if best is None:
        return True
    return score < best if selection == "val_loss" else score > best


def validation_scores(labels, scores) -> tuple[float, float]:
    """``(val_loss, val_kappa)``: mean squared error of the grade and kappa at cut-offs 0.5/1.5/2.5/3.5
    (a non-finite kappa, e.g. from constant predictions, counts as 0)."""
    from retina_scale.grading.kappa import quadratic_weighted_kappa
    from retina_scale.grading.thresholds import apply_thresholds

    kappa = quadratic_weighted_kappa(labels, apply_thresholds(scores))
    return float(np.mean((scores - labels) ** 2)), float(kappa) if math.isfinite(kappa) else 0.0


def score_on_splits(val_labels, val_scores, test, files, config: TrainConfig, name: str,
                    log: Callable[[str], None], extra: dict | None = None) -> dict:
    """How a stage (or the fusion stage) is scored once its best epoch is chosen: cut-offs optimised on the
    validation scores, the referable-DR operating points chosen there (an unmet one is logged, never replaced),
    then with ``test`` (``(labels, scores, patient ids)``, or None) the test evaluation with patient-bootstrap
    intervals, written with ``extra`` to ``files.evaluation_json``/``evaluation_md`` and logged.

    Returns ``{"fit", "thresholds", "val_kappa_opt", "points", "evaluation"}`` (``evaluation`` None without test).
    """
    from retina_scale.grading.evaluation import evaluate_predictions
    from retina_scale.grading.kappa import quadratic_weighted_kappa
    from retina_scale.grading.operating_points import (
        choose_operating_points, evaluate_operating_points, evaluation_text,
    )
    from retina_scale.grading.thresholds import apply_thresholds, fit_thresholds
    from retina_scale.utils.fileio import write_text

    points = choose_operating_points(val_labels, val_scores)
    for point_name, point in points["points"].items():
        if not point["met"]:
            log(f"{name}: operating point {point_name} not met: {point['reason']}")
    fit = fit_thresholds(val_labels, val_scores)
    thresholds = [float(t) for t in fit.thresholds]
    if fit.note:  # a cut-off the validation split cannot place keeps its default (also in evaluation.json)
        log(f"{name}: {fit.note}")
    val_kappa_opt = quadratic_weighted_kappa(val_labels, apply_thresholds(val_scores, thresholds))
    evaluation = None
    if test is not None:
        labels, scores, groups = test
        n_boot, seed = config.eval_bootstrap, config.seed
        evaluation = evaluate_predictions(labels, scores, thresholds, n_boot=n_boot, seed=seed, groups=groups)
        evaluation.update(thresholds_fit=fit.to_dict(), tta_draws=config.tta.draws, **(extra or {}))
        evaluation["operating_points"] = evaluate_operating_points(points, labels, scores, groups, n_boot=n_boot,
                                                                   seed=seed)
        write_json(files.evaluation_json, evaluation)
        write_text(files.evaluation_md, evaluation_text(evaluation) + "\n")
        log(evaluation_text(evaluation))
    return {"fit": fit, "thresholds": thresholds, "val_kappa_opt": val_kappa_opt, "points": points,
            "evaluation": evaluation}


def check_same_config(layout: RunLayout, config: TrainConfig) -> None:
    """A rerun must describe the same run (so 'resume' means what it says).

    Raises:
        ConfigError: ``layout``'s ``config.yaml`` holds other settings.
    """
    if not layout.config.exists():
        return
    old = to_dict(load_config(TrainConfig, layout.config))
    new = to_dict(config)
    keep = ("stages", "model", "data", "augment", "resample", "global_batch_size", "seed", "optim", "selection",
            "loss", "tta")
    changed = [k for k in keep if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(
            f"run folder {layout.root} holds a run with other settings ({', '.join(changed)} differ); "
            "use another name (name=...) or delete the folder"
        )


def patients_of(splits_file, image_ids) -> np.ndarray:
    """The patient of each image id, from a run's ``splits.csv`` (an unknown id is its own patient)."""
    import pandas as pd

    frame = pd.read_csv(splits_file, dtype=str, keep_default_na=False)
    patient = dict(zip(frame["image"], frame["patient"]))
    return np.array([patient.get(i, i) for i in image_ids])


def format_search_table(result: dict) -> str:
    """A stage's learning-rate search for people (``result`` is ``tuning.SearchResult.to_dict()``,
    as ``tuning/search.json`` and the stage's report entry hold it); the best trial is marked ``*``."""
    extras = sorted({k for r in result["trials"] for k in r["values"] if k != "lr"})
    header = ("trial", "lr", *extras, "val kappa (opt. cut-offs)", "val kappa (fixed)", "val loss", "seconds", "status")
    rows = []
    for r in result["trials"]:
        mark = " *" if r["trial"] == result["best_trial"] else ""
        status = "diverged" if r["diverged"] else r["status"].lower()
        rows.append((r["trial"] + mark, number(r["lr"], ".3g"), *(number(r["values"].get(k), ".3g") for k in extras),
                     number(r.get("val_kappa_optimized")), number(r["val_kappa"]), number(r["val_loss"]),
                     number(r["seconds"], ".1f"), status))
    lines = [text_table(header, rows)]
    scored_by = {"val_kappa_optimized": "val kappa at cut-offs optimised on validation",
                 "val_kappa": "val kappa at cut-offs 0.5/1.5/2.5/3.5", "val_loss": "the lowest val loss"}
    lines.append(f"* best: trial {result['best_trial']}, lr {result['lr']:.4g} ({result['tuner']} search, "
                 f"{len(result['trials'])} trials, {result['seconds']:.0f} s of trials, "
                 f"{result.get('wall_seconds', 0):.0f} s this time; scored by "
                 f"{scored_by.get(result.get('objective', 'val_kappa'), result.get('objective'))}, ties to the lower val loss)")
    return "\n".join(lines)
