"""The resolution study end to end on a thin two-stage ladder: the ladder, the from-scratch control
with the ladder's time, throughput, and the report (tables, figures, findings, CLI)."""

import json

import numpy as np
import pytest

from retina_scale.cli import main
from retina_scale.utils.typed_config import ConfigError
from retina_scale.config import load_train_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(small_cache, stages="[{stage: tiny, epochs: 2, lr: 0.003}, {stage: small, epochs: 1, lr: 0.001}]",
            extra=()):
    data, cache = small_cache
    return load_train_config("study", [
        "model.width=0.125", "model.dropout=0.0", "data.normalize=none", f"data.data={json.dumps(str(data))}",
        f"data.cache={json.dumps(str(cache))}", "data.workers=1", "data.val_fraction=0.25",
        "data.test_fraction=0.25", "global_batch_size=8", "eval_bootstrap=20", f"stages={stages}", *extra])


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_cache):
    from retina_scale.evidence.study import run_study

    out = tmp_path_factory.mktemp("study")
    summary = run_study(out, _config(small_cache), throughput_steps=2, peak_sizes=(256,), verbose=0)
    return out, summary


def _states(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    return [json.loads((run_dir / "stages" / f"{s['index']}-{s['stage']}" / "state.json").read_text())
            for s in report["stages"]]


@pytest.mark.slow
def test_study_writes_report_figures_and_json(study):
    out, summary = study
    assert summary["report_md"] == str(out / "REPORT.md")
    figures = sorted(p.name for p in (out / "figures").iterdir())
    # roc.png: the operating points' figure (issue 17); mild DR against resolution and one grade-1 photo's heat map
    # at every stage (issue 14).
    assert figures == ["complexity.png", "confusion.png", "grade1_by_stage.png", "kappa_vs_stage.png",
                       "mild_dr_vs_resolution.png", "roc.png", "stepwise_vs_scratch.png", "val_loss.png"]
    for name in figures:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["findings"] == summary["findings"] and len(on_disk["findings"]) >= 4
    assert set(json.loads((out / "study.json").read_text())) == {"ladder_seconds", "scratch_seconds",
                                                                 "throughput_seconds"}


@pytest.mark.slow
def test_report_numbers_are_the_stage_evaluations(study):
    out, summary = study
    text = (out / "REPORT.md").read_text()
    run_dir = out / "runs" / "stepwise"
    for stage, name in zip(summary["stages"], ("1-tiny", "2-small")):
        evaluation = json.loads((run_dir / "stages" / name / "evaluation.json").read_text())
        assert stage["test_kappa"] == evaluation["kappa"]
        k = evaluation["kappa"]
        assert f"{k['value']:.3f} [{k['ci_low']:.3f}, {k['ci_high']:.3f}]" in text
        mild = evaluation["table_iv"]["mild_dr"]["recall"]
        assert stage["table_iv"]["mild_dr"]["recall"] == mild
        state = json.loads((run_dir / "stages" / name / "state.json").read_text())
        assert stage["val_loss"] == [r["val_loss"] for r in state["history"]]
    matrix = json.loads((run_dir / "stages" / "2-small" / "evaluation.json").read_text())["confusion_matrix"]
    assert "| 0 | " + " | ".join(map(str, matrix[0])) + " |" in text


@pytest.mark.slow
def test_scratch_trains_the_top_stage_from_initialisation_for_the_ladders_time(study):
    out, summary = study
    ladder_seconds = sum(r["seconds"] for s in _states(out / "runs" / "stepwise") for r in s["history"])
    scratch_dir = out / "runs" / "scratch"
    report = json.loads((scratch_dir / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["small"]
    stage_dir = scratch_dir / "stages" / "1-small"
    assert not (stage_dir / "transfer.json").exists()  # nothing carried over: orthogonal initialisation
    state = json.loads((stage_dir / "state.json").read_text())
    assert state["lr"] == pytest.approx(0.003)  # the ladder's first-stage rate, not the fine-tuning rate
    from retina_scale.utils.typed_config import load_config
    from retina_scale.config import TrainConfig

    config = load_config(TrainConfig, scratch_dir / "config.yaml")
    assert config.stages[0].max_seconds == pytest.approx(ladder_seconds, abs=0.1)
    assert summary["scratch"]["ladder_seconds"] == pytest.approx(ladder_seconds)
    # Compared on the measure that picks the epochs: kappa at cut-offs optimised on validation.
    assert summary["scratch"]["scratch_best_val_kappa"] == max(r["val_kappa_optimized"] for r in state["history"])


@pytest.mark.slow
def test_throughput_figures_follow_their_definitions(study):
    from retina_scale.models.complexity import family_complexity

    out, summary = study
    result = json.loads((out / "throughput.json").read_text())
    counts = {r["stage"]: r for r in family_complexity(["tiny", "small"], width=0.125)}
    peak = result["peak"]
    assert peak["flops"] == pytest.approx(2 * peak["n"] ** 3 / peak["seconds"])
    for stage in result["stages"]:
        train = stage["train"]
        assert train["forward_macs"] == counts[stage["stage"]]["macs"]
        assert train["images_per_s"] == pytest.approx(train["steps"] * train["batch"] / train["seconds"])
        assert stage["achieved_flops"] == pytest.approx(3 * train["forward_macs"] * 2 * train["images_per_s"])
        assert stage["fraction_of_peak"] == pytest.approx(stage["achieved_flops"] / peak["flops"])
        assert stage["input"]["images_per_s"] > 0 and stage["predict"]["images_per_s"] > 0
    assert summary["throughput"] == result


@pytest.mark.slow
def test_rerunning_the_study_repeats_no_step(study, small_cache):
    from retina_scale.evidence.study import run_study

    out, summary = study
    before = (out / "study.json").read_text()
    states = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/stages/*/state.json")}
    again = run_study(out, _config(small_cache), throughput_steps=2, peak_sizes=(256,), verbose=0)
    assert (out / "study.json").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in states} == states
    assert again["stages"] == summary["stages"]


@pytest.mark.slow
def test_report_cli_on_a_run_and_on_a_study(study, capsys):
    out, summary = study
    run_dir = out / "runs" / "stepwise"
    run_md = (run_dir / "report.md").read_text()
    assert main(["report", "--run", str(run_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report_md"] == str(run_dir / "report" / "REPORT.md")
    assert printed["scratch"] is None and printed["throughput"] is None
    assert (run_dir / "report.md").read_text() == run_md  # the trainer's own report is left alone
    assert "Not run" in (run_dir / "report" / "REPORT.md").read_text()

    assert main(["report", "--run", str(out), "--out", str(out / "again"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["scratch"]["stage"] == "small" and printed["throughput"] == summary["throughput"]


@pytest.mark.slow
def test_max_seconds_stops_a_stage_between_epochs(tmp_path, small_cache):
    from retina_scale.training.stepwise import StepwiseScaler

    config = _config(small_cache, stages="[{stage: tiny, epochs: 4, lr: 0.003, max_seconds: 0.001}]",
                     extra=[f"runs_dir={json.dumps(str(tmp_path))}", "export=false", "name=budget"])
    report = StepwiseScaler(config, verbose=0).run()
    stage = report["stages"][0]
    assert (stage["epochs"], stage["planned_epochs"], stage["stopped_by_time"]) == (1, 4, True)
    assert len(_states(tmp_path / "budget")[0]["history"]) == 1


def test_max_seconds_must_be_positive(tmp_path):
    # The config is refused before any data is read: no data set needed.
    with pytest.raises(ConfigError, match=r"stages.0.max_seconds must be > 0"):
        _config((tmp_path / "data", tmp_path / "cache"), stages="[{stage: tiny, epochs: 2, max_seconds: 0}]")


# ------------------------------------------------------------------------------ the analysis alone
def _stage(name, size, kappa, low, high, mild_f1, weights, history):
    stat = lambda v, lo=None, hi=None: {"value": v, "ci_low": lo, "ci_high": hi, "n_valid": 10}  # noqa: E731
    table = {k: {"precision": stat(0.5), "recall": stat(0.4), "f1": stat(f)} for k, f in
             (("no_dr", 0.9), ("any_dr", 0.7), ("mild_dr", mild_f1))}
    return {"stage": name, "size": size, "epochs": len(history), "weights": weights, "seconds": 1.0,
            "val_kappa": max(r["val_kappa"] for r in history), "history": history,
            "evaluation": {"kappa": stat(kappa, low, high), "table_iv": table, "confusion_matrix": [[1]]}}


def _history(kappas, seconds):
    return [{"epoch": i + 1, "val_kappa": k, "val_loss": 1 - k, "seconds": s}
            for i, (k, s) in enumerate(zip(kappas, seconds))]


def test_time_to_reach_counts_earlier_stages():
    from retina_scale.evidence.report import compare_scratch

    ladder = {"stages": [_stage("tiny", 112, 0.5, 0.4, 0.6, 0.1, 1e6, _history([0.3, 0.5], [10, 10])),
                         _stage("small", 224, 0.7, 0.6, 0.8, 0.2, 3e6, _history([0.62, 0.7], [30, 30]))]}
    scratch = {"stages": [_stage("small", 224, 0.6, 0.5, 0.7, 0.15, 3e6, _history([0.2, 0.6, 0.55], [25, 25, 25]))]}
    c = compare_scratch(ladder, scratch)
    assert c["scratch_best_val_kappa"] == 0.6
    assert c["scratch_time_to_scratch_best"] == 50  # second epoch
    assert c["ladder_time_to_scratch_best"] == 50  # 10 + 10 + the first small epoch's 30
    assert (c["ladder_seconds"], c["scratch_seconds"]) == (80, 75)

    never = {"stages": [_stage("small", 224, 0.9, 0.8, 0.95, 0.2, 3e6, _history([0.95], [40]))]}
    assert compare_scratch(ladder, never)["ladder_time_to_scratch_best"] is None


def test_time_to_reach_uses_the_optimised_cut_offs_kappa_when_the_history_has_it():
    from retina_scale.evidence.report import compare_scratch

    def optimised(kappas, fixed, seconds):
        return [{**row, "val_kappa_optimized": k} for row, k in zip(_history(fixed, seconds), kappas)]

    # Fixed cut-offs' kappa swings (0.1, 0.7, 0.2); the optimised one climbs (0.5, 0.6, 0.8).
    scratch = {"stages": [_stage("small", 224, 0.6, 0.5, 0.7, 0.15, 3e6, optimised([0.5, 0.6, 0.8], [0.1, 0.7, 0.2],
                                                                                 [10, 10, 10]))]}
    ladder = {"stages": [_stage("small", 224, 0.7, 0.6, 0.8, 0.2, 3e6, optimised([0.7, 0.85], [0.9, 0.3], [20, 20]))]}
    c = compare_scratch(ladder, scratch)
    assert c["scratch_best_val_kappa"] == 0.8 and c["scratch_time_to_scratch_best"] == 30
    assert c["ladder_time_to_scratch_best"] == 40
    assert c["ladder_top_stage_best_val_kappa"] == 0.85  # the same measure for the ladder's top stage


def test_findings_state_the_trend_and_the_overlap():
    from retina_scale.evidence.report import findings

    rising = [_stage("tiny", 112, 0.50, 0.45, 0.55, 0.10, 1e6, _history([0.5], [1])),
              _stage("small", 224, 0.65, 0.60, 0.70, 0.20, 3e6, _history([0.6], [1])),
              _stage("median", 448, 0.70, 0.66, 0.74, 0.30, 8e6, _history([0.7], [1]))]
    text = findings(rising, None, None)
    assert text[0].startswith("Test kappa rises at every step") and "do not overlap" in text[0]
    assert "+0.150, +0.050: smaller gains per doubling" in text[1]
    assert "Mild DR F1 0.100 -> 0.300 (+0.200)" in text[2]

    dip = [rising[0], _stage("small", 224, 0.48, 0.40, 0.56, 0.05, 3e6, _history([0.5], [1]))]
    text = findings(dip, None, None)
    assert text[0].startswith("Test kappa falls at every step")  # one step, down

    wobbly = rising[:2] + [_stage("median", 448, 0.60, 0.55, 0.65, 0.30, 8e6, _history([0.7], [1]))]
    assert findings(wobbly, None, None)[0].startswith("Test kappa does not change monotonically")
    assert "overlap" in text[0] and "do not overlap" not in text[0]
    assert np.isclose(float(text[0].split("change ")[1].split(" ")[0]), -0.02)


@pytest.mark.parametrize("preset, sizes, width, fundus", [("study", [112, 224, 448, 896], 0.5, 1024),
                                                          ("study-full", [112, 224, 448, 896], 1.0, 1024)])
def test_study_presets_describe_the_documented_ladders(preset, sizes, width, fundus):
    from retina_scale.models.convnet import get_stage

    config = load_train_config(preset)
    assert [get_stage(s.stage).input_size for s in config.stages] == sizes
    assert config.model.width == width and not config.tune.enabled
    assert config.data.synth_size == fundus >= sizes[-1]
    assert all(s.max_seconds is None for s in config.stages)
    # The levers that did not move the heat maps on the quick ladder stay off (issue 14's screen).
    assert (config.model.head_pooling, config.loss.aux, config.resample.grade1_boost) == ("rms", "none", 1.0)
    # The CPU study adds Graham's normalisation and a mild-DR-enriched prior; the GPU study keeps the paper's design.
    expected = (("graham", "0.40,0.30,0.15,0.08,0.07") if preset == "study" else ("none", "eyepacs"))
    assert (config.data.normalize, config.data.synth_prior) == expected


def test_the_study_passes_the_normalisation_and_the_levers_through(tmp_path):
    import argparse

    from retina_scale.commands.study import add_arguments, build_config
    from retina_scale.evidence.study import study_configs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["data.normalize=none", "data.synth_prior='0.4,0.4,0.1,0.05,0.05'",
                              "model.head_pooling=max", "loss.aux=classification", "resample.grade1_boost=2"])
    ladder = study_configs(build_config(args), tmp_path / "study")
    assert (ladder.data.normalize, ladder.data.synth_prior) == ("none", "0.4,0.4,0.1,0.05,0.05")
    assert (ladder.model.head_pooling, ladder.loss.aux, ladder.resample.grade1_boost) == ("max", "classification", 2)
    assert ladder.data.cache == str(tmp_path / "study" / "data" / "cache")


@pytest.mark.slow
def test_the_study_report_records_the_class_prior_and_normalisation(study):
    out, summary = study
    on_disk = json.loads((out / "report.json").read_text())
    # small_cache's photos were drawn with the balanced prior (the preset's synth_prior did not make them).
    assert on_disk["data"]["prior"] == {"name": "balanced", "fractions": [0.2] * 5}
    assert on_disk["data"]["normalize"] == "none" and on_disk["data"] == summary["data"]
    grades = on_disk["data"]["grades"]
    assert set(grades) == {"train", "val", "test"} and sum(map(sum, grades.values())) == 48
    assert on_disk["stages"][-1]["test_images"] == sum(grades["test"])
    text = (out / "REPORT.md").read_text()
    assert "drawn with the balanced class prior (0.200, 0.200, 0.200, 0.200, 0.200 for grades 0-4)" in text


@pytest.mark.slow
def test_study_reports_mild_dr_auc_and_lesion_hit_rates_per_stage(study):
    out, summary = study
    run_dir = out / "runs" / "stepwise"
    text = (out / "REPORT.md").read_text()
    on_disk = json.loads((out / "report.json").read_text())
    assert "mild-DR AUC [95 % CI]" in text and "MA hit rate [95 % CI]" in text and "Lesion hit rate" in text
    assert "(figures/mild_dr_vs_resolution.png)" in text and "(figures/grade1_by_stage.png)" in text
    for stage, name in zip(on_disk["stages"], ("1-tiny", "2-small")):
        evaluation = json.loads((run_dir / "stages" / name / "evaluation.json").read_text())
        auc = evaluation["mild_dr_auc"]
        assert stage["mild_dr_auc"] == auc and 0.0 <= auc["value"] <= 1.0
        assert f"{auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" in text
        # The study explained each ladder stage on its test photos with lesions (the synthetic benchmark).
        explained = json.loads((out / "explain" / name / "explain.json").read_text())
        assert stage["lesion_hit_rates"] == explained["lesion_hit_rates"]
        assert stage["ma_hit_rate"] == explained["lesion_hit_rates"]["microaneurysm"]
        for rate in explained["lesion_hit_rates"].values():
            assert 0.0 <= rate["value"] <= 1.0 and rate["chance"] == 0.05 and rate["n_lesions"] > 0
        assert all(row["true_grade"] >= 1 and row["error"] == "" for row in explained["photos"])
        assert 1 <= len(list((out / "explain" / name / "overlays").glob("*.png"))) <= 8


def test_the_scratch_control_is_the_top_stage_alone_without_search_or_fusion(tmp_path, monkeypatch):
    import retina_scale.evidence.report as report
    from retina_scale.evidence.study import scratch_config
    from retina_scale.run_layout import StudyLayout

    ladder = load_train_config("quick", ["fusion.enabled=true", "tune.enabled=true"])
    history = [{"epoch": 1, "seconds": 30.0, "val_kappa": 0.5, "val_loss": 1.0}]
    stages = [{"stage": s.stage, "history": history * (i + 1)} for i, s in enumerate(ladder.stages)]
    monkeypatch.setattr(report, "load_run", lambda folder: {"stages": stages})
    scratch = scratch_config(ladder, StudyLayout(tmp_path))
    assert [s.stage for s in scratch.stages] == [ladder.stages[-1].stage]
    assert scratch.stages[0].max_seconds == pytest.approx(30.0 * (1 + 2 + 3))  # every epoch of the ladder
    assert scratch.stages[0].epochs == 6  # 180 s over the top stage's 30 s epochs
    assert not scratch.fusion.enabled and not scratch.tune.enabled and not scratch.export
    assert ladder.fusion.enabled  # the ladder's own config is left as it was
