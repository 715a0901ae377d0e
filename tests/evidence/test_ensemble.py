"""Tests of the stage ensemble (`retina-scale evaluate --ensemble`, retina_scale.evidence.ensemble): on a thin
two-stage run its scores are the mean of the two stages' own scores, its cut-offs are fitted on validation and
not on the evaluated split; the forms it cannot use are refused in one line."""

import json

import numpy as np
import pytest

from retina_scale.cli import main
from retina_scale.evidence.ensemble import mean_scores, resolve_members


def test_mean_scores_match_the_members_by_image_and_refuse_other_images():
    lower = (np.array([1.0, 2.0, 4.0]), np.array([1, 2, 4]), np.array(["c", "a", "b"]))
    top = (np.array([0.0, 3.0, 1.0]), np.array([2, 4, 1]), np.array(["a", "b", "c"]))
    ids, labels, scores = mean_scores([lower, top])
    assert ids.tolist() == ["a", "b", "c"] and labels.tolist() == [2, 4, 1]
    assert scores.tolist() == [1.0, 3.5, 1.0]
    with pytest.raises(ValueError, match="different images"):
        mean_scores([lower, (top[0], top[1], np.array(["a", "b", "d"]))])


def _stage(run, folder):
    (run / "stages" / folder).mkdir(parents=True)
    (run / "stages" / folder / "best.keras").write_bytes(b"")  # only its presence is looked at here
    return run / "stages" / folder


def test_a_run_folder_means_its_last_finished_stage_and_the_one_below(tmp_path):
    run = tmp_path / "r"
    _stage(run, "1-tiny"), _stage(run, "2-small")
    (run / "stages" / "3-median").mkdir()  # started, no best.keras: not the top
    members = resolve_members(run)
    assert (members.lower.name, members.top.name) == ("tiny", "small")
    assert resolve_members(run / "stages" / "2-small").lower.index == 1


@pytest.mark.parametrize("where, message", [
    ("export", "needs a run's stages"),
    ("keras", "needs a run's stages"),
    ("first", "is the run's first stage"),
    ("no_lower", "the stage below 2-small (stage 1) is missing"),
    ("lower_unfinished", "the stage below 2-small (stage 1) is missing or has no best.keras"),
])
def test_what_the_ensemble_cannot_use_is_refused_in_one_line(tmp_path, capsys, where, message):
    run = tmp_path / "r"
    model = {
        "export": lambda: _saved_model(tmp_path / "saved_models" / "retina" / "1"),
        "keras": lambda: _stage(run, "2-small") / "best.keras",
        "first": lambda: _stage(run, "1-tiny"),
        "no_lower": lambda: _stage(run, "2-small"),
        "lower_unfinished": lambda: ((run / "stages" / "1-tiny").mkdir(parents=True), _stage(run, "2-small"))[1],
    }[where]()
    assert main(["evaluate", "--model", str(model), "--ensemble", "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def _saved_model(folder):
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def thin_run(tmp_path_factory, small_cache):
    """A two-stage run (tiny 112 px, small 224 px, width 0.125, one epoch each) on the shared small cache."""
    from retina_scale.config import load_train_config
    from retina_scale.training.stepwise import StepwiseScaler

    data, cache = small_cache
    tmp = tmp_path_factory.mktemp("ensemble")
    overrides = {"runs_dir": tmp / "runs", "export_dir": tmp / "export", "data.data": data, "data.cache": cache}
    settings = [f"{key}={json.dumps(str(value))}" for key, value in overrides.items()] + [
        "name=e", "model.width=0.125", "model.dropout=0.0", "data.workers=1", "data.val_fraction=0.25",
        "data.test_fraction=0.25", "global_batch_size=8", "eval_bootstrap=0", "export=false", "tune.enabled=false", "fusion.enabled=false",
        "stages=[{stage: tiny, epochs: 1, lr: 0.003}, {stage: small, epochs: 1, lr: 0.001}]"]
    StepwiseScaler(load_train_config("quick", settings), verbose=0).run()
    return tmp / "runs" / "e", cache


def _own_scores(stage, cache, splits, split):
    """A stage's scores by image on ``split``, through evaluate's own loading of a stage (its load_predictor)."""
    from retina_scale.commands.evaluate import load_predictor
    from retina_scale.data.pipeline import CacheInput

    predict, thresholds, size, _ = load_predictor(stage)
    inp = CacheInput(cache, size, split=split, split_file=splits, augment=None, resample=None)
    scores = {}
    for images, _, ids in inp.dataset(8, training=False, include_ids=True):
        scores.update(zip((i.decode() for i in ids.numpy()), predict(images)))
    return scores, dict(zip(inp.image_ids, inp.labels)), thresholds


def _hand_mean(run, cache, split):
    lower, labels, _ = _own_scores(run / "stages" / "1-tiny", cache, run / "splits.csv", split)
    top, _, top_thresholds = _own_scores(run / "stages" / "2-small", cache, run / "splits.csv", split)
    assert sorted(lower) == sorted(top) == sorted(labels)
    ids = sorted(labels)
    mean = np.array([(float(lower[i]) + float(top[i])) / 2 for i in ids])
    return mean, np.array([labels[i] for i in ids]).astype(int), np.array([top[i] for i in ids]), top_thresholds


@pytest.mark.slow
def test_the_ensemble_is_the_mean_of_both_stages_with_cut_offs_fitted_on_validation(thin_run, capsys):
    from retina_scale.grading.kappa import quadratic_weighted_kappa
    from retina_scale.grading.thresholds import apply_thresholds, fit_thresholds

    run, cache = thin_run
    assert main(["evaluate", "--model", str(run / "stages" / "2-small"), "--ensemble", "--bootstrap", "20",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    val_mean, val_labels, _, _ = _hand_mean(run, cache, "val")
    test_mean, test_labels, test_top, top_thresholds = _hand_mean(run, cache, "test")
    assert not np.allclose(test_mean, test_top)  # the stage below weighs in
    on_validation = fit_thresholds(val_labels, val_mean).thresholds
    on_test = fit_thresholds(test_labels, test_mean).thresholds
    assert not np.allclose(on_validation, on_test)  # else the next line could not tell where they were fitted
    np.testing.assert_allclose(result["thresholds"], on_validation, atol=1e-6)
    assert result["thresholds_fit"]["optimized_on"] == "validation"
    assert result["thresholds_fit"]["n_images"] == len(val_labels) and result["n_images"] == len(test_labels)
    grades = apply_thresholds(test_mean, on_validation)
    expected = np.zeros((5, 5), int)
    np.add.at(expected, (test_labels, grades), 1)
    np.testing.assert_array_equal(result["confusion_matrix"], expected)
    assert result["kappa"]["value"] == pytest.approx(quadratic_weighted_kappa(test_labels, grades), abs=1e-9)
    assert result["bootstrap"]["unit"] == "patient" and result["bootstrap"]["n_boot"] == 20
    alone = result["top_stage_alone"]
    assert alone["thresholds"] == list(top_thresholds)
    top_kappa = quadratic_weighted_kappa(test_labels, apply_thresholds(test_top, top_thresholds))
    assert alone["kappa"]["value"] == pytest.approx(top_kappa, abs=1e-9)
    info = result["ensemble"]
    assert (info["lower"], info["top"], info["lower_size"], info["top_size"]) == ("1-tiny", "2-small", 112, 224)
    assert info["images_per_second"] > 0 and info["top_images_per_second"] > 0


@pytest.mark.slow
def test_the_ensemble_with_tta_and_as_text(thin_run, capsys):
    run, _ = thin_run
    assert main(["evaluate", "--model", str(run), "--ensemble", "--tta", "2", "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    assert "Stage ensemble: mean grade of 1-tiny (112 px) and 2-small (224 px), on split test" in out
    assert "optimised for the mean grade on the validation split" in out and "optimistic" not in out
    assert "2 view(s) per image" in out and "top stage alone" in out
