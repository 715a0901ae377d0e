"""`retina-scale explain` end to end on a thin two-stage run of the shared synthetic data set: a run's stage on
its test split (overlays, summary, lesion hit rates checked against lesions.csv and images.csv), a chosen stage
and grade, an export on photo files with bad ones among them, and one-line refusals."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from retina_scale.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def thin_run(tmp_path_factory, small_cache):
    from retina_scale.config import load_train_config
    from retina_scale.training.stepwise import StepwiseScaler

    data, cache = small_cache
    tmp = tmp_path_factory.mktemp("explain-run")
    config = load_train_config("quick", [
        f"runs_dir={json.dumps(str(tmp / 'runs'))}", f"export_dir={json.dumps(str(tmp / 'export'))}", "name=t",
        "model.width=0.125", "model.dropout=0.0", f"data.data={json.dumps(str(data))}",
        f"data.cache={json.dumps(str(cache))}", "data.workers=1", "data.val_fraction=0.25",
        "data.test_fraction=0.25", "global_batch_size=8", "eval_bootstrap=20", "tune.enabled=false", "fusion.enabled=false",
        "stages=[{stage: tiny, epochs: 1, lr: 0.003}, {stage: small, epochs: 2, lr: 0.001}]"])
    report = StepwiseScaler(config, verbose=0).run()
    return tmp / "runs" / "t", report, data, cache


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _test_photos(run_dir, data):
    """The test photos of the run with their true grade (images.csv) and lesions (lesions.csv)."""
    test = {r["image"] for r in _rows(run_dir / "splits.csv") if r["split"] == "test"}
    truth = {r["image"]: int(r["true_level"]) for r in _rows(data / "images.csv") if r["image"] in test}
    lesions = {}
    for r in _rows(data / "lesions.csv"):
        if r["image"] in test:
            lesions.setdefault(r["image"], []).append(r["kind"])
    return truth, lesions


@pytest.mark.slow
def test_explain_a_runs_last_stage_on_its_test_split(thin_run, tmp_path, capsys):
    run_dir, report, data, _ = thin_run
    out = tmp_path / "explain"
    assert main(["explain", "--model", str(run_dir), "--split", "test", "--out", str(out), "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "explain.json").read_text())
    truth, lesions = _test_photos(run_dir, data)
    assert "2-small" in summary["model"] and summary["layer"] == "block4_conv3_lrelu" and summary["input_size"] == 224
    assert sorted(r["image"] for r in summary["photos"]) == sorted(truth) and summary["n_errors"] == 0
    for row in summary["photos"]:
        assert row["error"] == "" and math.isfinite(row["score"]) and row["grade"] in range(5)
        assert row["true_grade"] == truth[row["image"]]  # lesions.csv's grade is the generator's true grade
        assert 0.0 <= row["cam_peak"] and math.isfinite(row["cam_peak"])
        png = (out / row["overlay"]).read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 5000
    assert len(_rows(out / "explain.csv")) == len(truth)
    # Every counted lesion, recounted from lesions.csv: microaneurysms of grade-1 photos, the others anywhere.
    expected = {"microaneurysm": sum(k == "microaneurysm" for i, ks in lesions.items() if truth[i] == 1 for k in ks),
                "haemorrhage": sum(k in ("dot_blot_haemorrhage", "flame_haemorrhage") for ks in lesions.values()
                                   for k in ks),
                "exudate": sum(k == "hard_exudate" for ks in lesions.values() for k in ks)}
    rates = summary["lesion_hit_rates"]
    assert {g: r["n_lesions"] for g, r in rates.items()} == {g: n for g, n in expected.items() if n}
    for group, r in rates.items():
        assert 0.0 <= r["value"] <= 1.0 and r["chance"] == 0.05 and r["n_photos"] >= 1, group
        assert r["ci_low"] <= r["value"] <= r["ci_high"], group
    assert "Lesion hit rate" in printed and "microaneurysm" in printed


@pytest.mark.slow
def test_explain_a_chosen_stage_and_grade(thin_run, tmp_path):
    run_dir, _, data, _ = thin_run
    out = tmp_path / "mild"
    assert main(["explain", "--model", str(run_dir), "--stage", "tiny", "--split", "test", "--grades", "1",
                 "--limit", "3", "--overlays", "1", "--out", str(out), "--json"]) == 0
    summary = json.loads((out / "explain.json").read_text())
    truth, _ = _test_photos(run_dir, data)
    mild = [i for i, g in truth.items() if g == 1]
    assert summary["layer"] == "block3_conv3_lrelu" and summary["input_size"] == 112
    assert summary["n_photos"] == min(3, len(mild)) >= 1
    assert all(truth[r["image"]] == 1 for r in summary["photos"])
    assert len(list((out / "overlays").glob("*.png"))) == 1


@pytest.mark.slow
def test_explain_an_export_on_photo_files_with_bad_ones(thin_run, tmp_path):
    run_dir, report, data, cache = thin_run
    export = Path(report["stages"][-1]["export_path"])
    photos = tmp_path / "photos"
    photos.mkdir()
    names = sorted(p.name for p in (data / "train").glob("*.jpeg"))[:2]
    for name in names:
        shutil.copy(data / "train" / name, photos / name)
    (photos / "broken.jpeg").write_bytes(b"not a photo at all")
    (photos / "empty.png").write_bytes(b"")
    out = tmp_path / "files"
    assert main(["explain", "--model", str(export), "--images", str(photos), "--lesions", str(data / "lesions.csv"),
                 "--out", str(out), "--json"]) == 0
    rows = {Path(r["image"]).name: r for r in json.loads((out / "explain.json").read_text())["photos"]}
    assert set(rows) == set(names) | {"broken.jpeg", "empty.png"}
    assert rows["broken.jpeg"]["error"].startswith("not an image") and rows["broken.jpeg"]["score"] is None
    assert rows["empty.png"]["error"].startswith("empty file")
    for name in names:
        assert rows[name]["error"] == "" and rows[name]["grade"] in range(5)
        assert (out / rows[name]["overlay"]).read_bytes()[:8] == PNG_MAGIC

    # The export's network (rebuilt from its weights) scores the cached test images as the stage itself does.
    by_export, by_stage = tmp_path / "export-cached", tmp_path / "stage-cached"
    common = ["--cache", str(cache), "--split", "test", "--splits", str(run_dir / "splits.csv"), "--limit", "4",
              "--overlays", "0", "--json"]
    assert main(["explain", "--model", str(export), "--out", str(by_export), *common]) == 0
    assert main(["explain", "--model", str(run_dir / "stages" / "2-small"), "--out", str(by_stage), *common]) == 0
    a = json.loads((by_export / "explain.json").read_text())["photos"]
    b = json.loads((by_stage / "explain.json").read_text())["photos"]
    assert [r["image"] for r in a] == [r["image"] for r in b]
    assert all(abs(x["score"] - y["score"]) < 1e-4 and x["grade"] == y["grade"] for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--stage", "large", "--split", "test"], "has no stage 'large'"),
    (["--images", "EMPTY"], "no photo to explain"),
    (["--split", "test", "--grades", "7"], "--grades must be grades 0-4"),
    (["--split", "test", "--fraction", "1.5"], "--fraction must be between 0 and 1"),
])
def test_bad_input_is_refused_in_one_line(thin_run, tmp_path, capsys, args, message):
    run_dir = thin_run[0]
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    assert main(["explain", "--model", str(run_dir), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_a_run_with_its_own_synthetic_set_finds_its_lesions_from_any_folder(thin_run, tmp_path, monkeypatch):
    """A run made without --data records its data folder relative to where it was started (`runs/NAME/data/...`):
    named by an absolute path from another folder, explain still finds the run's own lesions.csv."""
    import yaml

    from retina_scale.data.cache import CONFIG

    run_dir, _, data, cache = thin_run
    own = tmp_path / "start" / "runs" / "own"
    shutil.copytree(run_dir, own)
    shutil.copytree(data, own / "data" / "synthetic")
    shutil.copytree(cache, own / "data" / "cache")
    config = yaml.safe_load((own / "config.yaml").read_text())
    config["runs_dir"], config["data"]["data"], config["data"]["cache"] = "runs", None, None
    (own / "config.yaml").write_text(yaml.safe_dump(config))
    cache_config = json.loads((own / "data" / "cache" / CONFIG).read_text())
    cache_config["data"]["root"] = "runs/own/data/synthetic"  # as `retina-scale train` records it, run from start/
    (own / "data" / "cache" / CONFIG).write_text(json.dumps(cache_config))
    monkeypatch.chdir(tmp_path)  # not start/: the recorded relative root does not resolve from here
    out = tmp_path / "explain-own"
    assert main(["explain", "--model", str(own), "--split", "test", "--out", str(out), "--bootstrap", "0",
                 "--overlays", "0"]) == 0
    summary = json.loads((out / "explain.json").read_text())
    rates = summary["lesion_hit_rates"]  # None when no lesions.csv was found
    assert rates and sum(r["n_lesions"] for r in rates.values()) > 0
