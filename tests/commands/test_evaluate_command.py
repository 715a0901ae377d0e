"""Tests of `retina-scale evaluate` on a small synthetic data set: a stage folder's thresholds are used,
every graded image is counted by patient, and bad arguments are refused in one line. The evaluation of a
trained run's export and stage against its own test evaluation is in tests/training/test_stepwise.py."""

import csv
import json

import numpy as np
import pytest

from retina_scale.cli import main
from retina_scale.models import build_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from retina_scale.data.synthetic import generate_dataset

    folder = tmp_path_factory.mktemp("evaluate") / "synthetic"
    generate_dataset(str(folder), count=12, size=128, seed=1, prior="balanced", workers=1, progress=False)
    with open(folder / "trainLabels.csv", newline="") as handle:
        labels = {row["image"]: int(row["level"]) for row in csv.DictReader(handle)}
    return folder, labels


def _constant_stage(folder, value, thresholds):
    """A stage folder whose model grades every image ``value`` (zero last kernel), with its state.json."""
    folder.mkdir(parents=True)
    model = build_model("tiny", width=0.125, seed=0)
    head = model.get_layer("head_grade")
    kernel, _ = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.array([value], np.float32)])
    model.save(folder / "best.keras")
    (folder / "state.json").write_text(json.dumps({"status": "done", "result": {"thresholds": thresholds}}))
    return folder


def test_evaluate_uses_the_stage_thresholds_and_counts_every_image(data, tmp_path, capsys):
    folder, labels = data
    # Every score is 2.3: grade 2 at the default cut-offs, grade 3 at this stage's (2.3 >= 2.2).
    thresholds = [0.5, 1.5, 2.2, 3.5]
    stage = _constant_stage(tmp_path / "runs" / "r" / "stages" / "1-tiny", 2.3, thresholds)
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(stage), "--data", str(folder), "--cache", str(tmp_path / "cache"),
                 "--workers", "1", "--bootstrap", "10", "--json", "--out", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    assert result["model"] == str(stage / "best.keras") and result["thresholds"] == thresholds
    assert result["n_images"] == len(labels) == 12
    assert result["n_patients"] == len({name.split("_")[0] for name in labels}) == 6
    assert result["bootstrap"]["unit"] == "patient" and result["bootstrap"]["n_boot"] == 10
    counts = np.bincount(list(labels.values()), minlength=5)
    expected = np.zeros((5, 5), int)
    expected[:, 3] = counts
    np.testing.assert_array_equal(result["confusion_matrix"], expected)
    # One predicted grade for all: kappa is 0 (no agreement beyond chance), not undefined.
    assert result["kappa"]["value"] == pytest.approx(0.0, abs=1e-12)
    # The same model as a .keras file elsewhere has no state.json beside it: the default cut-offs.
    keras_file = tmp_path / "model.keras"
    keras_file.write_bytes((stage / "best.keras").read_bytes())
    assert main(["evaluate", "--model", str(keras_file), "--cache", str(tmp_path / "cache"), "--bootstrap", "0",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["thresholds"] == [0.5, 1.5, 2.5, 3.5]
    assert [row[2] for row in result["confusion_matrix"]] == counts.tolist()


@pytest.mark.parametrize("args, message", [
    (["--split", "test"], "--split needs --splits"),
    ([], "give --data (images to preprocess) or --cache"),
    (["--cache", "c", "--bootstrap", "-1"], "--bootstrap must be >= 0"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, args, message):
    assert main(["evaluate", "--model", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_what_is_not_a_model_is_refused(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--cache", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["evaluate", "--model", str(tmp_path / "notes.txt"), "--cache", str(tmp_path)]) == 2
    assert "is not a model: expected an export folder" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path), "--cache", str(tmp_path)]) == 2
    assert "is not a model" in capsys.readouterr().err
