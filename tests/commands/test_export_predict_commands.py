"""Tests of `retina-scale export` (a run's stage to a TF Serving version) and `retina-scale predict`."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from retina_scale.cli import main
from retina_scale.config import PreprocessConfig
from retina_scale.data.fundus import preprocess_file
from retina_scale.models import build_model
from retina_scale.serving.export import list_versions, load_export

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fundus_fixtures import draw_fundus  # noqa: E402
from hostile_fixtures import cut_jpeg, png_claiming  # noqa: E402

THRESHOLDS = [0.11, 0.9, 2.2, 3.1]


def _fake_run(root: Path) -> Path:
    """A run folder as the trainer leaves it: stage 1 done (best.keras, state.json), stage 2 interrupted,
    config.yaml with Graham normalisation and the cache's cache.json."""
    run = root / "runs" / "r1"
    tiny = run / "stages" / "1-tiny"
    tiny.mkdir(parents=True)
    model = build_model("tiny", width=0.125, seed=0)
    model.save(tiny / "best.keras")
    (tiny / "state.json").write_text(json.dumps(
        {"status": "done", "result": {"stage": "tiny", "thresholds": THRESHOLDS, "val_kappa": 0.4}}))
    small = run / "stages" / "2-small"
    small.mkdir(parents=True)
    (small / "state.json").write_text(json.dumps({"status": "running", "epoch": 1}))
    (run / "config.yaml").write_text("name: r1\ndata:\n  normalize: graham\n")
    cache = run / "data" / "cache"
    cache.mkdir(parents=True)
    (cache / "cache.json").write_text(json.dumps(
        {"version": 1, "sizes": [112, 224], "preprocess": {"normalize": "graham", "mask": True},
         "image_format": "jpeg"}))
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    run = _fake_run(root)
    base = root / "saved_models"
    rc = main(["export", "--run", str(run), "--model-name", "retina", "--base", str(base)])
    assert rc == 0
    return dict(root=root, run=run, base=base, path=base / "retina" / "1")


def test_export_takes_the_last_finished_stage_its_thresholds_and_preprocessing(exported):
    predict, meta = load_export(exported["path"], signature="predict_images")
    assert meta["stage"] == "tiny" and meta["thresholds"] == THRESHOLDS
    assert meta["preprocessing"]["normalize"] == "graham" and meta["preprocessing"]["sizes"] == [112, 224]
    assert meta["user"]["run"] == "r1"
    # The graph grades a photo as the stage's model grades the cache's (Graham) image of it.
    ok, buf = cv2.imencode(".jpg", draw_fundus(width=400, height=300), [cv2.IMWRITE_JPEG_QUALITY, 95])
    data = buf.tobytes()
    cached = preprocess_file("a.jpg", (112, 224), PreprocessConfig(normalize="graham"), data=data).images[112]
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(exported["run"] / "stages" / "1-tiny" / "best.keras")
    want = float(model.predict(cached[None].astype(np.float32), verbose=0).ravel()[0])
    got = predict(images=tf.constant([data]))
    assert abs(float(got["grade_continuous"].numpy()[0]) - want) < 0.02
    assert int(got["grade"].numpy()[0]) == int(np.sum(np.array(THRESHOLDS) <= want))


@pytest.mark.slow  # two saved_model_cli processes load TensorFlow: ~11 s
def test_saved_model_cli_shows_and_runs_the_commands_export(exported, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    ok, buf = cv2.imencode(".jpg", draw_fundus(width=400, height=300), [cv2.IMWRITE_JPEG_QUALITY, 95])
    np.save(tmp_path / "photo.npy", np.array([buf.tobytes()]))
    show = subprocess.Popen(cli + ["show", "--dir", str(exported["path"]), "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run = subprocess.Popen(cli + ["run", "--dir", str(exported["path"]), "--tag_set", "serve", "--signature_def",
                                  "predict_images", "--inputs", f"images={tmp_path / 'photo.npy'}",
                                  "--outdir", str(tmp_path / "out")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    shown, shown_err = show.communicate(timeout=300)
    _, ran_err = run.communicate(timeout=300)
    assert show.returncode == 0, shown_err[-2000:]
    assert run.returncode == 0, ran_err[-2000:]
    for name in ("serving_default", "predict_images", "get_metadata"):
        assert f"signature_def['{name}']" in shown
    assert np.load(tmp_path / "out" / "valid.npy").tolist() == [True]
    assert np.load(tmp_path / "out" / "grade.npy")[0] in range(5)


def test_export_refuses_unfinished_unknown_stages_and_non_runs(exported, capsys):
    args = ["export", "--model-name", "retina", "--base", str(exported["base"])]
    assert main(args + ["--run", str(exported["run"]), "--stage", "small"]) == 2
    err = capsys.readouterr().err
    assert "stage 'small' of" in err and "has not finished; finished stages: ['tiny']" in err
    assert main(args + ["--run", str(exported["run"]), "--stage", "huge"]) == 2
    assert "no stage 'huge'; accepted: tiny" in capsys.readouterr().err
    assert main(args + ["--run", str(exported["root"])]) == 2
    assert "is not a training run" in capsys.readouterr().err
    assert main(args + ["--run", str(exported["root"] / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert list_versions(exported["base"] / "retina") == [1]


def test_export_adds_a_version_and_keep_prunes(tmp_path):
    run = _fake_run(tmp_path)
    base = tmp_path / "models"
    (base / "m" / "1").mkdir(parents=True)  # an older version, as a previous export leaves it
    (base / "m" / "1" / "saved_model.pb").write_bytes(b"old")
    args = ["export", "--run", str(run), "--model-name", "m", "--base", str(base), "--stage", "tiny"]
    assert main(args + ["--keep", "1", "--json"]) == 0
    assert list_versions(base / "m") == [2]
    assert not [p for p in (base / "m").iterdir() if p.name.startswith(".tmp")]
    assert main(args + ["--keep", "0"]) == 2
    assert list_versions(base / "m") == [2]


# ------------------------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    for i in range(5):
        ok, buf = cv2.imencode(".jpg", draw_fundus(width=320 + 10 * i, height=240, seed=i))
        (folder / ("sub" if i % 2 else ".") / f"p{i}.jpg").write_bytes(buf.tobytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage, not a photo")
    # Quantisation tables renamed to comments: the header checks pass, the decoder fails the whole call.
    ok, buf = cv2.imencode(".jpg", draw_fundus(seed=9))
    (folder / "sub" / "noquant.jpg").write_bytes(buf.tobytes().replace(b"\xff\xdb", b"\xff\xfe"))
    (folder / "text.png").write_bytes(b"hello")
    (folder / "notes.txt").write_text("not listed: not an image extension")
    return folder


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_grades_a_folder_and_reports_bad_photos_without_stopping(exported, photo_folder, tmp_path):
    out = tmp_path / "predictions.csv"
    rc = main(["predict", "--model", str(exported["base"] / "retina"), "--images", str(photo_folder),
               "--out", str(out), "--batch-size", "3"])
    assert rc == 0
    rows = {Path(r["image"]).name: r for r in _read(out)}
    assert sorted(rows) == ["broken.jpg", "noquant.jpg", "p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg", "text.png"]
    assert rows["noquant.jpg"]["error"].startswith("cannot decode") and rows["noquant.jpg"]["grade"] == ""
    # TensorFlow's reason, not the first line of its message ("Graph execution error:"): issue 16.
    assert "Invalid JPEG data" in rows["noquant.jpg"]["error"], rows["noquant.jpg"]["error"]
    assert "{{" not in rows["noquant.jpg"]["error"] and "Graph execution" not in rows["noquant.jpg"]["error"]
    assert "truncated JPEG" in rows["broken.jpg"]["error"] and rows["broken.jpg"]["grade"] == ""
    assert "not an image" in rows["text.png"]["error"]
    predict, _ = load_export(exported["path"], signature="predict_images")
    import tensorflow as tf

    for i in range(5):
        row = rows[f"p{i}.jpg"]
        path = photo_folder / ("sub" if i % 2 else ".") / f"p{i}.jpg"
        want = predict(images=tf.constant([path.read_bytes()]))
        assert row["error"] == ""
        assert int(row["grade"]) == int(want["grade"].numpy()[0])
        assert abs(float(row["grade_continuous"]) - float(want["grade_continuous"].numpy()[0])) < 1e-5
        assert row["referable"] == str(int(want["referable"].numpy()[0]))


def test_predict_reads_a_csv_and_reports_missing_files(exported, photo_folder, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text(f"id,image\n1,{photo_folder / 'p0.jpg'}\n2,missing.jpg\n")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(exported["path"]), "--images", str(listing), "--out", str(out)]) == 0
    rows = _read(out)
    assert [Path(r["image"]).name for r in rows] == ["p0.jpg", "missing.jpg"]
    assert rows[0]["error"] == "" and rows[0]["grade"] != ""
    assert "cannot read file" in rows[1]["error"]


def test_predict_refuses_what_is_not_our_model_and_leaves_no_output(tmp_path, photo_folder, capsys):
    out = tmp_path / "p.csv"
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--model", str(tmp_path / "empty"), "--images", str(photo_folder), "--out", str(out)]) == 2
    assert "not a retina_scale SavedModel" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path), "--images", str(photo_folder), "--out", str(out),
                 "--batch-size", "0"]) == 2
    assert "--batch-size must be a positive integer" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".p.csv*"))


# ------------------------------------------------------------------------------ hostile input (issue 16)


def test_predict_reads_only_regular_files(exported, tmp_path):
    """A link to /dev/zero named z.jpeg grew memory until MemoryError; a FIFO named f.jpeg hung the run."""
    folder = tmp_path / "photos"
    folder.mkdir()
    ok, buf = cv2.imencode(".jpg", draw_fundus(seed=1))
    (folder / "good.jpeg").write_bytes(buf.tobytes())
    (folder / "z.jpeg").symlink_to("/dev/zero")
    os.mkfifo(folder / "f.jpeg")
    (folder / "link.jpeg").symlink_to(folder / "good.jpeg")  # a link to a regular file is read
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(exported["path"]), "--images", str(folder), "--out", str(out)]) == 0
    rows = {Path(r["image"]).name: r for r in _read(out)}
    assert rows["z.jpeg"]["error"] == "not a regular file (device); only regular files are read"
    assert rows["f.jpeg"]["error"] == "not a regular file (FIFO); only regular files are read"
    assert rows["good.jpeg"]["error"] == rows["link.jpeg"]["error"] == ""
    assert rows["good.jpeg"]["grade"] == rows["link.jpeg"]["grade"] != ""


def test_predict_gives_hostile_photos_an_error_row_each_and_grades_the_rest(exported, tmp_path, monkeypatch):
    """Bomb headers, cut JPEGs, TIFF/BMP, a PNG named .jpeg and a formula-like name, in one folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = cv2.imencode(".jpg", draw_fundus(width=400, height=300, seed=2))[1].tobytes()
    files = {
        "good.jpeg": photo,
        "bomb.png": png_claiming(20000, 20000),
        "cut.jpeg": cut_jpeg(photo),
        "scan.tif": cv2.imencode(".tif", draw_fundus())[1].tobytes(),
        "scan.bmp": cv2.imencode(".bmp", draw_fundus())[1].tobytes(),
        "png_named.jpeg": cv2.imencode(".png", draw_fundus(width=400, height=300, seed=2))[1].tobytes(),
        "=cmd|calc.jpeg": photo,
        "+1.jpeg": photo,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    monkeypatch.chdir(folder)  # relative paths: the image cell starts with the file name
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(exported["path"]), "--images", ".", "--out", str(out)]) == 0
    rows = {r["image"]: r for r in _read(out)}
    assert set(rows) == {"good.jpeg", "bomb.png", "cut.jpeg", "scan.tif", "scan.bmp", "png_named.jpeg",
                         "'=cmd|calc.jpeg", "'+1.jpeg"}  # what a spreadsheet would run is escaped
    assert rows["bomb.png"]["error"].startswith("image too large (20000x20000")
    assert rows["cut.jpeg"]["error"].startswith("truncated JPEG")
    assert rows["scan.tif"]["error"].startswith("TIFF image; predict_images decodes JPEG and PNG only")
    assert rows["scan.bmp"]["error"].startswith("BMP image; predict_images decodes JPEG and PNG only")
    graded = ["good.jpeg", "png_named.jpeg", "'=cmd|calc.jpeg", "'+1.jpeg"]
    assert all(rows[n]["error"] == "" and rows[n]["grade"] != "" for n in graded)
    assert rows["good.jpeg"]["grade"] == rows["'+1.jpeg"]["grade"]
    assert not any(r["grade"] for n, r in rows.items() if n not in graded)


# ------------------------------------------------------------- operating points, test-time augmentation (issue 17)
_POINTS = {"chosen_on": "validation", "n_referable": 10, "n_not_referable": 20, "min_specificity": 0.98,
           "min_sensitivity": 0.975, "points": {
               "high_sensitivity": {"met": True, "threshold": -1000.0, "val_sensitivity": 1.0, "val_specificity": 0.0,
                                    "rule": "r", "reason": None},
               "high_specificity": {"met": False, "threshold": None, "val_sensitivity": None, "val_specificity": None,
                                    "rule": "r", "reason": "no threshold refers a referable eye"},
               "youden": {"met": True, "threshold": 1000.0, "val_sensitivity": 0.5, "val_specificity": 1.0,
                          "rule": "r", "reason": None}}}


@pytest.fixture(scope="module")
def exported_with_points(tmp_path_factory):
    """The fake run's stage with operating points in its state.json (high sensitivity refers every photo,
    high specificity not met), exported with two TTA views."""
    root = tmp_path_factory.mktemp("points")
    run = _fake_run(root)
    state = run / "stages" / "1-tiny" / "state.json"
    record = json.loads(state.read_text())
    record["result"]["operating_points"] = _POINTS
    state.write_text(json.dumps(record))
    base = root / "saved_models"
    assert main(["export", "--run", str(run), "--model-name", "retina", "--base", str(base), "--tta", "2"]) == 0
    return dict(root=root, run=run, base=base, path=base / "retina" / "1")


def test_export_records_the_stages_points_and_tta(exported_with_points, capsys):
    predict, meta = load_export(exported_with_points["path"], signature="predict_images")
    assert meta["operating_points"]["points"]["high_sensitivity"]["threshold"] == -1000.0
    assert meta["tta"]["draws"] == 2 and meta["user"]["thresholds_tta_draws"] == 1
    assert "refer_high_sensitivity" in predict.structured_outputs
    assert "refer_high_specificity" not in predict.structured_outputs


@pytest.mark.parametrize("command", ["export", "predict", "evaluate"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_tta_zero_or_negative_is_a_one_line_error_before_any_work(command, value, tmp_path, capsys):
    args = {"export": ["--run", str(tmp_path / "run"), "--model-name", "m", "--base", str(tmp_path / "b")],
            "predict": ["--model", str(tmp_path / "m"), "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")],
            "evaluate": ["--model", str(tmp_path / "m"), "--cache", str(tmp_path / "c")]}[command]
    assert main([command, *args, "--tta", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"retina-scale {command}: error: --tta must be a whole number >= 1 (1: no test-time "
                   f"augmentation); got {value}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow  # two folders graded with two exports: ~7 s
def test_predict_csv_has_the_refer_columns_empty_where_the_export_has_no_point(exported, exported_with_points,
                                                                                 photo_folder, tmp_path, capsys):
    out = tmp_path / "with.csv"
    assert main(["predict", "--model", str(exported_with_points["path"]), "--images", str(photo_folder / "sub"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _read(out)
    graded = [r for r in rows if r["error"] == ""]
    assert list(rows[0]) == ["image", "grade", "grade_continuous", "referable", "refer_high_sensitivity",
                             "refer_high_specificity", "error"]
    assert graded and all(r["refer_high_sensitivity"] == "1" for r in graded)  # threshold -1000: every photo
    assert all(r["refer_high_specificity"] == "" for r in rows)
    assert all(r["refer_high_sensitivity"] == "" for r in rows if r["error"])
    assert "refer_high_specificity empty: operating point high_specificity was not met on validation" in printed
    assert "mean of 2 test-time augmentation views" in printed
    # An export without operating points (the module's, as exports were made before them): both columns empty.
    out = tmp_path / "without.csv"
    assert main(["predict", "--model", str(exported["path"]), "--images", str(photo_folder / "sub"),
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert all(r["refer_high_sensitivity"] == r["refer_high_specificity"] == "" for r in _read(out))
    assert set(summary["empty_columns"]) == {"refer_high_sensitivity", "refer_high_specificity"}
    assert "records no operating points" in summary["empty_columns"]["refer_high_sensitivity"]


@pytest.mark.slow  # three exports graded and a network rebuilt: ~15 s
def test_predict_tta_on_an_export_without_it_equals_the_export_made_with_it(exported, exported_with_points,
                                                                           photo_folder, tmp_path, capsys):
    rows = {}
    for name, model, extra in (("baked", exported_with_points["path"], []), ("asked", exported["path"], ["--tta", "2"]),
                               ("plain", exported["path"], [])):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--model", str(model), "--images", str(photo_folder), "--out", str(out),
                     "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["tta"] == (1 if name == "plain" else 2)
        rows[name] = {r["image"]: r for r in _read(out)}
    graded = [k for k, r in rows["baked"].items() if r["error"] == ""]
    assert len(graded) == 5
    for key in graded:
        baked, asked = float(rows["baked"][key]["grade_continuous"]), float(rows["asked"][key]["grade_continuous"])
        assert abs(baked - asked) < 1e-5 and rows["baked"][key]["grade"] == rows["asked"][key]["grade"]
    # The two views differ from one: the average is not the plain score.
    assert max(abs(float(rows["plain"][k]["grade_continuous"]) - float(rows["asked"][k]["grade_continuous"]))
               for k in graded) > 1e-4
    # An export that averages its own views refuses another number of them.
    assert main(["predict", "--model", str(exported_with_points["path"]), "--images", str(photo_folder),
                 "--out", str(tmp_path / "x.csv"), "--tta", "3"]) == 2
    assert "averages 2 test-time augmentation views already" in capsys.readouterr().err
