#!/usr/bin/env python3
"""Training throughput against the machine's limit and against peers: the README's performance table.

For each configuration (width x stage x precision), in one process of its own (so no configuration
inherits another's threads, traces or memory), with global batch 32:

- the dense matmul peak of this machine in float32 (and bf16 where the CPU has native bf16);
- our training step's img/s (``DistributedTrainer``, inputs held in memory:
  ``retina_scale.evidence.throughput.train_images_per_second``) and its fraction of the peak of its
  precision, counting 3 x forward multiply-adds x 2 FLOPs per image;
- Keras ``fit`` on the identical model (same builder, same precision, same optimizer, MSE, no XLA) on
  the same in-memory batches: ``fit_ratio`` = fit img/s / ours;
- whole epochs of a real one-stage run (``StepwiseScaler``: the cached, augmented and resampled input,
  validation included, the quick preset's 600 synthetic photos) against the step alone:
  ``epoch_ratio`` = epoch img/s (median of the epochs after the first, which traces) / ours.

Usage::

    python benchmarks/train_throughput.py --quick --json benchmarks/train_throughput_quick.json
    python benchmarks/train_throughput.py --json /tmp/full.json --widths 0.25,0.5,1 --sizes 112,224,448

``--quick`` takes a few steps per measurement and measures whole epochs at width 0.25 only (the quick
preset's), to finish in about 5 minutes on 2 cores; the default measures more steps and every row's epochs.
The synthetic photos and their cache live in ``--work`` (default ``/tmp/retina-train-throughput``) and are
reused by later runs. Ratios are taken within one process; absolute numbers move with the machine's load
(``machine.load`` records it before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 32
STEPS = {"quick": {112: 8, 224: 4, 448: 2, 896: 1}, "full": {112: 16, 224: 8, 448: 4, 896: 2}}
"""Steps per timed call; calls repeat until MIN_SECONDS have passed."""
MIN_SECONDS = {"quick": 1.5, "full": 5.0}
EPOCHS = {"quick": 3, "full": 4}


def _config(width: float, precision: str, work: Path, extra=()):
    """The quick preset at ``width`` and ``precision``, reading the photos and cache of :func:`prepare_data`."""
    from retina_scale.config import load_train_config
    from retina_scale.run_layout import RunLayout

    data = RunLayout(work / "runs" / "data")  # the run folder prepare_data makes its data in
    return load_train_config("quick", [
        f"model.width={width}", f"precision={precision}", f"global_batch_size={BATCH}", "tune.enabled=false",
        "export=false", "eval_bootstrap=10", "data.workers=1", f"runs_dir={json.dumps(str(work / 'runs'))}",
        f"data.data={json.dumps(str(data.synthetic))}", f"data.cache={json.dumps(str(data.cache))}", *extra])


def prepare_data(work: Path, sizes) -> None:
    """The quick preset's synthetic photos and their cache at ``sizes`` in ``work`` (made once, then reused)."""
    from retina_scale.run_layout import RunLayout
    from retina_scale.training.stage import prepare_run_data

    stages = ", ".join(f"{{stage: '{s}', epochs: 1}}" for s in sorted(sizes))
    config = _config(0.25, "float32", work, [f"stages=[{stages}]", "name=data", "data.data=null", "data.cache=null"])
    prepare_run_data(config, RunLayout.of(config), progress=False)


def fit_images_per_second(config, spec, steps: int, warmup: int = 2, min_seconds: float = 0.0) -> float:
    """Keras ``fit`` img/s on the model ``train_images_per_second`` times, with the run's optimizer: fits of
    ``steps`` steps until they took ``min_seconds``."""
    import keras
    import tensorflow as tf

    from retina_scale.training.optim import make_optimizer
    from retina_scale.training.stage import build_stage_model

    model = build_stage_model(config, spec)
    model.compile(optimizer=make_optimizer(config.optim), loss="mse", jit_compile=False)
    size = spec.input_size
    image = tf.random.stateless_uniform((size, size, 3), seed=(5, 6), maxval=255.0)
    batches = tf.data.Dataset.from_tensors((image, tf.constant([2.0]))).repeat().batch(BATCH).prefetch(2)
    model.fit(batches, epochs=1, steps_per_epoch=warmup, verbose=0)  # trace and warm up
    t0 = time.perf_counter()
    done = 0
    while done == 0 or time.perf_counter() - t0 < min_seconds:
        model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
        done += steps
    seconds = time.perf_counter() - t0
    keras.backend.clear_session()
    return done * BATCH / seconds


def epoch_images_per_second(config, spec, epochs: int) -> dict:
    """Whole epochs of a one-stage run (training and validation) on the cached synthetic photos."""
    from retina_scale.run_layout import RunLayout
    from retina_scale.training.stepwise import StepwiseScaler

    name = f"epochs-{spec.name}-{config.model.width:g}-{config.precision}"
    config = _config(config.model.width, config.precision, Path(config.runs_dir).parent,
                     [f"name={name}", f"stages=[{{stage: {spec.name}, epochs: {epochs}}}]"])
    layout = RunLayout.of(config)
    shutil.rmtree(layout.root, ignore_errors=True)  # train again, not "finished earlier"
    report = StepwiseScaler(config, verbose=0).run()
    history = (json.loads(layout.stage(1, spec.name).state.read_text()))["history"]
    train = sum(1 for line in layout.splits.read_text().splitlines()[1:] if line.endswith(",train"))
    per_epoch = train // BATCH * BATCH
    rates = [per_epoch / row["seconds"] for row in history]
    shutil.rmtree(layout.root, ignore_errors=True)
    return {"epoch_img_s": rates, "images_per_epoch": per_epoch, "stage_seconds": report["stages"][0]["seconds"]}


def measure_row(width: float, size: int, precision: str, work: Path, mode: str, with_epochs: bool) -> dict:
    """One configuration, in this process: peak(s), our step, ``fit`` and (optionally) whole epochs."""
    from retina_scale.evidence.throughput import matmul_peak, train_images_per_second
    from retina_scale.models.convnet import get_stage

    spec = get_stage(size)
    config = _config(width, precision, work)
    peaks = {"float32": matmul_peak((1024, 2048, 4096), repeats=3)["flops"]}
    if precision == "mixed_bfloat16":
        peaks["bfloat16"] = matmul_peak((1024, 2048, 4096), repeats=3, dtype="bfloat16")["flops"]
    steps, seconds = STEPS[mode][size], MIN_SECONDS[mode]
    ours = train_images_per_second(config, spec, steps=steps, warmup=2, min_seconds=seconds)
    fit = fit_images_per_second(config, spec, steps=steps, min_seconds=seconds)
    flops = 3.0 * ours["forward_macs"] * 2.0 * ours["images_per_s"]
    peak = peaks["bfloat16" if precision == "mixed_bfloat16" else "float32"]
    row = {"width": width, "size": size, "stage": spec.name, "precision": precision, "batch": BATCH,
           "steps": ours["steps"],
           "img_s": ours["images_per_s"], "gflops": flops / 1e9, "peak_gflops": peak / 1e9,
           "peak_fraction": flops / peak, "fp32_peak_gflops": peaks["float32"] / 1e9,
           "fit_img_s": fit, "fit_ratio": fit / ours["images_per_s"], "epoch_img_s": None, "epoch_ratio": None}
    if with_epochs:
        epochs = epoch_images_per_second(config, spec, EPOCHS[mode])
        later = statistics.median(epochs["epoch_img_s"][1:])
        row.update(epoch_img_s=later, epoch_ratio=later / ours["images_per_s"], epochs=epochs["epoch_img_s"])
    return row


def machine_info() -> dict:
    import keras
    import tensorflow as tf

    from retina_scale.utils.hardware import bf16_capable, cpu_flags, cpu_model

    flags = cpu_flags()
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "bf16_native": bf16_capable(flags), "flags": sorted(flags),
            "vector_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")}


def _rows_wanted(args, bf16: bool):
    precisions = [p for p in args.precisions.split(",") if p != "mixed_bfloat16" or bf16]
    for width in (float(w) for w in args.widths.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            for precision in precisions:
                epochs = size in args.epoch_sizes and (not args.quick or (width == 0.25 and precision == "float32"))
                yield width, size, precision, epochs


def format_rows(rows) -> str:
    from retina_scale.utils.tables import number, text_table

    header = ("width", "px", "precision", "img/s", "GFLOP/s", "peak", "of peak", "fit / ours", "epoch / step")
    body = [(f"{r['width']:g}", str(r["size"]), r["precision"], f"{r['img_s']:.1f}", f"{r['gflops']:.0f}",
             f"{r['peak_gflops']:.0f}", f"{r['peak_fraction']:.1%}", number(r["fit_ratio"], ".2f"),
             number(r["epoch_ratio"], ".2f")) for r in rows]
    return text_table(header, body, right=range(3, len(header)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps; whole epochs at width 0.25 only")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--widths", default="0.25,0.5")
    parser.add_argument("--sizes", default="112,224,448")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16",
                        help="mixed_bfloat16 is measured where the CPU has native bf16")
    parser.add_argument("--epoch-sizes", default="224,448", help="sizes whose whole epochs are measured")
    parser.add_argument("--work", default="/tmp/retina-train-throughput")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one configuration, in this process (the parent's child)
    args = parser.parse_args(argv)
    args.epoch_sizes = {int(s) for s in args.epoch_sizes.split(",") if s}
    work, mode = Path(args.work), "quick" if args.quick else "full"
    if args.row:
        width, size, precision, epochs = json.loads(args.row)
        print("ROW " + json.dumps(measure_row(width, size, precision, work, mode, epochs)), flush=True)
        return 0
    t0 = time.time()
    machine = machine_info()
    machine["load_before"] = os.getloadavg()
    wanted = list(_rows_wanted(args, machine["bf16_native"]))
    if any(epochs for *_, epochs in wanted):
        prepare_data(work, {size for _, size, _, epochs in wanted if epochs})
    rows = []
    for spec in wanted:
        cmd = [sys.executable, __file__, "--work", str(work), "--row", json.dumps(spec)] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        lines = [line for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode or not lines:
            raise SystemExit(f"configuration {spec} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][4:]))
        print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    machine["load_after"] = os.getloadavg()
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine, "seconds": round(time.time() - t0, 1), "rows": rows}
    print(format_rows(rows))
    print(f"{result['seconds']:.0f} s; load {machine['load_before']} -> {machine['load_after']}")
    if args.json:
        from retina_scale.utils.fileio import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
