"""Tests of `retina-scale report` on hand-made finished runs: a plain run folder, a study folder (the
ladder, the scratch run, throughput.json and study.json found by themselves), and one-line refusals.
The report of a real study is tested in tests/evidence/test_study.py."""

import json

import numpy as np

from retina_scale.cli import main
from retina_scale.grading.evaluation import evaluate_predictions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def _fake_run(run_dir, stages, seed=0):
    """A finished run as the trainer leaves it: report.json, config.yaml, per stage state.json (the
    epochs) and evaluation.json (a real evaluation of made-up scores)."""
    rng = np.random.default_rng(seed)
    rows = []
    for index, (name, size, kappas) in enumerate(stages, start=1):
        y = rng.integers(0, 5, 60)
        evaluation = evaluate_predictions(y, y + rng.normal(0, 0.4 + 0.2 / index, 60), n_boot=20, seed=0)
        history = [{"epoch": e + 1, "val_kappa": k, "val_loss": 1 - k, "seconds": 2.0} for e, k in enumerate(kappas)]
        folder = run_dir / "stages" / f"{index}-{name}"
        _write(folder / "state.json", {"status": "done", "history": history})
        _write(folder / "evaluation.json", evaluation)
        rows.append({"index": index, "stage": name, "size": size, "epochs": len(kappas), "weights": 1e5 * index,
                     "seconds": 2.0 * len(kappas), "val_kappa": max(kappas), "test_images": 60})
    _write(run_dir / "report.json", {"name": run_dir.name, "strategy": "default", "replicas": 1, "stages": rows})
    _write(run_dir / "config.yaml", "name: {}\nmodel:\n  width: 0.125\nglobal_batch_size: 8\n".format(run_dir.name))
    return run_dir


LADDER = [("tiny", 112, [0.2, 0.4]), ("small", 224, [0.5, 0.6])]


def test_report_of_a_run_goes_to_its_report_folder(tmp_path, capsys):
    run = _fake_run(tmp_path / "runs" / "r1", LADDER)
    assert main(["report", "--run", str(run), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report_md"] == str(run / "report" / "REPORT.md")
    assert printed["scratch"] is None and printed["throughput"] is None and printed["study"] is None
    assert [s["stage"] for s in printed["stages"]] == ["tiny", "small"]
    stored = json.loads((run / "stages" / "2-small" / "evaluation.json").read_text())
    assert printed["stages"][1]["test_kappa"] == stored["kappa"]
    assert json.loads((run / "report" / "report.json").read_text())["findings"] == printed["findings"]
    # Real evaluations of made-up scores carry a mild-DR AUC, so its figure is drawn; no stage panel outside a study.
    assert sorted(printed["figures"]) == ["complexity", "confusion", "kappa_vs_stage", "mild_dr_vs_resolution",
                                          "val_loss"]
    for relative in printed["figures"].values():
        assert (run / "report" / relative).read_bytes()[:8] == PNG_MAGIC
    text = (run / "report" / "REPORT.md").read_text()
    assert "| 0 | " + " | ".join(map(str, stored["confusion_matrix"][0])) + " |" in text
    assert "Not run" in text and "Not measured" in text


def test_report_of_a_study_folder_finds_scratch_throughput_and_timings(tmp_path, capsys):
    study = tmp_path / "study"
    _fake_run(study / "runs" / "stepwise", LADDER)
    _fake_run(study / "runs" / "scratch", [("small", 224, [0.3, 0.45, 0.5])], seed=1)
    _write(study / "study.json", {"ladder_seconds": 12.0, "scratch_seconds": 9.0})
    throughput = {"machine": {"platform": "test", "cpus": 2}, "width": 0.125,
                  "peak": {"flops": 1e10, "n": 256, "seconds": 0.1},
                  "stages": [{"stage": name, "size": size, "fraction_of_peak": 0.01 * i, "achieved_flops": 1e8 * i,
                              "train": {"images_per_s": 10.0 * i, "forward_macs": 1e6 * i, "batch": 8},
                              "input": {"images_per_s": 100.0}, "predict": None, "epoch_images_per_s": None}
                             for i, (name, size, _) in enumerate(LADDER, start=1)]}
    _write(study / "throughput.json", throughput)
    out = tmp_path / "again"
    assert main(["report", "--run", str(study), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report_md"] == str(out / "REPORT.md")
    assert printed["run_dir"] == str(study / "runs" / "stepwise")
    assert printed["scratch"]["stage"] == "small" and printed["scratch"]["scratch_best_val_kappa"] == 0.5
    # Ladder epochs (2 s each) reach 0.2, 0.4, 0.5, 0.6: the third reaches scratch's best 0.5, after 6 s.
    assert printed["scratch"]["ladder_time_to_scratch_best"] == 6.0
    assert printed["throughput"] == throughput and printed["study"] == {"ladder_seconds": 12.0,
                                                                        "scratch_seconds": 9.0}
    text = (out / "REPORT.md").read_text()
    assert "Wall time per step: ladder 12 s, scratch 9 s." in text and "Not run" not in text
    # Without --out a study folder is its own report folder; the ladder's own report.json is left alone.
    ladder_report = (study / "runs" / "stepwise" / "report.json").read_text()
    assert main(["report", "--run", str(study)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"Report: {study / 'REPORT.md'}"
    assert json.loads((study / "report.json").read_text())["scratch"]["stage"] == "small"
    assert (study / "runs" / "stepwise" / "report.json").read_text() == ladder_report


def test_report_cli_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished stepwise run" in err[0]
    assert main(["report", "--run", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    run = _fake_run(tmp_path / "r", LADDER[:1])
    assert main(["report", "--run", str(run), "--scratch", str(tmp_path / "nope")]) == 2
    assert "--scratch: no such file or folder" in capsys.readouterr().err
    assert main(["report", "--run", str(run), "--steps", "0"]) == 2
    assert "--steps must be >= 1; got 0" in capsys.readouterr().err
