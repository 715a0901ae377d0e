"""The StepwiseScaler: the paper's Algorithm 1 on any tf.distribute strategy.

For each stage of the ladder: build the stage's model inside the strategy's scope, transfer the
previous stage's best weights by layer name (and print the report), pick the learning rate (from the
config, or from a search hook), fine-tune on that stage's cached images, keep the best epoch by
validation kappa, cut the regression output into grades with thresholds optimised on validation,
evaluate on the test split, and export a SavedModel for TF Serving. Stage 1 starts from orthogonal
initialisation.

A run lives in ``<runs_dir>/<name>/``::

    config.yaml  splits.csv  report.json  report.md
    data/synthetic/ data/cache/          (the embedded data set, when no --data is given)
    stages/1-tiny/  state.json  log.csv  tensorboard/  transfer.{json,txt}  initial.npz
                    last.npz  best.npz  best.keras  evaluation.{json,md}
                    tuning/  (the Keras Tuner project of the stage's learning-rate search, when tune.enabled)

Run the same command again after an interruption (Ctrl-C or kill -9): finished stages are not
retrained, the interrupted stage resumes from its last epoch checkpoint (optimizer state
included), and the class-resampling schedule continues where it was (it is a pure function of the
epoch number).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from retina_scale.config import TrainConfig
from retina_scale.run_layout import RunLayout
from retina_scale.training.optim import lr_at, make_optimizer
from retina_scale.training.stage import (
    StageContext, build_stage_model, check_same_config, ensure_synthetic_data, patients_of, predict_input,
    stage_input, validation_scores,
)
from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import read_json as _read_json
from retina_scale.utils.fileio import write_json as _write_json
from retina_scale.utils.fileio import write_text as _write_text
from retina_scale.utils.tables import number, text_table
from retina_scale.utils.typed_config import dump_config


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss kept diverging); the message says why and what to try."""




def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


class StepwiseScaler:
    """Trains the ladder of stages described by a ``TrainConfig``.

    Args:
        config: the run's configuration (``load_train_config("quick")``, ...).
        strategy: a ``tf.distribute.Strategy``; by default chosen from the machine and
            ``config.strategy`` (see ``choose_strategy``).
        lr_search: optional hook ``fn(StageContext) -> float`` (or an object with ``lr`` and
            ``to_dict()``) that picks each stage's learning rate; None runs Keras Tuner's search
            (``retina_scale.training.tuning.LearningRateSearch``) when ``config.tune.enabled``, else uses the
            config's learning rates. A resumed stage keeps the learning rate it started with.
        verbose: 1 shows Keras progress bars per epoch and a line per stage; 0 is silent.
        log: where lines for people go (default ``print``).

    Example:
    >>> from retina_scale.config import load_train_config
    >>> report = StepwiseScaler(load_train_config("quick")).run()
    >>> [(s["stage"], s["val_kappa"]) for s in report["stages"]]
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
        from retina_scale.training.distribute import is_chief

        layout = RunLayout.of(self.config)
        if is_chief(self.strategy):
            return layout
        resolver = self.strategy.cluster_resolver
        return layout.worker(resolver.task_type, resolver.task_id)

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    @property
    def is_chief(self) -> bool:
        from retina_scale.training.distribute import is_chief

        return is_chief(self.strategy)

    # ------------------------------------------------------------------------------------- data
    def prepare_data(self) -> tuple[Path, Path]:
        """Makes (or reuses) the images, the per-size cache and the patient-level split.

        Returns:
            ``(cache_dir, splits_file)``.
        """
        from retina_scale.config import PreprocessConfig
        from retina_scale.data.cache import prepare_cache
        from retina_scale.data.sources import ensure_splits, read_dataset
        from retina_scale.models.convnet import get_stage

        cfg = self.config.data
        sizes = sorted({get_stage(s.stage).input_size for s in self.config.stages})
        workers = cfg.workers or os.cpu_count() or 1
        data_dir = Path(cfg.data) if cfg.data else self._synthetic_data(workers)
        cache_dir = Path(cfg.cache) if cfg.cache else self.run_dir / "data" / "cache"
        dataset = read_dataset(data_dir, labels=cfg.labels, format=cfg.format,
                               image_col=cfg.image_col, label_col=cfg.label_col)
        if not dataset.records:
            raise UserError(f"no usable image in {data_dir}: {len(dataset.failures)} failed "
                             "(see the reasons with 'retina-scale prepare')")
        self.log(f"Preparing the cache at {', '.join(map(str, sizes))} px in {cache_dir} ...")
        result = prepare_cache(dataset, cache_dir, sizes=sizes, config=PreprocessConfig(normalize=cfg.normalize),
                               workers=workers, progress=bool(self.verbose))
        self.log(result.summary())
        if result.prepared + result.skipped == 0:
            raise UserError(f"no usable image in {data_dir}; see {cache_dir / 'failures.csv'}")

        splits_file = self.run_dir / "splits.csv"
        splits = ensure_splits(self.run_dir, dataset.records, cfg.val_fraction, cfg.test_fraction, seed=cfg.split_seed)
        labels = {r.image_id: r.label for r in dataset.records}
        for split in ("train", "val"):
            grades = {labels.get(i) for i, s in splits.items() if s == split and labels.get(i) is not None}
            if not grades:
                raise UserError(f"the {split} split is empty; give more images or change data.val_fraction / "
                                 "data.test_fraction")
            if split == "train" and len(grades) < 2:
                raise UserError(f"the train split holds a single grade ({grades.pop()}); a grader needs at "
                                 "least two")
        return cache_dir, splits_file

    def _synthetic_data(self, workers: int) -> Path:
        return ensure_synthetic_data(self.run_dir / "data", self.config.data, workers,
                                     progress=bool(self.verbose), log=self.log)

    # -------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        """Runs (or resumes) every stage; returns the run report (also in report.json / report.md)."""
        from retina_scale.models.convnet import get_stage
        from retina_scale.training.distribute import strategy_name

        t0 = time.time()
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        check_same_config(self.layout, self.config)
        if self.is_chief or not (run_dir / "config.yaml").exists():
            dump_config(self.config, run_dir / "config.yaml")
        strategy = self.strategy
        self.log(f"Run {self.config.name} in {run_dir}: {len(self.config.stages)} stages, "
                 f"{strategy_name(strategy)} strategy with {strategy.num_replicas_in_sync} replica(s), "
                 f"global batch {self.config.global_batch_size}")
        cache_dir, splits_file = self.prepare_data()
        results = []
        previous = None
        for index, stage_cfg in enumerate(self.config.stages, start=1):
            spec = get_stage(stage_cfg.stage)
            result = self._run_stage(index, stage_cfg, spec, previous, cache_dir, splits_file)
            results.append(result)
            previous = Path(result["best_checkpoint"])
        report = {
            "name": self.config.name,
            "run_dir": str(run_dir),
            "strategy": strategy_name(strategy),
            "replicas": strategy.num_replicas_in_sync,
            "seconds_this_invocation": round(time.time() - t0, 1),
            "stages": results,
        }
        _write_json(run_dir / "report.json", report)
        _write_text(run_dir / "report.md", format_report(report))
        self.log("\n" + format_stage_table(results))
        return report

    def _lr_search(self):
        """The hook given, else Keras Tuner's search when ``tune.enabled``, else None (the config's lr)."""
        if self.lr_search is not None or not self.config.tune.enabled:
            return self.lr_search
        from retina_scale.training.tuning import LearningRateSearch

        return LearningRateSearch(verbose=self.verbose, log=self._log)

    # ------------------------------------------------------------------------------------ stage
    def _stage_dir(self, index, spec) -> Path:
        return self.run_dir / "stages" / f"{index}-{spec.name}"

    def _run_stage(self, index, stage_cfg, spec, previous, cache_dir, splits_file) -> dict:
        import keras

        stage_dir = self._stage_dir(index, spec)
        stage_dir.mkdir(parents=True, exist_ok=True)
        state_file = stage_dir / "state.json"
        state = _read_json(state_file) if state_file.exists() else None
        if state and state.get("status") == "done":
            self.log(f"Stage {index} {spec.name} ({spec.input_size} px) finished earlier: "
                     f"val kappa {state['result']['val_kappa']:.4f}; not retrained")
            return state["result"]

        cfg = self.config
        strategy = self.strategy
        from retina_scale.training.checkpoint import (
            model_weights_from_checkpoint,
            restore_checkpoint,
            save_checkpoint,
        )
        from retina_scale.training.distribute import DistributedTrainer

        with strategy.scope():
            model = build_stage_model(self.config, spec)
        initial = stage_dir / "initial.npz"
        resumed = state is not None

        if state is None:
            if previous is not None:
                from retina_scale.models.transfer import transfer_weights

                report = transfer_weights(model_weights_from_checkpoint(previous), model)
                report.src_name = previous.parent.name
                _write_json(stage_dir / "transfer.json", report.to_dict())
                _write_text(stage_dir / "transfer.txt", report.format_table() + "\n")
                self.log(report.format_table())
            save_checkpoint(model, None, initial)
            default_lr = stage_cfg.lr if stage_cfg.lr is not None else cfg.optim.lr
            from retina_scale.training.optim import scaled_learning_rate

            default_lr = scaled_learning_rate(default_lr, cfg.global_batch_size, cfg.optim.reference_batch_size)
            lr, lr_source, search = default_lr, "config", None
            lr_search = self._lr_search()
            if lr_search is not None:
                found = lr_search(StageContext(index, spec, stage_dir, initial, default_lr, cfg,
                                               strategy, cache_dir, splits_file))
                # A hook returns a learning rate, or an object with ``lr`` and ``to_dict()`` (the
                # Keras Tuner search's result, whose table goes into the stage's report).
                lr = float(getattr(found, "lr", found))
                search = found.to_dict() if hasattr(found, "to_dict") else None
                lr_source = "search"
                restore_checkpoint(model, None, initial)
            # The search's other dimensions (tune.extra) drive the stage too, not only its lr.
            best = (search or {}).get("best_values") or {}
            hparams = {k: best[k] for k in ("weight_decay", "momentum", "batch_size") if k in best}
            state = {"status": "training", "stage": spec.name, "size": spec.input_size, "epoch": 0,
                     "lr": lr, "lr_source": lr_source, "hparams": hparams, "lr_scale": 1.0, "nan_events": 0,
                     "best_kappa": None, "best_epoch": None, "history": [], "seconds": 0.0, "search": search}
            _write_json(state_file, state)
        hparams = state.get("hparams") or {}
        batch_size = int(hparams.get("batch_size", cfg.global_batch_size))
        with strategy.scope():
            optimizer = make_optimizer(cfg.optim, weight_decay=hparams.get("weight_decay"),
                                       momentum=hparams.get("momentum"))
        trainer = DistributedTrainer(model, optimizer, strategy, batch_size)  # builds the optimizer
        if resumed:  # this process built the model afresh: start from the stage's own weights
            last = stage_dir / "last.npz"
            restore_checkpoint(model, optimizer if last.exists() else None, last if last.exists() else initial)
            self.log(f"Stage {index} {spec.name}: resuming at epoch {state['epoch'] + 1} of {stage_cfg.epochs}")
        if hparams:
            self.log(f"Stage {index} {spec.name}: search's choices {hparams} (with lr {state['lr']:.3g})")

        train_input, val_input = self._inputs(spec, stage_cfg, cache_dir, splits_file)
        steps = train_input.steps_per_epoch(batch_size)
        writer = self._summary_writer(stage_dir)
        self.log(f"Stage {index} {spec.name} ({spec.input_size} px): {model.count_params():,} weights, "
                 f"{len(train_input)} training / {len(val_input)} validation images, {steps} steps per epoch, "
                 f"lr {state['lr']:.3g} ({state['lr_source']})")

        epoch = state["epoch"]
        while epoch < stage_cfg.epochs:
            if stage_cfg.max_seconds is not None and state["seconds"] >= stage_cfg.max_seconds:
                self.log(f"Stage {index} {spec.name}: time budget of {stage_cfg.max_seconds:.0f} s spent after "
                         f"{epoch} of {stage_cfg.epochs} epochs ({state['seconds']:.0f} s); stopping the stage")
                state["stopped_by_time"] = True
                break
            t_epoch = time.time()
            lr = lr_at(cfg.optim, state["lr"], state["lr_scale"], epoch, stage_cfg.epochs)
            optimizer.learning_rate.assign(lr)
            iterator = iter(train_input.distribute(strategy, batch_size, training=True,
                                                   start_epoch=epoch, epochs=1))
            progbar = keras.utils.Progbar(steps, verbose=1 if self.verbose else 0,
                                          stateful_metrics=["val_loss", "val_kappa"])
            if self.verbose:
                self._log(f"Epoch {epoch + 1}/{stage_cfg.epochs}")
            loss = trainer.train_steps(iterator, steps, progbar=None if not self.verbose else _ProgbarAdapter(progbar))
            if not math.isfinite(loss):
                state["nan_events"] += 1
                if state["nan_events"] > cfg.nan.max_events:
                    _write_json(state_file, state)
                    raise TrainingError(
                        f"stage {spec.name}: the training loss was {loss} in {state['nan_events']} epochs even after "
                        f"lowering the learning rate to {lr * cfg.nan.lr_factor:.3g}; lower stages.{index - 1}.lr or "
                        "optim.clipnorm, or check the data"
                    )
                state["lr_scale"] *= cfg.nan.lr_factor
                last = stage_dir / "last.npz"
                restore_checkpoint(model, optimizer if last.exists() else None, last if last.exists() else initial)
                if not last.exists():
                    for variable in optimizer.variables:  # a fresh start: clear the diverged momenta
                        if variable is not optimizer.iterations and "learning_rate" not in variable.path:
                            variable.assign(np.zeros(variable.shape, variable.dtype))
                self.log(f"Stage {spec.name} epoch {epoch + 1}: loss {loss}; reloaded the last good checkpoint and "
                         f"lowered the learning rate to {lr_at(cfg.optim, state['lr'], state['lr_scale'], epoch, stage_cfg.epochs):.3g} "
                         f"(event {state['nan_events']} of {cfg.nan.max_events})")
                _write_json(state_file, state)
                continue
            labels, scores = self._predict(trainer, val_input)
            row = self._epoch_row(epoch, loss, labels, scores, lr, time.time() - t_epoch)
            if self.verbose:
                progbar.update(steps, values=[("val_loss", row["val_loss"]), ("val_kappa", row["val_kappa"])],
                               finalize=True)
            state["history"].append(row)
            state["seconds"] += row["seconds"]
            if state["best_kappa"] is None or row["val_kappa"] > state["best_kappa"]:
                state["best_kappa"], state["best_epoch"] = row["val_kappa"], epoch + 1
                save_checkpoint(model, None, stage_dir / "best.npz")
            epoch += 1
            state["epoch"] = epoch
            save_checkpoint(model, optimizer, stage_dir / "last.npz")
            self._write_logs(stage_dir, state["history"], writer, row)
            _write_json(state_file, state)

        result = self._finish_stage(index, spec, stage_cfg, model, trainer, state, stage_dir, val_input,
                                    cache_dir, splits_file)
        state["status"] = "done"
        state["result"] = result
        _write_json(state_file, state)
        self.log(f"Stage {index} {spec.name}: {spec.input_size} px, {state['epoch']} epochs, best val kappa "
                 f"{result['val_kappa']:.4f} (epoch {result['best_epoch']}), {result['seconds']:.0f} s")
        return result

    def _finish_stage(self, index, spec, stage_cfg, model, trainer, state, stage_dir, val_input,
                      cache_dir, splits_file) -> dict:
        from retina_scale.grading.evaluation import (
            evaluate_predictions,
            format_evaluation,
        )
        from retina_scale.grading.kappa import quadratic_weighted_kappa
        from retina_scale.grading.thresholds import (
            apply_thresholds,
            optimize_thresholds,
        )
        from retina_scale.training.checkpoint import restore_checkpoint

        restore_checkpoint(model, None, stage_dir / "best.npz")
        labels, scores = self._predict(trainer, val_input)
        thresholds = [float(t) for t in optimize_thresholds(labels, scores)]
        val_kappa_opt = quadratic_weighted_kappa(labels, apply_thresholds(scores, thresholds))
        evaluation = None
        test_input = self._input(spec, None, cache_dir, splits_file, "test", training=False, missing_ok=True)
        if test_input is not None:
            t_labels, t_scores, keys = self._predict(trainer, test_input, with_keys=True)
            groups = patients_of(splits_file, test_input.image_ids[keys])
            evaluation = evaluate_predictions(t_labels, t_scores, thresholds, n_boot=self.config.eval_bootstrap,
                                              seed=self.config.seed, groups=groups)
            _write_json(stage_dir / "evaluation.json", evaluation)
            _write_text(stage_dir / "evaluation.md", format_evaluation(evaluation) + "\n")
            self.log(format_evaluation(evaluation))
        if self.is_chief:
            model.save(stage_dir / "best.keras")
        export_path = None
        if self.config.export and self.is_chief:
            export_path = str(self._export(model, spec, thresholds, stage_dir))
        return {
            "index": index,
            "stage": spec.name,
            "size": spec.input_size,
            "epochs": state["epoch"],
            "planned_epochs": stage_cfg.epochs,
            "stopped_by_time": bool(state.get("stopped_by_time")),
            "lr": state["lr"],
            "lr_source": state["lr_source"],
            "nan_events": state["nan_events"],
            "best_epoch": state["best_epoch"],
            "val_kappa": state["best_kappa"],
            "val_kappa_optimized_thresholds": _finite(val_kappa_opt),
            "thresholds": thresholds,
            "test_kappa": evaluation["kappa"]["value"] if evaluation else None,
            "test_images": evaluation["n_images"] if evaluation else 0,
            "seconds": round(state["seconds"], 1),
            "weights": model.count_params(),
            "best_checkpoint": str(stage_dir / "best.npz"),
            "keras_model": str(stage_dir / "best.keras"),
            "export_path": export_path,
            "search": state.get("search"),
        }

    def _export(self, model, spec, thresholds, stage_dir):
        from retina_scale.serving.export import export_saved_model, run_preprocessing

        # The cache's sizes and mask too: predict_images repeats the cache's resize chain (no train/serve skew).
        preprocessing = run_preprocessing(self.run_dir)
        preprocessing["normalize"] = self.config.data.normalize
        metadata = {
            "run": self.config.name,
            "stage": spec.name,
            "input_size": spec.input_size,
            "width": self.config.model.width,
            "preprocessing": preprocessing,
        }
        return export_saved_model(model, self.config.export_dir, self.config.model_name,
                                  thresholds=thresholds, metadata=metadata)

    # ---------------------------------------------------------------------------------- helpers
    def _input(self, spec, stage_cfg, cache_dir, splits_file, split, training, missing_ok=False):
        return stage_input(self.config, spec, stage_cfg, cache_dir, splits_file, split, training, missing_ok)

    def _inputs(self, spec, stage_cfg, cache_dir, splits_file):
        return (self._input(spec, stage_cfg, cache_dir, splits_file, "train", training=True),
                self._input(spec, stage_cfg, cache_dir, splits_file, "val", training=False))

    def _predict(self, trainer, inp, with_keys=False):
        return predict_input(trainer, inp, with_keys=with_keys)

    @staticmethod
    def _epoch_row(epoch, loss, labels, scores, lr, seconds) -> dict:
        val_loss, kappa = validation_scores(labels, scores)
        return {"epoch": epoch + 1, "loss": float(loss), "val_loss": val_loss, "val_kappa": kappa, "lr": float(lr),
                "seconds": round(seconds, 2)}

    def _summary_writer(self, stage_dir):
        import tensorflow as tf

        return tf.summary.create_file_writer(str(stage_dir / "tensorboard"))

    def _write_logs(self, stage_dir, history, writer, row) -> None:
        import tensorflow as tf

        header = ["epoch", "loss", "val_loss", "val_kappa", "lr", "seconds"]
        lines = [",".join(header)] + [",".join(str(r[k]) for k in header) for r in history]
        _write_text(stage_dir / "log.csv", "\n".join(lines) + "\n")
        with writer.as_default(step=row["epoch"]):
            for key in ("loss", "val_loss", "val_kappa", "lr"):
                tf.summary.scalar(key, row[key])
        writer.flush()


# ------------------------------------------------------------------- helpers shared with the search












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


def format_report(report: dict) -> str:
    lines = [f"# Stepwise run `{report['name']}`", "",
             f"Strategy {report['strategy']} with {report['replicas']} replica(s).", "", "```",
             format_stage_table(report["stages"]), "```", ""]
    for stage in report["stages"]:
        if stage.get("search"):
            from retina_scale.training.tuning import format_search_table

            lines += [f"## Learning-rate search, stage {stage['index']} {stage['stage']}", "", "```",
                      format_search_table(stage["search"]), "```", ""]
    return "\n".join(lines)
