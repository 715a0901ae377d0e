"""What every stage needs, shared by the trainer (``stepwise``), the search (``tuning``) and the evidence.

The stage's model as the config describes it, its inputs (a ``CacheInput`` per split), one pass of
prediction over a split, the validation scores that pick the best epoch, the embedded synthetic data
set, and the check that a run folder holds the run a config describes.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from retina_scale.config import TrainConfig
from retina_scale.run_layout import RunLayout, synthetic_dir, synthetic_stamp
from retina_scale.utils.fileio import read_json, write_json
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


def build_stage_model(config: TrainConfig, spec):
    """The stage's model as the config describes it (call inside the strategy's scope)."""
    from retina_scale.models.convnet import build_model

    m = config.model
    return build_model(spec, width=m.width, dropout=m.dropout, leaky_slope=m.leaky_slope, l2=m.l2, seed=m.seed)


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


def predict_input(trainer, inp, with_keys=False):
    """Every image of ``inp`` once through ``trainer``: ``(labels, scores[, keys])``, same on every worker."""
    import tensorflow as tf

    gb = trainer.global_batch_size
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(inp.image_ids), tf.range(len(inp), dtype=tf.int64)), -1)

    def make_examples(ctx):
        ds = inp.dataset(gb, training=False, input_context=ctx, include_ids=True).unbatch()
        return ds.map(lambda image, label, image_id: (image, label, tf.constant(1.0), table.lookup(image_id)))

    iterator, steps = trainer.distribute_evaluation(make_examples, len(inp))
    labels, scores, keys = trainer.predict(iterator, steps, with_keys=True)
    return (labels, scores, keys) if with_keys else (labels, scores)


def validation_scores(labels, scores) -> tuple[float, float]:
    """``(val_loss, val_kappa)``: mean squared error of the grade and kappa at cut-offs 0.5/1.5/2.5/3.5
    (a non-finite kappa, e.g. from constant predictions, counts as 0)."""
    from retina_scale.grading.kappa import quadratic_weighted_kappa
    from retina_scale.grading.thresholds import apply_thresholds

    kappa = quadratic_weighted_kappa(labels, apply_thresholds(scores))
    return float(np.mean((scores - labels) ** 2)), float(kappa) if math.isfinite(kappa) else 0.0


def check_same_config(layout: RunLayout, config: TrainConfig) -> None:
    """A rerun must describe the same run (so 'resume' means what it says).

    Raises:
        ConfigError: ``layout``'s ``config.yaml`` holds other settings.
    """
    if not layout.config.exists():
        return
    old = to_dict(load_config(TrainConfig, layout.config))
    new = to_dict(config)
    keep = ("stages", "model", "data", "augment", "resample", "global_batch_size", "seed", "optim")
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
