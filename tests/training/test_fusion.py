"""The both-eye fusion stage (issue 17) on a thin two-stage ladder: its validation and test kappas recomputed here
from its saved network and features, the one-eye fallback, pairing errors, resuming, and its config checks."""

import json

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from retina_scale.config import load_train_config
from retina_scale.data.sources import ONE_EYE, SAME_EYE, UNKNOWN_EYE, pair_eyes
from retina_scale.utils.typed_config import ConfigError


def _overrides(root, data, cache, extra=()):
    return [
        f"runs_dir={json.dumps(str(root / 'runs'))}", f"export_dir={json.dumps(str(root / 'export'))}",
        "name=f", "model.width=0.125", "model.dropout=0.0",
        f"data.data={json.dumps(str(data))}", f"data.cache={json.dumps(str(cache))}", "data.workers=1",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "global_batch_size=8", "eval_bootstrap=20",
        "stages=[{stage: tiny, epochs: 1, lr: 0.003}, {stage: small, epochs: 2, lr: 0.001}]", "tune.enabled=false",
        "fusion.enabled=false", "fusion.epochs=6", "fusion.hidden=8", "fusion.dropout=0.0", *extra,
    ]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """49 synthetic photos: 24 patients with both eyes, patient 25 with a left eye only."""
    from retina_scale.data.cache import prepare_cache
    from retina_scale.data.sources import read_dataset
    from retina_scale.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("fusion-data")
    data, cache = root / "synthetic", root / "cache"
    generate_dataset(str(data), count=49, size=224, seed=5, prior="balanced", workers=1, progress=False)
    prepare_cache(read_dataset(data), cache, sizes=(112, 224), workers=1, progress=False)
    return data, cache


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory, odd_data):
    """The ladder trained without fusion, then the same command with ``fusion.enabled=true``:
    ``(run folder, report, log lines of the second run, best.npz bytes of each stage before the second run)``."""
    from retina_scale.training.stepwise import StepwiseScaler

    root = tmp_path_factory.mktemp("fused")
    StepwiseScaler(load_train_config("quick", _overrides(root, *odd_data)), verbose=0).run()
    run_dir = root / "runs" / "f"
    before = {p.parent.name: p.read_bytes() for p in run_dir.glob("stages/*/best.npz")}
    lines = []
    config = load_train_config("quick", _overrides(root, *odd_data, ["fusion.enabled=true"]))
    report = StepwiseScaler(config, verbose=1, log=lines.append).run()
    return run_dir, report, lines, before, (root, odd_data)


def _splits(run_dir):
    import pandas as pd

    return pd.read_csv(run_dir / "splits.csv", dtype=str, keep_default_na=False)


def _recomputed_scores(run_dir, split):
    """The fusion stage's grades of one split, recomputed here: pairs by patient and eye from splits.csv, the saved
    network on the saved features, the single-eye grade where the patient has no other photo."""
    import keras

    frame = _splits(run_dir)
    with np.load(run_dir / "fusion" / "features.npz") as f:
        ids, labels = f[f"{split}/ids"], f[f"{split}/labels"]
        features, scores = f[f"{split}/features"], f[f"{split}/scores"]
    net = keras.saving.load_model(run_dir / "fusion" / "fusion.keras", safe_mode=True)
    row = {image: i for i, image in enumerate(ids)}
    patient_eye = {(p, e): img for img, p, e in zip(frame["image"], frame["patient"], frame["eye"])}
    eye_of = dict(zip(frame["image"], zip(frame["patient"], frame["eye"])))
    out = scores.astype(np.float64).copy()
    for i, image in enumerate(ids):
        patient, eye = eye_of[image]
        fellow = patient_eye.get((patient, "right" if eye == "left" else "left"))
        if fellow is None or fellow not in row:
            continue
        j = row[fellow]
        x = np.concatenate([features[i], features[j], np.abs(features[i] - features[j]), [scores[i], scores[j]]])
        out[i] = float(np.asarray(net({"pair": x[None].astype(np.float32),
                                       "own": np.array([[scores[i]]], np.float32)})).ravel()[0])
    return labels.astype(int), out, scores, ids


def _grades(scores, cuts):
    return np.searchsorted(np.asarray(cuts), scores, side="right")


def _qwk(labels, scores, cuts=(0.5, 1.5, 2.5, 3.5)):
    return cohen_kappa_score(labels, _grades(scores, cuts), weights="quadratic", labels=range(5))


@pytest.mark.slow
def test_fused_validation_and_test_kappas_are_computed_as_every_stages(fused_run):
    run_dir, report, _, _, _ = fused_run
    fusion = report["fusion"]
    labels, scores, _, _ = _recomputed_scores(run_dir, "val")
    assert fusion["val_kappa"] == pytest.approx(_qwk(labels, scores), abs=1e-5)
    assert fusion["val_kappa_optimized_thresholds"] == pytest.approx(_qwk(labels, scores, fusion["thresholds"]),
                                                                      abs=1e-5)
    # The cut-offs were optimised on validation: no worse there than the fixed ones.
    assert fusion["val_kappa_optimized_thresholds"] >= fusion["val_kappa"] - 1e-9
    t_labels, t_scores, _, _ = _recomputed_scores(run_dir, "test")
    evaluation = json.loads((run_dir / "fusion" / "evaluation.json").read_text())
    assert evaluation["kappa"]["value"] == pytest.approx(_qwk(t_labels, t_scores, fusion["thresholds"]), abs=1e-5)
    assert fusion["test_kappa"] == evaluation["kappa"]["value"]
    assert evaluation["n_images"] == len(t_labels) == fusion["test_images"]


@pytest.mark.slow
def test_the_fusion_stage_is_one_more_row_of_the_report(fused_run):
    run_dir, report, _, _, _ = fused_run
    assert [s["stage"] for s in report["stages"]] == ["tiny", "small"]
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["fusion"]["stage"] == "fusion" and on_disk["fusion"]["index"] == 3
    table = (run_dir / "report.md").read_text()
    fusion_lines = [line for line in table.splitlines() if line.startswith("fusion ")]
    assert len(fusion_lines) == 1 and f"{report['fusion']['val_kappa']:.4f}" in fusion_lines[0]


@pytest.mark.slow
def test_a_patient_with_one_eye_keeps_the_single_eye_grade_and_the_log_counts_it(fused_run):
    run_dir, report, lines, _, _ = fused_run
    frame = _splits(run_dir)
    lonely = [image for image, patient in zip(frame["image"], frame["patient"])
              if (frame["patient"] == patient).sum() == 1]
    assert lonely == ["25_left"]
    split = frame.loc[frame["image"] == "25_left", "split"].item()
    assert report["fusion"]["fallback"][split] == {ONE_EYE: 1}
    assert all(not counts for s, counts in report["fusion"]["fallback"].items() if s != split)
    counted = [line for line in lines if "keep the single-eye grade" in line]
    assert len(counted) == 1 and "(1 one eye only)" in counted[0]
    _, fused, single, ids = _recomputed_scores(run_dir, split)
    at = list(ids).index("25_left")
    assert fused[at] == single[at]
    others = np.arange(len(ids)) != at
    assert not np.allclose(fused[others], single[others])  # the paired eyes' grades did move


@pytest.mark.slow
def test_enabling_fusion_on_a_finished_run_trains_only_the_fusion_stage(fused_run):
    run_dir, _, lines, before, _ = fused_run
    after = {p.parent.name: p.read_bytes() for p in run_dir.glob("stages/*/best.npz")}
    assert after == before and len(before) == 2
    assert sum("finished earlier" in line and line.startswith("Stage") for line in lines) == 2
    assert any(line.startswith("Fusion: features of 49 photos") for line in lines)


@pytest.mark.slow
def test_a_rerun_keeps_a_done_fusion_stage_and_an_interrupted_one_retrains_from_the_saved_features(fused_run):
    from retina_scale.training.stepwise import StepwiseScaler

    run_dir, report, _, _, (root, data) = fused_run
    files = run_dir / "fusion"
    config = load_train_config("quick", _overrides(root, *data, ["fusion.enabled=true"]))
    model_bytes, features_bytes = (files / "fusion.keras").read_bytes(), (files / "features.npz").read_bytes()
    lines = []
    again = StepwiseScaler(config, verbose=1, log=lines.append).run()
    assert any(line.startswith("Fusion stage finished earlier") for line in lines)
    assert again["fusion"] == report["fusion"] and (files / "fusion.keras").read_bytes() == model_bytes
    # Killed while training: state.json says so; the rerun trains the network again but not the features.
    (files / "state.json").write_text(json.dumps({"status": "training", "settings": {}}))
    lines.clear()
    resumed = StepwiseScaler(config, verbose=1, log=lines.append).run()
    assert not any(line.startswith("Fusion: features of") for line in lines)
    assert any(line.startswith("Fusion: 6 epochs") for line in lines)
    assert (files / "features.npz").read_bytes() == features_bytes
    assert resumed["fusion"]["val_kappa"] == pytest.approx(report["fusion"]["val_kappa"], abs=1e-6)
    assert json.loads((files / "state.json").read_text())["status"] == "done"


def test_pairing_refuses_anything_but_one_photo_of_each_eye():
    patients = ["1", "1", "2", "2", "2", "3", "4", "4", "5", "5"]
    eyes = ["right", "left", "left", "left", "right", "left", "left", None, "left", "right"]
    fellow, reasons = pair_eyes(patients, eyes)
    assert fellow.tolist() == [1, 0, -1, -1, -1, -1, -1, -1, 9, 8]
    assert reasons[2:5] == [SAME_EYE] * 3  # patient 2's right eye too: no sure fellow
    assert reasons[5] == ONE_EYE and reasons[7] == UNKNOWN_EYE
    assert reasons[0] == reasons[1] == reasons[8] == ""


@pytest.mark.parametrize("override, message", [
    ("fusion.hidden=0", "fusion.hidden must be in [1, 4096]; got 0"),
    ("fusion.epochs=0", "fusion.epochs must be in [1, 10000]; got 0"),
    ("fusion.dropout=1.0", "fusion.dropout must be in [0, 1); got 1"),
    ("fusion.lr=-1", "fusion.lr must be > 0; got -1"),
    ("fusion.widht=3", "fusion.widht"),
    ("fusion.enabled=3", "fusion.enabled"),
])
def test_bad_fusion_settings_are_refused_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_train_config("quick", [override])


@pytest.mark.slow
def test_the_resolution_report_has_a_fusion_row(fused_run, tmp_path):
    from retina_scale.evidence.report import write_report

    run_dir, report, _, _, _ = fused_run
    summary = write_report(run_dir, tmp_path / "report", complexity=False)
    evaluation = json.loads((run_dir / "fusion" / "evaluation.json").read_text())
    assert summary["fusion"]["test_kappa"]["value"] == evaluation["kappa"]["value"]
    assert [s["stage"] for s in summary["stages"]] == ["tiny", "small"]
    text = (tmp_path / "report" / "REPORT.md").read_text()
    kappa_rows = [line for line in text.split("## 2.")[0].splitlines() if line.startswith("| fusion |")]
    assert len(kappa_rows) == 1 and f"{report['fusion']['val_kappa']:.3f}" in kappa_rows[0]
    assert "test photos without a usable fellow eye" in text


def _test_patients(run_dir, data):
    """``(patient, left photo bytes, right photo bytes)`` of each test patient with both eyes."""
    frame = _splits(run_dir)
    test = frame[frame["split"] == "test"]
    both = sorted({p for p in test["patient"] if set(test.loc[test["patient"] == p, "eye"]) == {"left", "right"}})
    return [(p, (data / "train" / f"{p}_left.jpeg").read_bytes(), (data / "train" / f"{p}_right.jpeg").read_bytes())
            for p in both]


@pytest.mark.slow  # a saved_model_cli process loads TensorFlow: ~10 s
def test_saved_model_cli_runs_predict_patient_as_the_fusion_stage_graded_the_pair(fused_run, tmp_path):
    import os
    import subprocess
    import sys

    run_dir, report, _, _, (_, (data, _)) = fused_run
    export = report["fusion"]["export_path"]
    assert export is not None and export != report["stages"][-1]["export_path"]
    patients = _test_patients(run_dir, data)[:2]
    assert len(patients) == 2
    # numpy fixed-width bytes: a JPEG ends in FF D9, so no trailing NUL is lost. Row 3: the right photo is junk.
    np.save(tmp_path / "left.npy", np.array([patients[0][1], patients[1][1], patients[0][1]]))
    np.save(tmp_path / "right.npy", np.array([patients[0][2], patients[1][2], b"junk"]))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "run", "--dir", export,
                           "--tag_set", "serve", "--signature_def", "predict_patient", "--inputs",
                           f"left={tmp_path / 'left.npy'};right={tmp_path / 'right.npy'}", "--outdir",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = {f.stem: np.load(f, allow_pickle=True) for f in (tmp_path / "out").glob("*.npy")}  # errors: objects
    _, fused, single, ids = _recomputed_scores(run_dir, "test")
    at = {image: i for i, image in enumerate(ids)}
    for row, (patient, _, _) in enumerate(patients):
        for eye in ("left", "right"):
            assert out[f"{eye}_valid"][row] and out[f"{eye}_fused"][row]
            assert abs(out[f"{eye}_grade_continuous"][row] - fused[at[f"{patient}_{eye}"]]) < 0.05
    # The fellow photo failed: the left eye keeps its single-eye grade, the right one has none.
    assert out["left_valid"][2] and not out["left_fused"][2]
    assert abs(out["left_grade_continuous"][2] - single[at[f"{patients[0][0]}_left"]]) < 0.05
    assert not out["right_valid"][2] and out["right_grade"][2] == -1 and out["right_error"][2]
    cuts = report["fusion"]["thresholds"]
    assert out["left_grade"].tolist() == _grades(out["left_grade_continuous"], cuts).tolist()


@pytest.mark.slow
def test_predict_pairs_photos_by_file_name_and_says_why_a_photo_was_graded_alone(fused_run, tmp_path):
    import csv
    import shutil

    from retina_scale.cli import main

    run_dir, report, _, _, (_, (data, _)) = fused_run
    (a, _, _), (b, _, _), (c, _, _), (d, _, _) = _test_patients(run_dir, data)[:4]
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, source in ((f"{a}_left", f"{a}_left"), (f"{a}_right", f"{a}_right"), (f"{b}_left", f"{b}_left"),
                         (f"{c}_left", f"{c}_left"), (f"{c}-left", f"{c}_right"), (f"{d}_left", f"{d}_left")):
        shutil.copy(data / "train" / f"{source}.jpeg", folder / f"{name}.jpeg")
    (folder / f"{d}_right.jpeg").write_bytes(b"not a photo")
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", report["fusion"]["export_path"], "--images", str(folder),
                 "--out", str(out)]) == 0
    rows = {row["image"].rsplit("/", 1)[1][: -len(".jpeg")]: row for row in csv.DictReader(out.open())}
    assert len(rows) == 7
    _, fused, single, ids = _recomputed_scores(run_dir, "test")
    at = {image: i for i, image in enumerate(ids)}
    for eye, other in (("left", "right"), ("right", "left")):
        row = rows[f"{a}_{eye}"]
        assert row["fusion"] == f"with {folder / f'{a}_{other}.jpeg'}" and not row["error"]
        assert abs(float(row["grade_continuous"]) - fused[at[f"{a}_{eye}"]]) < 0.05
    assert rows[f"{b}_left"]["fusion"] == "single eye: one eye only"
    assert abs(float(rows[f"{b}_left"]["grade_continuous"]) - single[at[f"{b}_left"]]) < 0.05
    assert rows[f"{c}_left"]["fusion"] == rows[f"{c}-left"]["fusion"] == "single eye: two photos of the same eye"
    assert abs(float(rows[f"{c}_left"]["grade_continuous"]) - single[at[f"{c}_left"]]) < 0.05
    assert rows[f"{d}_left"]["fusion"] == "single eye: the fellow photo failed"
    assert abs(float(rows[f"{d}_left"]["grade_continuous"]) - single[at[f"{d}_left"]]) < 0.05
    assert rows[f"{d}_right"]["error"] and rows[f"{d}_right"]["grade"] == ""


def test_the_quick_preset_trains_the_fusion_stage_and_the_default_does_not():
    from retina_scale.config import TrainConfig

    assert load_train_config("quick").fusion.enabled is True
    assert TrainConfig().fusion.enabled is False


def test_saved_features_are_reused_only_for_the_same_checkpoint_and_views(tmp_path):
    from retina_scale.training.fusion import _stored_features, features_source

    checkpoint = tmp_path / "best.npz"
    checkpoint.write_bytes(b"weights one")
    top = {"stage": "small", "best_checkpoint": str(checkpoint)}
    source = features_source(top, 1)
    path = tmp_path / "features.npz"
    np.savez(path, source=np.array(source), **{"val/features": np.ones((2, 3)), "val/ids": np.array(["a", "b"])})
    stored = _stored_features(path, source)
    assert set(stored) == {"val"} and stored["val"]["features"].shape == (2, 3)
    assert _stored_features(path, features_source(top, 8)) is None  # other TTA views
    checkpoint.write_bytes(b"weights two")  # the top stage was trained again
    assert _stored_features(path, features_source(top, 1)) is None
    np.savez(path, **{"val/features": np.ones((2, 3))})  # written before the source was recorded
    assert _stored_features(path, source) is None


@pytest.mark.slow
def test_a_done_fusion_stage_is_redone_when_its_features_came_from_another_top_stage(fused_run, tmp_path):
    import shutil

    from retina_scale.training.stepwise import StepwiseScaler

    run_dir, report, _, _, (_, data) = fused_run
    shutil.copytree(run_dir, tmp_path / "runs" / "f")  # a copy: the other tests keep the module's run
    files = tmp_path / "runs" / "f" / "fusion"
    # As if the top stage had been trained again after the fusion stage: its features and state name another source.
    with np.load(files / "features.npz") as stored:
        arrays = {k: stored[k] for k in stored.files}
    current = str(arrays.pop("source"))
    np.savez(files / "features.npz", source=np.array("another checkpoint"), **arrays)
    state = json.loads((files / "state.json").read_text())
    assert state["status"] == "done" and state["settings"]["features"] == current
    state["settings"]["features"] = "another checkpoint"
    (files / "state.json").write_text(json.dumps(state))
    lines = []
    config = load_train_config("quick", _overrides(tmp_path, *data, ["fusion.enabled=true"]))
    again = StepwiseScaler(config, verbose=1, log=lines.append).run()
    assert not any(line.startswith("Fusion stage finished earlier") for line in lines)
    assert any(line.startswith("Fusion: the saved features came from another") for line in lines)
    assert any(line.startswith("Fusion: features of 49 photos") for line in lines)
    assert json.loads((files / "state.json").read_text())["settings"]["features"] == current
    assert again["fusion"]["val_kappa"] == pytest.approx(report["fusion"]["val_kappa"], abs=1e-6)  # the same inputs
