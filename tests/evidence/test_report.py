"""Tests of retina_scale.evidence.report's record of the photos: the class prior used and the grades per split
(issue 14: a study of mild DR may enrich its share, and the report must say so). The whole report is tested on a
thin study in test_study.py. Also the operating-point parts: report.json keeps each stage's points, REPORT.md's
section 9 shows them on validation and test beside Gulshan et al.'s, and the ROC figure marks both."""

import json

import numpy as np
import pytest

from retina_scale.evidence import report as report_module
from retina_scale.evidence.report import _data_line, data_summary, write_report
from retina_scale.grading.evaluation import evaluate_predictions
from retina_scale.grading.operating_points import choose_operating_points, evaluate_operating_points


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



def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def _run(run_dir, with_points=True):
    """A finished two-stage run whose evaluations hold operating points (made-up scores): the first stage's
    validation has no referable eye (no point met), the second's gives all three."""
    rng = np.random.default_rng(0)
    rows = []
    for index, name in enumerate(("tiny", "small"), start=1):
        y = rng.integers(0, 5, 80)
        scores = y + rng.normal(0, 0.6, 80)
        groups = np.repeat(np.arange(40), 2)
        evaluation = evaluate_predictions(y, scores, n_boot=20, groups=groups)
        if with_points:
            val_y = rng.integers(0, 2, 30) if index == 1 else rng.integers(0, 5, 200)
            chosen = choose_operating_points(val_y, val_y + rng.normal(0, 0.3, val_y.size))
            evaluation["operating_points"] = evaluate_operating_points(chosen, y, scores, groups, n_boot=20)
        folder = run_dir / "stages" / f"{index}-{name}"
        _write(folder / "state.json", {"status": "done", "history": [{"epoch": 1, "val_kappa": 0.5, "val_loss": 1.0,
                                                                      "seconds": 1.0}]})
        _write(folder / "evaluation.json", evaluation)
        rows.append({"index": index, "stage": name, "size": 112 * index, "epochs": 1, "weights": 1e5, "seconds": 1.0,
                     "val_kappa": 0.5, "test_images": 80})
    _write(run_dir / "report.json", {"name": run_dir.name, "strategy": "default", "replicas": 1, "stages": rows})
    _write(run_dir / "config.yaml", "name: r\nmodel:\n  width: 0.125\n")
    return run_dir


def test_report_shows_the_operating_points_beside_gulshans(tmp_path):
    run = _run(tmp_path / "runs" / "r")
    summary = write_report(run, tmp_path / "out", complexity=False)
    small = summary["stages"][1]["operating_points"]
    stored = json.loads((run / "stages" / "2-small" / "evaluation.json").read_text())["operating_points"]
    assert "test_roc" not in small and small["points"] == stored["points"]
    assert summary["stages"][0]["operating_points"]["points"]["youden"]["met"] is False
    assert json.loads((tmp_path / "out" / "report.json").read_text())["stages"][1]["operating_points"] == small
    text = (tmp_path / "out" / "REPORT.md").read_text()
    section = text[text.index("## 9. Operating points for referable DR"):]
    high_spec = stored["points"]["high_specificity"]
    assert (f"| small | high_specificity | {high_spec['threshold']:.4f} | {high_spec['val_sensitivity']:.1%} | "
            f"{high_spec['val_specificity']:.1%} |") in section
    assert "| tiny | youden | not met |" in section and "holds no referable eye" in section
    assert "| high specificity | 90.3% | 98.1% |" in section and "| high sensitivity | 97.5% | 93.4% |" in section
    assert "![ROC and operating points](figures/roc.png)" in section
    assert (tmp_path / "out" / "figures" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roc_figure_marks_the_last_stages_points_and_gulshans(tmp_path, monkeypatch):
    run = _run(tmp_path / "runs" / "r")
    drawn = {}

    def keep(fig, path):
        if str(path).endswith("roc.png"):
            ax = fig.axes[0]
            drawn["lines"] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                              for line in ax.get_lines()}
            drawn["lines"].update({c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
                                   for c in ax.containers})  # the points with their interval bars

    monkeypatch.setattr(report_module, "_save", keep)
    write_report(run, tmp_path / "out", complexity=False)
    lines = drawn["lines"]
    assert lines["Gulshan 2016 EyePACS-1: high specificity"] == ([pytest.approx(0.019)], [0.903])
    assert lines["Gulshan 2016 EyePACS-1: high sensitivity"] == ([pytest.approx(0.066)], [0.975])
    stored = json.loads((run / "stages" / "2-small" / "evaluation.json").read_text())["operating_points"]
    for name in ("high_specificity", "high_sensitivity", "youden"):
        point = stored["points"][name]
        x, y = lines[f"small: {name.replace('_', ' ')} (test)"]
        assert x == [pytest.approx(1 - point["test_specificity"]["value"])] and y == [point["test_sensitivity"]["value"]]
    auc = json.loads((run / "stages" / "2-small" / "evaluation.json").read_text())["referable"]["auc"]["value"]
    assert lines[f"small (224 px), AUC {auc:.3f}"] == (stored["test_roc"]["fpr"], stored["test_roc"]["tpr"])


def test_a_run_without_operating_points_says_so_and_draws_no_roc(tmp_path):
    run = _run(tmp_path / "runs" / "old", with_points=False)
    summary = write_report(run, tmp_path / "out", complexity=False)
    assert "roc" not in summary["figures"] and summary["stages"][1]["operating_points"] is None
    assert "Not available: the stages' evaluations predate operating points" in (tmp_path / "out" / "REPORT.md").read_text()
