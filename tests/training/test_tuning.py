"""Keras Tuner's learning-rate search: picks the best trial, starts every trial from the same
weights, resumes an interrupted search, runs distributed (chief + 2 workers on localhost), and
refuses a bad search space before any trial."""

import json
import subprocess
import sys

import pytest

from retina_scale.cli import main
from retina_scale.config import load_train_config


def _overrides(tmp_path, data_and_cache, name="t", stages="[{stage: tiny, epochs: 1, lr: 0.003}]", trials=3,
               extra=()):
    data, cache = data_and_cache
    return [
        f"runs_dir={json.dumps(str(tmp_path / 'runs'))}", f"export_dir={json.dumps(str(tmp_path / 'export'))}",
        f"name={name}", "model.width=0.125", "model.dropout=0.0", "export=false",
        f"data.data={json.dumps(str(data / 'train'))}", f"data.labels={json.dumps(str(data / 'trainLabels.csv'))}",
        f"data.cache={json.dumps(str(cache))}", "data.workers=1",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "global_batch_size=8", "eval_bootstrap=20",
        f"stages={stages}", "tune.enabled=true", f"tune.max_trials={trials}", "tune.epochs=1",
        "tune.data_fraction=0.5", "tune.lr_min=1e-4", "tune.lr_max=0.1", "fusion.enabled=false", *extra,
    ]


def _no_data(tmp_path):
    """Paths for a command refused before it reads any data (nothing needs to be there)."""
    return tmp_path / "no-data", tmp_path / "no-cache"


def _row(trial, kappa, loss, status="COMPLETED", optimized=None):
    return {"trial": trial, "status": status, "val_kappa": kappa, "val_loss": loss, "val_kappa_optimized": optimized}


def _by_trial(rows, trial):
    return next(r for r in rows if r["trial"] == trial)


def test_best_trial_is_the_highest_kappa_of_the_completed_trials():
    from retina_scale.training.tuning import best_trial

    rows = [_row("0", 0.30, 1.2), _row("1", 0.55, 1.5), _row("2", 0.90, 0.1, status="RUNNING"),
            _row("3", 0.95, 0.2, status="FAILED"), _row("4", None, None), _row("5", 0.10, 0.9)]
    assert best_trial(rows, "val_kappa")["trial"] == "1"  # 2 and 3 did not complete; 4 has no kappa


def test_best_trial_follows_the_objective():
    from retina_scale.training.tuning import best_trial

    # Issue 15: every short trial read 0 at the fixed cut-offs; the optimised-cut-off kappa still ranks them.
    rows = [_row("0", 0.0, 1.10, optimized=0.31), _row("1", 0.0, 1.30, optimized=0.52),
            _row("2", 0.0, 0.95, optimized=0.44)]
    assert best_trial(rows)["trial"] == "1"  # the default objective: val_kappa_optimized
    assert best_trial(rows, "val_kappa")["trial"] == "2"  # all tie at 0: the lowest val loss
    assert best_trial(rows, "val_loss")["trial"] == "2"
    assert best_trial([_row("0", 0.5, 2.0, optimized=0.6), _row("1", 0.1, 1.0, optimized=0.6)])["trial"] == "1"
    # A search recorded before the objective existed has no optimised kappa: no trial can be chosen by it.
    assert best_trial([_row("0", 0.5, 1.0)]) is None


def test_best_trial_ties_go_to_the_lower_val_loss_then_the_earlier_trial():
    from retina_scale.training.tuning import best_trial

    assert best_trial([_row("0", 0.5, 1.5), _row("1", 0.5, 1.1), _row("2", 0.4, 0.2)], "val_kappa")["trial"] == "1"
    # Trial ids compare as numbers: 9 is earlier than 10.
    assert best_trial([_row("10", 0.5, 1.1), _row("9", 0.5, 1.1), _row("11", 0.5, 1.3)], "val_kappa")["trial"] == "9"
    # A missing or infinite val loss (a diverged trial) loses every tie.
    assert best_trial([_row("0", 0.5, None), _row("1", 0.5, float("inf")), _row("2", 0.5, 2.0)], "val_kappa")["trial"] == "2"
    assert best_trial([_row("0", -1.0, None), _row("1", -1.0, None)], "val_kappa")["trial"] == "0"


def test_best_trial_is_none_when_no_trial_completed():
    from retina_scale.training.tuning import best_trial

    assert best_trial([]) is None
    assert best_trial([_row("0", 0.5, 1.0, status="RUNNING", optimized=0.5), _row("1", None, None)]) is None


@pytest.fixture(scope="module")
def searched_run(tmp_path_factory, small_cache):
    from retina_scale.training.stepwise import StepwiseScaler
    from retina_scale.training.tuning import search_hook

    tmp = tmp_path_factory.mktemp("searched")
    stages = "[{stage: tiny, epochs: 1, lr: 0.003}, {stage: small, epochs: 1, lr: 0.001}]"
    config = load_train_config("quick", _overrides(tmp, small_cache, stages=stages, trials=2))
    report = StepwiseScaler(config, lr_search=search_hook(config, verbose=0), verbose=0).run()
    return tmp / "runs" / "t", report, config


@pytest.mark.slow
def test_search_picks_the_best_kappa_and_the_stage_trains_with_it(searched_run):
    run_dir, report, _ = searched_run
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["stages"] == report["stages"]
    for stage, folder in zip(report["stages"], ("1-tiny", "2-small")):
        search = stage["search"]
        rows = search["trials"]
        assert [r["trial"] for r in rows] == ["0", "1"] and all(r["status"] == "COMPLETED" for r in rows)
        assert len({r["lr"] for r in rows}) == 2 and all(1e-4 <= r["lr"] <= 0.1 for r in rows)
        best = _by_trial(rows, search["best_trial"])  # ties: see test_best_trial_ties_*
        assert search["objective"] == "val_kappa_optimized"
        assert best["val_kappa_optimized"] == max(r["val_kappa_optimized"] for r in rows) and search["lr"] == best["lr"]
        state = json.loads((run_dir / "stages" / folder / "state.json").read_text())
        assert state["lr_source"] == "search" and state["lr"] == best["lr"] == stage["lr"]
        assert state["history"][0]["lr"] == pytest.approx(best["lr"])  # the stage trained with it
        assert state["search"] == search
        stored = json.loads((run_dir / "stages" / folder / "tuning" / "search.json").read_text())
        assert stored["result"] == search
        table = (run_dir / "stages" / folder / "tuning" / "search.md").read_text()
        assert f"{best['trial']} *" in table and "val kappa (opt. cut-offs)" in table
        for r in rows:  # a diverged trial (too large an lr) is a result: kappa -1, no loss
            assert r["seconds"] > 0 and (r["val_loss"] is None) == r["diverged"]
            for kappa in (r["val_kappa"], r["val_kappa_optimized"]):
                assert kappa == -1.0 if r["diverged"] else -1.0 <= kappa <= 1.0
            assert r["diverged"] or r["val_kappa_optimized"] >= r["val_kappa"] - 1e-9  # optimised on these images
    assert (run_dir / "report.md").read_text().count("## Learning-rate search") == 2
    tiny, small = ({r["lr"] for r in s["search"]["trials"]} for s in report["stages"])
    assert not tiny & small  # each stage draws its own learning rates


@pytest.mark.slow
def test_every_trial_starts_from_the_stage_initial_weights(searched_run):
    import keras

    from retina_scale.models.convnet import get_stage
    from retina_scale.training.stage import build_stage_model
    from retina_scale.training.tuning import checkpoint_fingerprint, model_fingerprint

    run_dir, report, config = searched_run
    for stage, folder in zip(report["stages"], ("1-tiny", "2-small")):
        initial = checkpoint_fingerprint(run_dir / "stages" / folder / "initial.npz")
        hashes = {r["initial_weights_hash"] for r in stage["search"]["trials"]}
        assert hashes == {initial}
    # The small stage's initial weights are the tiny stage's, transferred: not what a fresh build holds.
    keras.backend.clear_session()
    fresh = model_fingerprint(build_stage_model(config, get_stage("small")))
    assert fresh != checkpoint_fingerprint(run_dir / "stages" / "2-small" / "initial.npz")


@pytest.mark.slow
def test_a_resumed_run_does_not_repeat_a_finished_search(searched_run, small_cache):
    from retina_scale.training.stepwise import StepwiseScaler
    from retina_scale.training.tuning import LearningRateSearch

    run_dir, report, config = searched_run
    stage_dir = run_dir / "stages" / "2-small"
    # Interrupted after its search, before training: the stage starts again, its search does not.
    (stage_dir / "state.json").unlink()
    trial_files = sorted((stage_dir / "tuning").glob("trial_*/trial.json"))
    before = {p: p.stat().st_mtime_ns for p in trial_files}
    lines = []
    search = LearningRateSearch(log=lines.append)
    again = StepwiseScaler(config, lr_search=search, verbose=0).run()
    assert search.last_tuner.trials_run_here == []
    assert {p: p.stat().st_mtime_ns for p in trial_files} == before
    assert again["stages"][1]["lr"] == report["stages"][1]["lr"]
    assert again["stages"][1]["search"]["trials"] == report["stages"][1]["search"]["trials"]
    assert any("finished earlier" in line and "not repeated" in line for line in lines)


@pytest.mark.slow
def test_interrupted_search_resumes_with_the_remaining_trials_only(tmp_path, small_cache, monkeypatch):
    from retina_scale.training import distribute
    from retina_scale.training.tuning import LearningRateSearch, stage_context

    config = load_train_config("quick", _overrides(tmp_path, small_cache, trials=3))
    context = stage_context(config, "tiny", verbose=0)
    real = distribute.DistributedTrainer.train_steps
    calls = {"n": 0}

    def interrupted_in_second_trial(self, iterator, steps, progbar=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of trial 1
        return real(self, iterator, steps, progbar)

    monkeypatch.setattr(distribute.DistributedTrainer, "train_steps", interrupted_in_second_trial)
    first = LearningRateSearch(verbose=0)
    with pytest.raises(KeyboardInterrupt):
        first(context)
    assert first.last_tuner.trials_run_here == ["0"]
    project = context.stage_dir / "tuning"
    trial0 = json.loads((project / "trial_0" / "trial.json").read_text())
    lr1 = json.loads((project / "trial_1" / "trial.json").read_text())["hyperparameters"]["values"]["lr"]
    assert trial0["status"] == "COMPLETED"

    monkeypatch.setattr(distribute.DistributedTrainer, "train_steps", real)
    second = LearningRateSearch(verbose=0)
    result = second(context)
    assert second.last_tuner.trials_run_here == ["1", "2"]  # trial 0 is not run again
    assert [r["trial"] for r in result.trials] == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in result.trials)
    assert result.trials[0]["val_kappa"] == trial0["metrics"]["metrics"]["val_kappa"]["observations"][0]["value"][0]
    assert result.trials[1]["lr"] == lr1  # the interrupted trial is run again with its own values


@pytest.mark.slow
def test_chief_and_two_workers_on_localhost_complete_a_search(tmp_path, small_cache, subprocess_env, free_ports):
    args = [sys.executable, "-m", "retina_scale", "tune", "--stage", "tiny", "--quiet", "--json",
            *_overrides(tmp_path, small_cache, name="dist", trials=3)]
    port = free_ports(1)[0]
    procs = {}
    for tuner_id in ("chief", "worker0", "worker1"):
        env = dict(subprocess_env, KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1",
                   KERASTUNER_ORACLE_PORT=str(port))
        procs[tuner_id] = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = {}
    try:
        for tuner_id, proc in procs.items():
            out, err = proc.communicate(timeout=400)
            assert proc.returncode == 0, f"{tuner_id}:\n{out[-2000:]}\n{err[-3000:]}"
            outputs[tuner_id] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    chief = outputs["chief"]
    assert [r["trial"] for r in chief["trials"]] == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in chief["trials"])
    best = _by_trial(chief["trials"], chief["best_trial"])
    assert best["val_kappa_optimized"] == max(r["val_kappa_optimized"] for r in chief["trials"])
    assert chief["lr"] == best["lr"]
    ran = outputs["worker0"]["trials"] + outputs["worker1"]["trials"]
    assert sorted(ran) == ["0", "1", "2"]  # every trial ran on a worker, once
    assert outputs["worker0"]["role"] == outputs["worker1"]["role"] == "worker"
    stored = json.loads((tmp_path / "runs" / "dist" / "stages" / "1-tiny" / "tuning" / "search.json").read_text())
    assert stored["result"]["lr"] == chief["lr"]


@pytest.mark.parametrize("override,message", [
    ("tune.lr_max=1e-5", "tune.lr_min must be < tune.lr_max; got lr_min=0.0001 >= lr_max=1e-05"),
    ("tune.lr_min=0", "tune.lr_min and tune.lr_max must be > 0 for log sampling"),
    ("tune.tuner=grid", "unknown tuner 'grid'; accepted: random, bayesian, hyperband"),
    ("tune.extra={dropout: {values: [0.1]}}", "unknown search dimension 'dropout'; accepted: weight_decay, "
                                              "batch_size, momentum"),
    ("tune.extra={weight_decay: {min: 0, max: 1e-3, sampling: log}}", "min must be > 0 for log sampling"),
])
@pytest.mark.parametrize("command", ["tune", "train"])
def test_bad_search_space_is_refused_before_any_trial(tmp_path, capsys, override, message, command):
    argv = [command, *(["--stage", "tiny"] if command == "tune" else ["--tune"]),
            *_overrides(tmp_path, _no_data(tmp_path)), override]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_extra_dimensions_come_from_the_config():
    from retina_scale.config import TuneConfig, load_train_config
    from retina_scale.training.tuning import build_search_space

    config = load_train_config("quick", ["tune.extra={weight_decay: {min: 1e-6, max: 1e-3, sampling: log}, "
                                         "batch_size: {values: [16, 32]}}"])
    hp = build_search_space(config.tune)
    space = {p.name: p.get_config() for p in hp.space}
    assert set(space) == {"lr", "weight_decay", "batch_size"}
    assert space["lr"]["sampling"] == "log" and space["lr"]["min_value"] == config.tune.lr_min
    assert space["batch_size"]["values"] == [16, 32]
    assert TuneConfig().lr_min == 1e-5 and TuneConfig().lr_max == 1e-1


def test_unknown_stage_names_the_ladder(tmp_path, capsys):
    code = main(["tune", "--stage", "large", *_overrides(tmp_path, _no_data(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no stage 'large' in this run's ladder; accepted: tiny or 1..1" in err


def test_the_build_sets_the_mixed_precision_policy_again_after_clear_session():
    import keras

    from retina_scale.models.convnet import get_stage
    from retina_scale.config import load_train_config
    from retina_scale.training.tuning import StageHyperModel
    import tensorflow as tf

    config = load_train_config("quick", ["model.width=0.125"])
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        hypermodel = StageHyperModel(config, get_stage("tiny"), tf.distribute.get_strategy(),
                                     keras.config.dtype_policy().name)
        keras.backend.clear_session()
        assert keras.config.dtype_policy().name == "float32"  # the trap: clear_session resets it
        model = hypermodel.build()
        assert model.get_layer("block1_conv1").dtype_policy.name == "mixed_bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")
        keras.backend.clear_session()


@pytest.mark.slow
def test_extra_dimensions_found_by_the_search_drive_the_stage(tmp_path, small_cache):
    from retina_scale.training.stepwise import StepwiseScaler
    from retina_scale.training.tuning import search_hook

    extra = ["tune.extra={weight_decay: {values: [0.0003]}, batch_size: {values: [16]}}"]
    config = load_train_config("quick", _overrides(tmp_path, small_cache, trials=1, extra=extra))
    lines = []
    StepwiseScaler(config, lr_search=search_hook(config, log=lines.append), log=lines.append).run()
    state = json.loads((tmp_path / "runs" / "t" / "stages" / "1-tiny" / "state.json").read_text())
    assert state["hparams"] == {"weight_decay": 0.0003, "batch_size": 16}
    # 24 training images: one step of 16 per epoch (a global batch of 8 would give 3).
    assert any("24 training / " in line and "1 steps per epoch" in line for line in lines), lines


@pytest.mark.slow
def test_trials_share_one_trainer_traced_once_and_run_as_a_fresh_trainer_would(tmp_path, small_cache, monkeypatch):
    from retina_scale.training.checkpoint import restore_checkpoint
    from retina_scale.training.distribute import DistributedTrainer
    from retina_scale.training.optim import make_optimizer
    from retina_scale.training.stage import build_stage_model, stage_input
    from retina_scale.training.tuning import (
        LearningRateSearch, StageTuner, TrialInputs, _train_trial, checkpoint_fingerprint, stage_context,
    )

    config = load_train_config("quick", _overrides(tmp_path, small_cache, trials=3))
    context = stage_context(config, "tiny", verbose=0)
    seen = {}
    real_release = StageTuner.release

    def record_then_release(tuner):
        seen.update({key: t.tracing_counts() for key, t in tuner.trainers.items()})
        real_release(tuner)

    monkeypatch.setattr(StageTuner, "release", record_then_release)
    result = LearningRateSearch(verbose=0)(context)
    assert [r["status"] for r in result.trials] == ["COMPLETED"] * 3 and len({r["lr"] for r in result.trials}) == 3
    # One trainer for the stage's three trials, each of its step functions traced once.
    assert seen == {(8, None, None): {"train_step": 1, "predict_step": 1}}
    assert {r["initial_weights_hash"] for r in result.trials} == {checkpoint_fingerprint(context.initial_weights)}

    # The last trial ran on a trainer two trials had used; a fresh model and trainer get the same numbers.
    last = result.trials[-1]
    with context.strategy.scope():
        model = build_stage_model(config, context.stage)
        optimizer = make_optimizer(config.optim, lr=last["lr"])
    restore_checkpoint(model, None, context.initial_weights)
    trainer = DistributedTrainer(model, optimizer, context.strategy, 8)
    args = (config, context.stage, config.stages[0], context.cache_dir, context.splits_file)
    train_input, val_input = stage_input(*args, "train", training=True), stage_input(*args, "val", training=False)
    steps = max(1, round(config.tune.data_fraction * train_input.steps_per_epoch(8)))
    fresh = _train_trial(trainer, TrialInputs(trainer, train_input, val_input), steps, 1)
    assert fresh.loss == pytest.approx(last["loss"], rel=1e-4)
    assert fresh.row["val_loss"] == pytest.approx(last["val_loss"], rel=1e-4)
    assert fresh.row["val_kappa"] == last["val_kappa"] and fresh.row["val_kappa_optimized"] == last["val_kappa_optimized"]
