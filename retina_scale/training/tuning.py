"""Keras Tuner searches the learning rate of every stage of the ladder.

The right learning rate differs per stage: a freshly initialised tiny net wants a large one, a large
net initialised from a median one a much smaller one. For one stage, the search runs trials that each

1. take the stage's one model, built once inside the strategy's scope (``StageHyperModel.build``),
2. load the SAME transferred initial weights into it (the stage's ``initial.npz``; every trial records a
   fingerprint of the weights it starts from, ``initial_weights_hash``),
3. reset the optimizer's state and set the trial's learning rate, a variable (log-uniform in
   ``tune.lr_min``..``tune.lr_max``; optional extra dimensions ``weight_decay``, ``batch_size``,
   ``momentum`` from ``tune.extra``),
4. train ``tune.epochs`` epochs of ``tune.data_fraction`` of each epoch's training draw with the
   trainer's own custom loop (``DistributedTrainer``; ``model.fit`` fails under
   ``MultiWorkerMirroredStrategy`` in Keras 3.15),
5. and score its last epoch by ``tune.objective``: kappa at cut-offs optimised on validation (the
   default, the same measure that picks a stage's best epoch), kappa at the fixed cut-offs, or validation
   loss; ties go to the lower validation loss, then to the earlier trial. Fixed-cut-off kappa reads 0 for
   every short trial whose scores have not yet spread past 0.5 (issue 15: all 3 tiny-stage trials of the
   old quick preset), so it cannot choose.

The best trial's values then drive the stage's full fine-tuning: ``search_hook(config)`` is the
trainer's hook (``StepwiseScaler(config, lr_search=search_hook(config))``), a ``LearningRateSearch``
when ``tune.enabled``. A trial whose loss diverges scores kappa -1 (both kinds) and loss ``inf``: a result (too
large a learning rate), not a failure.

Each stage has one Keras Tuner project, ``stages/<i>-<stage>/tuning/``, opened with
``overwrite=False``: a search interrupted and started again continues with the remaining trials (an
interrupted trial is run again from the initial weights), and a finished search is read back, not
repeated. ``tuning/search.json`` (the settings, the initial weights' fingerprint and the table) and
``tuning/search.md`` (the table for people) are written when the search ends.

The trials of a stage share one model and one ``DistributedTrainer`` (one more per distinct
``batch_size``, ``weight_decay`` or ``momentum`` of ``tune.extra``: the step is traced for a batch
size, and Keras bakes those two into the optimizer's update), so each step function is traced once per
stage, not once per trial (each trace costs 1-3 s on a CPU, issue 13), and a trial is numerically the
run a fresh model and trainer would make.

Keras Tuner traps handled here: the hypermodel is not given to Keras Tuner (``hypermodel=None``;
``StageTuner.run_trial`` builds it), because ``Tuner.__init__`` would build the model once at
construction, outside the strategy's scope; Keras Tuner's own ``run_trial`` calls
``keras.backend.clear_session()`` before every build, which resets a mixed-precision policy (ours
builds once, under the run's ``precision`` set inside the build); and ``fit`` callbacks are deep-copied per
trial, so anything a trial keeps on disk lives in that trial's own folder (``trial_<id>/``), never in a
shared one.

Distributed search is Keras Tuner's chief/worker mode: start one process with
``KERASTUNER_TUNER_ID=chief`` (it runs the oracle and no trial) and any number with
``KERASTUNER_TUNER_ID=worker0, worker1, ...``, all with ``KERASTUNER_ORACLE_IP`` and
``KERASTUNER_ORACLE_PORT`` naming the chief (see ``retina-scale tune --help`` and the README).

Example (searches and trains every stage of the quick ladder: minutes on a CPU)::

    from retina_scale.config import load_train_config
    from retina_scale.training.stage import format_search_table
    from retina_scale.training.stepwise import StepwiseScaler

    config = load_train_config("quick", ["tune.max_trials=5", "tune.tuner=bayesian"])
    report = StepwiseScaler(config, lr_search=search_hook(config)).run()
    print(format_search_table(report["stages"][0]["search"]))
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Callable

import keras
import keras_tuner
import numpy as np

from retina_scale.config import TrainConfig
from retina_scale.run_layout import StageLayout
from retina_scale.training.checkpoint import model_weights_from_checkpoint, restore_checkpoint
from retina_scale.training.distribute import DistributedTrainer
from retina_scale.training.optim import make_optimizer, stage_learning_rate
from retina_scale.training.stage import (
    StageContext, build_stage_model, check_same_config, format_search_table, machine_precision, make_predictor,
    prepare_run_data, process_layout, save_initial_weights, stage_input, validation_row,
)
from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import read_json, write_json, write_text
from retina_scale.utils.locking import holding, run_folder_lock
from retina_scale.utils.typed_config import ConfigError, dump_config, to_dict

DIVERGED_KAPPA = -1.0
STAGE_SEED_STRIDE = 10007
FINISHED = ("COMPLETED", "FAILED")  # the trial statuses Keras Tuner does not run again


# ------------------------------------------------------------------------------------------- space
def build_search_space(tune):
    """The ``keras_tuner.HyperParameters`` of a ``TuneConfig``: ``lr`` (log-uniform) and the extras.

    Raises:
        ConfigError: a bad space (see ``check_tune_config``), before any trial.
    """
    from retina_scale.config import check_tune_config

    check_tune_config(tune)
    hp = keras_tuner.HyperParameters()
    hp.Float("lr", tune.lr_min, tune.lr_max, sampling="log")
    for name, dim in sorted(tune.extra.items()):
        integer = name == "batch_size"
        if dim.values is not None:
            values = sorted({int(v) if integer else float(v) for v in dim.values})
            hp.Choice(name, values)
        elif integer:
            hp.Int(name, int(dim.min), int(dim.max), step=int(dim.step or 1), sampling=dim.sampling)
        else:
            hp.Float(name, dim.min, dim.max, step=dim.step, sampling=dim.sampling)
    return hp


def make_oracle(tune, hyperparameters, stage_index: int = 1):
    """Keras Tuner's ``random``, ``bayesian`` or ``hyperband`` oracle on the space, optimising ``tune.objective``
    (the kappas up, the loss down).

    The oracle's seed is ``tune.seed + 10007 * (stage_index - 1)``: each stage draws its own learning
    rates (Keras Tuner steps its seed by one per value drawn, so neighbouring seeds would repeat a
    stage's draws one trial later), and every worker of a run draws the same ones."""
    objective = keras_tuner.Objective(tune.objective, direction="min" if tune.objective == "val_loss" else "max")
    common = dict(objective=objective, hyperparameters=hyperparameters, allow_new_entries=False,
                  tune_new_entries=False, seed=tune.seed + STAGE_SEED_STRIDE * (stage_index - 1))
    if tune.tuner == "random":
        return keras_tuner.oracles.RandomSearchOracle(max_trials=tune.max_trials, **common)
    if tune.tuner == "bayesian":
        return keras_tuner.oracles.BayesianOptimizationOracle(max_trials=tune.max_trials, **common)
    if tune.tuner == "hyperband":
        # Hyperband sets its own number of trials from max_epochs (= tune.epochs) and factor 3.
        return keras_tuner.oracles.HyperbandOracle(max_epochs=tune.epochs, factor=3, hyperband_iterations=1,
                                                   **common)
    raise ConfigError(f"tune.tuner: unknown tuner {tune.tuner!r}; accepted: random, bayesian, hyperband")


def weights_fingerprint(arrays) -> float:
    """A checksum of a list of weight arrays, as a float (52 bits of SHA-256; a Keras Tuner metric
    must be a number). Model weights in layer order, or an ``.npz`` checkpoint's ``model/`` arrays
    in the same order, give the same value for the same weights."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str((a.dtype.str, a.shape)).encode())
        digest.update(a.tobytes())
    return float(int(digest.hexdigest()[:13], 16))


def model_fingerprint(model) -> float:
    return weights_fingerprint([np.asarray(w) for layer in model.layers for w in layer.weights])


def checkpoint_fingerprint(path) -> float:
    """The ``model_fingerprint`` of the model a checkpoint (``save_checkpoint``) holds."""
    return weights_fingerprint([a for arrays in model_weights_from_checkpoint(path).values() for a in arrays])


# ---------------------------------------------------------------------------------- hypermodel
class StageHyperModel:
    """Builds the stage's model for the trials, inside the strategy's scope and under the dtype policy
    given when the search was set up (the run's ``precision``), whatever the global policy is then
    (``clear_session`` resets it)."""

    def __init__(self, config, spec, strategy, dtype_policy: str):
        self.config, self.spec, self.strategy, self.dtype_policy = config, spec, strategy, dtype_policy

    def build(self, hp=None):
        with self.strategy.scope():
            return build_stage_model(self.config, self.spec, policy=self.dtype_policy)


@dataclasses.dataclass
class _TrialScores:
    """What one trial's training ended with (``diverged``: a non-finite loss or prediction)."""

    loss: float
    row: dict  # validation_row's val_loss, val_kappa, val_kappa_optimized
    diverged: bool


class TrialInputs:
    """A trainer's inputs for a stage's trials, built once and iterated afresh by every trial: each
    epoch's training draw (a distributed dataset per epoch, made when first asked for) and validation."""

    def __init__(self, trainer, train_input, val_input):
        self.trainer, self.train_input = trainer, train_input
        self.validate = make_predictor(trainer, val_input)
        self._epochs: dict[int, object] = {}

    def epoch(self, epoch: int):
        """A new iterator over epoch ``epoch``'s training draw, from its first batch."""
        if epoch not in self._epochs:
            self._epochs[epoch] = self.train_input.distribute(
                self.trainer.strategy, self.trainer.global_batch_size, training=True, start_epoch=epoch, epochs=1)
        return iter(self._epochs[epoch])


def _train_trial(trainer, inputs: TrialInputs, steps: int, epochs: int) -> _TrialScores:
    """``epochs`` epochs of ``steps`` steps each, scored on validation after each epoch; stops at the
    first non-finite loss or prediction (the trial diverged: kappas -1, val loss inf)."""
    loss = float("nan")
    diverged = {"val_loss": float("inf"), "val_kappa": DIVERGED_KAPPA, "val_kappa_optimized": DIVERGED_KAPPA}
    row = dict(diverged)
    for epoch in range(epochs):
        loss = trainer.train_steps(inputs.epoch(epoch), steps)
        if not math.isfinite(loss):
            return _TrialScores(loss, diverged, True)
        labels, scores = inputs.validate()
        if not np.all(np.isfinite(scores)):
            return _TrialScores(loss, diverged, True)
        row = validation_row(labels, scores)
    return _TrialScores(loss, row, False)


class StageTuner(keras_tuner.Tuner):
    """A Keras Tuner ``Tuner`` whose ``run_trial`` is the trainer's custom loop (see the module doc)."""

    def __init__(self, oracle, *, hypermodel, config, spec, stage_cfg, initial_weights, cache_dir,
                 splits_file, strategy, project: Path, log=print):
        """``project``: the Keras Tuner project folder (the stage's ``StageLayout.tuning``)."""
        self.config, self.spec, self.stage_cfg = config, spec, stage_cfg
        self.initial_weights = Path(initial_weights)
        self.cache_dir, self.splits_file = cache_dir, splits_file
        self._log = log
        self._inputs = None
        self._model = None
        self._model_states: list = []
        self.trainers: dict[tuple, DistributedTrainer] = {}
        self._trial_inputs: dict[tuple, TrialInputs] = {}
        self.trials_run_here: list[str] = []
        project = Path(project)
        super().__init__(oracle, hypermodel=None, directory=str(project.parent), project_name=project.name,
                         overwrite=False, distribution_strategy=strategy)
        self.stage_hypermodel = hypermodel
        if (_search_role() != "worker" and not self.oracle.trials
                and (Path(self.project_dir) / "oracle.json").exists()):
            # The project was written under another tuner id (e.g. a distributed search, whose
            # chief saves as 'chief'), so Keras Tuner did not reload it: reload its oracle all the
            # same, so no trial is repeated.
            self.oracle.reload()

    def search(self, *args, **kwargs):
        if _search_role() != "chief":
            return super().search(*args, **kwargs)
        # The chief only serves the oracle (Keras Tuner's own loop would poll for the end every 20 s).
        self.save()
        _serve_oracle(self.oracle)

    def finished(self) -> bool:
        """True when an earlier search ran every trial (not hyperband, whose count is its own)."""
        oracle = self.oracle
        return (self.config.tune.tuner != "hyperband" and not oracle.ongoing_trials
                and (self.remaining_trials or 0) <= 0
                and all(t.status in FINISHED for t in oracle.trials.values()))

    def _stage_inputs(self):
        if self._inputs is None:
            args = (self.config, self.spec, self.stage_cfg, self.cache_dir, self.splits_file)
            self._inputs = (stage_input(*args, "train", training=True), stage_input(*args, "val", training=False))
        return self._inputs

    def trial_trainer(self, values: dict) -> tuple[DistributedTrainer, TrialInputs]:
        """The trainer of a trial with ``values``, ready to start, and its inputs: the stage's one model
        back at its initial weights (and its dropout's seed state as built), the optimizer's state
        reset, the trial's learning rate set. Made once per (batch size, weight decay, momentum)."""
        strategy = self.distribution_strategy
        if self._model is None:
            self._model = self.stage_hypermodel.build()
            weights = {id(w) for w in self._model.weights}
            self._model_states = [(v, np.array(v.numpy())) for v in self._model.variables if id(v) not in weights]
        key = (int(values.get("batch_size", self.config.global_batch_size)), values.get("weight_decay"),
               values.get("momentum"))
        if key not in self.trainers:
            with strategy.scope():
                optimizer = make_optimizer(self.config.optim, weight_decay=key[1], momentum=key[2])
            self.trainers[key] = DistributedTrainer(self._model, optimizer, strategy, key[0], loss=self.config.loss)
            self._trial_inputs[key] = TrialInputs(self.trainers[key], *self._stage_inputs())
        restore_checkpoint(self._model, None, self.initial_weights)
        for variable, value in self._model_states:
            variable.assign(value)
        trainer = self.trainers[key]
        trainer.reset_optimizer(float(values["lr"]))
        return trainer, self._trial_inputs[key]

    def release(self) -> None:
        """Lets the stage's model, trainers and inputs go (the tuner's results stay readable)."""
        self._model, self._model_states, self._inputs = None, [], None
        self.trainers, self._trial_inputs = {}, {}
        gc.collect()

    def run_trial(self, trial, *args, **kwargs):
        t0 = time.time()
        values = trial.hyperparameters.values
        trainer, inputs = self.trial_trainer(values)
        start_hash = model_fingerprint(trainer.model)
        per_epoch = inputs.train_input.steps_per_epoch(trainer.global_batch_size)
        steps = max(1, round(self.config.tune.data_fraction * per_epoch))
        epochs = int(values.get("tuner/epochs", self.config.tune.epochs))
        scores = _train_trial(trainer, inputs, steps, epochs)
        seconds = time.time() - t0
        self.trials_run_here.append(trial.trial_id)
        self._log(_trial_line(trial.trial_id, values, scores, epochs, steps, seconds))
        return {**{k: float(v) for k, v in scores.row.items()},
                "loss": float(scores.loss) if math.isfinite(scores.loss) else float("inf"),
                "seconds": float(seconds), "initial_weights_hash": start_hash,
                "diverged": 1.0 if scores.diverged else 0.0, "steps": float(steps * epochs)}


def _trial_line(trial_id, values, scores: _TrialScores, epochs, steps, seconds) -> str:
    extras = "".join(f", {k} {v:.3g}" for k, v in values.items() if k in ("weight_decay", "batch_size", "momentum"))
    outcome = (f": diverged (loss {scores.loss})" if scores.diverged
               else f": val kappa {scores.row['val_kappa_optimized']:.4f} at optimised cut-offs, "
                    f"{scores.row['val_kappa']:.4f} at fixed, val loss {scores.row['val_loss']:.4f}")
    return (f"  trial {trial_id}: lr {values['lr']:.3g}{extras}{outcome}, "
            f"{epochs} epoch(s) of {steps} step(s), {seconds:.1f} s")


# -------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class SearchResult:
    """The outcome of one stage's search: the best learning rate and the table of trials."""

    stage: str
    lr: float
    best_trial: str
    best_values: dict
    trials: list[dict]
    tuner: str
    project_dir: str
    initial_weights_hash: float
    seconds: float
    wall_seconds: float = 0.0
    objective: str = "val_kappa"  # what scored the trials (tune.objective); searches before issue 15: val_kappa

    def to_dict(self) -> dict:
        return _json_safe(dataclasses.asdict(self))


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _last(trial, name):
    metrics = trial.metrics
    if not metrics.exists(name):
        return None
    history = metrics.get_history(name)
    return float(history[-1].value[0] if isinstance(history[-1].value, (list, tuple)) else history[-1].value)


def collect_trials(oracle) -> list[dict]:
    """One row per trial of the oracle, in trial order: id, status, values, both kappas, losses, seconds."""
    rows = []
    for trial_id in sorted(oracle.trials, key=lambda t: int(t)):
        trial = oracle.trials[trial_id]
        values = {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}
        rows.append({
            "trial": trial_id,
            "status": trial.status,
            "lr": float(values.get("lr")) if "lr" in values else None,
            "values": values,
            "epochs": trial.hyperparameters.values.get("tuner/epochs"),
            "val_kappa": _last(trial, "val_kappa"),
            "val_kappa_optimized": _last(trial, "val_kappa_optimized"),
            "val_loss": _last(trial, "val_loss"),
            "loss": _last(trial, "loss"),
            "seconds": _last(trial, "seconds"),
            "diverged": bool(_last(trial, "diverged")),
            "initial_weights_hash": _last(trial, "initial_weights_hash"),
        })
    return rows


def best_trial(rows: list[dict], objective: str = "val_kappa_optimized") -> dict | None:
    """The completed trial with the best ``objective`` (highest kappa, or lowest ``val_loss``); ties go to
    the lower val loss (a missing or non-finite one counts as infinite), then the earlier trial. None if
    no trial completed with a score."""
    done = [r for r in rows if r["status"] == "COMPLETED" and r.get(objective) is not None]
    if not done:
        return None

    def key(r):
        loss = r["val_loss"] if r["val_loss"] is not None and math.isfinite(r["val_loss"]) else math.inf
        return (loss if objective == "val_loss" else -r[objective], loss, int(r["trial"]))

    return min(done, key=key)


def _settings(config) -> dict:
    """What a search's trials depend on, beside the initial weights; a reloaded project must match.
    ``max_trials`` is left out: raising it continues a finished search with more trials."""
    t = to_dict(config.tune)
    keep = {k: t[k] for k in ("tuner", "lr_min", "lr_max", "epochs", "data_fraction", "extra", "seed", "objective")}
    keep["global_batch_size"] = config.global_batch_size
    keep["optim"] = to_dict(config.optim)
    return keep


def _check_or_stamp(files: StageLayout, settings: dict, initial_hash: float, stamp: bool) -> None:
    """A project already in ``files.tuning`` must hold a search of the same settings from the same
    initial weights; a new one gets its ``search.json`` (settings, no result yet) when ``stamp``.

    Raises:
        ConfigError: the project holds a search of other settings or other initial weights.
    """
    if files.search_json.exists():
        stored = read_json(files.search_json)
        changed = sorted(k for k in settings if stored.get("settings", {}).get(k) != settings[k])
        if stored.get("initial_weights_hash") != initial_hash:
            changed.append("initial weights")
        if changed:
            raise ConfigError(
                f"{files.tuning} holds a search with other settings ({', '.join(changed)} differ); restore them, "
                "or delete that folder to search again")
    elif stamp:
        files.tuning.mkdir(parents=True, exist_ok=True)
        write_json(files.search_json, _json_safe({"settings": settings, "initial_weights_hash": initial_hash,
                                                  "result": None}))


def _search_result(context: StageContext, oracle, initial_hash: float, wall_seconds: float) -> SearchResult:
    """The finished search's table and best trial.

    Raises:
        RuntimeError: no trial completed (names the last trial's error).
    """
    rows = collect_trials(oracle)
    best = best_trial(rows, context.config.tune.objective)
    if best is None:
        messages = [t.message for t in oracle.trials.values() if t.message]
        last = messages[-1].strip().splitlines()[-1] if messages else "no trial ran"
        raise RuntimeError(f"stage {context.stage.name}: no trial of the learning-rate search completed "
                           f"({len(rows)} trials); last error: {last}")
    return SearchResult(
        stage=context.stage.name, lr=float(best["lr"]), best_trial=best["trial"],
        best_values=best["values"], trials=rows, tuner=context.config.tune.tuner,
        project_dir=str(context.layout.tuning), initial_weights_hash=initial_hash,
        seconds=round(sum(r["seconds"] or 0.0 for r in rows), 1), wall_seconds=round(wall_seconds, 1),
        objective=context.config.tune.objective)


# --------------------------------------------------------------------------------------- search
class LearningRateSearch:
    """The ``StepwiseScaler`` hook: ``search(StageContext) -> SearchResult`` (its ``lr`` drives the stage),
    or None in a worker of a distributed search (the chief holds the results).

    Args:
        verbose: 1 prints a line per trial and the table; 0 is silent.
        log: where lines for people go (default ``print``).
    """

    def __init__(self, *, verbose: int = 1, log: Callable[[str], None] = print):
        self.verbose = verbose
        self._log = log
        self.last_tuner = None

    def log(self, text):
        if self.verbose:
            self._log(text)

    # A search in one process holds its run folder (the trainer calling it holds it already: re-entrant); the
    # processes of a distributed search share it.
    @holding(lambda self, context: None if _search_role() else run_folder_lock(
        process_layout(context.config, context.strategy).root))
    def __call__(self, context: StageContext) -> SearchResult | None:
        tune, files = context.config.tune, context.layout
        hp = build_search_space(tune)  # a bad space fails here, before any trial
        initial_hash = checkpoint_fingerprint(context.initial_weights)
        settings = _settings(context.config)
        worker = _search_role() == "worker"
        _check_or_stamp(files, settings, initial_hash, stamp=not worker)

        t0 = time.time()
        before = keras.config.dtype_policy().name
        policy = machine_precision(context.config.precision)
        self.log(f"Stage {context.index} {context.stage.name}: {tune.tuner} learning-rate search in {files.tuning} "
                 f"(lr {tune.lr_min:g}..{tune.lr_max:g} log-uniform"
                 + "".join(f", {k}" for k in sorted(tune.extra))
                 + f"; {tune.epochs} epoch(s) on {tune.data_fraction:g} of the training draw per trial)")
        tuner = self._make_tuner(context, hp, policy)
        if not worker and tuner.finished():
            self.log(f"  the search finished earlier ({len(tuner.oracle.trials)} trials); not repeated")
        try:
            tuner.search(verbose=0)
        finally:
            keras.config.set_dtype_policy(before)  # in case a clear_session reset it
            tuner.release()
        if worker:
            self.log(f"  {os.environ.get('KERASTUNER_TUNER_ID')}: ran {len(tuner.trials_run_here)} trial(s) "
                     f"({', '.join(tuner.trials_run_here) or 'none'}); the chief holds the results")
            return None
        result = _search_result(context, tuner.oracle, initial_hash, time.time() - t0)
        data = result.to_dict()
        write_json(files.search_json, _json_safe({"settings": settings, "initial_weights_hash": initial_hash,
                                                  "result": data}))
        table = format_search_table(data)
        write_text(files.search_md, table + "\n")
        self.log(table)
        return result

    def _make_tuner(self, context: StageContext, hp, policy: str) -> StageTuner:
        hypermodel = StageHyperModel(context.config, context.stage, context.strategy, policy)
        tuner = StageTuner(
            make_oracle(context.config.tune, hp, context.index), hypermodel=hypermodel, config=context.config,
            spec=context.stage, stage_cfg=context.config.stages[context.index - 1],
            initial_weights=context.initial_weights, cache_dir=context.cache_dir, splits_file=context.splits_file,
            strategy=context.strategy, project=context.layout.tuning, log=self.log)
        self.last_tuner = tuner
        return tuner


def search_hook(config: TrainConfig, *, verbose: int = 1,
                log: Callable[[str], None] = print) -> LearningRateSearch | None:
    """The trainer's learning-rate hook for ``config``: a ``LearningRateSearch`` when
    ``config.tune.enabled``, else None (the stages train with the config's learning rates)::

        StepwiseScaler(config, lr_search=search_hook(config)).run()
    """
    return LearningRateSearch(verbose=verbose, log=log) if config.tune.enabled else None


# ------------------------------------------------------------------------------ one stage alone
def stage_context(config: TrainConfig, stage: str, *, strategy=None, verbose: int = 1,
                  log: Callable[[str], None] = print) -> StageContext:
    """The ``StageContext`` of one stage of a run, for ``retina-scale tune``: prepares the data (or
    reuses it) and the stage's initial weights (kept if the stage folder has them; else orthogonal
    for the first stage, transferred from the previous stage's ``best.npz`` for a later one).

    Args:
        stage: a stage name of the config's ladder (``tiny``, ``small``, ...) or its 1-based index.
        strategy: a ``tf.distribute.Strategy``; by default chosen from ``config.strategy``.

    Raises:
        UserError: no such stage in the ladder, or a later stage whose previous stage has not
            been trained in this run folder.
        ConfigError: the run folder holds a run of other settings.
    """
    from retina_scale.config import check_config
    from retina_scale.models.convnet import get_stage
    from retina_scale.training.distribute import choose_strategy

    check_config(config)
    specs = [get_stage(s.stage) for s in config.stages]
    index = _stage_index(stage, [s.name for s in specs])
    spec = specs[index - 1]
    strategy = strategy if strategy is not None else choose_strategy(config.strategy)
    layout = process_layout(config, strategy)
    # The processes of a distributed search share the run folder: they take turns here; anyone else is refused.
    with run_folder_lock(layout.root, wait=_search_role() is not None, log=log):
        check_same_config(layout, config)
        if not layout.config.exists():
            dump_config(config, layout.config)
        files = layout.stage(index, spec.name)
        previous = layout.stage(index - 1, specs[index - 2].name).best if index > 1 else None
        if not files.initial.exists() and previous is not None and not previous.exists():
            raise UserError(f"stage {spec.name} starts from stage {specs[index - 2].name}'s best weights, which "
                            f"{layout.root} does not have yet; train the earlier stages first (retina-scale train)")
        cache_dir, splits_file = prepare_run_data(config, layout, log if verbose else None, progress=bool(verbose))
        if not files.initial.exists():
            with strategy.scope():
                model = build_stage_model(config, spec)
            save_initial_weights(model, previous, files)
    return StageContext(index, spec, files.dir, files.initial, stage_learning_rate(config, config.stages[index - 1]),
                        config, strategy, cache_dir, splits_file)


def _stage_index(stage: str, names: list[str]) -> int:
    """The 1-based index of ``stage`` (a name in ``names`` or a 1-based position)."""
    if stage in names:
        return names.index(stage) + 1
    if stage.isdigit() and 1 <= int(stage) <= len(names):
        return int(stage)
    raise UserError(f"no stage {stage!r} in this run's ladder; accepted: {', '.join(names)} or 1..{len(names)}")


# ------------------------------------------------------------- Keras Tuner's distributed mode
def _search_role() -> str | None:
    """This process's part in Keras Tuner's distributed search, from the environment variables Keras
    Tuner documents for it: ``"chief"`` (serves the oracle), ``"worker"`` (runs trials), or None (a
    search in one process, without ``KERASTUNER_ORACLE_IP``). Keras Tuner itself refuses an incomplete
    set of these variables when the tuner is made."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


# ----------------------------------------------------- the one use of Keras Tuner's private API
# Keras Tuner has no public way to serve an oracle with a shorter poll: its chief loop
# (keras_tuner.src.distribute.oracle_chief.start_server) sleeps 20 s between checks for the end once
# the first worker is told to stop (since 1.4.7). _serve_oracle is that loop with a 0.5 s poll, on
# Keras Tuner's own gRPC servicer: keras_tuner.src.protos, oracle_chief.OracleServicer (its
# stop_triggered) and oracle_chief.exit_chief. These are private (keras_tuner.src.*, see Keras Tuner
# 1.4.0's release notes), hence keras-tuner>=1.4.7,<1.5 in setup.py; tested with 1.4.8
# (tests/training/test_tuning.py runs a chief and two workers on localhost).
def _serve_oracle(oracle, poll: float = 0.5):
    """Serves the oracle over gRPC at KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT until every trial
    has ended and every worker has been told to stop."""
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute.oracle_chief import OracleServicer, exit_chief

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"the search's chief cannot listen on {address} (KERASTUNER_ORACLE_IP/PORT); is the port free?")
    server.start()
    try:
        while not (servicer.stop_triggered and exit_chief(oracle)):
            time.sleep(poll)
    finally:
        server.stop(grace=1)
