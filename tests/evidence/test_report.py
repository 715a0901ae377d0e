"""Tests of retina_scale.evidence.report's record of the photos: the class prior used and the grades per split
(issue 14: a study of mild DR may enrich its share, and the report must say so). The whole report is tested on a
thin study in test_study.py."""

import json

import pytest

from retina_scale.evidence.report import _data_line, data_summary


def _splits(path, rows):
    lines = ["image,patient,eye,label,split"] + [f"i{k},p{k},left,{label},{split}" for k, (label, split) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _synthetic(folder, prior):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"count": 10, "prior": prior, "levels": [2, 2, 2, 2, 2]}))


@pytest.mark.parametrize("prior, name", [([0.2] * 5, "balanced"), ([0.7348, 0.0696, 0.1507, 0.0248, 0.0201], "eyepacs"),
                                         ([0.4, 0.4, 0.1, 0.05, 0.05], None)])
def test_the_prior_of_a_synthetic_set_given_as_data_is_recorded(tmp_path, prior, name):
    run = tmp_path / "run"
    run.mkdir()
    _synthetic(tmp_path / "synthetic", prior)
    _splits(run / "splits.csv", [(0, "train"), (1, "train"), (1, "train"), (4, "val"), (2, "test"), ("", "test")])
    config = {"data": {"data": str(tmp_path / "synthetic"), "normalize": "graham", "synth_prior": "eyepacs"}}
    data = data_summary({"dir": str(run), "config": config})
    # The prior the photos were drawn with (summary.json), not the config's synth_prior, which did not make them.
    assert data["prior"] == {"name": name, "fractions": prior}
    assert data["normalize"] == "graham" and data["data"] == str(tmp_path / "synthetic")
    assert data["grades"] == {"train": [1, 2, 0, 0, 0], "val": [0, 0, 0, 0, 1], "test": [0, 0, 1, 0, 0]}
    line = _data_line(data)
    assert f"drawn with the {name or 'custom'} class prior" in line and "colour normalisation graham" in line
    assert "train 1/2/0/0/0; val 0/0/0/0/1; test 0/0/1/0/0" in line


def test_a_runs_own_synthetic_set_and_photos_not_made_by_the_generator(tmp_path):
    own = tmp_path / "own"
    _synthetic(own / "data" / "synthetic", [0.5, 0.3, 0.1, 0.05, 0.05])
    data = data_summary({"dir": str(own), "config": {"data": {"data": None}}})
    assert data["prior"] == {"name": None, "fractions": [0.5, 0.3, 0.1, 0.05, 0.05]}
    assert data["normalize"] == "none" and data["grades"] is None and data["data"] is None
    assert _data_line(data).startswith("Photos: the run's own synthetic set, drawn with the custom class prior")

    real = tmp_path / "eyepacs"
    real.mkdir()
    data = data_summary({"dir": str(tmp_path / "run"), "config": {"data": {"data": str(real)}}})
    assert data["prior"] is None and "class prior" not in _data_line(data)
