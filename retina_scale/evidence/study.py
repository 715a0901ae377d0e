"""The resolution study: does grading improve with input resolution, and does stepwise training pay?

One study folder (:class:`retina_scale.run_layout.StudyLayout`) holds everything the report needs::

    <out>/data/synthetic/     the embedded synthetic data set (when no data.data is given)
    <out>/data/cache/         the per-size cache, shared by both runs
    <out>/runs/stepwise/      the ladder (a normal stepwise run)
    <out>/runs/scratch/       the top stage alone from orthogonal initialisation, for the ladder's time
    <out>/saved_models/       the ladder's exports
    <out>/study.json          the wall time of each step
    <out>/throughput.json     per-stage speeds and this machine's fp32 matmul peak
    <out>/explain/<i>-<stage>/  Grad-CAM of each ladder stage on the test photos with lesions, and the lesion
                              hit rates (the synthetic benchmark only: it needs lesions.csv)
    <out>/REPORT.md, report.json, figures/*.png

Every step is skipped when its result is already there, so an interrupted study resumes where it
stopped (the runs themselves resume mid-stage).

Example (it trains for an hour or more, so it is not run as a doctest; ``retina-scale study`` runs it)::

    from retina_scale.config import load_train_config
    summary = run_study("runs/resolution-study", load_train_config("study"))
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from retina_scale.config import StageConfig, TrainConfig
from retina_scale.run_layout import RunLayout, StudyLayout
from retina_scale.utils.fileio import read_json as _read_json
from retina_scale.utils.fileio import write_json as _write_json


def _placed(config: TrainConfig, run: RunLayout) -> TrainConfig:
    """``config`` with ``runs_dir`` and ``name`` such that its run folder is ``run.root``."""
    return dataclasses.replace(config, name=run.root.name, runs_dir=str(run.root.parent))


def study_configs(config: TrainConfig, out) -> TrainConfig:
    """The ladder's config placed in the study folder ``out``: the run at ``runs/stepwise``, exports
    under ``saved_models``, the shared cache under ``data/cache`` (unless the config names one)."""
    study = StudyLayout(out)
    data = config.data
    if data.cache is None:
        data = dataclasses.replace(data, cache=str(study.cache))
    return dataclasses.replace(_placed(config, study.ladder), export_dir=str(study.export_dir), data=data)


def scratch_config(ladder: TrainConfig, study: StudyLayout) -> TrainConfig:
    """The from-scratch control: the ladder's top stage alone, from orthogonal initialisation, with
    the first stage's learning rate (a net that starts from nothing), for the ladder's training time,
    in the study's ``runs/scratch``.

    The ladder's time is the sum of its epochs' seconds (training and validation of every stage;
    transfers, test evaluation and exports are not counted). The control's epoch count is that time
    over the top stage's mean epoch time (so the learning-rate drop falls where it would), and
    ``max_seconds`` stops it once the ladder's time is spent.
    """
    from retina_scale.evidence.report import cumulative_curve, load_run

    stages = load_run(study.ladder.root)["stages"]
    budget = cumulative_curve(stages)[-1]["elapsed"]  # the sum of every epoch's seconds, all stages
    top = stages[-1]["history"]
    per_epoch = sum(r["seconds"] for r in top) / len(top)
    epochs = max(1, round(budget / per_epoch))
    first = ladder.stages[0]
    lr = first.lr if first.lr is not None else ladder.optim.lr
    stage = StageConfig(ladder.stages[-1].stage, epochs, lr=lr,
                        augment_strength=ladder.stages[-1].augment_strength, max_seconds=round(budget, 1))
    tune = dataclasses.replace(ladder.tune, enabled=False)
    fusion = dataclasses.replace(ladder.fusion, enabled=False)  # the control is the top stage alone
    return _placed(dataclasses.replace(ladder, stages=[stage], tune=tune, fusion=fusion, export=False), study.scratch)


class _Steps:
    """Runs each named step once: its wall time goes to ``study.json``, and a step recorded there is
    not run again."""

    def __init__(self, study: StudyLayout):
        self.path = study.timings
        self.timings = _read_json(self.path) if self.path.exists() else {}

    def __call__(self, name: str, fn: Callable[[], object]) -> None:
        if name in self.timings:
            return
        t0 = time.time()
        fn()
        self.timings[name] = round(time.time() - t0, 1)
        _write_json(self.path, self.timings)


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
    from retina_scale.evidence.report import write_report
    from retina_scale.training.stepwise import StepwiseScaler
    from retina_scale.training.tuning import search_hook

    study = StudyLayout(out)
    study.root.mkdir(parents=True, exist_ok=True)
    ladder = study_configs(config, study.root)
    check_config(ladder)
    step = _Steps(study)
    if ladder.data.data is None:  # both runs must see the same photos: make them once, here
        ladder = _with_synthetic_data(ladder, study, step, verbose, log)
    step("ladder_seconds", lambda: StepwiseScaler(
        ladder, lr_search=search_hook(ladder, verbose=verbose, log=log), verbose=verbose, log=log).run())
    scratch_dir = None
    if scratch:
        scratch_cfg = scratch_config(ladder, study)
        scratch_dir = study.scratch.root
        if verbose:
            log(f"From scratch: stage {scratch_cfg.stages[0].stage} for {scratch_cfg.stages[0].max_seconds:.0f} s "
                f"(the ladder's training time), up to {scratch_cfg.stages[0].epochs} epochs")
        step("scratch_seconds", lambda: StepwiseScaler(scratch_cfg, verbose=verbose, log=log).run())
    hit_rates = None
    lesions_csv = Path(ladder.data.data) / "lesions.csv"
    if lesions_csv.is_file():  # the synthetic benchmark: where each stage looks, against the drawn lesions
        from retina_scale.evidence.explain import explain_study

        hit_rates = explain_study(study, lesions_csv, n_boot=ladder.eval_bootstrap, seed=ladder.seed,
                                  progress=bool(verbose), log=log if verbose else None)
    throughput_file = None
    if throughput:
        from retina_scale.evidence.throughput import measure_run_throughput

        throughput_file = study.throughput
        step("throughput_seconds", lambda: _write_json(throughput_file, measure_run_throughput(
            study.ladder.root, steps=throughput_steps, log=log if verbose else None, peak_sizes=peak_sizes)))
    return write_report(study.ladder.root, study.root, scratch_dir=scratch_dir, throughput_file=throughput_file,
                        study=step.timings, hit_rates=hit_rates)


def _with_synthetic_data(ladder: TrainConfig, study: StudyLayout, step: _Steps, verbose: int,
                         log: Callable[[str], None]) -> TrainConfig:
    """Makes (once) the embedded synthetic data set in the study's data folder; the ladder reads it."""
    import os

    from retina_scale.training.stage import ensure_synthetic_data

    workers = ladder.data.workers or os.cpu_count() or 1
    step("synthetic_seconds", lambda: ensure_synthetic_data(
        study.data_dir, ladder.data, workers, progress=bool(verbose), log=log if verbose else None))
    return dataclasses.replace(ladder, data=dataclasses.replace(ladder.data, data=str(study.synthetic)))
