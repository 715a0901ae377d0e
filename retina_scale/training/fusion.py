"""Both-eye fusion: the optional stage after the ladder's top stage (``fusion.enabled``, issue 17).

A patient's two eyes are graded together: a small network takes, for one eye, its features and its fellow eye's
(the top stage's penultimate activations, ``head_maxout2``; with ``tta.draws`` > 1 their mean and standard
deviation over the TTA views), their absolute difference, and both eyes' single-eye grades, and predicts this
eye's grade as the single-eye grade plus a correction (its last layer starts at zero: an untrained fusion
network grades as the single-eye model). It trains with the ladder's loss (mean squared error of the grade),
keeps its best epoch by the ladder's ``selection`` on validation (``stage.validation_row``, ``stage.is_better``),
then its cut-offs are optimised on validation (``grading.thresholds.fit_thresholds``) and the test split is
evaluated by ``grading.evaluation.evaluate_predictions``, as every stage.

Pairing (``data.sources.pair_eyes``) uses the run's ``splits.csv`` (patient and eye of each photo): an eye is paired only
when its patient has exactly one usable photo of each eye. Any other eye (one eye only, a fellow photo that
failed preprocessing, two photos of the same eye, an unknown eye) keeps its single-eye grade, and the log and
the report count them by reason: never a pairing with a photo that might be the wrong one.

Files (``RunLayout.fusion``): ``fusion/features.npz`` (made once per top stage: the expensive part), then
``state.json``, ``log.csv``, ``fusion.keras``, ``evaluation.{json,md}``. A rerun with the stage done and the same
``fusion`` settings trains nothing; an interrupted or changed fusion stage retrains its network from the saved
features (seconds).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from retina_scale.data.sources import PAIRED, pair_eyes
from retina_scale.models.fusion import build_fusion_net, feature_model, pair_features, view_features
from retina_scale.run_layout import RunLayout
from retina_scale.utils.fileio import atomic_path, csv_text, read_json, write_json, write_text
from retina_scale.utils.typed_config import to_dict

SPLITS = ("train", "val", "test")


def fallback_counts(reasons) -> dict[str, int]:
    """How many photos kept their single-eye grade, by reason."""
    return dict(sorted(Counter(r for r in reasons if r != PAIRED).items()))


def extract_split(extract, inp, draws: int, batch_size: int = 32) -> dict:
    """The features, single-eye grades, labels and ids of every photo of a ``CacheInput``, in its order;
    ``extract(images) -> (features, grades)`` is a stage's :func:`~retina_scale.models.fusion.feature_model`."""
    from retina_scale.data.tta import view_options

    options = view_options("graham" if inp.graham else "none")
    features, scores = [], []
    for images, _ in inp.dataset(batch_size, training=False):
        f, s = view_features(extract, images, draws, **options)
        features.append(np.asarray(f))
        scores.append(np.asarray(s))
    return {"ids": inp.image_ids.astype(str), "labels": inp.labels, "features": np.concatenate(features),
            "scores": np.concatenate(scores)}


def split_pairs(split: dict, rows=None) -> dict:
    """:func:`pair_features` of the paired photos of one split's features (``rows``: which; default all paired)."""
    rows = np.flatnonzero(split["fellow"] >= 0) if rows is None else rows
    other = split["fellow"][rows]
    inputs = pair_features(split["features"][rows], split["features"][other], split["scores"][rows],
                           split["scores"][other])
    return {k: np.asarray(v, np.float32) for k, v in inputs.items()}


# ------------------------------------------------------------------------------------ the network
def fused_scores(net, split: dict) -> np.ndarray:
    """Every photo's grade: the fusion network's for paired photos, the single-eye grade for the others."""
    scores = np.array(split["scores"], np.float32)
    rows = np.flatnonzero(split["fellow"] >= 0)
    if len(rows):
        scores[rows] = np.asarray(net.predict(split_pairs(split, rows), verbose=0, batch_size=1024)).reshape(-1)
    return scores


def train_fusion_net(config, data: dict):
    """Trains the fusion network epoch by epoch on the training split's paired photos (MSE of the grade, Adam)
    and keeps the best epoch by ``config.selection`` on every validation photo (fallbacks included), scored by
    ``stage.validation_row`` as a stage's epochs are. Returns ``(net, history, best row)``."""
    import keras

    from retina_scale.training.stage import is_better, validation_row

    cfg = config.fusion
    keras.utils.set_random_seed(config.seed)
    rows = np.flatnonzero(data["train"]["fellow"] >= 0)
    train, labels = split_pairs(data["train"], rows), data["train"]["labels"][rows]
    net = build_fusion_net(train["pair"], cfg.hidden, cfg.dropout, config.seed)
    net.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss="mse")
    history, best, best_weights = [], None, None
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        fitted = net.fit(train, labels, batch_size=cfg.batch_size, epochs=1, shuffle=True, verbose=0)
        row = {"epoch": epoch, "loss": float(fitted.history["loss"][-1]),
               **validation_row(data["val"]["labels"], fused_scores(net, data["val"])), "lr": cfg.lr,
               "seconds": round(time.time() - t0, 2)}
        history.append(row)
        if is_better(row, None if best is None else best[config.selection], config.selection):
            best, best_weights = row, net.get_weights()
    net.set_weights(best_weights)
    return net, history, best


# -------------------------------------------------------------------------------------------- stage
def stage_features(config, layout: RunLayout, top: dict, cache_dir, splits_file, log) -> dict:
    """Every split's features at the top stage's size (``fusion/features.npz``, made once), with each photo's
    fellow and reason (``data.sources.pair_eyes``): ``{split: {"ids", "labels", "features", "scores", "fellow",
    "reasons", "patients"}}``; a split the cache lacks (no test split) is left out."""
    files = layout.fusion
    source = features_source(top, config.tta.draws)
    data = _stored_features(files.features, source)
    if data is None:
        if files.features.exists():
            log("Fusion: the saved features came from another top stage checkpoint or number of TTA views; "
                "extracting them again")
        data = _extract_features(config, top, cache_dir, splits_file, log)
        with atomic_path(files.features) as tmp, open(tmp, "wb") as f:
            np.savez(f, source=np.array(source), **{f"{s}/{k}": v for s, d in data.items() for k, v in d.items()})
    for split in data.values():
        split["patients"], eyes = _patients_and_eyes(splits_file, split["ids"])
        split["fellow"], split["reasons"] = pair_eyes(split["patients"], eyes)
    return data


def features_source(top: dict, draws: int) -> str:
    """What the features are made from: the top stage, the SHA-256 of its best checkpoint, the TTA views."""
    import hashlib
    import json

    digest = hashlib.sha256(Path(top["best_checkpoint"]).read_bytes()).hexdigest()
    return json.dumps({"stage": top["stage"], "checkpoint_sha256": digest, "tta_draws": int(draws)}, sort_keys=True)


def _stored_features(path, source: str) -> dict | None:
    """The saved features when they were made from ``source`` (:func:`features_source`); None otherwise."""
    if not path.exists():
        return None
    with np.load(path) as stored:
        if "source" not in stored.files or str(stored["source"]) != source:
            return None
        data = {s: {k.split("/")[1]: stored[k] for k in stored.files if k.startswith(s + "/")} for s in SPLITS}
    return {s: d for s, d in data.items() if d}


def _extract_features(config, top: dict, cache_dir, splits_file, log) -> dict:
    """:func:`extract_split` of every split the cache has, with the top stage's best weights (float32)."""
    import tensorflow as tf

    from retina_scale.models.convnet import get_stage
    from retina_scale.training.checkpoint import restore_checkpoint
    from retina_scale.training.stage import build_stage_model, stage_input

    spec = get_stage(top["stage"])
    model = build_stage_model(config, spec, policy="float32")
    restore_checkpoint(model, None, top["best_checkpoint"])
    extractor = feature_model(model)
    extract = tf.function(lambda x: extractor(x, training=False), reduce_retracing=True)
    t0, data = time.time(), {}
    for split in SPLITS:
        inp = stage_input(config, spec, None, cache_dir, splits_file, split, training=False, missing_ok=True)
        if inp is not None:
            data[split] = extract_split(extract, inp, config.tta.draws, config.global_batch_size)
    log(f"Fusion: features of {sum(len(d['ids']) for d in data.values())} photos from stage {top['index']} "
        f"{spec.name} ({spec.input_size} px, {config.tta.draws} view(s)) in {time.time() - t0:.0f} s")
    return data


def _patients_and_eyes(splits_file, image_ids) -> tuple[np.ndarray, list]:
    """The patient and eye of each image id, from a run's ``splits.csv`` (an unknown id: its own patient, no eye)."""
    import pandas as pd

    frame = pd.read_csv(splits_file, dtype=str, keep_default_na=False)
    known = {image: (patient, eye or None) for image, patient, eye in zip(frame["image"], frame["patient"],
                                                                        frame["eye"])}
    pairs = [known.get(i, (i, None)) for i in image_ids]
    return np.array([p for p, _ in pairs]), [e for _, e in pairs]


def run_fusion(config, layout: RunLayout, top: dict, cache_dir, splits_file, log, is_chief: bool = True,
               export=None):
    """The fusion stage after the ladder's top stage (``top``: its report row); returns its report row, or None
    when the training split holds no patient with both eyes. Done with the same settings and the same top-stage
    checkpoint and TTA views: not retrained.
    ``export(top, fusion)``, if given, exports the top stage with the fusion network (``export_saved_model``'s
    ``fusion``) and returns the version folder."""
    # The stage is done only for these fusion settings on features of this top-stage checkpoint and these views.
    files = layout.fusion
    settings = {**to_dict(config.fusion), "features": features_source(top, config.tta.draws)}
    files.dir.mkdir(parents=True, exist_ok=True)
    state = read_json(files.state) if files.state.exists() else None
    if state and state.get("status") == "done" and state.get("settings") == settings:
        log(f"Fusion stage finished earlier: val kappa {state['result']['val_kappa']:.4f}; not retrained")
        return state["result"]
    t0 = time.time()
    data = stage_features(config, layout, top, cache_dir, splits_file, log)
    fallback = {s: fallback_counts(d["reasons"]) for s, d in data.items()}
    log("Fusion: photos without a usable fellow eye keep the single-eye grade: " + "; ".join(
        f"{s} {sum(n.values())} of {len(data[s]['ids'])}" + (f" ({_reasons(n)})" if n else "")
        for s, n in fallback.items()))
    if not (data["train"]["fellow"] >= 0).any():
        log("Fusion: no patient of the training split has a photo of each eye; no fusion stage")
        return None
    write_json(files.state, {"status": "training", "settings": settings})
    net, history, best = train_fusion_net(config, data)
    write_text(files.log_csv, _log_text(history))
    result = _finish_fusion(config, files, net, data, top, log)
    result.update(epochs=len(history), planned_epochs=config.fusion.epochs, best_epoch=best["epoch"],
                  selection=config.selection, selection_score=best[config.selection], val_kappa=best["val_kappa"],
                  seconds=round(time.time() - t0, 1), fallback=fallback)
    if is_chief:
        net.save(files.model)
    if export is not None:
        result["export_path"] = export(top, {"net": net, "thresholds": result["thresholds"],
                                             "hidden": config.fusion.hidden})
    write_json(files.state, {"status": "done", "settings": settings, "history": history, "result": result})
    log(f"Fusion: {len(history)} epochs, {result['seconds']:.0f} s; best epoch {best['epoch']} by "
        f"{config.selection} {best[config.selection]:.4f} (val kappa at cut-offs 0.5/1.5/2.5/3.5: "
        f"{best['val_kappa']:.4f})")
    return result


def _reasons(counts: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items())


def _log_text(history) -> str:
    """``log.csv``: one row per epoch, the columns of a stage's."""
    columns = ("epoch", "loss", "val_loss", "val_kappa", "val_kappa_optimized", "lr", "seconds")
    return csv_text(columns, [[row[k] for k in columns] for row in history], lineterminator="\n")


def _finish_fusion(config, files, net, data: dict, top: dict, log) -> dict:
    """The best epoch's cut-offs optimised on validation, the test evaluation (``evaluation.{json,md}``) and the
    stage's report row, scored as a stage's (``stage.score_on_splits``) and read as one
    (``stepwise.format_stage_table``)."""
    from retina_scale.training.stage import score_on_splits

    test = data.get("test")
    scored = score_on_splits(
        data["val"]["labels"], fused_scores(net, data["val"]),
        None if test is None else (test["labels"], fused_scores(net, test), test["patients"]), files, config,
        "Fusion", log, extra=None if test is None else {"fallback": fallback_counts(test["reasons"])})
    thresholds, fit, points, evaluation = scored["thresholds"], scored["fit"], scored["points"], scored["evaluation"]
    kappa_opt = float(scored["val_kappa_opt"])
    ops = evaluation["operating_points"] if evaluation else points
    return {"index": top["index"] + 1, "stage": "fusion", "size": top["size"], "lr": config.fusion.lr,
            "lr_source": "config", "stopped_by_time": False, "nan_events": 0,
            "val_kappa_optimized_thresholds": kappa_opt if np.isfinite(kappa_opt) else None,
            "thresholds": thresholds, "thresholds_fit": fit.to_dict(),
            "test_kappa": evaluation["kappa"]["value"] if evaluation else None,
            "mild_dr_auc": evaluation["mild_dr_auc"]["value"] if evaluation else None,
            "test_images": evaluation["n_images"] if evaluation else 0, "tta_draws": config.tta.draws,
            "operating_points": {k: v for k, v in ops.items() if k != "test_roc"},
            "weights": net.count_params(), "best_checkpoint": None, "keras_model": str(files.model),
            "export_path": None, "search": None}
