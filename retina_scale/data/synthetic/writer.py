"""The data set on disk, in the EyePACS (Kaggle 2015) layout (:func:`generate_dataset`): photos drawn in worker
processes and written atomically as they come, then lesions.csv, images.csv, summary.json and, last,
trainLabels.csv."""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import cv2
import numpy as np

from retina_scale.data.synthetic.camera import encode_jpeg
from retina_scale.data.synthetic.plan import ImageSpec, parse_prior, plan_dataset, validate_count, validate_size
from retina_scale.data.synthetic.render import render_fundus
from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import write_bytes, write_csv, write_json
from retina_scale.utils.parallel import parallel_map

LESION_COLUMNS = (
    "image", "kind", "x", "y", "size_px", "size_um", "quadrant", "depth", "cluster",
)
IMAGE_COLUMNS = (
    "image", "patient", "eye", "level", "true_level", "background", "seed", "width", "height",
    "field_diameter_px", "um_per_px", "field_x", "field_y", "disc_x", "disc_y", "disc_diameter_px",
    "fovea_x", "fovea_y",
)


# The photos this generator writes, and the temporary files of an interrupted write of one (``atomic_path``'s
# ``.<name>.<random>.tmp.jpeg``, and ``<name>.tmp`` of earlier versions).
_PHOTO_NAME = re.compile(r"^(\d+_(left|right)\.jpeg(\.tmp)?|\.\d+_(left|right)\.jpeg\.\w+\.tmp\.jpeg)$")


def _render_one(job):
    """``(spec, JPEG bytes, lesion records, anatomy)`` of one photo; runs in a worker process."""
    spec, size, framing = job
    rng = np.random.default_rng(spec.seed)
    img, records, meta = render_fundus(rng, spec.true_level, size=size, eye=spec.eye,
                                       background=spec.background, framing=framing, return_meta=True)
    data = encode_jpeg(rng, img, spec.name)
    meta["height"] = img.shape[0]
    meta["width"] = img.shape[1]
    return spec, data, records, meta


def _worker_init():
    cv2.setNumThreads(1)


def _check_arguments(count, size, prior, workers, framing, real_fraction) -> tuple[int, int, np.ndarray]:
    """``(count, size, prior probabilities)`` once every argument is valid; a UserError names the first that is not."""
    count = validate_count(count)
    size = validate_size(size)
    probs = parse_prior(prior)
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise UserError(f"workers {workers} is invalid; it must be a whole number >= 1")
    if framing not in (None, "none", "eyepacs"):
        raise UserError(f"framing {framing!r} is invalid; accepted: none, eyepacs")
    if not 0.0 <= float(real_fraction) <= 1.0:
        raise UserError(f"real fraction {real_fraction} is outside [0, 1]")
    return count, size, probs


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"output path {out_dir} exists and is not a folder")
        if os.listdir(out_dir) and not overwrite:
            raise FileExistsError(
                f"output folder {out_dir} is not empty; choose an empty or new folder, or pass --overwrite"
            )


def image_row(spec: ImageSpec, meta: dict) -> dict:
    """The images.csv row of a photo: its plan and its anatomy."""
    return dict(image=spec.name, patient=spec.patient, eye=spec.eye, level=spec.level, true_level=spec.true_level,
                background=spec.background, seed=spec.seed, **meta)


def _write_photos(train: str, specs: list[ImageSpec], size: int, framing: str | None, workers: int,
                  progress: bool) -> tuple[list[dict], list[dict]]:
    """Draw the photos in ``workers`` processes and write each into ``train`` as it comes (atomically);
    returns the rows of lesions.csv and images.csv, in the order of ``specs``."""
    lesion_rows: list[dict] = []
    image_rows: list[dict] = []
    jobs = [(s, size, framing) for s in specs]
    # spawn, not fork: forking a process whose OpenCV / BLAS thread pools are running can deadlock
    with parallel_map(_render_one, jobs, workers, initializer=_worker_init, start_method="spawn",
                      progress=progress, desc="synth") as results:
        for spec, data, records, meta in results:
            write_bytes(os.path.join(train, spec.name + ".jpeg"), data)
            lesion_rows += [dict(image=spec.name, **rec) for rec in records]
            image_rows.append(image_row(spec, meta))
    return lesion_rows, image_rows


def remove_stale_photos(train: str, names: Iterable[str]) -> list[str]:
    """Delete the photos (and temporary files) of this generator in ``train`` that are not one of ``names``:
    overwriting a larger, older set must leave train/ and trainLabels.csv in agreement. Other files stay.
    Returns the names deleted."""
    wanted = {name + ".jpeg" for name in names}
    stale = sorted(f for f in os.listdir(train) if f not in wanted and _PHOTO_NAME.match(f))
    for name in stale:
        os.unlink(os.path.join(train, name))
    return stale


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.4f}"
    return v


def _table(rows: Iterable[dict], columns: Sequence[str]):
    """``rows`` as lists in ``columns``' order, floats with 2 decimals (4 below 1)."""
    return ([_fmt(row[c]) for c in columns] for row in rows)


def dataset_summary(out_dir: str, specs: list[ImageSpec], lesion_rows: list[dict], *, size: int, seed: int,
                    probs, label_noise: float, framing: str | None, real_fraction: float) -> dict:
    """summary.json: the arguments, the count of photos per written grade and of lesions per kind, the paths."""
    levels = np.bincount([s.level for s in specs], minlength=5).tolist()
    kinds: dict[str, int] = {}
    for r in lesion_rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return dict(out_dir=out_dir, count=len(specs), size=size, seed=int(seed), prior=[float(p) for p in probs],
                label_noise=float(label_noise), framing=framing, real_fraction=float(real_fraction),
                levels=levels, lesions=kinds, labels=os.path.join(out_dir, "trainLabels.csv"),
                lesions_csv=os.path.join(out_dir, "lesions.csv"))


def generate_dataset(
    out_dir: str,
    count: int,
    size: int = 1024,
    seed: int = 0,
    prior: str | Sequence[float] = "eyepacs",
    label_noise: float = 0.0,
    workers: int = 1,
    framing: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    real_fraction: float = 0.3,
) -> dict:
    """Write a synthetic data set in the EyePACS (Kaggle 2015) layout.

    ``out_dir/train/<patient>_<left|right>.jpeg``, ``out_dir/lesions.csv`` (one row per lesion drawn),
    ``out_dir/images.csv`` (one row per photo: eye, true and written grade, background, anatomy) and, last and
    atomically, ``out_dir/trainLabels.csv`` (``image,level``). The same arguments give byte-identical files
    whatever ``workers`` is.

    Args:
        out_dir: output folder; must be new or empty unless ``overwrite``.
        count: number of photos.
        size: fundus diameter in pixels (64-4096).
        seed: master seed.
        prior: ``eyepacs`` (paper's Table II), ``balanced`` or five fractions.
        label_noise: probability that the written label moves to an adjacent grade.
        workers: processes drawing photos in parallel.
        framing: ``None`` or ``"eyepacs"`` (see :func:`render_fundus`).
        overwrite: allow a non-empty ``out_dir`` (the files this function writes are replaced).
        progress: show a tqdm progress bar.
        real_fraction: fraction of photos on the real ``skimage`` background.

    Returns:
        A summary dict: count, size, seed, prior, label counts, lesion counts by kind, paths.

    Example:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     summary = generate_dataset(tmp, count=4, size=96, progress=False)
    >>> summary["count"], sum(summary["levels"])
    (4, 4)
    """
    count, size, probs = _check_arguments(count, size, prior, workers, framing, real_fraction)
    out_dir = str(out_dir)
    _check_out_dir(out_dir, overwrite)
    specs = plan_dataset(count, seed=seed, prior=probs, label_noise=label_noise, real_fraction=real_fraction)
    train = os.path.join(out_dir, "train")
    labels_path = os.path.join(out_dir, "trainLabels.csv")
    os.makedirs(train, exist_ok=True)
    if os.path.exists(labels_path):  # overwriting: never leave stale labels beside new photos
        os.unlink(labels_path)
    lesion_rows, image_rows = _write_photos(train, specs, size, framing, workers, progress)
    remove_stale_photos(train, [s.name for s in specs])
    write_csv(os.path.join(out_dir, "lesions.csv"), LESION_COLUMNS, _table(lesion_rows, LESION_COLUMNS))
    write_csv(os.path.join(out_dir, "images.csv"), IMAGE_COLUMNS, _table(image_rows, IMAGE_COLUMNS))
    summary = dataset_summary(out_dir, specs, lesion_rows, size=size, seed=seed, probs=probs,
                              label_noise=label_noise, framing=framing, real_fraction=real_fraction)
    write_json(os.path.join(out_dir, "summary.json"), summary)
    # the labels go last: a folder with trainLabels.csv is complete
    write_csv(labels_path, ("image", "level"), ([s.name, s.level] for s in specs))
    return summary
