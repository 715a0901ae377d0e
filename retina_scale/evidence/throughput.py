"""Speeds of a stepwise run's stages against this machine's limit (the resolution study's part 8).

For every stage of a finished run, measured in one process, one after the other:

- training images/s of the model alone (the run's optimizer and global batch, inputs held in memory,
  the same ``DistributedTrainer`` step the trainer runs);
- achieved training FLOP/s = 3 x forward multiply-adds x 2 x images/s (forward + two backward
  passes, 2 FLOPs per multiply-add), as a fraction of the dense fp32 matmul peak measured here;
- input-pipeline images/s alone (the stage's cached training input with its augmentation and
  resampling, iterated without a model);
- prediction images/s of the stage's exported SavedModel (``serving_default`` on preprocessed
  images at the stage's size), when the run exported it.

Example (it needs a trained run and takes minutes, so it is not run as a doctest)::

    result = measure_run_throughput("runs/resolution-study/runs/stepwise", steps=20)
    print(format_throughput(result))
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

from retina_scale.utils.tables import text_table


def matmul_peak(sizes=(1024, 2048, 4096), repeats: int = 5, dtype: str = "float32") -> dict:
    """Dense matmul FLOP/s of this machine (TensorFlow's kernels) in ``dtype`` (``float32``, or ``bfloat16``
    where the CPU has native bf16): the best over ``sizes`` of the fastest of ``repeats`` runs, ``2 n^3``
    FLOPs each."""
    import tensorflow as tf

    @tf.function
    def matmul(a, b):
        return tf.matmul(a, b)

    best = {"flops": 0.0}
    for n in sizes:
        a = tf.cast(tf.random.stateless_normal((n, n), seed=(1, 2), dtype=tf.float32), dtype)
        b = tf.cast(tf.random.stateless_normal((n, n), seed=(3, 4), dtype=tf.float32), dtype)
        matmul(a, b).numpy()  # trace and warm up
        fastest = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a, b).numpy()
            fastest = min(fastest, time.perf_counter() - t0)
        flops = 2.0 * n ** 3 / fastest
        if flops > best["flops"]:
            best = {"flops": flops, "n": n, "seconds": fastest}
    return best


def train_images_per_second(config, spec, steps: int = 20, warmup: int = 3, min_seconds: float = 0.0) -> dict:
    """Training images/s of the stage's model alone (inputs in memory) with the run's optimizer: ``steps``
    steps, repeated until they took ``min_seconds`` in all (short timings are mostly noise)."""
    import keras
    import tensorflow as tf

    from retina_scale.models.complexity import count_complexity
    from retina_scale.training.distribute import DistributedTrainer
    from retina_scale.training.optim import make_optimizer
    from retina_scale.training.stage import build_stage_model

    strategy = tf.distribute.get_strategy()
    batch = config.global_batch_size
    model = build_stage_model(config, spec)
    optimizer = make_optimizer(config.optim)
    trainer = DistributedTrainer(model, optimizer, strategy, batch, loss=config.loss)
    size = spec.input_size
    image = tf.random.stateless_uniform((size, size, 3), seed=(5, 6), maxval=255.0)
    examples = tf.data.Dataset.from_tensors((image, tf.constant(2.0))).repeat()
    iterator = trainer.distribute_training(lambda: examples)
    trainer.train_steps(iterator, warmup)
    t0 = time.perf_counter()
    done = 0
    while done == 0 or time.perf_counter() - t0 < min_seconds:
        trainer.train_steps(iterator, steps)
        done += steps
    seconds = time.perf_counter() - t0
    macs = count_complexity(model, size).macs
    weights = model.count_params()
    keras.backend.clear_session()
    return {"images_per_s": done * batch / seconds, "steps": done, "batch": batch, "seconds": seconds,
            "forward_macs": macs, "weights": weights}


def input_images_per_second(config, spec, stage_cfg, cache_dir, splits_file, batches: int = 20,
                            warmup: int = 2) -> dict:
    """Images/s of the stage's training input alone: draw, decode, augment, batch (no model)."""
    from retina_scale.training.stage import stage_input

    inp = stage_input(config, spec, stage_cfg, cache_dir, splits_file, "train", training=True)
    batch = config.global_batch_size
    per_epoch = inp.steps_per_epoch(batch)
    epochs = -(-(batches + warmup) // max(1, per_epoch)) + 1
    iterator = iter(inp.dataset(batch, training=True, epochs=epochs))
    for _ in range(warmup):
        next(iterator)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(iterator)  # the batch is decoded, augmented and materialised here
    seconds = time.perf_counter() - t0
    return {"images_per_s": batches * batch / seconds, "batches": batches, "batch": batch,
            "train_images": len(inp), "steps_per_epoch": per_epoch}


def predict_images_per_second(export_path, size: int, batch: int = 32, repeats: int = 5) -> dict:
    """Images/s of an exported SavedModel's ``serving_default`` on a batch of images at ``size``."""
    import tensorflow as tf

    from retina_scale.serving.export import load_export

    serve, _ = load_export(export_path)
    images = tf.random.stateless_uniform((batch, size, size, 3), seed=(7, 8), maxval=255.0)
    serve(images=images)  # warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        serve(images=images)["grade"].numpy()
    seconds = time.perf_counter() - t0
    return {"images_per_s": repeats * batch / seconds, "batch": batch, "repeats": repeats}


def measure_run_throughput(run_dir, steps: int = 20, log: Callable[[str], None] | None = None,
                           peak_sizes=(1024, 2048, 4096)) -> dict:
    """Every measurement above for each stage of the finished run in ``run_dir``.

    Returns:
        A JSON-serialisable dict: ``machine``, ``peak`` (matmul), and ``stages`` (one dict per stage:
        ``train``, ``input``, ``predict``, ``achieved_flops``, ``fraction_of_peak``, and
        ``epoch_images_per_s``: the run's own epochs, training and validation included).
    """
    import keras
    import tensorflow as tf

    from retina_scale.config import TrainConfig
    from retina_scale.evidence.report import load_run
    from retina_scale.models.convnet import get_stage
    from retina_scale.run_layout import RunLayout
    from retina_scale.utils.typed_config import load_config

    run = load_run(run_dir)  # refuses a folder without a finished run
    layout = RunLayout.from_folder(run_dir)
    config = load_config(TrainConfig, layout.config)
    say = log or (lambda text: None)

    say("Measuring the fp32 matmul peak ...")
    peak = matmul_peak(peak_sizes)
    say(f"  {peak['flops'] / 1e9:.1f} GFLOP/s (n={peak['n']})")
    stages = []
    for stage_cfg, result in zip(config.stages, run["stages"]):
        spec = get_stage(stage_cfg.stage)
        say(f"Stage {spec.name} ({spec.input_size} px): training step, input pipeline, export ...")
        train = train_images_per_second(config, spec, steps=steps)
        achieved = 3.0 * train["forward_macs"] * 2.0 * train["images_per_s"]
        inp = input_images_per_second(config, spec, stage_cfg, layout.cache, layout.splits, batches=steps)
        predict = None
        if result.get("export_path") and Path(result["export_path"]).exists():
            predict = predict_images_per_second(result["export_path"], spec.input_size, config.global_batch_size)
            keras.backend.clear_session()
        epoch_seconds = [r["seconds"] for r in result["history"]]
        images_per_epoch = inp["steps_per_epoch"] * inp["batch"]
        epoch_rate = images_per_epoch * len(epoch_seconds) / sum(epoch_seconds) if epoch_seconds else None
        record = {
            "stage": spec.name, "size": spec.input_size, "train": train, "input": inp, "predict": predict,
            "achieved_flops": achieved, "fraction_of_peak": achieved / peak["flops"],
            "epoch_images_per_s": epoch_rate,
        }
        say(f"  train {train['images_per_s']:.1f} img/s = {achieved / 1e9:.2f} GFLOP/s "
            f"({record['fraction_of_peak']:.1%} of peak); input {inp['images_per_s']:.0f} img/s; "
            f"predict {predict['images_per_s']:.1f} img/s" if predict else "  (no export to time)")
        stages.append(record)
    return {
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "devices": [d.device_type for d in tf.config.list_physical_devices()],
        },
        "width": config.model.width,
        "peak": peak,
        "stages": stages,
    }


def format_throughput(result: dict) -> str:
    """A table of ``measure_run_throughput``'s result, for people."""
    header = ("stage", "size", "train img/s", "GFLOP/s", "of peak", "input img/s", "predict img/s",
              "epoch img/s")
    rows = []
    for s in result["stages"]:
        rows.append((s["stage"], str(s["size"]), f"{s['train']['images_per_s']:.1f}",
                     f"{s['achieved_flops'] / 1e9:.2f}", f"{s['fraction_of_peak']:.1%}",
                     f"{s['input']['images_per_s']:.0f}",
                     f"{s['predict']['images_per_s']:.1f}" if s.get("predict") else "-",
                     f"{s['epoch_images_per_s']:.1f}" if s.get("epoch_images_per_s") else "-"))
    lines = [text_table(header, rows, right=range(1, len(header)))]
    peak = result["peak"]
    lines.append(f"fp32 matmul peak: {peak['flops'] / 1e9:.1f} GFLOP/s (n={peak['n']}); achieved training FLOP/s = "
                 "3 x forward multiply-adds x 2 x train img/s")
    return "\n".join(lines)
