"""The StepwiseScaler: the paper's Algorithm 1 on any tf.distribute strategy.

For each stage of the ladder: build the stage's model inside the strategy's scope, transfer the
previous stage's best weights by layer name (and print the report), pick the learning rate (from the
config, or from a search hook the caller gives), fine-tune on that stage's cached images, keep the
best epoch by validation kappa, cut the regression output into grades with thresholds optimised on
validation, evaluate on the test split, and export a SavedModel for TF Serving. Stage 1 starts from
orthogonal initialisation.

A run lives in ``<runs_dir>/<name>/`` (every path: ``retina_scale.run_layout``)::

    config.yaml  splits.csv  report.json  report.md
    data/synthetic/ data/cache/          (the embedded data set, when no --data is given)
    stages/1-tiny/  state.json  log.csv  tensorboard/  transfer.{json,txt}  initial.npz
                    last.npz  best.npz  best.keras  evaluation.{json,md}
                    tuning/  (the Keras Tuner project of the stage's learning-rate search, when searched)

Run the same command again after an interruption (Ctrl-C or kill -9): finished stages are not
retrained, the interrupted stage resumes from its last epoch checkpoint (optimizer state
included), and the class-resampling schedule continues where it was (it is a pure function of the
epoch number).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from retina_scale.config import TrainConfig
from retina_scale.run_layout import RunLayout, StageLayout
from retina_scale.training.checkpoint import restore_checkpoint, save_checkpoint
from retina_scale.training.optim import after_nan_loss, lr_at, make_optimizer, stage_learning_rate
from retina_scale.training.stage import (
    StageContext, build_stage_model, check_same_config, float32_model, format_search_table, is_better,
    make_deterministic, make_predictor, patients_of, predict_input, prepare_run_data, process_layout, save_initial_weights,
    score_on_splits, stage_input, validation_row,
)
from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import read_json, write_json, write_text
from retina_scale.utils.locking import holding, run_folder_lock
from retina_scale.utils.tables import number, text_table
from retina_scale.utils.typed_config import dump_config


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss kept diverging); the message says what to lower or check."""


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


@dataclasses.dataclass
class _StageRun:
    """One stage in training: its place in the ladder, its folder, its state (``state.json``) and,
    once set up, its model, optimizer and trainer."""

    index: int
    spec: object  # StageSpec
    cfg: object  # StageConfig
    files: StageLayout
    state: dict | None = None
    model: object = None
    optimizer: object = None
    trainer: object = None
    batch_size: int = 0


class StepwiseScaler:
    """Trains the ladder of stages described by a ``TrainConfig``.

    Args:
        config: the run's configuration (``load_train_config("quick")``, ...).
        strategy: a ``tf.distribute.Strategy``; by default chosen from the machine and
            ``config.strategy`` (see ``choose_strategy``).
        lr_search: optional hook ``fn(StageContext) -> float`` (or an object with ``lr`` and
            ``to_dict()``) that picks each stage's learning rate; None uses the config's learning
            rates. Keras Tuner's search is ``retina_scale.training.tuning.search_hook(config)`` (a
            ``LearningRateSearch`` when ``config.tune.enabled``): the caller builds it, as
            ``retina-scale train`` does. A resumed stage keeps the learning rate it started with.
        verbose: 1 shows Keras progress bars per epoch and a line per stage; 0 is silent.
        log: where lines for people go (default ``print``).

    Example (trains the quick ladder: minutes on a CPU)::

        from retina_scale.config import load_train_config
        from retina_scale.training.tuning import search_hook

        config = load_train_config("quick")
        report = StepwiseScaler(config, lr_search=search_hook(config)).run()
        print([(s["stage"], s["val_kappa"]) for s in report["stages"]])
    """

    def __init__(self, config: TrainConfig, *, strategy=None, lr_search: Callable | None = None,
                 verbose: int = 1, log: Callable[[str], None] = print):
        from retina_scale.config import check_config

        check_config(config)
        self.config = config
        self._strategy = strategy
        self.lr_search = lr_search
        self.verbose = verbose
        self._log = log

    # ------------------------------------------------------------------------------------ set-up
    def log(self, text: str) -> None:
        if self.verbose:
            self._log(text)

    @property
    def strategy(self):
        if self._strategy is None:
            from retina_scale.training.distribute import choose_strategy

            self._strategy = choose_strategy(self.config.strategy)
        return self._strategy

    @property
    def layout(self) -> RunLayout:
        """This process's run folder: the chief's, or a worker's copy beside it (identical weights)."""
        return process_layout(self.config, self.strategy)

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    @property
    def is_chief(self) -> bool:
        from retina_scale.training.distribute import is_chief

        return is_chief(self.strategy)

    # -------------------------------------------------------------------------------------- run
    # One trainer per run folder: a second one stops at once, naming this one's pid and host (utils.locking).
    @holding(lambda self: run_folder_lock(self.layout.root))
    def run(self) -> dict:
        """Runs (or resumes) every stage; returns the run report (also in report.json / report.md)."""
        from retina_scale.models.convnet import get_stage
        from retina_scale.training.distribute import strategy_name

        t0 = time.time()
        if self.config.deterministic:
            make_deterministic(self.config.seed)
        layout = self.layout
        layout.root.mkdir(parents=True, exist_ok=True)
        check_same_config(layout, self.config)
        if self.is_chief or not layout.config.exists():
            dump_config(self.config, layout.config)
        strategy = self.strategy
        self.log(f"Run {self.config.name} in {layout.root}: {len(self.config.stages)} stages, "
                 f"{strategy_name(strategy)} strategy with {strategy.num_replicas_in_sync} replica(s), "
                 f"global batch {self.config.global_batch_size}")
        if self.lr_search is None and self.config.tune.enabled:
            self.log("tune.enabled, but no search hook was given (lr_search): the stages train with the "
                     "config's learning rates")
        cache_dir, splits_file = prepare_run_data(self.config, layout, self.log, progress=bool(self.verbose))
        results = []
        previous = None
        for index, stage_cfg in enumerate(self.config.stages, start=1):
            spec = get_stage(stage_cfg.stage)
            run = _StageRun(index, spec, stage_cfg, layout.stage(index, spec.name))
            result = self._run_stage(run, previous, cache_dir, splits_file)
            results.append(result)
            previous = Path(result["best_checkpoint"])
        fusion = self._fusion(results[-1], cache_dir, splits_file) if self.config.fusion.enabled else None
        report = {
            "name": self.config.name,
            "run_dir": str(layout.root),
            "strategy": strategy_name(strategy),
            "replicas": strategy.num_replicas_in_sync,
            "seconds_this_invocation": round(time.time() - t0, 1),
            "stages": results,
            **({"fusion": fusion} if fusion is not None else {}),
        }
        write_json(layout.report_json, report)
        write_text(layout.report_md, format_report(report))
        self.log("\n" + format_stage_table(stage_rows(report)))
        return report

    # ------------------------------------------------------------------------------------ stage
    def _run_stage(self, run: _StageRun, previous: Path | None, cache_dir, splits_file) -> dict:
        files, spec = run.files, run.spec
        files.dir.mkdir(parents=True, exist_ok=True)
        run.state = read_json(files.state) if files.state.exists() else None
        if run.state and run.state.get("status") == "done":
            self.log(f"Stage {run.index} {spec.name} ({spec.input_size} px) finished earlier: "
                     f"val kappa {run.state['result']['val_kappa']:.4f}; not retrained")
            return run.state["result"]

        with self.strategy.scope():
            run.model = build_stage_model(self.config, spec)
        resumed = run.state is not None
        if not resumed:
            run.state = self._start_stage(run, previous, cache_dir, splits_file)
        self._make_trainer(run)
        if resumed:  # this process built the model afresh: start from the stage's own weights
            self._restore_last_good(run)
            self.log(_resume_line(run))
        hparams = run.state.get("hparams") or {}
        if hparams:
            self.log(f"Stage {run.index} {spec.name}: search's choices {hparams} (with lr {run.state['lr']:.3g})")

        args = (self.config, spec, run.cfg, cache_dir, splits_file)
        train_input = stage_input(*args, "train", training=True)
        val_input = stage_input(*args, "val", training=False)
        self._train_epochs(run, train_input, val_input)

        result = self._finish_stage(run, val_input, cache_dir, splits_file)
        run.state["status"] = "done"
        run.state["result"] = result
        write_json(files.state, run.state)
        self.log(f"Stage {run.index} {spec.name}: {spec.input_size} px, {run.state['epoch']} epochs, {result['seconds']:.0f} s; "
                 f"best epoch {result['best_epoch']} by {result['selection']} {result['selection_score']:.4f} "
                 f"(val kappa at cut-offs 0.5/1.5/2.5/3.5: {result['val_kappa']:.4f})")
        return result

    def _start_stage(self, run: _StageRun, previous: Path | None, cache_dir, splits_file) -> dict:
        """A new stage: its initial weights (transferred, with the report), its learning rate (the
        config's, or the search hook's) and its first ``state.json``."""
        cfg, files = self.config, run.files
        transfer = save_initial_weights(run.model, previous, files)
        if transfer is not None:
            write_json(files.transfer_json, transfer.to_dict())
            write_text(files.transfer_txt, transfer.format_table() + "\n")
            self.log(transfer.format_table())
        default_lr = stage_learning_rate(cfg, run.cfg)
        lr, lr_source, search = default_lr, "config", None
        if self.lr_search is not None:
            found = self.lr_search(StageContext(run.index, run.spec, files.dir, files.initial, default_lr, cfg,
                                                self.strategy, cache_dir, splits_file))
            # A hook returns a learning rate, or an object with ``lr`` and ``to_dict()`` (the
            # Keras Tuner search's result, whose table goes into the stage's report).
            lr = float(getattr(found, "lr", found))
            search = found.to_dict() if hasattr(found, "to_dict") else None
            lr_source = "search"
            restore_checkpoint(run.model, None, files.initial)
        # The search's other dimensions (tune.extra) drive the stage too, not only its lr.
        best = (search or {}).get("best_values") or {}
        hparams = {k: best[k] for k in ("weight_decay", "momentum", "batch_size") if k in best}
        state = {"status": "training", "stage": run.spec.name, "size": run.spec.input_size, "epoch": 0,
                 "lr": lr, "lr_source": lr_source, "hparams": hparams, "lr_scale": 1.0, "nan_events": 0,
                 "best_kappa": None, "best_epoch": None, "history": [], "seconds": 0.0, "search": search}
        write_json(files.state, state)
        return state

    def _make_trainer(self, run: _StageRun) -> None:
        from retina_scale.training.distribute import DistributedTrainer

        hparams = run.state.get("hparams") or {}
        run.batch_size = int(hparams.get("batch_size", self.config.global_batch_size))
        with self.strategy.scope():
            run.optimizer = make_optimizer(self.config.optim, weight_decay=hparams.get("weight_decay"),
                                           momentum=hparams.get("momentum"))
        run.trainer = DistributedTrainer(run.model, run.optimizer, self.strategy, run.batch_size,  # builds it
                                         loss=self.config.loss)

    @staticmethod
    def _restore_last_good(run: _StageRun) -> None:
        """The last finished epoch (weights and optimizer state), else the stage's initial weights."""
        if run.files.last.exists():
            restore_checkpoint(run.model, run.optimizer, run.files.last)
        else:
            restore_checkpoint(run.model, None, run.files.initial)

    def _train_epochs(self, run: _StageRun, train_input, val_input) -> None:
        """The epoch loop: from ``state['epoch']`` to the stage's epochs, or until its time budget."""
        import keras
        import tensorflow as tf

        state, spec = run.state, run.spec
        steps = train_input.steps_per_epoch(run.batch_size)
        writer = tf.summary.create_file_writer(str(run.files.tensorboard))
        self.log(f"Stage {run.index} {spec.name} ({spec.input_size} px): {run.model.count_params():,} weights, "
                 f"{len(train_input)} training / {len(val_input)} validation images, {steps} steps per epoch, "
                 f"lr {state['lr']:.3g} ({state['lr_source']}), {run.model.dtype_policy.name}")
        epoch = state["epoch"]
        # One training iterator for the rest of the stage (its draws, epoch after epoch, from the epoch it
        # starts at) and one validation input: built per epoch they cost a rebuild, a cold first step and
        # no prefetch during validation (issue 13). A diverged epoch is run again on a new iterator.
        iterator = None
        validate = make_predictor(run.trainer, val_input)
        while epoch < run.cfg.epochs:
            if self._out_of_time(run, epoch):
                break
            t_epoch = time.time()
            lr = lr_at(self.config.optim, state["lr"], state["lr_scale"], epoch, run.cfg.epochs)
            run.optimizer.learning_rate.assign(lr)
            if iterator is None:
                iterator = iter(train_input.distribute(self.strategy, run.batch_size, training=True,
                                                       start_epoch=epoch, epochs=run.cfg.epochs - epoch))
            progbar = keras.utils.Progbar(steps, verbose=progbar_verbosity(self.verbose, sys.stdout),
                                          stateful_metrics=["val_loss", "val_kappa", "val_kappa_opt"])
            if self.verbose:
                self._log(f"Epoch {epoch + 1}/{run.cfg.epochs}")
            loss = run.trainer.train_steps(iterator, steps, progbar=_ProgbarAdapter(progbar) if self.verbose else None)
            if not math.isfinite(loss):
                self._on_nan_loss(run, epoch, loss, lr)
                iterator = None
                continue
            labels, scores = validate()
            row = _epoch_row(epoch, loss, labels, scores, lr, time.time() - t_epoch)
            if self.verbose:
                progbar.update(steps, values=[("val_loss", row["val_loss"]), ("val_kappa", row["val_kappa"]),
                                              ("val_kappa_opt", row["val_kappa_optimized"])], finalize=True)
            epoch += 1
            self._record_epoch(run, row, writer)

    def _out_of_time(self, run: _StageRun, epoch: int) -> bool:
        budget, state = run.cfg.max_seconds, run.state
        if budget is None or state["seconds"] < budget:
            return False
        self.log(f"Stage {run.index} {run.spec.name}: time budget of {budget:.0f} s spent after "
                 f"{epoch} of {run.cfg.epochs} epochs ({state['seconds']:.0f} s); stopping the stage")
        state["stopped_by_time"] = True
        return True

    def _record_epoch(self, run: _StageRun, row: dict, writer) -> None:
        """A finished epoch: its row, the best checkpoint if it is the best, the last checkpoint, the logs."""
        state, files = run.state, run.files
        state["history"].append(row)
        state["seconds"] += row["seconds"]
        selection = self.config.selection
        if is_better(row, state.get("best_score"), selection):
            state["best_score"], state["best_kappa"], state["best_epoch"] = row[selection], row["val_kappa"], row["epoch"]
            state["selection"] = selection
            save_checkpoint(run.model, None, files.best)
        state["epoch"] = row["epoch"]
        save_checkpoint(run.model, run.optimizer, files.last)
        _write_logs(files, state["history"], writer, row)
        write_json(files.state, state)

    def _on_nan_loss(self, run: _StageRun, epoch: int, loss: float, lr: float) -> None:
        """The NaN policy (``optim.after_nan_loss``): reload the last good epoch with a lower learning
        rate, or stop with a ``TrainingError`` once the policy's events are spent."""
        state, nan, optim = run.state, self.config.nan, self.config.optim
        decision = after_nan_loss(state["nan_events"], state["lr_scale"], nan)
        state["nan_events"] = decision.nan_events
        if decision.action == "fail":
            write_json(run.files.state, state)
            raise TrainingError(
                f"stage {run.spec.name}: the training loss was {loss} in {state['nan_events']} epochs even after "
                f"lowering the learning rate to {lr * nan.lr_factor:.3g}; lower stages.{run.index - 1}.lr or "
                "optim.clipnorm, or check the data"
            )
        state["lr_scale"] = decision.lr_scale
        fresh = not run.files.last.exists()
        self._restore_last_good(run)
        if fresh:  # back to the initial weights: clear the diverged momenta too
            for variable in run.optimizer.variables:
                if variable is not run.optimizer.iterations and "learning_rate" not in variable.path:
                    variable.assign(np.zeros(variable.shape, variable.dtype))
        new_lr = lr_at(optim, state["lr"], state["lr_scale"], epoch, run.cfg.epochs)
        self.log(f"Stage {run.spec.name} epoch {epoch + 1}: loss {loss}; reloaded the last good checkpoint and "
                 f"lowered the learning rate to {new_lr:.3g} (event {state['nan_events']} of {nan.max_events})")
        write_json(run.files.state, state)

    def _finish_stage(self, run: _StageRun, val_input, cache_dir, splits_file) -> dict:
        """The best epoch's thresholds on validation, its test evaluation, best.keras and the export."""
        files, spec, state, model = run.files, run.spec, run.state, run.model
        restore_checkpoint(model, None, files.best)
        draws = self.config.tta.draws  # scores averaged over the TTA views (1: the plain scores)
        labels, scores = predict_input(run.trainer, val_input, tta_draws=draws)
        test, test_input = None, stage_input(self.config, spec, None, cache_dir, splits_file, "test", training=False,
                                             missing_ok=True)
        if test_input is not None:
            t_labels, t_scores, keys = predict_input(run.trainer, test_input, with_keys=True, tta_draws=draws)
            test = (t_labels, t_scores, patients_of(splits_file, test_input.image_ids[keys]))
        scored = score_on_splits(labels, scores, test, files, self.config, f"Stage {run.index} {spec.name}", self.log)
        thresholds, points, evaluation = scored["thresholds"], scored["points"], scored["evaluation"]
        fit, val_kappa_opt = scored["fit"], scored["val_kappa_opt"]
        if self.is_chief:
            model.save(files.best_keras)
        export_path = None
        if self.config.export and self.is_chief:
            export_path = str(self._export(model, spec, thresholds, points))
        return {
            "index": run.index,
            "stage": spec.name,
            "size": spec.input_size,
            "epochs": state["epoch"],
            "planned_epochs": run.cfg.epochs,
            "stopped_by_time": bool(state.get("stopped_by_time")),
            "lr": state["lr"],
            "lr_source": state["lr_source"],
            "nan_events": state["nan_events"],
            "best_epoch": state["best_epoch"],
            "selection": state.get("selection", "val_kappa"),
            "selection_score": state.get("best_score", state["best_kappa"]),
            "val_kappa": state["best_kappa"],
            "val_kappa_optimized_thresholds": _finite(val_kappa_opt),
            "thresholds": thresholds,
            "thresholds_fit": fit.to_dict(),
            "test_kappa": evaluation["kappa"]["value"] if evaluation else None,
            "mild_dr_auc": evaluation["mild_dr_auc"]["value"] if evaluation else None,
            "test_images": evaluation["n_images"] if evaluation else 0,
            "tta_draws": draws,
            "operating_points": _points_summary(evaluation["operating_points"] if evaluation else points),
            "seconds": round(state["seconds"], 1),
            "weights": model.count_params(),
            "best_checkpoint": str(files.best),
            "keras_model": str(files.best_keras),
            "export_path": export_path,
            "search": state.get("search"),
        }

    def _fusion(self, top: dict, cache_dir, splits_file) -> dict | None:
        """Both-eye fusion after the top stage (``training.fusion``), exported with ``predict_patient``."""
        from retina_scale.training.fusion import run_fusion

        export = self._export_fusion if self.config.export and self.is_chief else None
        return run_fusion(self.config, self.layout, top, cache_dir, splits_file, self.log, self.is_chief, export)

    def _export_fusion(self, top: dict, fusion: dict) -> str:
        """A new version of the export: the top stage as its own export, plus the fusion network's
        ``predict_patient`` (``fusion``: ``export_saved_model``'s argument)."""
        from retina_scale.models.convnet import get_stage

        spec = get_stage(top["stage"])
        model = build_stage_model(self.config, spec, policy="float32")
        restore_checkpoint(model, None, Path(top["best_checkpoint"]))
        return str(self._export(model, spec, top["thresholds"], top["operating_points"], fusion=fusion))

    def _export(self, model, spec, thresholds, points=None, fusion=None):
        from retina_scale.serving.export import export_saved_model, run_preprocessing

        # The cache's sizes and mask too: predict_images repeats the cache's resize chain (no train/serve skew).
        preprocessing = run_preprocessing(self.layout.root)
        preprocessing["normalize"] = self.config.data.normalize
        metadata = {
            "run": self.config.name,
            "stage": spec.name,
            "input_size": spec.input_size,
            "width": self.config.model.width,
            "preprocessing": preprocessing,
        }
        # A float32 copy of a mixed-precision model: the export computes the same on any hardware.
        return export_saved_model(float32_model(model), self.config.export_dir, self.config.model_name,
                                  thresholds=thresholds, metadata=metadata, operating_points=points,
                                  tta=self.config.tta.draws, fusion=fusion)


# ------------------------------------------------------------------------------------- helpers
def _resume_line(run: _StageRun) -> str:
    """What a resumed stage says: the epoch it resumes at, or that its epochs are all done (a stage killed
    after its last epoch, or stopped by its time budget, is only finished: thresholds, test, export)."""
    done, planned = run.state["epoch"], run.cfg.epochs
    where = f"Stage {run.index} {run.spec.name}"
    if run.state.get("stopped_by_time"):
        return f"{where}: its time budget was spent after {done} of {planned} epochs; finishing the stage"
    if done >= planned:
        return (f"{where}: all {planned} epochs were trained earlier; finishing the stage (thresholds, test "
                "evaluation, export)")
    return f"{where}: resuming at epoch {done + 1} of {planned}"


def _epoch_row(epoch, loss, labels, scores, lr, seconds) -> dict:
    return {"epoch": epoch + 1, "loss": float(loss), **validation_row(labels, scores), "lr": float(lr),
            "seconds": round(seconds, 2)}


LOG_COLUMNS = ("epoch", "loss", "val_loss", "val_kappa", "val_kappa_optimized", "lr", "seconds")


def _write_logs(files: StageLayout, history, writer, row) -> None:
    """The stage's ``log.csv`` (every epoch so far) and this epoch's TensorBoard scalars."""
    import tensorflow as tf

    lines = [",".join(LOG_COLUMNS)] + [",".join(str(r[k]) for k in LOG_COLUMNS) for r in history]
    write_text(files.log_csv, "\n".join(lines) + "\n")
    with writer.as_default(step=row["epoch"]):
        for key in ("loss", "val_loss", "val_kappa", "val_kappa_optimized", "lr"):
            tf.summary.scalar(key, row[key])
    writer.flush()


def progbar_verbosity(verbose: int, stream) -> int:
    """Keras's Progbar mode: 0 silent; a bar redrawn at every step on a terminal (or with ``verbose`` 2, the
    command's ``--verbose``); else one line per epoch with its metrics (a log file gets no per-step redraws)."""
    if not verbose:
        return 0
    is_terminal = getattr(stream, "isatty", lambda: False)()
    return 1 if is_terminal or verbose >= 2 else 2


class _ProgbarAdapter:
    """Lets ``DistributedTrainer.train_steps`` drive a Keras Progbar without finishing the line."""

    def __init__(self, progbar):
        self.progbar = progbar

    def update(self, step, values):
        if step < self.progbar.target:
            self.progbar.update(step, values=values)
        else:
            self.progbar.update(step - 1, values=values)


def format_stage_table(results: list[dict]) -> str:
    """The final table of stages, for people."""
    header = ("stage", "size", "epochs", "best", "val kappa", "val kappa*", "test kappa", "seconds", "export")
    rows = [(r["stage"], str(r["size"]), str(r["epochs"]), str(r["best_epoch"]),
             number(r["val_kappa"]), number(r["val_kappa_optimized_thresholds"]), number(r["test_kappa"]),
             f"{r['seconds']:.0f}", r["export_path"] or "-") for r in results]
    lines = [text_table(header, rows)]
    lines.append("val kappa: thresholds 0.5/1.5/2.5/3.5; val kappa*: thresholds optimised on validation "
                 "(also used for test and export)")
    return "\n".join(lines)


def _points_summary(points: dict) -> dict:
    """The operating points as a run's report keeps them: without the test ROC curve (in evaluation.json)."""
    return {k: v for k, v in points.items() if k != "test_roc"}


def stage_rows(report: dict) -> list[dict]:
    """A run report's rows: its stages, then the both-eye fusion stage's when it has one (``report["fusion"]``)."""
    return report["stages"] + ([report["fusion"]] if report.get("fusion") else [])


def format_report(report: dict) -> str:
    """The run's ``report.md``: the table of stages, then each stage's operating points and learning-rate
    search, if any."""
    lines = [f"# Stepwise run `{report['name']}`", "",
             f"Strategy {report['strategy']} with {report['replicas']} replica(s).", "", "```",
             format_stage_table(stage_rows(report)), "```", ""]
    for stage in stage_rows(report):
        if stage.get("operating_points"):
            from retina_scale.grading.operating_points import format_operating_points

            lines += [f"## Operating points, stage {stage['index']} {stage['stage']}", "", "```",
                      format_operating_points(stage["operating_points"]), "```", ""]
        if stage.get("search"):
            lines += [f"## Learning-rate search, stage {stage['index']} {stage['stage']}", "", "```",
                      format_search_table(stage["search"]), "```", ""]
    return "\n".join(lines)
