"""Keras Tuner searches the learning rate of every stage of the ladder.

The right learning rate differs per stage: a freshly initialised tiny net wants a large one, a large
net initialised from a median one a much smaller one. For one stage, the search runs trials that each

1. build the stage's model inside the strategy's scope (``StageHyperModel.build``),
2. load the SAME transferred initial weights (the stage's ``initial.npz``; every trial records a
   fingerprint of the weights it starts from, ``initial_weights_hash``),
3. make the optimizer with the trial's learning rate (log-uniform in ``tune.lr_min``..``tune.lr_max``;
   optional extra dimensions ``weight_decay``, ``batch_size``, ``momentum`` from ``tune.extra``),
4. train ``tune.epochs`` epochs of ``tune.data_fraction`` of each epoch's training draw with the
   trainer's own custom loop (``DistributedTrainer``; ``model.fit`` fails under
   ``MultiWorkerMirroredStrategy`` in Keras 3.15),
5. and score validation kappa (objective: max; ties go to the lower validation loss).

The best learning rate then drives the stage's full fine-tuning (``StepwiseScaler`` calls
``LearningRateSearch`` per stage when ``tune.enabled``). A trial whose loss diverges scores kappa -1
and loss ``inf``: a result (too large a learning rate), not a failure.

Each stage has one Keras Tuner project, ``stages/<i>-<stage>/tuning/``, opened with
``overwrite=False``: a search interrupted and started again continues with the remaining trials (an
interrupted trial is run again from the initial weights), and a finished search is read back, not
repeated. ``tuning/search.json`` (the settings, the initial weights' fingerprint and the table) and
``tuning/search.md`` (the table for people) are written when the search ends.

Keras Tuner traps handled here: ``Tuner.__init__`` builds the model once at construction, outside
the strategy's scope (``_populate_initial_space`` is overridden: the space is declared without
building); it calls ``keras.backend.clear_session()`` between trials, which resets a mixed-precision
policy (the policy seen at construction is set again inside every build); and ``fit`` callbacks are
deep-copied per trial, so anything a trial keeps on disk lives in that trial's own folder
(``trial_<id>/``), never in a shared one.

Distributed search is Keras Tuner's chief/worker mode: start one process with
``KERASTUNER_TUNER_ID=chief`` (it runs the oracle and no trial) and any number with
``KERASTUNER_TUNER_ID=worker0, worker1, ...``, all with ``KERASTUNER_ORACLE_IP`` and
``KERASTUNER_ORACLE_PORT`` naming the chief (see ``retina-scale tune --help`` and the README).

Example:
>>> from retina_scale.config import load_train_config
>>> from retina_scale.training.stepwise import StepwiseScaler
>>> config = load_train_config("quick", ["tune.max_trials=5", "tune.tuner=bayesian"])
>>> report = StepwiseScaler(config).run()      # searches every stage, then trains it
>>> print(format_search_table(report["stages"][0]["search"]))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import write_json
from retina_scale.utils.fileio import write_text as _write_text
from retina_scale.utils.tables import number, text_table
from retina_scale.utils.typed_config import ConfigError, to_dict

OBJECTIVE = "val_kappa"
DIVERGED_KAPPA = -1.0
STAGE_SEED_STRIDE = 10007


# ------------------------------------------------------------------------------------------- space
def build_search_space(tune):
    """The ``keras_tuner.HyperParameters`` of a ``TuneConfig``: ``lr`` (log-uniform) and the extras.

    Raises:
        ConfigError: a bad space (see ``check_tune_config``), before any trial.
    """
    import keras_tuner

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
    """Keras Tuner's ``random``, ``bayesian`` or ``hyperband`` oracle on the space, maximising val kappa.

    The oracle's seed is ``tune.seed + 10007 * (stage_index - 1)``: each stage draws its own learning
    rates (Keras Tuner steps its seed by one per value drawn, so neighbouring seeds would repeat a
    stage's draws one trial later), and every worker of a run draws the same ones."""
    import keras_tuner

    objective = keras_tuner.Objective(OBJECTIVE, direction="max")
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
    in file order, give the same value for the same weights."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str((a.dtype.str, a.shape)).encode())
        digest.update(a.tobytes())
    return float(int(digest.hexdigest()[:13], 16))


def model_fingerprint(model) -> float:
    return weights_fingerprint([np.asarray(w) for layer in model.layers for w in layer.weights])


def checkpoint_fingerprint(path) -> float:
    with np.load(path) as data:
        return weights_fingerprint([data[k] for k in data.files if k.startswith("model/")])


# ---------------------------------------------------------------------------------- hypermodel
def _keras_tuner_base():
    import keras_tuner

    return keras_tuner


class StageHyperModel:
    """Builds one stage's model for a trial, inside the strategy's scope and under the dtype policy
    seen when the search was set up (``clear_session`` between trials resets the global policy)."""

    def __init__(self, config, spec, strategy, dtype_policy: str):
        self.config, self.spec, self.strategy, self.dtype_policy = config, spec, strategy, dtype_policy

    def build(self, hp=None):
        import keras

        from retina_scale.training.stage import build_stage_model

        keras.config.set_dtype_policy(self.dtype_policy)
        with self.strategy.scope():
            return build_stage_model(self.config, self.spec)


def _make_tuner_class():
    """``StageTuner``, defined on first use so that importing this module does not import Keras Tuner."""
    keras_tuner = _keras_tuner_base()

    class StageTuner(keras_tuner.Tuner):
        """A Keras Tuner ``Tuner`` whose ``run_trial`` is the trainer's custom loop (see module doc)."""

        def __init__(self, oracle, *, hypermodel, config, spec, stage_cfg, initial_weights, cache_dir,
                     splits_file, strategy, directory, project_name="tuning", log=print):
            self.config, self.spec, self.stage_cfg = config, spec, stage_cfg
            self.initial_weights = Path(initial_weights)
            self.cache_dir, self.splits_file = cache_dir, splits_file
            self._log = log
            self._inputs = None
            self.trials_run_here: list[str] = []
            super().__init__(oracle, hypermodel=None, directory=str(directory), project_name=project_name,
                             overwrite=False, distribution_strategy=strategy)
            self.stage_hypermodel = hypermodel
            oracle_file = Path(self.project_dir) / "oracle.json"
            if (not self._is_worker() and oracle_file.exists()
                    and not Path(self._get_tuner_fname()).exists() and not self.oracle.trials):
                # The project was written under another tuner id (e.g. a distributed search, whose
                # chief saves as 'chief'): reload its oracle all the same, so no trial is repeated.
                self.oracle.reload()

        def search(self, *args, **kwargs):
            from keras_tuner.src.distribute import utils as dist_utils

            if not dist_utils.is_chief_oracle():
                return super().search(*args, **kwargs)
            # The chief only serves the oracle. Keras Tuner's own server loop polls for the end every
            # 20 s once the first worker is told to stop; this one polls every 0.5 s.
            self.save()
            _serve_oracle(self.oracle)

        def _populate_initial_space(self):
            # Keras Tuner builds the model here, once, outside the strategy's scope; the space is
            # already given to the oracle, so nothing is built.
            return

        def _stage_inputs(self):
            if self._inputs is None:
                from retina_scale.training.stage import stage_input

                args = (self.config, self.spec, self.stage_cfg, self.cache_dir, self.splits_file)
                self._inputs = (stage_input(*args, "train", training=True),
                                stage_input(*args, "val", training=False))
            return self._inputs

        def run_trial(self, trial, *args, **kwargs):
            import gc

            import keras

            from retina_scale.training.checkpoint import restore_checkpoint
            from retina_scale.training.distribute import DistributedTrainer
            from retina_scale.training.optim import make_optimizer
            from retina_scale.training.stage import predict_input, validation_scores

            t0 = time.time()
            hp = trial.hyperparameters
            values = hp.values
            strategy = self.distribution_strategy
            keras.backend.clear_session()
            gc.collect()
            model = self.stage_hypermodel.build(hp)
            restore_checkpoint(model, None, self.initial_weights)
            start_hash = model_fingerprint(model)
            batch = int(values.get("batch_size", self.config.global_batch_size))
            with strategy.scope():
                optimizer = make_optimizer(self.config.optim, lr=float(values["lr"]),
                                           weight_decay=values.get("weight_decay"), momentum=values.get("momentum"))
            trainer = DistributedTrainer(model, optimizer, strategy, batch)
            train_input, val_input = self._stage_inputs()
            steps = max(1, round(self.config.tune.data_fraction * train_input.steps_per_epoch(batch)))
            epochs = int(values.get("tuner/epochs", self.config.tune.epochs))
            loss = val_loss = float("nan")
            kappa, diverged = DIVERGED_KAPPA, False
            for epoch in range(epochs):
                iterator = iter(train_input.distribute(strategy, batch, training=True, start_epoch=epoch, epochs=1))
                loss = trainer.train_steps(iterator, steps)
                if not math.isfinite(loss):
                    diverged = True
                    break
                labels, scores = predict_input(trainer, val_input)
                if not np.all(np.isfinite(scores)):
                    diverged = True
                    break
                val_loss, kappa = validation_scores(labels, scores)
            if diverged:
                kappa, val_loss = DIVERGED_KAPPA, float("inf")
            seconds = time.time() - t0
            self.trials_run_here.append(trial.trial_id)
            self._log(f"  trial {trial.trial_id}: lr {values['lr']:.3g}"
                      + "".join(f", {k} {v:.3g}" for k, v in values.items() if k in ("weight_decay", "batch_size",
                                                                                     "momentum"))
                      + (f": diverged (loss {loss})" if diverged
                         else f": val kappa {kappa:.4f}, val loss {val_loss:.4f}")
                      + f", {epochs} epoch(s) of {steps} step(s), {seconds:.1f} s")
            return {OBJECTIVE: float(kappa), "val_loss": float(val_loss),
                    "loss": float(loss) if math.isfinite(loss) else float("inf"),
                    "seconds": float(seconds), "initial_weights_hash": start_hash,
                    "diverged": 1.0 if diverged else 0.0, "steps": float(steps * epochs)}

    return StageTuner


def _serve_oracle(oracle, poll: float = 0.5):
    """Keras Tuner's ``oracle_chief.start_server`` (1.4.8) with a shorter poll: serves the oracle over
    gRPC at KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT until every trial has ended and every worker
    has been told to stop."""
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


_TUNER_CLASS = None


def stage_tuner_class():
    global _TUNER_CLASS
    if _TUNER_CLASS is None:
        _TUNER_CLASS = _make_tuner_class()
    return _TUNER_CLASS


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
    """One row per trial of the oracle, in trial order: id, status, values, kappa, loss, seconds."""
    rows = []
    for trial_id in sorted(oracle.trials, key=lambda t: int(t)):
        trial = oracle.trials[trial_id]
        values = {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}
        kappa = _last(trial, OBJECTIVE)
        rows.append({
            "trial": trial_id,
            "status": trial.status,
            "lr": float(values.get("lr")) if "lr" in values else None,
            "values": values,
            "epochs": trial.hyperparameters.values.get("tuner/epochs"),
            "val_kappa": kappa,
            "val_loss": _last(trial, "val_loss"),
            "loss": _last(trial, "loss"),
            "seconds": _last(trial, "seconds"),
            "diverged": bool(_last(trial, "diverged")),
            "initial_weights_hash": _last(trial, "initial_weights_hash"),
        })
    return rows


def best_trial(rows: list[dict]) -> dict | None:
    """The completed trial with the highest val kappa; ties go to the lower val loss, then the
    earlier trial. None if no trial completed."""
    done = [r for r in rows if r["status"] == "COMPLETED" and r["val_kappa"] is not None]
    if not done:
        return None

    def key(r):
        loss = r["val_loss"] if r["val_loss"] is not None and math.isfinite(r["val_loss"]) else math.inf
        return (-r["val_kappa"], loss, int(r["trial"]))

    return min(done, key=key)


def format_search_table(result: dict) -> str:
    """The search's table for people (``result`` is ``SearchResult.to_dict()``)."""
    extras = sorted({k for r in result["trials"] for k in r["values"] if k != "lr"})
    header = ("trial", "lr", *extras, "val kappa", "val loss", "seconds", "status")
    rows = []
    for r in result["trials"]:
        mark = " *" if r["trial"] == result["best_trial"] else ""
        status = "diverged" if r["diverged"] else r["status"].lower()
        rows.append((r["trial"] + mark, number(r["lr"], ".3g"), *(number(r["values"].get(k), ".3g") for k in extras),
                     number(r["val_kappa"]), number(r["val_loss"]), number(r["seconds"], ".1f"), status))
    lines = [text_table(header, rows)]
    lines.append(f"* best: trial {result['best_trial']}, lr {result['lr']:.4g} ({result['tuner']} search, "
                 f"{len(result['trials'])} trials, {result['seconds']:.0f} s of trials, "
                 f"{result.get('wall_seconds', 0):.0f} s "
                 "this time; val kappa at cut-offs "
                 "0.5/1.5/2.5/3.5, ties to the lower val loss)")
    return "\n".join(lines)


def _write_json(path, data):
    write_json(path, _json_safe(data))


def _settings(config) -> dict:
    """What a search's trials depend on, beside the initial weights; a reloaded project must match.
    ``max_trials`` is left out: raising it continues a finished search with more trials."""
    t = to_dict(config.tune)
    keep = {k: t[k] for k in ("tuner", "lr_min", "lr_max", "epochs", "data_fraction", "extra", "seed")}
    keep["global_batch_size"] = config.global_batch_size
    keep["optim"] = to_dict(config.optim)
    return keep


# --------------------------------------------------------------------------------------- search
def is_distributed_worker() -> bool:
    from keras_tuner.src.distribute import utils as dist_utils

    return dist_utils.has_chief_oracle() and not dist_utils.is_chief_oracle()


def is_distributed_chief() -> bool:
    from keras_tuner.src.distribute import utils as dist_utils

    return dist_utils.is_chief_oracle()


class LearningRateSearch:
    """The ``StepwiseScaler`` hook: ``search(StageContext) -> SearchResult`` (its ``lr`` drives the stage).

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

    def __call__(self, context) -> SearchResult | None:
        import keras

        config = context.config
        tune = config.tune
        hp = build_search_space(tune)  # a bad space fails here, before any trial
        stage_cfg = config.stages[context.index - 1]
        project = Path(context.stage_dir) / "tuning"
        initial_hash = checkpoint_fingerprint(context.initial_weights)
        settings = _settings(config)
        stamp = project / "search.json"
        worker = is_distributed_worker()
        if stamp.exists():
            stored = json.loads(stamp.read_text(encoding="utf-8"))
            changed = sorted(k for k in settings if stored.get("settings", {}).get(k) != settings[k])
            if stored.get("initial_weights_hash") != initial_hash:
                changed.append("initial weights")
            if changed:
                raise ConfigError(
                    f"{project} holds a search with other settings ({', '.join(changed)} differ); restore them, "
                    "or delete that folder to search again")
        elif not worker:
            project.mkdir(parents=True, exist_ok=True)
            _write_json(stamp, {"settings": settings, "initial_weights_hash": initial_hash, "result": None})

        t0 = time.time()
        policy = keras.config.dtype_policy().name
        hypermodel = StageHyperModel(config, context.stage, context.strategy, policy)
        oracle = make_oracle(tune, hp, context.index)
        self.log(f"Stage {context.index} {context.stage.name}: {tune.tuner} learning-rate search in {project} "
                 f"(lr {tune.lr_min:g}..{tune.lr_max:g} log-uniform"
                 + "".join(f", {k}" for k in sorted(tune.extra))
                 + f"; {tune.epochs} epoch(s) on {tune.data_fraction:g} of the training draw per trial)")
        tuner = stage_tuner_class()(
            oracle, hypermodel=hypermodel, config=config, spec=context.stage, stage_cfg=stage_cfg,
            initial_weights=context.initial_weights, cache_dir=context.cache_dir, splits_file=context.splits_file,
            strategy=context.strategy, directory=context.stage_dir, project_name="tuning",
            log=self.log)
        self.last_tuner = tuner
        if not worker and tune.tuner != "hyperband" and not tuner.oracle.ongoing_trials \
                and not tuner.oracle._retry_queue and (tuner.remaining_trials or 0) <= 0:
            self.log(f"  the search finished earlier ({len(tuner.oracle.trials)} trials); not repeated")
        try:
            tuner.search(verbose=0)
        finally:
            keras.config.set_dtype_policy(policy)  # clear_session between trials reset it
        if worker:
            self.log(f"  {os.environ.get('KERASTUNER_TUNER_ID')}: ran {len(tuner.trials_run_here)} trial(s) "
                     f"({', '.join(tuner.trials_run_here) or 'none'}); the chief holds the results")
            return None
        rows = collect_trials(tuner.oracle)
        best = best_trial(rows)
        if best is None:
            messages = [t.message for t in tuner.oracle.trials.values() if t.message]
            last = messages[-1].strip().splitlines()[-1] if messages else "no trial ran"
            raise RuntimeError(f"stage {context.stage.name}: no trial of the learning-rate search completed "
                               f"({len(rows)} trials); last error: {last}")
        result = SearchResult(
            stage=context.stage.name, lr=float(best["lr"]), best_trial=best["trial"],
            best_values=best["values"], trials=rows, tuner=tune.tuner, project_dir=str(project),
            initial_weights_hash=initial_hash,
            seconds=round(sum(r["seconds"] or 0.0 for r in rows), 1), wall_seconds=round(time.time() - t0, 1))
        data = result.to_dict()
        _write_json(stamp, {"settings": settings, "initial_weights_hash": initial_hash, "result": data})
        table = format_search_table(data)
        _write_text(project / "search.md", table + "\n")
        self.log(table)
        return result


def search_stage(context, *, verbose: int = 1, log: Callable[[str], None] = print) -> SearchResult | None:
    """Runs (or resumes, or reads back) one stage's search; see ``LearningRateSearch``."""
    return LearningRateSearch(verbose=verbose, log=log)(context)


# ------------------------------------------------------------------------------ one stage alone
def stage_context(config, stage: str, *, strategy=None, verbose: int = 1, log: Callable[[str], None] = print):
    """The ``StageContext`` of one stage of a run, for ``retina-scale tune``: prepares the data (or
    reuses it) and the stage's initial weights (kept if the stage folder has them; else orthogonal
    for the first stage, transferred from the previous stage's ``best.npz`` for a later one).

    Args:
        stage: a stage name of the config's ladder (``tiny``, ``small``, ...) or its 1-based index.

    Raises:
        ValueError: no such stage in the ladder, or a later stage whose previous stage has not
            been trained in this run folder.
    """
    from retina_scale.models.convnet import get_stage
    from retina_scale.training.checkpoint import (
        model_weights_from_checkpoint,
        save_checkpoint,
    )
    from retina_scale.training.optim import scaled_learning_rate
    from retina_scale.training.stage import StageContext, build_stage_model
    from retina_scale.training.stepwise import StepwiseScaler
    from retina_scale.utils.typed_config import dump_config

    specs = [get_stage(s.stage) for s in config.stages]
    names = [s.name for s in specs]
    if stage in names:
        index = names.index(stage) + 1
    elif stage.isdigit() and 1 <= int(stage) <= len(specs):
        index = int(stage)
    else:
        raise UserError(f"no stage {stage!r} in this run's ladder; accepted: {', '.join(names)} "
                         f"or 1..{len(names)}")
    spec = specs[index - 1]
    scaler = StepwiseScaler(config, strategy=strategy, verbose=verbose, log=log)
    run_dir = scaler.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    scaler._check_same_config()
    if not (run_dir / "config.yaml").exists():
        dump_config(config, run_dir / "config.yaml")
    stage_dir = scaler._stage_dir(index, spec)
    previous = None
    if index > 1:
        previous = scaler._stage_dir(index - 1, specs[index - 2]) / "best.npz"
    initial = stage_dir / "initial.npz"
    if not initial.exists() and previous is not None and not previous.exists():
        raise UserError(f"stage {spec.name} starts from stage {specs[index - 2].name}'s best weights, which "
                         f"{run_dir} does not have yet; train the earlier stages first (retina-scale train)")
    cache_dir, splits_file = scaler.prepare_data()
    strategy = scaler.strategy
    if not initial.exists():
        stage_dir.mkdir(parents=True, exist_ok=True)
        with strategy.scope():
            model = build_stage_model(config, spec)
        if previous is not None:
            from retina_scale.models.transfer import transfer_weights

            transfer_weights(model_weights_from_checkpoint(previous), model)
        save_checkpoint(model, None, initial)
    stage_cfg = config.stages[index - 1]
    default_lr = scaled_learning_rate(stage_cfg.lr if stage_cfg.lr is not None else config.optim.lr,
                                      config.global_batch_size, config.optim.reference_batch_size)
    return StageContext(index, spec, stage_dir, initial, default_lr, config, strategy, cache_dir, splits_file)
