"""Export a trained stage as a SavedModel in TensorFlow Serving's layout.

``export_saved_model`` writes ``<base_dir>/<model_name>/<version>/`` (the version an increasing
integer), the layout a TF Serving ``--model_base_path=<base_dir>/<model_name>`` watches. TF Serving
may load a version folder the moment it appears, so a version is written into a temporary sibling
folder ``.tmp-<version>-<random>`` (not an integer, so TF Serving ignores it) and renamed into place
in one ``os.rename``: a server never sees half a model. A failed export removes its temporary folder
and leaves no version behind; a crashed one (``kill -9``) leaves a ``.tmp-*`` folder that the next
export of the same model removes. Exports of the same model name are serialised by an advisory lock
on ``<base_dir>/<model_name>/.export.lock``.

Signatures (no Keras needed to serve or load them):

``serving_default``
    input ``images``: float32 ``(batch, height, width, 3)``, RGB values in ``[0, 255]``, square
    fundus crops already preprocessed as the training cache was (disc crop, and Graham's colour
    normalisation when the run used it; the metadata's ``preprocessing`` says which). Any square
    size: images at the stage's input size go to the network untouched; other sizes are resized in
    the graph to the stage's size as the cache made them (area averaging when shrinking, bicubic when
    enlarging, then rounded (halves up) and clipped to whole values in ``[0, 255]`` like the
    cache's uint8 PNGs), because a network sees the retina at the scale it was trained at or its grades drift.
    Non-square images are refused (InvalidArgumentError) rather than stretched.

    outputs ``grade_continuous`` (float32 ``(batch,)``, the regression output), ``grade`` (int32
    ``(batch,)``: the number of thresholds ``<=`` the score, the rule of
    :func:`retina_scale.grading.thresholds.apply_thresholds`; the thresholds are constants in the
    graph), ``referable`` (bool ``(batch,)``: ``grade >= 2``, moderate non-proliferative DR or
    worse). A NaN or infinite score fails the request instead of grading it 0.

``predict_images``
    input ``images``: string ``(batch,)``, each element the bytes of one JPEG or PNG photo straight
    from the camera (over REST: ``{"b64": ...}``). The graph does the training cache's preprocessing
    with TF ops (:mod:`retina_scale.serving.preprocess`: header checks, reduced decode, disc finding,
    crop, resize to the stage size, Graham's normalisation or the circular mask as recorded in
    ``preprocessing``), then grades as ``serving_default``.

    outputs ``grade_continuous``, ``grade``, ``referable`` as ``serving_default``, plus ``valid``
    (bool ``(batch,)``) and ``error`` (string ``(batch,)``, ``""`` when valid), and, for each referable-DR
    operating point the metadata's ``operating_points`` holds as met (chosen on validation,
    :mod:`retina_scale.grading.operating_points`), ``refer_high_sensitivity`` / ``refer_high_specificity``
    (bool ``(batch,)``: ``grade_continuous >= `` the point's threshold, false when not valid). An export
    without a point (made before they existed, or the point was not met) has no such output. A photo that cannot
    be used (not JPEG/PNG, empty, truncated or cut short, grayscale, CMYK, 16-bit, too small, more
    pixels than the record's ``max_pixels`` (checked from the header, before decoding), no fundus
    found) does not fail the batch: its row has ``valid`` false, the reason in ``error``, ``grade`` -1,
    ``grade_continuous`` NaN and ``referable`` false. Corruption that the header checks cannot see
    (a JPEG whose frame header is damaged but whose end marker is present) makes the decoder fail
    the whole request: TF Serving answers HTTP 400 with the decoder's message. Our head is a
    regression head (one continuous grade), so there are no per-grade scores.

``predict_patient`` (only in an export made with ``fusion``: the both-eye fusion stage, ``fusion.enabled``)
    inputs ``left`` and ``right``: string ``(batch,)``, the encoded photos of each patient's two eyes, row by row.
    Both go through ``predict_images``' preprocessing and the stage's network (its penultimate features and its
    grade, over the TTA views); an eye whose fellow photo is valid too is graded by the fusion network, one whose
    fellow is not (empty, unreadable, no fundus) keeps its single-eye grade. The grades use the fusion stage's
    thresholds (``fusion.thresholds`` in the metadata). Outputs, for each of ``left_`` and ``right_``:
    ``grade_continuous``, ``grade``, ``referable``, ``valid``, ``error`` as ``predict_images``, and ``fused``
    (bool: graded with the fellow eye).

Test-time augmentation (``export_saved_model(..., tta=N)``, ``retina-scale export --tta N``): both
signatures then grade the mean of the network's scores over N fixed views of each image
(:mod:`retina_scale.data.tta`); the metadata's ``tta`` says how many and which (``{"draws": 1}``: off).

``get_metadata``
    no input; returns ``input_size`` (int32), ``thresholds`` (float64 ``(4,)``), ``stage``,
    ``preprocessing`` and ``metadata_json`` (strings): the same record as the version's
    ``metadata.json``, kept inside the SavedModel so a copied ``saved_model.pb`` still says how to
    feed it.

Why ``keras.export.ExportArchive`` rather than a hand-made ``tf.Module``: it is Keras 3's supported
path to a SavedModel (``model.export`` uses it); it tracks the model's Keras variables and builds the
signatures from plain ``tf.function`` endpoints, so the artefact is pure TensorFlow and loads with
``tf.saved_model.load`` and TF Serving without ``retina_scale`` or Keras installed.

Example (it writes ``saved_models/retina/<version>``, so it is not run as a doctest)::

    model = build_model("tiny", width=0.125, seed=0)
    path = export_saved_model(model, "saved_models", "retina", thresholds=(0.6, 1.4, 2.5, 3.3),
                              metadata={"preprocessing": "graham"}, keep=5)
    serve, meta = load_export(path)
    serve(images=tf.zeros((2, 112, 112, 3)))["grade"]  # int32 (2,)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from retina_scale.config import NUM_GRADES
from retina_scale.data.tta import check_draws
from retina_scale.grading.thresholds import DEFAULT_THRESHOLDS, validate_thresholds
from retina_scale.utils.errors import UserError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "REFERABLE_GRADE",
    "SERVED_POINTS",
    "check_operating_points",
    "export_saved_model",
    "list_versions",
    "load_export",
    "predict_images_function",
    "predict_patient_function",
    "read_export_weights",
    "run_preprocessing",
]

FORMAT = "retina_scale.saved_model"
"""The ``format`` field of ``metadata.json``: marks a folder as one of our exports."""

FORMAT_VERSION = 1
"""Bumped when the signatures or the metadata change incompatibly."""

METADATA_FILE = "metadata.json"

REFERABLE_GRADE = 2
"""Referable DR: moderate non-proliferative DR (grade 2) or worse."""

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION = re.compile(r"^[0-9]+$")  # str.isdigit would also accept "²", which int() refuses
_TMP_PREFIX = ".tmp-"
_LOCK_FILE = ".export.lock"
_RESIZE_NOTE = (
    "square images only; at input_size untouched, otherwise resized to input_size "
    "(area when shrinking, bicubic when enlarging), rounded and clipped to [0, 255]"
)


def list_versions(model_dir) -> list[int]:
    """The version numbers present under ``model_dir`` (folders named by an integer), ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION.match(p.name)
    )


@contextlib.contextmanager
def _export_lock(model_dir: Path):
    """An exclusive advisory lock on ``model_dir``: one export of a model name at a time."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, exports must not overlap
        yield
        return
    with open(model_dir / _LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_dir(path: Path) -> None:
    """Hides ``path`` under a temporary name in one rename, then deletes it.

    A server scanning the folder sees the version vanish at once, never half-deleted.
    """
    hidden = path.with_name(f"{_TMP_PREFIX}delete-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, hidden)
    shutil.rmtree(hidden)


def _check_arguments(model, model_name, version, keep, metadata):
    if not (hasattr(model, "stage") and hasattr(model, "input_size") and callable(model)):
        raise UserError(
            "export_saved_model takes a retina_scale model (RetinaConvNet from "
            f"retina_scale.models.build_model, with .stage and .input_size); got {type(model).__name__}"
        )
    if not isinstance(model_name, str) or not _MODEL_NAME.match(model_name):
        raise UserError(
            f"model_name must be one folder name of letters, digits, '.', '_' or '-' not starting "
            f"with '.', '_' or '-'; got {model_name!r}"
        )
    for name, value in (("version", version), ("keep", keep)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name} must be a positive integer or None; got {value!r}")
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise UserError(f"metadata must be a dict with string keys; got {type(metadata).__name__}")
    try:
        json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise UserError(f"metadata must be JSON-serialisable (str, number, list, dict): {err}") from None
    return dict(metadata)


SERVED_POINTS = ("high_sensitivity", "high_specificity")
"""The operating points ``predict_images`` answers for, as ``refer_<name>``, when the export records them."""


def check_operating_points(points) -> dict | None:
    """The operating-point record an export keeps (``choose_operating_points``'s keys, test results left out),
    or a one-line :class:`UserError` for a malformed one; None stays None."""
    import math

    from retina_scale.grading.operating_points import POINTS

    if points is None:
        return None
    if not isinstance(points, Mapping) or not isinstance(points.get("points"), Mapping):
        raise UserError("operating_points must be choose_operating_points' record (a dict with 'points'); got "
                        f"{type(points).__name__}")
    kept = {}
    for name, point in points["points"].items():
        if name not in POINTS:
            raise UserError(f"operating_points has an unknown point {name!r}; accepted: {', '.join(POINTS)}")
        met = isinstance(point, Mapping) and point.get("met") is True
        threshold = point.get("threshold") if isinstance(point, Mapping) else None
        if met and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                    or not math.isfinite(threshold)):
            raise UserError(f"operating point {name} is met but its threshold is {threshold!r}, not a finite number")
        kept[name] = {k: point.get(k) for k in ("met", "threshold", "val_sensitivity", "val_specificity", "rule",
                                                "reason")}
        kept[name]["met"] = met
    record = {k: points.get(k) for k in ("chosen_on", "n_referable", "n_not_referable", "min_specificity",
                                         "min_sensitivity")}
    return {**record, "points": kept}


def _served_points(points: dict | None) -> list[str]:
    """The names of the operating points ``predict_images`` answers for: those recorded and met."""
    recorded = (points or {}).get("points") or {}
    return [name for name in SERVED_POINTS if (recorded.get(name) or {}).get("met")]


def _tta_record(draws: int) -> dict:
    """The ``tta`` entry of the metadata: how many views the graph averages, and which."""
    from retina_scale.data.tta import SYMMETRIES, TTA_SEED, TTA_STRENGTH, view_names

    record = {"draws": int(draws), "views": view_names(draws)}
    if draws > len(SYMMETRIES):
        record.update(augment_strength=TTA_STRENGTH, augment_seed=TTA_SEED)
    return record


def _describe(model, model_name, version, thresholds, user, operating_points=None, tta: int = 1,
              fusion=None) -> dict:
    """The version's record (``metadata.json``, and inside the graph); with ``fusion``, its ``fusion`` entry and
    the ``predict_patient`` signature's."""
    info = _record(model, model_name, version, thresholds, user, operating_points, tta)
    if fusion is not None:
        info["fusion"], info["signatures"]["predict_patient"] = _patient_record(fusion)
    return info


def _record(model, model_name, version, thresholds, user, operating_points=None, tta: int = 1) -> dict:
    import keras
    import tensorflow as tf

    import retina_scale
    from retina_scale.models.convnet import RetinaConvNet

    user = dict(user)
    preprocessing = user.pop("preprocessing", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "version": version,
        "stage": model.stage.name,
        "input_size": int(model.input_size),
        "width": float(getattr(model, "width", 1.0)),
        # The network's constructor arguments: what rebuilds it from the weights, read as data (read_export_weights).
        "model_config": ({k: v for k, v in model.get_config().items() if k not in ("name", "trainable")}
                         if isinstance(model, RetinaConvNet) else None),
        "thresholds": list(thresholds),
        "num_grades": NUM_GRADES,
        "referable_grade": REFERABLE_GRADE,
        "preprocessing": preprocessing,
        "resize": _RESIZE_NOTE,
        "head": "regression: one continuous grade, no per-grade scores",
        "tta": _tta_record(tta),
        "operating_points": operating_points,
        "signatures": {
            "predict_images": {
                "inputs": {"images": "string (batch,), encoded JPEG or PNG bytes"},
                "outputs": {
                    "grade_continuous": "float32 (batch,), NaN when not valid",
                    "grade": "int32 (batch,), -1 when not valid",
                    "referable": "bool (batch,)",
                    **{f"refer_{name}": f"bool (batch,), score >= operating_points.points.{name}.threshold"
                       for name in _served_points(operating_points)},
                    "valid": "bool (batch,)",
                    "error": "string (batch,), empty when valid",
                },
            },
            "serving_default": {
                "inputs": {"images": "float32 (batch, height, width, 3), RGB in [0, 255]"},
                "outputs": {
                    "grade_continuous": "float32 (batch,)",
                    "grade": "int32 (batch,)",
                    "referable": "bool (batch,)",
                },
            },
            "get_metadata": {"inputs": {}, "outputs": {
                "input_size": "int32 ()", "thresholds": "float64 (4,)", "stage": "string ()",
                "preprocessing": "string ()", "metadata_json": "string ()",
            }},
        },
        "retina_scale_version": retina_scale.__version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "user": user,
    }


def _build_archive(model, info: dict, fusion_net=None):
    """The ExportArchive holding the model and the three signatures (see the module docstring), and with a
    fusion network ``predict_patient`` too."""
    import keras
    import tensorflow as tf

    serve, predict_images, get_metadata = _endpoints(model, info)
    archive = keras.export.ExportArchive()
    archive.track(model)
    if fusion_net is not None:
        archive.track(fusion_net)
        archive.add_endpoint("predict_patient", predict_patient_function(model, fusion_net, info),
                             input_signature=[tf.TensorSpec((None,), tf.string, name=eye) for eye in EYES])
    archive.add_endpoint(
        "serving_default", serve,
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32, name="images")],
    )
    archive.add_endpoint(
        "predict_images", predict_images,
        input_signature=[tf.TensorSpec((None,), tf.string, name="images")],
    )
    archive.add_endpoint("get_metadata", get_metadata, input_signature=[])
    return archive


def _endpoints(model, info: dict):
    """The functions behind ``serving_default``, ``predict_images`` and ``get_metadata``."""
    import tensorflow as tf

    from retina_scale.data.tta import tta_scores, view_options
    from retina_scale.serving.preprocess import preprocess_batch, preprocess_spec

    size = info["input_size"]
    # float64, as apply_thresholds compares: a float32 cut-off 1.4 would be 1.39999998 and grade a
    # score of exactly float32(1.4) one higher than apply_thresholds does.
    cuts = tf.constant(info["thresholds"], dtype=tf.float64)
    referable_grade = tf.constant(REFERABLE_GRADE, dtype=tf.int32)
    spec = preprocess_spec(info["preprocessing"], size)
    constants = _metadata_constants(info)
    draws = (info.get("tta") or {}).get("draws", 1)
    views = view_options(spec.normalize)
    points = {name: tf.constant(info["operating_points"]["points"][name]["threshold"], tf.float64)
              for name in _served_points(info.get("operating_points"))}

    def network(images):
        return tf.reshape(tf.cast(model(images, training=False), tf.float32), [-1])

    def scores_of(images):  # the mean over the views with TTA; the network's scores themselves without
        return tta_scores(network, images, draws, **views)

    def serve(images):
        scores = tf.debugging.assert_all_finite(
            scores_of(_to_stage_size(images, size)),
            "retina_scale model produced a NaN or infinite grade (are the images finite?)",
        )
        grade = _grades(scores, cuts)
        return {
            "grade_continuous": scores,
            "grade": grade,
            "referable": tf.greater_equal(grade, referable_grade),
        }

    def predict_images(images):
        images = _with_rank(images, 1, (
            "retina_scale predict_images takes a batch of encoded JPEG/PNG photos: a string "
            "tensor of shape (batch,)"
        ))
        pixels, error = preprocess_batch(images, spec)
        valid = tf.equal(error, "")
        scores = tf.debugging.assert_all_finite(
            tf.where(valid, scores_of(pixels), 0.0), "retina_scale model produced a NaN or infinite grade"
        )
        grade = tf.where(valid, _grades(scores, cuts), -1)
        refer = {f"refer_{name}": tf.logical_and(valid, tf.greater_equal(tf.cast(scores, tf.float64), t))
                 for name, t in points.items()}
        return {
            "grade_continuous": tf.where(valid, scores, float("nan")),
            "grade": grade,
            "referable": tf.logical_and(valid, tf.greater_equal(grade, referable_grade)),
            **refer,
            "valid": valid,
            "error": error,
        }

    def get_metadata():
        return dict(constants)

    return serve, predict_images, get_metadata


EYES = ("left", "right")
"""The inputs of ``predict_patient``, and the prefixes of its outputs."""


def predict_patient_function(model, fusion_net, info: dict):
    """The function behind ``predict_patient`` (module docstring): both eyes' photos of each patient through the
    stage's preprocessing and network (features and single-eye grade, averaged over the TTA views), then the fusion
    network for each eye whose fellow photo is usable too, the single-eye grade for the others; the grades cut by
    the fusion stage's thresholds (``info["fusion"]["thresholds"]``)."""
    import tensorflow as tf

    from retina_scale.data.tta import view_options
    from retina_scale.models.fusion import feature_model, pair_features, view_features
    from retina_scale.serving.preprocess import preprocess_batch, preprocess_spec

    spec = preprocess_spec(info["preprocessing"], info["input_size"])
    extractor, draws = feature_model(model), (info.get("tta") or {}).get("draws", 1)
    cuts = tf.constant(info["fusion"]["thresholds"], dtype=tf.float64)
    message = "retina_scale predict_patient takes two string tensors of shape (batch,): left and right photos"

    def predict_patient(left, right):
        n = tf.shape(_with_rank(left, 1, message))[0]
        pixels, error = preprocess_batch(tf.concat([left, _with_rank(right, 1, message)], axis=0), spec)
        valid = tf.equal(error, "")
        features, single = view_features(lambda x: extractor(x, training=False), pixels, draws,
                                         **view_options(spec.normalize))
        fellow = tf.concat([tf.range(n, 2 * n), tf.range(0, n)], axis=0)
        inputs = pair_features(features, tf.gather(features, fellow), single, tf.gather(single, fellow))
        fused = tf.reshape(tf.cast(fusion_net(inputs, training=False), tf.float32), [-1])
        paired = tf.logical_and(valid, tf.gather(valid, fellow))
        scores = tf.debugging.assert_all_finite(tf.where(valid, tf.where(paired, fused, single), 0.0),
                                                "retina_scale model produced a NaN or infinite grade")
        grade = tf.where(valid, _grades(scores, cuts), -1)
        outputs = {"grade_continuous": tf.where(valid, scores, float("nan")), "grade": grade,
                   "referable": tf.logical_and(valid, tf.greater_equal(grade, REFERABLE_GRADE)),
                   "fused": paired, "valid": valid, "error": error}
        return {f"{eye}_{k}": v[i * n:(i + 1) * n] for k, v in outputs.items() for i, eye in enumerate(EYES)}

    return predict_patient


def _patient_record(fusion: Mapping[str, Any]) -> tuple[dict, dict]:
    """The metadata's ``fusion`` entry and the ``predict_patient`` entry of its ``signatures``."""
    outputs = {"grade_continuous": "float32 (batch,), NaN when not valid", "grade": "int32 (batch,), -1 when not valid",
               "referable": "bool (batch,)", "fused": "bool (batch,), graded with the fellow eye (else the "
               "single-eye grade: the fellow photo was not valid)", "valid": "bool (batch,)",
               "error": "string (batch,), empty when valid"}
    signature = {"inputs": {eye: "string (batch,), encoded JPEG or PNG bytes of that eye" for eye in EYES},
                 "outputs": {f"{eye}_{k}": v for eye in EYES for k, v in outputs.items()}}
    record = {"thresholds": list(validate_thresholds(fusion["thresholds"], NUM_GRADES)),
              "feature_layer": "head_maxout2", "hidden": int(fusion.get("hidden", 0))}
    return record, signature


def predict_images_function(model, metadata: dict, tta: int):
    """The ``predict_images`` signature of an export, built in this process on ``model`` (its network rebuilt
    from the export's weights) with ``tta`` views instead of the export's own: a ``tf.function`` called as
    ``fn(images=...)``, returning the signature's outputs. ``retina-scale predict --tta N`` uses it."""
    import tensorflow as tf

    info = {**metadata, "tta": _tta_record(check_draws(tta, "--tta"))}
    _, predict_images, _ = _endpoints(model, info)
    return tf.function(predict_images, input_signature=[tf.TensorSpec((None,), tf.string, name="images")])


def _metadata_constants(info: dict) -> dict:
    """The tensors ``get_metadata`` returns: the version's record, kept inside the graph."""
    import tensorflow as tf

    preprocessing = info["preprocessing"]
    return {
        "input_size": tf.constant(info["input_size"], dtype=tf.int32),
        "thresholds": tf.constant(info["thresholds"], dtype=tf.float64),
        "stage": tf.constant(info["stage"]),
        "preprocessing": tf.constant(
            "" if preprocessing is None
            else preprocessing if isinstance(preprocessing, str)
            else json.dumps(preprocessing, sort_keys=True)
        ),
        "metadata_json": tf.constant(json.dumps(info, sort_keys=True)),
    }


def _with_rank(tensor, rank: int, message: str):
    """``tensor``, checked at run time to have ``rank`` dimensions.

    A loaded signature checks the dtype of its input but not its shape. The rank is counted from the
    values of tf.shape, because Grappler folds Rank/Size to the signature's static rank whatever is fed.
    """
    import tensorflow as tf

    dims = tf.shape(tensor)
    check = tf.debugging.assert_equal(
        tf.reduce_sum(tf.ones_like(dims) * tf.cast(dims >= 0, dims.dtype)), rank, message=message
    )
    with tf.control_dependencies([check]):
        return tf.identity(tensor)


def _to_stage_size(images, size: int):
    """Square RGB images at ``size``: untouched at that size, otherwise resized as the cache resizes."""
    import tensorflow as tf

    images = _with_rank(
        images, 4, "retina_scale serving_default takes images of shape (batch, height, width, 3)"
    )
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    checks = [
        tf.debugging.assert_equal(
            shape[3], 3,
            message="retina_scale serving_default takes RGB images with 3 channels",
        ),
        tf.debugging.assert_equal(
            height, width,
            message=(
                "retina_scale serving_default takes square fundus crops (height == width), as "
                "the training cache stores them; crop to the disc's bounding square first"
            ),
        ),
    ]
    with tf.control_dependencies(checks):
        images = tf.identity(images)

    def shrink():
        return tf.image.resize(images, (size, size), method="area")

    def enlarge():
        return tf.image.resize(images, (size, size), method="bicubic")

    def resized():
        out = tf.cond(height > size, shrink, enlarge)
        # Round halves up, as OpenCV does when it writes the cache's uint8 pixels.
        return tf.clip_by_value(tf.floor(out + 0.5), 0.0, 255.0)

    out = tf.cond(tf.equal(height, size), lambda: images, resized)
    return tf.ensure_shape(out, [None, size, size, 3])


def _grades(scores, cuts):
    """apply_thresholds' rule: grade = number of cut-offs <= score (a tie goes to the higher grade)."""
    import tensorflow as tf

    return tf.reduce_sum(
        tf.cast(tf.greater_equal(tf.cast(scores, tf.float64)[:, None], cuts[None, :]), tf.int32),
        axis=1,
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _write_version(model, folder: Path, info: dict, fusion_net=None) -> None:
    """Writes the SavedModel and ``metadata.json`` into ``folder`` (a temporary folder).

    Everything is flushed to disk before the caller renames the folder into place, so that after
    a power cut a version folder is whole or absent.
    """
    _build_archive(model, info, fusion_net).write_out(str(folder), verbose=False)
    with open(folder / METADATA_FILE, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True)
        handle.write("\n")
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _new_version(model_dir: Path, model_name: str, version: int | None) -> int:
    """The version number an export writes: ``version``, or one more than the highest present (1 for the first).

    Raises:
        FileExistsError: ``version`` already exists.
    """
    present = list_versions(model_dir)
    following = (present[-1] + 1) if present else 1
    if version is None:
        return following
    if (model_dir / str(version)).exists():
        raise FileExistsError(f"version {version} of {model_name!r} already exists in {model_dir}; pass another "
                              f"version or None for the next one ({following})")
    return version


def export_saved_model(
    model,
    base_dir,
    model_name: str,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    metadata: Mapping[str, Any] | None = None,
    version: int | None = None,
    keep: int | None = None,
    operating_points: Mapping[str, Any] | None = None,
    tta: int = 1,
    fusion: Mapping[str, Any] | None = None,
) -> Path:
    """Exports ``model`` as version ``<version>`` of ``<base_dir>/<model_name>/`` for TF Serving.

    Args:
        model: a built ``RetinaConvNet`` (``retina_scale.models.build_model``); its stage and input
            size are recorded, and images are resized in the graph to its input size. A model with an
            auxiliary head (``aux``, issue 14) is exported without it
            (``retina_scale.models.convnet.regression_model``): the export serves the grade alone.
        base_dir: the folder holding one sub-folder per model name (``saved_models``); created if
            missing.
        model_name: the model's folder name (letters, digits, ``.``, ``_``, ``-``).
        thresholds: the four strictly increasing cut-offs that turn the continuous grade into
            grades 0-4 (tuned on the validation set by the trainer), baked into the graph.
        metadata: optional JSON-serialisable dict stored in ``metadata.json`` under ``user``. Its
            ``preprocessing`` entry (a name such as ``"graham"`` or the preprocessing config as a
            dict) is lifted to the top level and into the SavedModel: it says how images must be
            prepared before they are sent.
        version: the version number; default one more than the highest present (1 for the first).
            An existing version is refused (FileExistsError).
        keep: if given, after the new version is in place only the ``keep`` highest versions are
            kept, the new one always among them.
        operating_points: the referable-DR points chosen on validation (``choose_operating_points``), kept in
            the metadata; ``predict_images`` answers ``refer_high_sensitivity`` / ``refer_high_specificity``
            (bool, ``score >= threshold``) for each of those two that was met. None: no such outputs.
        tta: both signatures average the grade over this many views of each image (``data.tta``; 1: off).
        fusion: the fusion stage's ``{"net", "thresholds", "hidden"}``: adds ``predict_patient`` (None: not).

    Returns:
        The path of the new version folder.

    Raises:
        ValueError: a bad argument (the message names what is accepted).
        FileExistsError: ``version`` already exists.
    """
    user = _check_arguments(model, model_name, version, keep, metadata)
    thresholds = validate_thresholds(thresholds, NUM_GRADES)
    points, tta = check_operating_points(operating_points), check_draws(tta, "tta")
    from retina_scale.models.convnet import regression_model
    from retina_scale.serving.preprocess import preprocess_spec

    model = regression_model(model)

    preprocess_spec(user.get("preprocessing"), int(model.input_size))  # a bad record fails before any write
    model_dir = Path(base_dir) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)

    with _export_lock(model_dir):
        # Under the lock no other export is running: any temporary folder is a crashed export's.
        for stale in model_dir.glob(f"{_TMP_PREFIX}*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        version = _new_version(model_dir, model_name, version)
        target = model_dir / str(version)
        tmp = model_dir / f"{_TMP_PREFIX}{version}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            info = _describe(model, model_name, version, thresholds, user, points, tta, fusion)
            _write_version(model, tmp, info, fusion["net"] if fusion is not None else None)
            os.rename(tmp, target)
            _fsync(model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if keep is not None:
            others = [v for v in list_versions(model_dir) if v != version]
            for old in others[: max(0, len(others) - (keep - 1))]:
                _remove_dir(model_dir / str(old))
    return target


def run_preprocessing(run_dir) -> dict:
    """The preprocessing a training run's cache applied, as the export records it.

    ``normalize`` from the run's ``config.yaml`` (``data.normalize``), overridden by what the cache itself says
    (``cache.json``: ``preprocess.normalize`` and ``mask``), and the cache's ``sizes``: the cache decodes for
    its largest size and makes each smaller one from the one above, and ``predict_images`` repeats that chain.
    Without the sizes the served images drift from the cached ones (README, "Serving with TensorFlow
    Serving"). The cache is the run's (:meth:`retina_scale.run_layout.RunLayout.from_folder`: ``data.cache``
    of the config, else the one inside the run folder).
    """
    from retina_scale.data.cache import read_config
    from retina_scale.run_layout import RunLayout
    from retina_scale.utils.typed_config import load_mapping

    layout = RunLayout.from_folder(run_dir)
    record = {"normalize": "none", "mask": True, "crop": "fundus bounding square", "resize": "area"}
    if layout.config.is_file():
        data = (load_mapping(layout.config) or {}).get("data") or {}
        record["normalize"] = data.get("normalize") or "none"
    try:
        cache = read_config(layout.cache)
    except FileNotFoundError:  # no cache beside the run: the config's normalisation is all we know
        return record
    pre = cache.get("preprocess") or {}
    record["normalize"] = pre.get("normalize", record["normalize"])
    record["mask"] = bool(pre.get("mask", True))
    if cache.get("sizes"):
        record["sizes"] = sorted(int(v) for v in cache["sizes"])
    return record


def _graph_metadata(path: Path) -> dict:
    """The metadata record ``get_metadata`` returns, read from ``saved_model.pb`` as data, without running it.

    The record is a string constant behind the ``get_metadata`` signature: one of the functions it calls, or a
    constant they capture (kept as a ``Const`` node of the graph). Every string constant reachable from the
    signature's outputs is parsed, and the one JSON object whose ``format`` is ours is the record.

    Raises:
        UserError: no ``get_metadata`` signature, no such record, or more than one.
    """
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except DecodeError as err:
        raise UserError(f"not a retina_scale SavedModel: {path / 'saved_model.pb'} cannot be parsed ({err})") from None
    records = []
    for graph in proto.meta_graphs:
        if "get_metadata" not in graph.signature_def:
            continue
        functions = {f.signature.name: f for f in graph.graph_def.library.function}
        nodes = {n.name: n for n in graph.graph_def.node}
        objects, saved = graph.object_graph_def.nodes, graph.object_graph_def.concrete_functions
        outputs = graph.signature_def["get_metadata"].outputs.values()
        todo = [nodes[t.name.split(":")[0]] for t in outputs if t.name.split(":")[0] in nodes]
        seen = set()
        while todo:
            node = todo.pop()
            records += _metadata_constants_of(node)
            called = [a.func.name for a in node.attr.values() if a.HasField("func")]
            called += [f.name for a in node.attr.values() if a.HasField("list") for f in a.list.func]
            for name in called:
                if name in functions and name not in seen:
                    seen.add(name)
                    todo.extend(functions[name].node_def)
                    captured = [objects[i].constant.operation for i in (saved[name].bound_inputs if name in saved
                                                                        else ()) if objects[i].HasField("constant")]
                    todo.extend(nodes[op] for op in captured if op in nodes)
    distinct = {json.dumps(r, sort_keys=True): r for r in records}  # a captured constant is reached once per caller
    if len(distinct) != 1:
        raise UserError(f"not a retina_scale SavedModel: the get_metadata function of {path} holds "
                        f"{len(distinct)} metadata records, expected one")
    return next(iter(distinct.values()))


def _metadata_constants_of(node) -> list[dict]:
    """The JSON objects of our ``format`` among the string constants of one graph node."""
    if node.op != "Const":
        return []
    found = []
    for raw in node.attr["value"].tensor.string_val:
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if isinstance(record, dict) and record.get("format") == FORMAT:
            found.append(record)
    return found


def load_export(path, signature: str = "serving_default"):
    """Loads one version folder written by :func:`export_saved_model`.

    Needs TensorFlow only (no Keras, no retina_scale model code). The metadata comes from the version's
    ``metadata.json``, checked against the record in ``saved_model.pb`` read as data: loading never runs
    the export's ``get_metadata``. A SavedModel is code all the same: calling the returned signature runs
    the export's graph (and ``tf.saved_model.load`` may run functions it holds, such as a table's
    initialiser), so load only exports you trust.

    Args:
        path: a version folder, ``<base_dir>/<model_name>/<version>``.
        signature: ``"serving_default"`` (preprocessed float images) or ``"predict_images"``
            (encoded JPEG/PNG bytes).

    Returns:
        ``(serve, metadata)``: the signature's concrete function (call it as
        ``serve(images=...)``; it returns a dict of ``grade_continuous``, ``grade``, ``referable``,
        and for ``predict_images`` also ``valid`` and ``error``) and the version's metadata dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: "not a retina_scale SavedModel: ..." when the folder is not one of our exports
            or its parts disagree.
    """
    if signature not in ("serving_default", "predict_images", "predict_patient"):
        raise UserError("signature must be 'serving_default', 'predict_images' or 'predict_patient' (exports with "
                        f"fusion); got {signature!r}")
    path = Path(path)
    metadata = _read_metadata(path)

    import tensorflow as tf

    # The graph's own record is read from saved_model.pb as data: get_metadata is never run (issue 16).
    embedded = _graph_metadata(path)
    loaded = tf.saved_model.load(str(path))
    missing = {"serving_default", "get_metadata", signature} - set(loaded.signatures)
    if missing:
        raise UserError(f"not a retina_scale SavedModel: {path} lacks signature(s) {sorted(missing)}")
    _check_embedded(metadata, embedded)
    serve = loaded.signatures[signature]
    serve._retina_scale_loaded = loaded  # keep the loaded object (and its variables) alive
    return serve, metadata


def _read_metadata(path: Path) -> dict:
    """The version's ``metadata.json``, once the folder is checked to be one of our exports (see :func:`load_export`)."""
    if not path.exists():
        raise FileNotFoundError(f"no such export folder: {path}")
    if not path.is_dir():
        raise UserError(f"not a retina_scale SavedModel: {path} is a file, expected a version folder")
    if not (path / "saved_model.pb").is_file():
        hint = ""
        versions = list_versions(path)
        if versions:
            hint = f" (it holds versions {versions}: pass one of them, e.g. {path / str(versions[-1])})"
        raise UserError(f"not a retina_scale SavedModel: no saved_model.pb in {path}{hint}")
    try:
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"not a retina_scale SavedModel: no {METADATA_FILE} in {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"not a retina_scale SavedModel: {path / METADATA_FILE} is not JSON ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise UserError(
            f"not a retina_scale SavedModel: {path / METADATA_FILE} has no format {FORMAT!r}"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"not a retina_scale SavedModel this version reads: format_version "
            f"{metadata.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return metadata


def _check_embedded(metadata: dict, embedded: dict) -> None:
    """``metadata.json`` and the graph's own record must agree on what decides the grades."""
    for key in ("stage", "input_size", "thresholds", "preprocessing", "tta", "operating_points", "fusion"):
        if embedded.get(key) != metadata.get(key):
            raise UserError(
                f"not a retina_scale SavedModel: {METADATA_FILE} says {key}={metadata.get(key)!r} "
                f"but the graph holds {embedded.get(key)!r}"
            )


def read_export_weights(path) -> tuple[dict, dict]:
    """The metadata and the network's weights of one of our exports, read as data: nothing of the SavedModel runs.

    ``metadata.json`` is checked as :func:`load_export` checks it (our ``format``, and the same record in
    ``saved_model.pb``); the variables' names come from the SavedModel's object graph (parsed, not loaded) and
    their values from its ``variables/`` checkpoint (``tf.train.load_checkpoint`` reads the tensor files). So an
    export can be looked into (``retina-scale explain`` rebuilds the network from ``model_config`` and these
    weights) without calling any of its functions.

    Returns:
        ``(metadata, {variable path, e.g. "block1_conv1/kernel": numpy array})``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UserError: "not a retina_scale SavedModel: ..." as :func:`load_export`, or no variables found.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    path = Path(path)
    metadata = _read_metadata(path)
    _check_embedded(metadata, _graph_metadata(path))
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    names = {}
    for graph in proto.meta_graphs:
        nodes = graph.object_graph_def.nodes
        lists = [c.node_id for c in (nodes[0].children if nodes else ()) if c.local_name == "_all_variables"]
        for child in nodes[lists[0]].children if lists else ():
            names[f"_all_variables/{child.local_name}/.ATTRIBUTES/VARIABLE_VALUE"] = nodes[child.node_id].variable.name
    if not names:
        raise UserError(f"not a retina_scale SavedModel: {path} has no variables in its object graph")
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    return metadata, {name: reader.get_tensor(key) for key, name in names.items()}
