"""Where the network looks: Grad-CAM heat maps of a stage or an export, PNG overlays, and lesion hit rates.

**Grad-CAM** (Selvaraju et al., 2017) on the continuous grade: the gradient of the regression output with
respect to a convolution layer's feature maps, averaged over the map, weighs each channel; the heat map is the
positive part of the weighted sum of the channels, upsampled (bilinear) to the image and scaled to [0, 1]. It
shows what raises the predicted grade. The default layer is the stage's last convolution (its leaky ReLU,
``block<N>_conv<M>_lrelu``: :func:`target_layer`), a 7x7 map at every stage's own size.

**Which model.** A stage's ``best.keras`` (loaded with ``safe_mode=True``) with the thresholds of its
``state.json``; or an export, whose SavedModel is never loaded or run: its weights are read as data
(``retina_scale.serving.export.read_export_weights``) into the network rebuilt from its ``model_config``.

**Which photos, preprocessed how.** Cached images (a run's cache at the stage's size, optionally one split of
its ``splits.csv``) are read as the training input reads them; photo files go through the cache's own
preprocessing (:func:`retina_scale.data.fundus.preprocess_file`) with the normalisation, mask and sizes the run
or export recorded. A photo that cannot be used is an error row, not a crash.

**Lesion hit rate.** On the synthetic benchmark ``lesions.csv`` gives every lesion's position in the original
photo. :func:`photo_to_cache` maps it into the cached square (the disc's bounding square cropped at the decode
reduction, then resized); a lesion is a hit when its pixel lies in the hottest ``fraction`` (5 %) of the fundus
disc (the circle inscribed in the square, not the whole square) of its photo's heat map (:func:`hottest`, ties
broken at random so that a flat map scores chance). Per lesion group: microaneurysms on photos of true grade 1
(microaneurysms only, the grade the generator's lesions imply), haemorrhages and hard exudates on every photo
that has them. Chance is ``fraction``. :func:`lesion_hit_rates` reports each with a patient bootstrap interval
(``retina_scale.grading.evaluation.bootstrap_statistics``).

Example (hand-built heat maps; a real run calls :func:`explain`):

>>> import numpy as np
>>> heat = np.zeros((40, 40)); heat[10, 12] = 1.0
>>> rates = lesion_hit_rates({"1_left": heat}, {"1_left": [("microaneurysm", 12.0, 10.0)]}, {"1_left": 1})
>>> rates["microaneurysm"]["value"], rates["microaneurysm"]["n_lesions"], rates["microaneurysm"]["chance"]
(1.0, 1, 0.05)
"""

from __future__ import annotations

import csv
import dataclasses
import re
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from retina_scale.data.synthetic.plan import INTRARETINAL_HAEMORRHAGES
from retina_scale.run_layout import ExplainLayout, RunLayout, StageLayout
from retina_scale.utils.errors import UserError

HOT_FRACTION = 0.05
"""The share of the fundus disc's area counted as the heat map's hottest region."""

# Lesion group -> (the lesions.csv kinds it counts, the true grades of the photos it counts them on; None: any).
LESION_GROUPS: dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]] = {
    "microaneurysm": (("microaneurysm",), (1,)),
    "haemorrhage": (tuple(INTRARETINAL_HAEMORRHAGES), None),
    "exudate": (("hard_exudate",), None),
}

_CONV_ACTIVATION = re.compile(r"^block(\d+)_conv(\d+)_lrelu$")


# ----------------------------------------------------------------------------------------------- Grad-CAM
def target_layer(model) -> str:
    """The name of the model's last convolution activation (``block<N>_conv<M>_lrelu``, largest N then M).

    Raises:
        UserError: the model has no such layer (not one of ours): pass the layer's name.
    """
    found = [(int(m.group(1)), int(m.group(2)), layer.name) for layer in model.layers
             if (m := _CONV_ACTIVATION.match(layer.name))]
    if not found:
        raise UserError(f"model {model.name!r} has no block<N>_conv<M>_lrelu layer; name the layer to explain "
                        f"(one of: {', '.join(layer.name for layer in model.layers[:12])}, ...)")
    return max(found)[2]


def grad_cam(model, images, layer: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM of the model's continuous grade for a batch of images.

    Args:
        model: a Keras functional model with one output (the grade), e.g. a stage's ``RetinaConvNet``.
        images: float ``(batch, h, w, 3)``, as the model takes them (RGB in [0, 255] for ours).
        layer: the layer whose output is explained; default :func:`target_layer`.

    Returns:
        ``(heat, scores, peak)``: heat maps ``(batch, h, w)`` in [0, 1] (each divided by its maximum; all zero
        where nothing raises the grade), the model's scores ``(batch,)`` and each map's maximum before scaling.
    """
    import keras
    import tensorflow as tf

    name = layer or target_layer(model)
    try:
        features_out = model.get_layer(name).output
    except ValueError:
        raise UserError(f"model {model.name!r} has no layer {name!r}; e.g. {target_layer(model)}") from None
    probe = keras.Model(model.inputs, [features_out, model.outputs[0]])
    x = tf.convert_to_tensor(np.asarray(images, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        features, out = probe(x, training=False)
        score = keras.ops.sum(keras.ops.cast(out, "float32"))
    grads = keras.ops.cast(tape.gradient(score, features), "float32")
    features = keras.ops.cast(features, "float32")
    weights = keras.ops.mean(grads, axis=(1, 2), keepdims=True)
    cam = keras.ops.relu(keras.ops.sum(weights * features, axis=-1, keepdims=True))
    cam = keras.ops.image.resize(cam, (int(x.shape[1]), int(x.shape[2])), interpolation="bilinear")[..., 0]
    cam = keras.ops.convert_to_numpy(cam).astype(np.float64)
    peak = cam.reshape(len(cam), -1).max(axis=1)
    heat = cam / np.where(peak > 0, peak, 1.0)[:, None, None]
    return heat, keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")).reshape(-1), peak


# ------------------------------------------------------------------------------------------------ lesions
def photo_reduction(width: int, height: int, disc_r: float, largest_size: int, reduced_decode: bool = True) -> int:
    """The decode reduction (1, 2, 4 or 8) ``preprocess_file`` used for a photo of ``width`` x ``height`` whose
    disc (full-resolution radius ``disc_r``) it cropped for sizes up to ``largest_size`` (a cache's largest).

    >>> photo_reduction(3888, 2592, 1200.0, 448), photo_reduction(1024, 1024, 512.0, 448)
    (4, 2)
    """
    from retina_scale.data.fundus import ImageInfo, choose_reduction, refine_reduction

    k = choose_reduction(ImageInfo("", int(width), int(height), 3, 8), int(largest_size), reduced_decode)
    return refine_reduction(k, disc_r / k, int(largest_size))


def photo_to_cache(x, y, disc, size: int, reduction: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the original photo -> positions in its cached (or preprocessed) ``size`` x ``size`` square.

    Pixel coordinates with pixel centres at whole numbers, as lesions.csv gives them. The photo was decoded at
    1/``reduction`` (decoded pixel j covers photo pixels ``k j .. k j + k - 1``), the disc's bounding square
    (:func:`retina_scale.data.fundus.crop_box` of the disc at that resolution) was cropped, and the square resized
    to ``size`` (area or bicubic, pixel centres aligned; a chain of such resizes maps the same).

    Args:
        x, y: positions in the photo (numbers or arrays).
        disc: the disc at full resolution: a ``Disc`` or ``(cx, cy, r)`` (the cache manifest's ``disc_*``).
        size: the square's side.
        reduction: the decode reduction (:func:`photo_reduction`; ``Preprocessed.reduction``).

    >>> xs, ys = photo_to_cache(500.0, 400.0, (500.0, 400.0, 300.0), 120)
    >>> round(float(xs), 6), round(float(ys), 6)
    (59.6, 59.6)
    """
    from retina_scale.data.fundus import Disc, crop_box

    cx, cy, r = (disc.cx, disc.cy, disc.r) if isinstance(disc, Disc) else disc
    k = int(reduction)
    x0, y0, side = crop_box(Disc(cx / k, cy / k, r / k))
    scale = size / side
    xs = ((np.asarray(x, np.float64) + 0.5) / k - x0) * scale - 0.5
    ys = ((np.asarray(y, np.float64) + 0.5) / k - y0) * scale - 0.5
    return xs, ys


def fundus_mask(size: int) -> np.ndarray:
    """The fundus disc of a cached square: pixels whose centre lies within half the side of the square's centre."""
    centre = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx - centre) ** 2 + (yy - centre) ** 2 <= (size / 2.0) ** 2


def hottest(heat: np.ndarray, fraction: float = HOT_FRACTION, seed: int = 0) -> np.ndarray:
    """The hottest ``fraction`` of the fundus disc of a square heat map: a boolean mask of
    ``round(fraction x disc pixels)`` pixels (at least one); equal values are ordered at random (``seed``), so a
    flat map's region is a random one and its hit rate is chance, not 1."""
    heat = np.asarray(heat, np.float64)
    disc = fundus_mask(heat.shape[0]) if heat.shape[0] == heat.shape[1] else np.ones(heat.shape, bool)
    where = np.flatnonzero(disc)
    order = np.random.default_rng(seed).permutation(where.size)
    ranked = order[np.argsort(-heat.ravel()[where][order], kind="stable")]
    mask = np.zeros(heat.size, bool)
    mask[where[ranked[: max(1, int(round(fraction * where.size)))]]] = True
    return mask.reshape(heat.shape)


def photo_hits(heat: np.ndarray, lesions: Iterable[tuple[str, float, float]], grade: int | None,
               fraction: float = HOT_FRACTION, seed: int = 0) -> dict[str, list[int]]:
    """``{group: [lesions, hits]}`` of one photo for the :data:`LESION_GROUPS` its true ``grade`` counts and it
    has lesions of; ``lesions`` are ``(kind, x, y)`` in the heat map's pixel coordinates."""
    hot = None
    counts: dict[str, list[int]] = {}
    size_y, size_x = np.shape(heat)
    for group, (kinds, grades) in LESION_GROUPS.items():
        points = [(x, y) for kind, x, y in lesions if kind in kinds]
        if not points or (grades is not None and grade not in grades):
            continue
        hot = hottest(heat, fraction, seed) if hot is None else hot
        hits = 0
        for x, y in points:
            px, py = int(round(x)), int(round(y))
            hits += bool(0 <= px < size_x and 0 <= py < size_y and hot[py, px])
        counts[group] = [len(points), hits]
    return counts


def hit_rates(per_photo: list[tuple[dict[str, list[int]], str]], fraction: float = HOT_FRACTION,
              n_boot: int = 0, seed: int = 0, confidence: float = 0.95) -> dict[str, dict]:
    """Per lesion group ``{value, ci_low, ci_high, n_valid, n_lesions, n_photos, chance}`` from the
    ``(photo_hits(...), patient)`` of each photo; the bootstrap resamples patients (``n_boot`` 0: no interval)."""
    from retina_scale.grading.evaluation import bootstrap_statistics

    groups = [g for g in LESION_GROUPS if any(g in counts for counts, _ in per_photo)]
    if not groups:
        return {}
    n = np.array([[counts.get(g, [0, 0])[0] for g in groups] for counts, _ in per_photo], np.float64)
    hits = np.array([[counts.get(g, [0, 0])[1] for g in groups] for counts, _ in per_photo], np.float64)

    def rates(weights):
        total = weights @ n
        return dict(zip(groups, np.divide(weights @ hits, total, out=np.full(len(groups), np.nan), where=total > 0)))

    summary, _, _ = bootstrap_statistics(rates, len(per_photo), [p for _, p in per_photo], n_boot, seed, confidence)
    return {g: {**summary[g], "n_lesions": int(n[:, i].sum()), "n_photos": int((n[:, i] > 0).sum()),
                "chance": float(fraction)} for i, g in enumerate(groups)}


def lesion_hit_rates(heat_maps, lesions, grades, groups=None, fraction: float = HOT_FRACTION, n_boot: int = 0,
                     seed: int = 0, confidence: float = 0.95) -> dict[str, dict]:
    """The lesion hit rate per group: the share of its lesions inside the hottest ``fraction`` of the fundus
    area of their photo's heat map, microaneurysms on photos of true grade 1, haemorrhages and exudates on any.

    Args:
        heat_maps: ``{image id: square heat map}``.
        lesions: ``{image id: [(kind, x, y), ...]}``, positions in the heat map's pixels (:func:`photo_to_cache`).
        grades: ``{image id: true grade}``.
        groups: ``{image id: patient id}`` for the bootstrap (default: each photo its own patient).
        fraction: the hot share of the fundus area (chance level).
        n_boot, seed, confidence: the patient bootstrap (``n_boot`` 0: no interval).

    Returns:
        ``{group: {"value", "ci_low", "ci_high", "n_valid", "n_lesions", "n_photos", "chance"}}`` for the groups
        with at least one lesion on a counted photo.
    """
    per_photo = [(photo_hits(heat, lesions.get(image, ()), grades.get(image), fraction, _photo_seed(image, seed)),
                  (groups or {}).get(image, image)) for image, heat in heat_maps.items()]
    return hit_rates(per_photo, fraction, n_boot, seed, confidence)


def _photo_seed(image: str, seed: int) -> int:
    return (zlib.crc32(image.encode()) + int(seed)) % 2**32


def read_lesions(path) -> dict[str, list[dict]]:
    """lesions.csv (``retina_scale.data.synthetic.writer``) as ``{image: [{"kind", "x", "y", "quadrant"}]}``."""
    out: dict[str, list[dict]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                out.setdefault(row["image"], []).append(
                    {"kind": row["kind"], "x": float(row["x"]), "y": float(row["y"]), "quadrant": row["quadrant"]})
    except (KeyError, ValueError) as err:
        raise UserError(f"{path} is not a lesions.csv of the synthetic data set (columns image, kind, x, y, "
                        f"quadrant): {err}") from None
    return out


def true_grade(records: list[dict] | None) -> int | None:
    """A synthetic photo's true grade: the one its drawn lesions imply (0 without any); None when unknown."""
    from retina_scale.data.synthetic.plan import grade_from_lesions

    return None if records is None else grade_from_lesions(records)


# ------------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class Explainable:
    """A network to explain and what it was trained with."""

    model: object
    input_size: int
    thresholds: tuple[float, ...]
    preprocessing: object  # the run's or export's record (retina_scale.serving.preprocess.preprocess_spec reads it)
    description: str
    notes: list[str] = dataclasses.field(default_factory=list)


def load_stage(path) -> Explainable:
    """A stage folder's ``best.keras`` (or a ``.keras`` file), its thresholds (the stage's ``state.json``;
    default 0.5 ... 3.5) and its run's preprocessing.

    Raises:
        FileNotFoundError, UserError: no such folder or file, or the stage has not finished.
    """
    import keras

    import retina_scale.models  # noqa: F401  (registers our layers for safe_mode loading)
    from retina_scale.grading.thresholds import DEFAULT_THRESHOLDS
    from retina_scale.models.convnet import regression_model
    from retina_scale.serving.export import run_preprocessing
    from retina_scale.utils.fileio import read_json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    folder = path if path.is_dir() else path.parent
    index, _, name = folder.name.partition("-")
    stage = StageLayout(folder, int(index) if index.isdigit() else 0, name or folder.name)
    keras_file = stage.best_keras if path.is_dir() else path
    if keras_file.suffix != ".keras" or not keras_file.is_file():
        raise UserError(f"{path} is not a model to explain: expected a run folder, a stage folder with best.keras "
                        "(a finished stage), a .keras file or an export")
    model = regression_model(keras.saving.load_model(keras_file, safe_mode=True))  # the grade alone (issue 14's aux)
    result = (read_json(stage.state).get("result") or {}) if stage.state.is_file() else {}
    thresholds = tuple(float(t) for t in (result.get("thresholds") or DEFAULT_THRESHOLDS))
    notes = [] if RunLayout(stage.run_root).config.is_file() else [
        "no run folder around this model: photo files are preprocessed with the defaults (no normalisation, "
        "circular mask)"]
    return Explainable(model, int(model.input_size), thresholds, run_preprocessing(stage.run_root), str(keras_file),
                       notes)


def load_export_model(path) -> Explainable:
    """An export's network, rebuilt from its metadata and its weights read as data (no function of the
    SavedModel is loaded or run: ``retina_scale.serving.export.read_export_weights``).

    Raises:
        UserError: not one of our exports, or its weights do not fit the network its metadata describes.
    """
    from retina_scale.models.convnet import build_model, scaled
    from retina_scale.serving.export import read_export_weights

    metadata, weights = read_export_weights(path)
    config, notes = dict(metadata.get("model_config") or {}), []
    if not config:  # an export written before model_config was recorded
        config = {"stage": metadata["stage"], "width": float(metadata.get("width", 1.0))}
        first = weights.get("block1_conv1/kernel")
        if first is not None and first.shape[-1] > scaled(32, config["width"]):
            config["min_filters"] = int(first.shape[-1])
        notes.append("the export records no model_config: rebuilt from its stage and width with the default "
                     "leaky ReLU slope (0.01)")
    config.update(kernel_initializer="zeros", seed=None)
    model = build_model(**config)
    for variable in model.weights:
        value = weights.get(variable.path)
        if value is None or tuple(value.shape) != tuple(variable.shape):
            raise UserError(f"export {path} does not fit the network its metadata describes: {variable.path} is "
                            f"{'missing' if value is None else tuple(value.shape)}, expected {tuple(variable.shape)}")
        variable.assign(value)
    return Explainable(model, int(metadata["input_size"]), tuple(float(t) for t in metadata["thresholds"]),
                       metadata.get("preprocessing"), f"export {path}", notes)


# ------------------------------------------------------------------------------------------------- photos
@dataclasses.dataclass
class Photo:
    """One photo to explain: ``load()`` returns ``(RGB square at the model's size, (disc, reduction))``, the
    disc and decode reduction placing the original photo's pixels (:func:`photo_to_cache`)."""

    image: str  # as shown: the cache's image id, or the photo's path
    lesion_id: str  # its id in lesions.csv: the image id, or the file name without extension
    load: Callable[[], tuple[np.ndarray, tuple]]
    label: float | None = None


def cache_photos(cache_dir, size: int, split: str | None = None, splits_file=None) -> list[Photo]:
    """The cached images at ``size`` (those of one split of a run's ``splits.csv`` with ``split``), in manifest
    order, read as the training input reads them."""
    import functools

    from retina_scale.data.cache import read_config, read_manifest
    from retina_scale.data.sources import read_splits

    frame = read_manifest(cache_dir, size)
    if split is not None:
        if splits_file is None:
            raise UserError("a split needs the run's splits.csv")
        splits = read_splits(splits_file)
        frame = frame[[splits.get(i) == split for i in frame["image"]]]
    largest = max(int(s) for s in read_config(cache_dir).get("sizes", [size]))
    photos = []
    for row in frame.itertuples(index=False):
        disc = (float(row.disc_cx), float(row.disc_cy), float(row.disc_r))
        geometry = (disc, photo_reduction(row.width, row.height, disc[2], largest))
        label = float(row.label) if str(row.label) not in ("", "nan") else None
        photos.append(Photo(str(row.image), str(row.image),
                            functools.partial(_read_cached, row.path, size, geometry), label))
    return photos


def _read_cached(path: str, size: int, geometry: tuple) -> tuple[np.ndarray, tuple]:
    import tensorflow as tf

    from retina_scale.data.fundus import BadImage

    try:  # the training input's decoders (decode_image picks decode_jpeg or decode_png, same defaults)
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
    except tf.errors.OpError as err:
        raise BadImage(f"cannot read the cached image ({err.message.splitlines()[0]})") from None
    if image.shape != (size, size, 3):
        raise BadImage(f"the cached image is {image.shape}, expected ({size}, {size}, 3)")
    return image, geometry


def file_photos(paths: Iterable, size: int, preprocessing) -> list[Photo]:
    """Photo files, to be preprocessed by the cache's own code with the recorded ``preprocessing`` (the run's or
    the export's: normalisation, mask and the cache's sizes, whose largest decides the reduced decode)."""
    import functools

    from retina_scale.config import PreprocessConfig
    from retina_scale.serving.preprocess import preprocess_spec

    spec = preprocess_spec(preprocessing, size)
    config = PreprocessConfig(normalize=spec.normalize, mask=spec.mask, max_pixels=spec.max_pixels)
    sizes = tuple(sorted(set(int(s) for s in spec.sizes) | {int(size)}))
    return [Photo(str(p), Path(p).stem, functools.partial(_preprocess_photo, str(p), sizes, config, size))
            for p in paths]


def _preprocess_photo(path: str, sizes, config, size: int) -> tuple[np.ndarray, tuple]:
    from retina_scale.data.fundus import preprocess_file

    out = preprocess_file(path, sizes, config)
    d = out.disc
    return out.images[size], ((d.cx, d.cy, d.r), out.reduction)


def _load(photo: Photo) -> tuple[np.ndarray | None, tuple | None, str]:
    """``(image, geometry, "")``, or ``(None, None, reason)`` for a photo that cannot be used."""
    try:
        image, geometry = photo.load()
    except FileNotFoundError:
        return None, None, "file not found"
    except UserError as exc:  # BadImage: the reason in one line
        return None, None, str(exc)
    except OSError as exc:
        return None, None, f"cannot read the file ({exc.strerror or exc})"
    except Exception as exc:  # an exotic file (or a bug): its row says so, the other photos go on (as the cache does)
        return None, None, f"preprocessing failed ({type(exc).__name__}: {exc})"
    return image, geometry, ""


# ---------------------------------------------------------------------------------------------- the run
def explain(target: Explainable, photos: list[Photo], out, *, layer: str | None = None,
            lesions: dict[str, list[dict]] | None = None, batch_size: int = 8, fraction: float = HOT_FRACTION,
            overlays: int | None = None, n_boot: int = 200, seed: int = 0, progress: bool = True) -> dict:
    """Grad-CAM of every photo: an overlay PNG per photo (the first ``overlays``; None: all), ``explain.csv`` and
    ``explain.json`` in ``out`` (:class:`retina_scale.run_layout.ExplainLayout`), and with ``lesions``
    (:func:`read_lesions`) the lesion hit rates. Returns the summary written to ``explain.json``.

    Raises:
        UserError: no photo, a bad ``batch_size``/``fraction``, or a layer the model does not have.
    """
    from tqdm import tqdm

    from retina_scale.utils.console import bar_interval
    from retina_scale.utils.fileio import write_csv, write_json

    if not photos:
        raise UserError("no photo to explain")
    if batch_size < 1 or not 0.0 < fraction < 1.0:
        raise UserError(f"batch size must be >= 1 and the hot fraction in (0, 1); got {batch_size}, {fraction}")
    layer = layer or target_layer(target.model)
    files = ExplainLayout(out)
    files.overlays.mkdir(parents=True, exist_ok=True)
    rows, per_photo = [], []
    budget = len(photos) if overlays is None else int(overlays)
    with tqdm(total=len(photos), unit="photo", desc="explain", disable=not progress,
              mininterval=bar_interval()) as bar:
        for start in range(0, len(photos), batch_size):
            batch = photos[start:start + batch_size]
            loaded = [_load(photo) for photo in batch]
            good = [i for i, (image, _, _) in enumerate(loaded) if image is not None]
            heat = scores = peak = None
            if good:
                heat, scores, peak = grad_cam(target.model, np.stack([loaded[i][0] for i in good]), layer)
            for i, (photo, (image, geometry, error)) in enumerate(zip(batch, loaded)):
                j = good.index(i) if image is not None else None
                draw = j is not None and budget > 0
                budget -= draw
                row, counts = _photo_result(target, photo, image, geometry, error, files, lesions, fraction, seed,
                                            draw, None if j is None else (heat[j], float(scores[j]), float(peak[j])))
                rows.append(row)
                if counts is not None:
                    per_photo.append(counts)
            bar.update(len(batch))
    rates = hit_rates(per_photo, fraction, n_boot, seed) if lesions is not None else None
    summary = {"model": target.description, "layer": layer, "input_size": target.input_size,
               "thresholds": list(target.thresholds), "preprocessing": target.preprocessing,
               "hot_fraction": fraction, "n_photos": len(rows), "n_errors": sum(bool(r["error"]) for r in rows),
               "notes": target.notes, "lesion_hit_rates": rates, "photos": rows}
    columns = list(rows[0])
    write_csv(files.table, columns, ([_csv_cell(r[c]) for c in columns] for r in rows), lineterminator="\n")
    write_json(files.summary, summary)
    return summary


def _photo_result(target: Explainable, photo: Photo, image, geometry, error: str, files: ExplainLayout,
                  lesions, fraction: float, seed: int, draw: bool, cam) -> tuple[dict, tuple | None]:
    """One photo's row (score, grade, lesion hits, overlay) and, with lesions, its ``(photo_hits, patient)``."""
    from retina_scale.data.cache import cache_key
    from retina_scale.data.sources import parse_patient_eye
    from retina_scale.grading.thresholds import apply_thresholds

    records = None if lesions is None else lesions.get(photo.lesion_id, [])
    truth = true_grade(records)
    row = {"image": photo.image, "score": None, "grade": None, "label": photo.label, "true_grade": truth,
           "cam_peak": None, "overlay": "", "error": error}
    if lesions is not None:
        row.update({f"{g}_{what}": None for g in LESION_GROUPS for what in ("lesions", "hits")})
    if cam is None:
        return row, None
    heat, score, peak = cam
    row.update(score=round(score, 6), grade=int(apply_thresholds([score], target.thresholds)[0]), cam_peak=peak)
    points = _cache_points(records, geometry, target.input_size)
    photo_seed = _photo_seed(photo.lesion_id, seed)
    counts = None
    if lesions is not None:
        counts = photo_hits(heat, points, truth, fraction, photo_seed)
        for group, (n, hits) in counts.items():
            row[f"{group}_lesions"], row[f"{group}_hits"] = n, hits
    if draw:
        path = files.overlay(cache_key(photo.image))
        title = f"{photo.image}: predicted grade {row['grade']} (score {score:.2f})" + (
            f", true grade {truth}" if truth is not None else f", label {photo.label:g}" if photo.label is not None
            else "")
        # A flat map (nothing raises the grade) has no hottest region: its random tie-break is not drawn.
        flat = peak <= 0
        draw_overlay(path, image, heat, title + ("; flat Grad-CAM: nothing raises the grade" if flat else ""),
                     None if flat else hottest(heat, fraction, photo_seed), points)
        row["overlay"] = path.relative_to(files.root).as_posix()
    return row, None if counts is None else (counts, parse_patient_eye(photo.lesion_id)[0])


def _cache_points(records: list[dict] | None, geometry: tuple, size: int) -> list[tuple[str, float, float]]:
    """A photo's lesions.csv records as ``(kind, x, y)`` in the pixels of its cached ``size`` square."""
    if not records:
        return []
    disc, reduction = geometry
    xs, ys = photo_to_cache([r["x"] for r in records], [r["y"] for r in records], disc, size, reduction)
    return [(r["kind"], float(x), float(y)) for r, x, y in zip(records, xs, ys)]


def _csv_cell(value):
    """A CSV cell: empty for None; text a spreadsheet would run as a formula gets a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return value


def draw_overlay(path, image, heat, title: str, hot=None, lesions: Iterable[tuple[str, float, float]] = ()) -> None:
    """A PNG (written atomically): the photo as the network sees it, and the same with the heat map over it, the
    hottest region outlined (``hot``) and the lesions circled (microaneurysms cyan, other lesions white)."""
    from retina_scale.evidence.report import _plt, _save

    plt = _plt()
    rgb = np.clip(np.asarray(image, np.float64), 0, 255).astype(np.uint8)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.4))
    axes[0].imshow(rgb)
    axes[0].set_title("photo, as the network sees it", fontsize=9)
    axes[1].imshow(rgb)
    shown = axes[1].imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    axes[1].set_title("Grad-CAM of the grade" + (f"; outline: hottest {HOT_FRACTION:.0%}" if hot is not None
                                                 else ""), fontsize=9)
    if hot is not None and hot.any():
        axes[1].contour(hot.astype(float), levels=[0.5], colors="white", linewidths=0.8)
    radius = max(3.0, rgb.shape[0] / 40)
    for ax in axes:
        for kind, x, y in lesions:
            ax.add_patch(plt.Circle((x, y), radius, fill=False, lw=0.8,
                                    color="cyan" if kind == "microaneurysm" else "white"))
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes[1], fraction=0.046, label="Grad-CAM (scaled to its maximum)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------------------------- the study
def study_hit_rates(study) -> dict[str, dict] | None:
    """``{stage name: lesion hit rates}`` of a resolution study's ladder stages from their ``explain.json``
    (``StudyLayout.explain``); None when no stage has been explained."""
    from retina_scale.utils.fileio import read_json

    found = {}
    for stage in RunLayout(study.ladder.root).stages():
        files = study.explain(stage)
        if files.summary.is_file():
            found[stage.name] = read_json(files.summary).get("lesion_hit_rates")
    return found or None


def explain_study(study, lesions_csv, *, n_boot: int = 200, seed: int = 0, overlays: int = 8,
                  progress: bool = False, log: Callable[[str], None] | None = None) -> dict[str, dict] | None:
    """Grad-CAM and lesion hit rates of every finished ladder stage of a study, on its test photos of true grade
    1 or more (the synthetic benchmark's ``lesions_csv``); a stage already explained is read, not redone.
    Returns :func:`study_hit_rates`."""
    lesions = read_lesions(lesions_csv)
    run = RunLayout.from_folder(study.ladder.root)  # the config says where the cache is
    for stage in run.stages():
        files = study.explain(stage)
        if files.summary.is_file() or not stage.best_keras.is_file():
            continue
        target = load_stage(stage.dir)
        photos = [p for p in cache_photos(run.cache, target.input_size, "test", run.splits)
                  if true_grade(lesions.get(p.lesion_id, [])) >= 1]
        if not photos:
            continue
        if log:
            log(f"Explain: stage {stage.index} {stage.name}, Grad-CAM of {len(photos)} test photos with lesions")
        explain(target, photos, files.root, lesions=lesions, n_boot=n_boot, seed=seed, overlays=overlays,
                progress=progress)
    from retina_scale.run_layout import ReportLayout

    if not ReportLayout(study.root).stage_panel.is_file():
        draw_stage_panel(study, lesions, seed=seed)
    return study_hit_rates(study)


def panel_photo(photos: Iterable[str], lesions: dict[str, list[dict]], min_ma: int = 3) -> str | None:
    """The grade-1 photo a study's stage figure shows, chosen by rule before any heat map is drawn: the first by
    name with at least ``min_ma`` microaneurysms, else the one with the most (first by name among ties).

    >>> lesions = {"2_left": [{"kind": "microaneurysm"}] * 2, "1_left": [{"kind": "microaneurysm"}] * 4,
    ...            "0_left": [{"kind": "microaneurysm"}] * 3 + [{"kind": "hard_exudate"}]}
    >>> panel_photo(["2_left", "1_left", "0_left"], lesions, min_ma=3)  # 0_left has exudates: grade 2
    '1_left'
    >>> panel_photo(["2_left", "1_left"], lesions, min_ma=9)
    '1_left'
    """
    counts = {}
    for name in sorted(photos):
        records = lesions.get(name)
        if records and true_grade(records) == 1:
            counts[name] = sum(r["kind"] == "microaneurysm" for r in records)
    if not counts:
        return None
    enough = [name for name, n in counts.items() if n >= min_ma]
    return enough[0] if enough else max(counts, key=counts.get)  # max keeps the first (by name) of ties


def draw_stage_panel(study, lesions: dict[str, list[dict]], *, seed: int = 0) -> str | None:
    """Figure (``ReportLayout(study.root).stage_panel``): one grade-1 test photo (:func:`panel_photo`) as every
    finished ladder stage sees it, with its Grad-CAM, the hottest 5 % outlined and its microaneurysms circled.
    Returns the photo's name, or None when no stage has finished or the test split has no grade-1 photo."""
    from retina_scale.grading.thresholds import apply_thresholds
    from retina_scale.run_layout import ReportLayout

    run = RunLayout.from_folder(study.ladder.root)
    panels, chosen = [], None
    for stage in [s for s in run.stages() if s.best_keras.is_file()]:
        target = load_stage(stage.dir)
        photos = {p.lesion_id: p for p in cache_photos(run.cache, target.input_size, "test", run.splits)}
        chosen = chosen or panel_photo(photos, lesions)
        image, geometry, _ = _load(photos[chosen]) if chosen in photos else (None, None, "")
        if image is None:
            return None
        heat, scores, peak = grad_cam(target.model, image[None])
        grade = int(apply_thresholds([float(scores[0])], target.thresholds)[0])
        # A flat map (nothing raises the grade) has no hottest region: its random tie-break is not drawn.
        hot = hottest(heat[0], HOT_FRACTION, _photo_seed(chosen, seed)) if peak[0] > 0 else np.zeros_like(heat[0], bool)
        panels.append((f"{stage.name}, {target.input_size} px: grade {grade} (score {scores[0]:.2f})"
                       + ("" if peak[0] > 0 else "\nflat Grad-CAM: nothing raises the grade"), image, heat[0], hot,
                       _cache_points(lesions.get(chosen), geometry, target.input_size)))
    if not panels:
        return None
    _draw_panels(ReportLayout(study.root).stage_panel, panels, f"{chosen}: true grade 1 "
                 f"({sum(r['kind'] == 'microaneurysm' for r in lesions[chosen])} microaneurysms, cyan)")
    return chosen


def _draw_panels(path, panels, title: str) -> None:
    """One column per stage: the photo as the stage sees it under its heat map, hottest region outlined,
    microaneurysms circled (radius a fixed share of the image, so the circles match across sizes)."""
    from retina_scale.evidence.report import _plt, _save

    plt = _plt()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # drawn before the report makes its figures folder
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.9), squeeze=False)
    for ax, (label, image, heat, hot, points) in zip(axes[0], panels):
        rgb = np.clip(np.asarray(image, np.float64), 0, 255).astype(np.uint8)
        ax.imshow(rgb)
        ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        if hot.any():
            ax.contour(hot.astype(float), levels=[0.5], colors="white", linewidths=0.6)
        for kind, x, y in points:
            if kind == "microaneurysm":
                ax.add_patch(plt.Circle((x, y), rgb.shape[0] / 30, fill=False, lw=0.9, color="cyan"))
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # room for the title above the two-line panel titles
    _save(fig, path)
