"""Tests of retina_scale.serving.export: TF Serving layout, atomic versions, the signatures."""

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from retina_scale.models import build_model
from retina_scale.serving import export as export_module
from retina_scale.serving.export import (
    FORMAT, METADATA_FILE, export_saved_model, list_versions, load_export,
)
from retina_scale.grading.thresholds import apply_thresholds

SIZE = 112  # the tiny stage's input size


def _images(n, size=SIZE, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.float32)


def _constant_model(value):
    """A thin model whose output is exactly ``value`` for every image (zero last kernel)."""
    model = build_model("tiny", width=0.125, seed=0)
    head = model.get_layer("head_grade")
    kernel, _ = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.array([value], np.float32)])
    return model


def _dir_names(path):
    return sorted(p.name for p in Path(path).iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export of a random thin model, with thresholds cut between its scores on 8 images."""
    model = build_model("tiny", width=0.125, seed=0)
    images = _images(8)
    scores = np.sort(model.predict(images, verbose=0).ravel())
    assert len(np.unique(scores)) == 8
    # Grades 0..4 all occur: 2 images below the first cut, 2, 2, 1, 1 in the next intervals.
    thresholds = tuple(float(scores[i] + scores[i + 1]) / 2 for i in (1, 3, 5, 6))
    base = tmp_path_factory.mktemp("saved_models")
    metadata = {"preprocessing": "graham", "run": "r1", "val_kappa": 0.5}
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    path = export_saved_model(model, base, "retina", thresholds=thresholds, metadata=metadata)
    after = dt.datetime.now(dt.timezone.utc)
    return dict(model=model, images=images, thresholds=thresholds, path=path, base=base,
                metadata=metadata, before=before, after=after)


def test_outputs_equal_keras_predictions_and_apply_thresholds(exported):
    serve, _ = load_export(exported["path"])
    images = exported["images"]
    out = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
    assert set(out) == {"grade_continuous", "grade", "referable"}
    assert out["grade_continuous"].dtype == np.float32 and out["grade_continuous"].shape == (8,)
    assert out["grade"].dtype == np.int32 and out["grade"].shape == (8,)
    assert out["referable"].dtype == bool and out["referable"].shape == (8,)
    expected = exported["model"].predict(images, verbose=0).ravel()
    np.testing.assert_allclose(out["grade_continuous"], expected, rtol=1e-5, atol=1e-6)
    grades = apply_thresholds(expected, exported["thresholds"])
    np.testing.assert_array_equal(out["grade"], grades)
    assert sorted(set(grades.tolist())) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(out["referable"], grades >= 2)


def test_other_sizes_are_resized_like_the_training_cache(exported):
    """A 224-px crop is served as the cache would have stored it at 112 px (cv2 INTER_AREA)."""
    serve, _ = load_export(exported["path"])
    big = _images(2, size=2 * SIZE, seed=3)
    cached = np.stack([cv2.resize(img.astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                       for img in big]).astype(np.float32)
    served = serve(images=tf.constant(big))["grade_continuous"].numpy()
    expected = exported["model"].predict(cached, verbose=0).ravel()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    # ... whereas feeding the 224-px crop to the network unresized gives another answer.
    unresized = exported["model"].predict(big, verbose=0).ravel()
    assert np.max(np.abs(unresized - expected)) > 100 * np.max(np.abs(served - expected))
    # Smaller crops are enlarged to the stage size; the result does not depend on the batch.
    small = _images(3, size=64, seed=4)
    one = serve(images=tf.constant(small[:1]))["grade_continuous"].numpy()
    np.testing.assert_allclose(serve(images=tf.constant(small))["grade_continuous"].numpy()[:1], one,
                               rtol=1e-5)


def test_bad_images_raise_clear_errors(exported):
    serve, _ = load_export(exported["path"])
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match="float"):
        serve(images=tf.zeros((1, SIZE, SIZE, 3), tf.int32))
    cases = [
        ((SIZE, SIZE, 3), r"shape \(batch, height, width, 3\)"),
        ((1, 1, SIZE, SIZE, 3), r"shape \(batch, height, width, 3\)"),
        ((1, SIZE, SIZE, 4), "3 channels"),
        ((1, SIZE, SIZE - 12, 3), "square"),
    ]
    for shape, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            serve(images=tf.zeros(shape))
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or infinite"):
        serve(images=tf.fill((1, SIZE, SIZE, 3), float("nan")))


def test_metadata_round_trips(exported):
    path = exported["path"]
    on_disk = json.loads((path / METADATA_FILE).read_text())
    serve, metadata = load_export(path)
    assert metadata == on_disk
    assert metadata["format"] == FORMAT
    assert metadata["model_name"] == "retina" and metadata["version"] == int(path.name) == 1
    assert metadata["stage"] == "tiny" and metadata["input_size"] == SIZE
    assert metadata["width"] == 0.125
    assert metadata["thresholds"] == list(exported["thresholds"])
    assert metadata["preprocessing"] == "graham"
    assert metadata["referable_grade"] == 2
    assert metadata["user"] == {"run": "r1", "val_kappa": 0.5}
    assert metadata["tensorflow_version"] == tf.__version__
    assert metadata["keras_version"] == keras.__version__
    assert exported["before"] <= dt.datetime.fromisoformat(metadata["created"]) <= exported["after"]
    # The same record lives inside the SavedModel, readable without metadata.json.
    loaded = tf.saved_model.load(str(path))
    constants = {k: v.numpy() for k, v in loaded.signatures["get_metadata"]().items()}
    assert constants["input_size"] == SIZE
    assert constants["thresholds"].tolist() == list(exported["thresholds"])
    assert constants["stage"] == b"tiny" and constants["preprocessing"] == b"graham"
    assert json.loads(constants["metadata_json"]) == on_disk


def test_load_export_refuses_what_is_not_ours(exported, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_export(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"not a retina_scale SavedModel: .*holds versions \[1\]"):
        load_export(exported["path"].parent)
    plain = tmp_path / "plain"
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x * 2}, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(plain), signatures=module.f)
    with pytest.raises(ValueError, match="not a retina_scale SavedModel: no metadata.json"):
        load_export(plain)
    (plain / METADATA_FILE).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a retina_scale SavedModel: .*format"):
        load_export(plain)
    # A metadata.json that disagrees with the graph (edited thresholds) is refused.
    copy = tmp_path / "copy"
    shutil.copytree(exported["path"], copy)
    edited = json.loads((copy / METADATA_FILE).read_text())
    edited["thresholds"] = [0.5, 1.5, 2.5, 3.5]
    (copy / METADATA_FILE).write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="not a retina_scale SavedModel: .*thresholds"):
        load_export(copy)


@pytest.mark.slow  # five exports and loads: ~13 s
def test_versions_increase_keep_prunes_and_ties_go_up(tmp_path):
    base = tmp_path / "saved_models"
    (base / "retina").mkdir(parents=True)
    (base / "retina" / ".tmp-7-deadbeef").mkdir()  # left by an export killed with -9
    on_cut = _constant_model(1.5)  # exactly on the default cut-off 1.5: grade 2, referable
    # float32(1.4) = 1.39999998 is below the cut-off 1.4: grade 1 for apply_thresholds, and for the
    # graph only if it compares in float64 as apply_thresholds does.
    below = _constant_model(np.float32(1.4))
    first = export_saved_model(on_cut, base, "retina")
    second = export_saved_model(below, base, "retina", thresholds=(0.5, 1.4, 2.5, 3.5))
    assert (first.name, second.name) == ("1", "2")
    assert _dir_names(base / "retina") == ["1", "2"]  # the stale temporary folder is gone
    images = tf.constant(_images(2))
    out1 = load_export(first)[0](images=images)
    out2 = load_export(second)[0](images=images)
    assert out1["grade_continuous"].numpy().tolist() == [1.5, 1.5]
    assert out1["grade"].numpy().tolist() == [2, 2] and out1["referable"].numpy().tolist() == [True] * 2
    assert apply_thresholds(out2["grade_continuous"].numpy(), (0.5, 1.4, 2.5, 3.5)).tolist() == [1, 1]
    assert out2["grade"].numpy().tolist() == [1, 1] and out2["referable"].numpy().tolist() == [False] * 2

    with pytest.raises(FileExistsError, match="version 2 .*already exists"):
        export_saved_model(below, base, "retina", version=2)
    newest = export_saved_model(on_cut, base, "retina", keep=2)
    assert newest.name == "3"
    assert list_versions(base / "retina") == [2, 3]
    assert sorted(p.name for p in (base / "retina").iterdir()) == [".export.lock", "2", "3"]
    # An explicit version lower than the others, with keep=1: the new one is kept, not the highest.
    assert export_saved_model(below, base, "retina", version=1, keep=1).name == "1"
    assert list_versions(base / "retina") == [1]
    assert load_export(base / "retina" / "1")[1]["version"] == 1


def test_failed_export_leaves_no_version_and_no_temporary_folder(exported, tmp_path, monkeypatch):
    base = tmp_path / "saved_models"
    model = exported["model"]

    def broken_save(obj, export_dir, *args, **kwargs):
        Path(export_dir).mkdir(exist_ok=True)
        (Path(export_dir) / "saved_model.pb").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(model, base, "retina")
    assert _dir_names(base / "retina") == []
    assert list_versions(base / "retina") == []
    monkeypatch.undo()
    # An existing version is untouched by a failed export of the next one.
    existing = exported["path"]
    before = sorted((p.relative_to(existing), p.stat().st_size) for p in existing.rglob("*"))

    def broken_metadata(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_describe", broken_metadata)
    with pytest.raises(KeyboardInterrupt):
        export_saved_model(model, exported["base"], "retina")
    assert _dir_names(exported["base"] / "retina") == ["1"]
    assert sorted((p.relative_to(existing), p.stat().st_size) for p in existing.rglob("*")) == before


def test_bad_arguments_are_refused_before_writing(exported, tmp_path):
    model = exported["model"]
    base = tmp_path / "saved_models"
    bad = [
        (dict(model_name="../escape"), "model_name"),
        (dict(model_name=".hidden"), "model_name"),
        (dict(model_name="retina", version=0), "version must be a positive integer"),
        (dict(model_name="retina", version=True), "version must be a positive integer"),
        (dict(model_name="retina", keep=0), "keep must be a positive integer"),
        (dict(model_name="retina", thresholds=(0.5, 2.5, 1.5, 3.5)), "strictly increasing"),
        (dict(model_name="retina", thresholds=(0.5, 1.5)), "expected 4 thresholds"),
        (dict(model_name="retina", metadata={"when": dt.datetime.now()}), "JSON"),
        (dict(model_name="retina", metadata={"x": float("nan")}), "JSON"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            export_saved_model(model, base, **kwargs)
    with pytest.raises(ValueError, match="retina_scale model"):
        export_saved_model(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]), base, "x")
    assert not base.exists()


def _saved_model_cli(*args):
    """Starts TensorFlow's own ``saved_model_cli`` (not waited for: the two calls run side by side)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _finish(process):
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    return stdout


@pytest.mark.slow  # saved_model_cli processes load TensorFlow: ~15 s
def test_saved_model_cli_shows_and_runs_the_signature(exported, tmp_path):
    path = str(exported["path"])
    images = exported["images"][:3]
    np.save(tmp_path / "images.npy", images)
    outdir = tmp_path / "out"
    shown = _saved_model_cli("show", "--dir", path, "--all")
    ran = _saved_model_cli("run", "--dir", path, "--tag_set", "serve", "--signature_def",
                           "serving_default", "--inputs", f"images={tmp_path / 'images.npy'}",
                           "--outdir", str(outdir))
    text = _finish(shown)
    _finish(ran)
    default = text[text.index("signature_def['serving_default']"):]
    default = default[: default.index("Method name")]
    assert "inputs['images']" in default and "DT_FLOAT" in default and "(-1, -1, -1, 3)" in default
    for name, dtype in (("grade_continuous", "DT_FLOAT"), ("grade", "DT_INT32"), ("referable", "DT_BOOL")):
        block = default[default.index(f"outputs['{name}']"):]
        assert block.splitlines()[1].strip() == f"dtype: {dtype}", block[:200]
    assert "signature_def['get_metadata']" in text

    expected = exported["model"].predict(images, verbose=0).ravel()
    np.testing.assert_allclose(np.load(outdir / "grade_continuous.npy"), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(outdir / "grade.npy"),
                                  apply_thresholds(expected, exported["thresholds"]))
    np.testing.assert_array_equal(np.load(outdir / "referable.npy"),
                                  apply_thresholds(expected, exported["thresholds"]) >= 2)


def _crafted_export(folder: Path, marker: Path) -> dict:
    """A SavedModel that passes for one of ours, whose get_metadata writes ``marker`` when it runs."""
    info = {"format": FORMAT, "format_version": 1, "stage": "tiny", "input_size": SIZE,
            "thresholds": [0.5, 1.5, 2.5, 3.5], "preprocessing": "none"}

    class Crafted(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32, name="images")])
        def serve(self, images):
            n = tf.shape(images)[0]
            return {"grade_continuous": tf.zeros([n]), "grade": tf.zeros([n], tf.int32),
                    "referable": tf.zeros([n], tf.bool)}

        @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name="images")])
        def predict_images(self, images):
            n = tf.shape(images)[0]
            return {"grade_continuous": tf.zeros([n]), "grade": tf.zeros([n], tf.int32),
                    "referable": tf.zeros([n], tf.bool), "valid": tf.ones([n], tf.bool), "error": tf.fill([n], "")}

        @tf.function(input_signature=[])
        def get_metadata(self):
            with tf.control_dependencies([tf.io.write_file(str(marker), "get_metadata ran")]):
                return {"metadata_json": tf.constant(json.dumps(info)), "stage": tf.constant("tiny")}

    module = Crafted()
    tf.saved_model.save(module, str(folder), signatures={
        "serving_default": module.serve, "predict_images": module.predict_images, "get_metadata": module.get_metadata})
    (folder / METADATA_FILE).write_text(json.dumps(info))
    return info


def test_loading_an_export_never_runs_its_graph_to_read_the_metadata(tmp_path, capsys):
    from retina_scale.cli import main

    marker = tmp_path / "written-by-the-export"
    crafted = tmp_path / "crafted" / "1"
    info = _crafted_export(crafted, marker)
    _, metadata = load_export(crafted)  # what `retina-scale evaluate --model` reads
    assert metadata == info and not marker.exists()
    _, metadata = load_export(crafted, signature="predict_images")
    assert metadata == info and not marker.exists()
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "a.png"), np.zeros((80, 80, 3), np.uint8))
    assert main(["predict", "--model", str(crafted.parent), "--images", str(photos),
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert not marker.exists()
    # The crafted function does write the file when it is run: the checks above could have seen it.
    tf.saved_model.load(str(crafted)).signatures["get_metadata"]()
    assert marker.read_text() == "get_metadata ran"


def test_a_model_with_an_aux_head_exports_and_serves_its_regression_output_alone(tmp_path):
    from retina_scale.serving.export import read_export_weights

    model = build_model("tiny", width=0.125, seed=2, aux="ordinal", head_pooling="attention")
    model.get_layer("head_attnpool").kernel.assign(np.linspace(-2, 2, 16).reshape(16, 1).astype("float32"))
    images = _images(6, seed=4)
    grade = np.asarray(model(images)[0]).ravel()
    path = export_saved_model(model, tmp_path, "aux", thresholds=(0.5, 1.5, 2.5, 3.5))
    serve, meta = load_export(path)
    out = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
    assert set(out) == {"grade_continuous", "grade", "referable"} and out["grade_continuous"].shape == (6,)
    np.testing.assert_allclose(out["grade_continuous"], grade, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["grade"], apply_thresholds(grade, (0.5, 1.5, 2.5, 3.5)))
    # The export holds the network without head_aux; its model_config rebuilds that network.
    assert "aux" not in meta["model_config"] and meta["model_config"]["head_pooling"] == "attention"
    _, weights = read_export_weights(path)
    assert not any(name.startswith("head_aux") for name in weights) and "head_attnpool/kernel" in weights


# ------------------------------------------------------------------ test-time augmentation, operating points
_POINTS = {
    "chosen_on": "validation", "n_referable": 12, "n_not_referable": 30, "min_specificity": 0.98,
    "min_sensitivity": 0.975,
    "points": {
        "high_specificity": {"met": False, "threshold": None, "val_sensitivity": None, "val_specificity": None,
                             "rule": "highest sensitivity with specificity >= 98.0%",
                             "reason": "no threshold refers a referable eye with specificity >= 98.0%"},
        "high_sensitivity": {"met": True, "threshold": 0.25, "val_sensitivity": 1.0, "val_specificity": 0.5,
                             "rule": "highest specificity with sensitivity >= 97.5%", "reason": None},
        "youden": {"met": True, "threshold": 0.5, "val_sensitivity": 0.75, "val_specificity": 0.8,
                   "rule": "Youden", "reason": None, "test_sensitivity": {"value": 0.7}},
    },
    "test_roc": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]},
}


@pytest.fixture(scope="module")
def tta_export(exported):
    """The same model exported with two test-time augmentation views and operating points (high sensitivity
    met, high specificity not)."""
    path = export_saved_model(exported["model"], exported["base"], "tta", thresholds=exported["thresholds"],
                              metadata={"preprocessing": "graham"}, operating_points=_POINTS, tta=2)
    return path


def test_two_views_average_the_plain_export_over_the_image_and_its_mirror(exported, tta_export):
    plain, plain_meta = load_export(exported["path"])
    serve, meta = load_export(tta_export)
    images = exported["images"]
    got = serve(images=tf.constant(images))["grade_continuous"].numpy()
    one = plain(images=tf.constant(images))["grade_continuous"].numpy()
    mirrored = plain(images=tf.constant(images[:, :, ::-1]))["grade_continuous"].numpy()
    np.testing.assert_allclose(got, (one + mirrored) / 2, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(got - one)) > 1e-4  # the mirror changes the scores: the average is not the plain one
    assert meta["tta"] == {"draws": 2, "views": ["identity", "flip_left_right"]}
    assert plain_meta["tta"] == {"draws": 1, "views": ["identity"]} and plain_meta["operating_points"] is None


def test_operating_points_are_recorded_and_served_only_where_met(exported, tta_export):
    predict, meta = load_export(tta_export, signature="predict_images")
    points = meta["operating_points"]
    assert points["points"]["high_sensitivity"]["threshold"] == 0.25 and points["n_referable"] == 12
    assert points["points"]["high_specificity"]["met"] is False
    assert "test_roc" not in points and "test_sensitivity" not in points["points"]["youden"]  # choice only
    outputs = set(predict.structured_outputs)
    assert "refer_high_sensitivity" in outputs and "refer_high_specificity" not in outputs
    assert "refer_youden" not in outputs
    described = meta["signatures"]["predict_images"]["outputs"]
    assert "refer_high_sensitivity" in described and "refer_high_specificity" not in described
    plain, _ = load_export(exported["path"], signature="predict_images")
    assert not {name for name in plain.structured_outputs if name.startswith("refer_")}
    # The graph's own record says the same (load_export compares them).
    loaded = tf.saved_model.load(str(tta_export))
    embedded = json.loads(loaded.signatures["get_metadata"]()["metadata_json"].numpy())
    assert embedded["operating_points"] == points and embedded["tta"]["draws"] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(tta=0), "tta must be a whole number >= 1"),
    (dict(tta=-1), "tta must be a whole number >= 1"),
    (dict(operating_points={"points": {"best": {"met": True, "threshold": 1.0}}}), "unknown point 'best'"),
    (dict(operating_points={"points": {"youden": {"met": True, "threshold": None}}}), "not a finite number"),
    (dict(operating_points=[0.5]), "choose_operating_points' record"),
])
def test_bad_tta_and_operating_points_are_refused_before_writing(exported, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_saved_model(exported["model"], tmp_path / "m", "retina", **kwargs)
    assert not (tmp_path / "m").exists()
