"""Benchmark of the data path: ``prepare`` on EyePACS-size JPEGs, cached input throughput, and the training step
with and without the input pipeline.

Three measurements, each a ratio taken in the same run (the machines are shared and noisy):

1. ``prepare`` on 3888x2592 JPEGs (the scikit-image fundus scaled to an EyePACS-like disc, cut at the top and
   bottom): reduced decoding (``IMREAD_REDUCED_COLOR_*``) against decoding at full size then resizing, one
   process each, for several size sets.
2. Cached input throughput (images/s) of :class:`retina_scale.data.pipeline.CacheInput` with o_O augmentation,
   at 112 / 224 / 448 / 896.
3. The model's training step alone on synthetic tensors held in memory, and end to end from the cache
   (``model.fit`` on each), per stage; the input is not the bottleneck when the ratio is >= 95 %.

``--augment-only`` times the augmentation alone instead (:mod:`retina_scale.data.augment` in the training
input's shape and options), optionally against another implementation in the same process (``--reference``: a
file that defines ``augment_batch`` with the same arguments, e.g. an older commit's pipeline.py).

Usage::

    python benchmarks/input_pipeline.py --images 12 --json benchmarks/input_pipeline.json
    python benchmarks/input_pipeline.py --skip-model          # parts 1 and 2 only
    git show 7a16c39:retina_scale/data/pipeline.py > /tmp/old_pipeline.py
    python benchmarks/input_pipeline.py --augment-only --sizes 224,448 --batches 16,8 --reference /tmp/old_pipeline.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

STAGES = {112: "tiny", 224: "small", 448: "median", 896: "large"}


def make_eyepacs_like(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` 3888x2592 JPEGs (quality 90) of the scikit-image fundus at an EyePACS-like scale."""
    import skimage.data

    rng = np.random.default_rng(seed)
    retina = cv2.cvtColor(skimage.data.retina(), cv2.COLOR_RGB2BGR)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        d = int(rng.integers(2500, 2800))
        disc = cv2.resize(retina, (d, d), interpolation=cv2.INTER_CUBIC)
        if i % 2:
            disc = disc[:, ::-1]
        canvas = np.zeros((2592, 3888, 3), np.uint8)
        x0 = (3888 - d) // 2 + int(rng.integers(-150, 150))
        y0 = (2592 - d) // 2 + int(rng.integers(-40, 40))
        sy0, sy1 = max(0, y0), min(2592, y0 + d)
        canvas[sy0:sy1, x0 : x0 + d] = disc[sy0 - y0 : sy1 - y0]
        name = f"{i // 2}_{'left' if i % 2 == 0 else 'right'}"
        cv2.imwrite(str(folder / f"{name}.jpeg"), canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
        rows.append(f"{name},{i % 5}")
    (folder / "trainLabels.csv").write_text("image,level\n" + "\n".join(rows) + "\n")


def bench_prepare(data: Path, work: Path, size_sets, repeats: int = 1) -> list[dict]:
    from retina_scale.data.cache import prepare_cache
    from retina_scale.config import PreprocessConfig
    from retina_scale.data.sources import read_dataset

    ds = read_dataset(data)
    results = []
    for sizes in size_sets:
        row = {"sizes": list(sizes)}
        for label, reduced in (("reduced", True), ("full", False)):
            best = float("inf")
            for _ in range(repeats):
                out = work / f"prep-{label}-{'-'.join(map(str, sizes))}"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                res = prepare_cache(ds, out, sizes=sizes, config=PreprocessConfig(reduced_decode=reduced),
                                    workers=1, progress=False)
                best = min(best, time.perf_counter() - t)
                assert res.prepared == len(ds.records), res.summary()
            row[f"{label}_s_per_image"] = best / len(ds.records)
        row["speedup"] = row["full_s_per_image"] / row["reduced_s_per_image"]
        if len(sizes) > 1:
            # The naive way: one full-size decode per stage (a separate preprocessing run for each size).
            t = time.perf_counter()
            for size in sizes:
                out = work / f"prep-naive-{size}"
                shutil.rmtree(out, ignore_errors=True)
                prepare_cache(ds, out, sizes=(size,), config=PreprocessConfig(reduced_decode=False), workers=1,
                              progress=False)
            row["naive_per_size_s_per_image"] = (time.perf_counter() - t) / len(ds.records)
            row["speedup_vs_naive"] = row["naive_per_size_s_per_image"] / row["reduced_s_per_image"]
        results.append(row)
        print(f"prepare sizes={sizes}: reduced {row['reduced_s_per_image'] * 1000:.0f} ms/img, "
              f"full {row['full_s_per_image'] * 1000:.0f} ms/img, speedup x{row['speedup']:.2f}"
              + (f"; one full decode per size {row['naive_per_size_s_per_image'] * 1000:.0f} ms/img, "
                 f"x{row['speedup_vs_naive']:.2f}" if "speedup_vs_naive" in row else ""), flush=True)
    return results


def grow_cache(cache: Path, n: int) -> None:
    """Copy a cache's images under new ids until it holds ``n`` (the input pipeline needs a few batches of
    distinct files; preparing that many 3888x2592 photos would take the benchmark's whole budget)."""
    import pandas as pd

    from retina_scale.data.cache import IMAGE_FORMATS, read_config

    ext = IMAGE_FORMATS[read_config(cache)["image_format"]]
    m = pd.read_csv(cache / "manifest.csv", dtype=str, keep_default_na=False)
    sizes = [c[len("bytes_"):] for c in m.columns if c.startswith("bytes_")]
    rows = [m]
    for j in range(1, -(-n // len(m))):
        extra = m.copy()
        extra["image"] = extra["image"] + f"-copy{j}"
        extra["key"] = extra["key"] + f"-copy{j}"
        extra["patient"] = extra["patient"] + f"-copy{j}"
        for key, new in zip(m["key"], extra["key"]):
            for s in sizes:
                shutil.copyfile(cache / s / f"{key}{ext}", cache / s / f"{new}{ext}")
        rows.append(extra)
    pd.concat(rows).iloc[:n].to_csv(cache / "manifest.csv", index=False)


def _images_per_s(ds, batch: int, steps: int, warmup: int = 2) -> float:
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t)


def bench_input(cache: Path, sizes, batches: dict, steps: int) -> dict:
    from retina_scale.data.pipeline import CacheInput

    out = {}
    for size in sizes:
        b = batches[size]
        out[size] = {}
        for mode in (False, True):
            inp = CacheInput(cache, size, resample=None, in_memory=mode)
            ds = inp.dataset(b, epochs=(steps + 4) // inp.steps_per_epoch(b) + 2)
            out[size]["memory" if mode else "files"] = _images_per_s(ds, b, steps)
        print(f"cached input {size}px, batch {b}: {out[size]['files']:.0f} images/s reading files, "
              f"{out[size]['memory']:.0f} images/s in memory", flush=True)
    return out


def _augment_input(module, pool, seeds, batch: int, options):
    """The training input's shape around ``module``'s augmentation: a parallel element map (gather the image; the
    element's draw when ``module`` draws per element), batch, a parallel batch map that augments."""
    import tensorflow as tf

    from retina_scale.config import AugmentConfig

    rng = np.random.default_rng(0)
    pca_vectors = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    pca_std = np.array([30.0, 10.0, 3.0])
    memory = tf.constant(pool)
    index = np.arange(len(seeds)) % len(pool)
    ds = tf.data.Dataset.from_tensor_slices((index, seeds)).repeat()
    auto = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if hasattr(module, "augment_drawn"):
        ds = ds.map(lambda i, s: (tf.gather(memory, i), *module.draw(s)), **auto).batch(batch, drop_remainder=True)
        ds = ds.map(lambda x, u, n: module.augment_drawn(x, u, n, AugmentConfig(), pca_vectors, pca_std), **auto)
    else:  # seeds per element, drawn in the batch function (the version before issue 12)
        ds = ds.map(lambda i, s: (tf.gather(memory, i), s), **auto).batch(batch, drop_remainder=True)
        ds = ds.map(lambda x, s: module.augment_batch(x, s, AugmentConfig(), pca_vectors, pca_std), **auto)
    return ds.with_options(options)


def bench_augment(sizes, batches: dict, steps: int, reference: str | None = None, rounds: int = 3) -> dict:
    """Images/s of the augmentation alone (o_O's settings) in the training input's shape and options (one thread
    per op), per size, from 32 distinct images held in memory; with ``reference`` (a file defining another
    ``augment_batch``, e.g. an older commit's pipeline.py) the implementations alternate, ``rounds`` times each,
    and the best of each is kept. Images per CPU-second of this process are reported too: on a shared machine,
    other processes change them less than the wall-clock rate."""
    import importlib.util

    import tensorflow as tf

    from retina_scale.data import augment

    impls = {"current": augment}
    if reference:
        spec = importlib.util.spec_from_file_location("reference_augment", reference)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        impls["reference"] = module
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1
    options.deterministic = True
    rng = np.random.default_rng(0)
    out = {}
    for size in sizes:
        b = batches[size]
        pool = rng.uniform(0, 255, (32, size, size, 3)).astype(np.float32)
        seeds = np.stack([np.zeros(4096), np.arange(4096)], axis=1).astype(np.int64)
        runs = {name: [] for name in impls}
        cpu = {name: [] for name in impls}
        for _ in range(rounds):
            for name, module in impls.items():
                ds = _augment_input(module, pool, seeds, b, options)
                t = time.process_time()
                runs[name].append(_images_per_s(ds, b, steps, warmup=3))
                cpu[name].append((steps + 3) * b / (time.process_time() - t))
        out[size] = {"batch": b, **{name: max(v) for name, v in runs.items()},
                     "images_per_cpu_s": {name: max(v) for name, v in cpu.items()}, "runs": runs, "cpu_runs": cpu}
        print(f"augmentation {size}px, batch {b}: " + ", ".join(
            f"{name} {max(runs[name]):.0f} images/s (runs {[round(r) for r in runs[name]]}), "
            f"{max(cpu[name]):.0f} images/CPU-s" for name in impls), flush=True)
    return out


def _timed_fit(model, ds, warmup: int, steps: int, batch: int) -> float:
    """Images/s over ``steps`` training steps that follow ``warmup`` steps of the same ``fit`` call."""
    import keras

    stamps = []

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            stamps.append(time.perf_counter())

    model.fit(ds, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[Stamp()])
    return steps * batch / (stamps[warmup + steps - 1] - stamps[warmup - 1])


def bench_model(cache: Path, sizes, batches: dict, steps: dict, width: float, repeats: int = 2) -> dict:
    import keras
    import tensorflow as tf

    from retina_scale.data.pipeline import CacheInput
    from retina_scale.models.convnet import build_model

    out = {}
    for size in sizes:
        b, n = batches[size], steps[size]
        model = build_model(STAGES[size], width=width, seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.003, momentum=0.9, nesterov=True), loss="mse")
        x = tf.random.uniform((b, size, size, 3), 0, 255, seed=1)
        y = tf.random.uniform((b,), 0, 4, seed=2)
        synthetic = tf.data.Dataset.from_tensors((x, y)).repeat()
        inp = CacheInput(cache, size, resample=None)
        real = inp.dataset(b, epochs=(repeats * (n + 2) + 4) // inp.steps_per_epoch(b) + 2).repeat()
        model.fit(synthetic, steps_per_epoch=2, epochs=1, verbose=0)  # build and trace
        # Alternate the two, ``repeats`` times each, keep the best of each (noisy shared machine).
        only, e2e = [], []
        for _ in range(repeats):
            only.append(_timed_fit(model, synthetic, 2, n, b))
            e2e.append(_timed_fit(model, real, 2, n, b))
        out[size] = {"batch": b, "steps": n, "model_only": max(only), "end_to_end": max(e2e),
                     "ratio": max(e2e) / max(only), "in_memory": inp.in_memory,
                     "all_model_only": only, "all_end_to_end": e2e}
        print(f"{STAGES[size]} {size}px batch {b}: model-only {max(only):.1f} img/s, end-to-end {max(e2e):.1f} "
              f"img/s, ratio {100 * max(e2e) / max(only):.1f} % (runs: {[round(v, 1) for v in only]} / "
              f"{[round(v, 1) for v in e2e]})", flush=True)
        keras.backend.clear_session()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=12, help="EyePACS-size JPEGs to make (default 12)")
    p.add_argument("--cached-images", type=int, default=128, help="images in the cache the input reads")
    p.add_argument("--sizes", default="112,224,448,896")
    p.add_argument("--input-steps", type=int, default=20, help="batches timed per size for the input alone")
    p.add_argument("--model-steps", default="20,8,3,2", help="training steps timed per size")
    p.add_argument("--batches", default="32,16,8,4", help="batch size per size")
    p.add_argument("--width", type=float, default=1.0, help="network width multiplier (1.0 = the paper's)")
    p.add_argument("--repeats", type=int, default=2, help="prepare timings: best of this many runs")
    p.add_argument("--model-repeats", type=int, default=2, help="alternating model-only / end-to-end runs")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--augment-only", action="store_true", help="time the augmentation alone (no data, no model)")
    p.add_argument("--reference", help="with --augment-only: a file defining another augment_batch to time too")
    p.add_argument("--rounds", type=int, default=3, help="with --augment-only: alternating runs of each")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = dict(zip(sizes, [int(b) for b in args.batches.split(",")]))
    msteps = dict(zip(sizes, [int(s) for s in args.model_steps.split(",")]))
    if args.augment_only:
        result = {"augment_images_per_s": bench_augment(sizes, batches, args.input_steps, args.reference, args.rounds)}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="rs-bench-"))
    try:
        import tensorflow as tf

        info = {"machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
                "python": platform.python_version(), "tensorflow": tf.__version__, "opencv": cv2.__version__,
                "numpy": np.__version__, "images": args.images}
        print(json.dumps(info), flush=True)
        data = work / "eyepacs"
        make_eyepacs_like(data, args.images)
        prep = bench_prepare(data, work, [tuple(sizes), (112, 224), (448,), (896,)], repeats=args.repeats)
        cache = work / f"prep-reduced-{'-'.join(map(str, sizes))}"
        grow_cache(cache, args.cached_images)
        inp = bench_input(cache, sizes, batches, args.input_steps)
        model = {} if args.skip_model else bench_model(cache, sizes, batches, msteps, args.width, args.model_repeats)
        result = {"info": info, "prepare": prep, "input_images_per_s": inp, "model": model, "width": args.width}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
