"""The resolution study: does grading improve with input resolution, and does stepwise training pay?

One study folder holds everything the report needs::

    <out>/data/synthetic/     the embedded synthetic data set (when no data.data is given)
    <out>/data/cache/         the per-size cache, shared by both runs
    <out>/runs/stepwise/      the ladder (a normal stepwise run)
    <out>/runs/scratch/       the top stage alone from orthogonal initialisation, for the ladder's time
    <out>/throughput.json     per-stage speeds and this machine's fp32 matmul peak
    <out>/REPORT.md, report.json, figures/*.png

Every step is skipped when its result is already there, so an interrupted study resumes where it
stopped (the runs themselves resume mid-stage).

Example:
>>> from retina_scale.config import load_train_config
>>> summary = run_study("runs/resolution-study", load_train_config("study"))
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from retina_scale.config import StageConfig, TrainConfig
from retina_scale.utils.fileio import read_json as _read_json
from retina_scale.utils.fileio import write_json as _write_json


def study_configs(config: TrainConfig, out) -> TrainConfig:
    """The ladder's config placed in the study folder: runs under ``<out>/runs``, exports under
    ``<out>/saved_models``, the shared cache under ``<out>/data/cache`` (unless the config names one)."""
    out = Path(out)
    data = config.data
    if data.cache is None:
        data = dataclasses.replace(data, cache=str(out / "data" / "cache"))
    return dataclasses.replace(config, name="stepwise", runs_dir=str(out / "runs"),
                               export_dir=str(out / "saved_models"), data=data)


def scratch_config(ladder: TrainConfig, run_dir) -> TrainConfig:
    """The from-scratch control: the ladder's top stage alone, from orthogonal initialisation, with
    the first stage's learning rate (a net that starts from nothing), for the ladder's training time.

    The ladder's time is the sum of its epochs' seconds (training and validation of every stage;
    transfers, test evaluation and exports are not counted). The control's epoch count is that time
    over the top stage's mean epoch time (so the learning-rate drop falls where it would), and
    ``max_seconds`` stops it once the ladder's time is spent.
    """
    from retina_scale.evidence.report import cumulative_curve, load_run

    stages = load_run(run_dir)["stages"]
    budget = cumulative_curve(stages)[-1]["elapsed"]  # the sum of every epoch's seconds, all stages
    top = stages[-1]["history"]
    per_epoch = sum(r["seconds"] for r in top) / len(top)
    epochs = max(1, round(budget / per_epoch))
    first = ladder.stages[0]
    lr = first.lr if first.lr is not None else ladder.optim.lr
    stage = StageConfig(ladder.stages[-1].stage, epochs, lr=lr,
                        augment_strength=ladder.stages[-1].augment_strength, max_seconds=round(budget, 1))
    tune = dataclasses.replace(ladder.tune, enabled=False)
    return dataclasses.replace(ladder, name="scratch", stages=[stage], tune=tune, export=False)


def run_study(out, config: TrainConfig, *, scratch: bool = True, throughput: bool = True,
              throughput_steps: int = 20, peak_sizes=(1024, 2048, 4096), verbose: int = 1,
              log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) the ladder, the from-scratch control and the throughput measurement in
    ``out``, then writes the report there.

    Args:
        out: the study folder.
        config: the ladder's ``TrainConfig`` (``load_train_config("study")``, ``"study-full"``, ...).
        scratch: also train the top stage from scratch for the ladder's time (the report's part 7).
        throughput: also measure speeds and the machine's fp32 peak (part 8).
        throughput_steps: timed training steps per stage.
        peak_sizes: matrix sizes of the fp32 matmul peak measurement (the best counts).
        verbose: 1 shows progress; 0 is silent.

    Returns:
        The report's summary (also in ``<out>/report.json``).
    """
    from retina_scale.config import check_config
    from retina_scale.training.stepwise import StepwiseScaler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ladder = study_configs(config, out)
    check_config(ladder)
    timings = _read_json(out / "study.json") if (out / "study.json").exists() else {}

    def step(name, fn):
        if name in timings:
            return
        t0 = time.time()
        fn()
        timings[name] = round(time.time() - t0, 1)
        _write_json(out / "study.json", timings)

    if ladder.data.data is None:  # both runs must see the same photos: make them once, here
        import os

        from retina_scale.training.stage import ensure_synthetic_data

        workers = ladder.data.workers or os.cpu_count() or 1
        step("synthetic_seconds", lambda: ensure_synthetic_data(
            out / "data", ladder.data, workers, progress=bool(verbose), log=log if verbose else None))
        ladder = dataclasses.replace(ladder, data=dataclasses.replace(ladder.data, data=str(out / "data" / "synthetic")))
    ladder_dir = Path(ladder.runs_dir) / ladder.name
    step("ladder_seconds", lambda: StepwiseScaler(ladder, verbose=verbose, log=log).run())
    scratch_dir = None
    if scratch:
        scratch_cfg = scratch_config(ladder, ladder_dir)
        scratch_dir = Path(scratch_cfg.runs_dir) / scratch_cfg.name
        if verbose:
            log(f"From scratch: stage {scratch_cfg.stages[0].stage} for {scratch_cfg.stages[0].max_seconds:.0f} s "
                f"(the ladder's training time), up to {scratch_cfg.stages[0].epochs} epochs")
        step("scratch_seconds", lambda: StepwiseScaler(scratch_cfg, verbose=verbose, log=log).run())
    throughput_file = None
    if throughput:
        from retina_scale.evidence.throughput import measure_run_throughput

        throughput_file = out / "throughput.json"

        def measure():
            result = measure_run_throughput(ladder_dir, steps=throughput_steps, log=log if verbose else None,
                                            peak_sizes=peak_sizes)
            _write_json(throughput_file, result)
        step("throughput_seconds", measure)
    from retina_scale.evidence.report import write_report

    return write_report(ladder_dir, out, scratch_dir=scratch_dir, throughput_file=throughput_file, study=timings)
