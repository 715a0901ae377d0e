"""Readers for the fundus data sets users hold, and patient-level splits.

Four layouts are understood, all producing the same :class:`Record`:

- ``eyepacs``: EyePACS / Kaggle 2015, a folder of ``<patient>_<left|right>.jpeg`` and a ``trainLabels.csv``
  with columns ``image,level``.
- ``aptos``: APTOS 2019, a ``train.csv`` with ``id_code,diagnosis`` and ``<id_code>.png`` files (in the data
  folder or its ``train_images/`` sub-folder).
- ``folders``: one sub-folder per grade (``0/ 1/ 2/ 3/ 4/``) holding the images.
- ``csv``: any CSV, with the image column and the label column named by the user.

Readers never raise on a bad row: a label that is not a grade, a duplicate image id, an id that points outside
the data folder (``..``, an absolute path, or a file or folder whose symbolic link leads out: every path is
resolved to its real path and must lie inside the data folder's real path, in every layout) or a missing
file becomes a :class:`Failure` (image, reason) that ``retina-scale prepare`` writes to ``failures.csv``. A labels file that cannot be read at all (wrong encoding, missing columns) is a
user error for the whole command and raises ``ValueError`` with one line.

Example:

```python
from retina_scale.data.sources import read_dataset, split_by_patient, write_splits
ds = read_dataset("data/eyepacs/train")            # format detected from trainLabels.csv
splits = split_by_patient(ds.records, val_fraction=0.1, test_fraction=0.1, seed=0)
write_splits(splits, ds.records, "runs/exp1/splits.csv")
```
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from retina_scale.config import FORMATS, GRADES, SPLIT_NAMES
from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import write_csv

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")

_EYE_RE = re.compile(r"^(?P<patient>.+?)[_\-.](?P<eye>left|right|l|r|od|os)$", re.IGNORECASE)
_EYE_NAMES = {"left": "left", "l": "left", "os": "left", "right": "right", "r": "right", "od": "right"}


@dataclasses.dataclass(frozen=True)
class Record:
    """One usable image of a data set.

    Args:
        image_id: the data set's id of the image (``10_left``; for the generic CSV, the cell as written).
        path: absolute path of the image file.
        label: DR grade 0-4, or ``None`` for unlabelled images.
        patient: patient id; both eyes of a patient share it. Falls back to ``image_id`` when the naming
            does not tell.
        eye: ``"left"``, ``"right"`` or ``None`` when unknown.
    """

    image_id: str
    path: str
    label: int | None
    patient: str
    eye: str | None = None


@dataclasses.dataclass(frozen=True)
class Failure:
    """An image that cannot be used, with a one-line reason."""

    image: str
    reason: str


@dataclasses.dataclass
class Dataset:
    """What a reader found: usable records, refused images, and the layout that was read."""

    records: list[Record]
    failures: list[Failure]
    format: str
    root: str


def parse_patient_eye(stem: str) -> tuple[str, str | None]:
    """Split an image name such as ``10_left`` into (``"10"``, ``"left"``); unknown eye gives (stem, None)."""
    m = _EYE_RE.match(stem)
    if not m:
        return stem, None
    return m.group("patient"), _EYE_NAMES[m.group("eye").lower()]


def parse_label(value) -> tuple[int | None, str | None]:
    """Return (grade, None) for a valid grade 0-4, else (None, reason)."""
    text = str(value).strip()
    if text == "" or text.lower() == "nan":
        return None, "label is empty (accepted: integers 0-4)"
    try:
        number = float(text)
    except ValueError:
        return None, f"label {text!r} is not a number (accepted: integers 0-4)"
    if not math.isfinite(number) or number != int(number):
        return None, f"label {text!r} is not an integer grade (accepted: integers 0-4)"
    grade = int(number)
    if grade not in GRADES:
        return None, f"label {grade} is outside 0-4"
    return grade, None


def read_csv_rows(path: str | os.PathLike, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Read a labels CSV as UTF-8 text, checking that ``required`` columns exist.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not UTF-8 text, or lacks one of the columns (message names both sets).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"labels file {path} is not UTF-8 text (byte {exc.start} is invalid); save it as UTF-8 CSV"
        ) from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(
            f"labels file {path} lacks column(s) {', '.join(missing)}; it has: "
            f"{', '.join(columns) or '(none)'}; expected: {', '.join(required)}"
        )
    rows = []
    for row in reader:
        rows.append({(k or "").strip(): (v if v is not None else "") for k, v in row.items()})
    return rows


def _resolve_inside(root: Path, name: str) -> tuple[Path | None, str | None]:
    """Resolve ``name`` under ``root``; refuse absolute paths and anything escaping the folder."""
    if name.strip() == "":
        return None, "image id is empty"
    if os.path.isabs(name) or re.match(r"^[A-Za-z]:[\\/]", name) or name.startswith("\\"):
        return None, "image id is an absolute path (refused: ids must be relative to the data folder)"
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        return None, "image id points outside the data folder (refused: '..' in the path)"
    candidate = (root / name).resolve()
    if not _inside(candidate, root):
        return None, LINK_LEADS_OUT
    return candidate, None


LINK_LEADS_OUT = "image id points outside the data folder (refused: link leads out)"


def _inside(path: Path, root: Path) -> bool:
    """Whether the real path of ``path`` (every symbolic link followed) lies inside the real path of ``root``."""
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
    except ValueError:
        return False
    return True


def _find_file(root: Path, name: str, extensions: tuple[str, ...], confine: Path | None = None):
    """``(path, None)`` for the file ``name`` names under ``root`` (trying ``extensions``), or ``(None, reason)``.

    The file found is resolved once more and must lie inside ``confine`` (default ``root``): ``name`` itself
    may stay inside while ``name + ".jpeg"`` is a link that leads out.
    """
    path, reason = _resolve_inside(root, name)
    if reason:
        return None, reason
    found = None
    if Path(name).suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
        found = path
    for ext in extensions:
        p = path.with_name(path.name + ext)
        if found is None and p.is_file():
            found = p
    if found is None and path.is_file():
        found = path
    if found is None:
        tried = ", ".join(path.name + e for e in extensions) if extensions else path.name
        return None, f"file not found (looked for {tried} in {path.parent})"
    if not _inside(found, confine or root):
        return None, LINK_LEADS_OUT
    return Path(os.path.realpath(found)), None


def _records_from_rows(rows, root: Path, image_col: str, label_col: str, extensions, search_dirs=()):
    records: list[Record] = []
    failures: list[Failure] = []
    first_row: dict[str, int] = {}
    first_label: dict[str, int | None] = {}
    conflicted: set[str] = set()
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        image = (row.get(image_col) or "").strip()
        grade, reason = parse_label(row.get(label_col, ""))
        if reason:
            failures.append(Failure(image or f"<row {i}>", f"{reason} (row {i})"))
            continue
        if image in first_row:
            if first_label[image] != grade:
                conflicted.add(image)
                failures.append(Failure(image, f"duplicate image id with a different label (rows {first_row[image]} and {i}); all copies refused"))
            else:
                failures.append(Failure(image, f"duplicate image id (row {i} repeats row {first_row[image]}); first kept"))
            continue
        first_row[image] = i
        first_label[image] = grade
        path, reason = _find_file(root, image, extensions)
        if path is None and "refused" not in reason:
            for extra in search_dirs:
                found, why = _find_file(root / extra, image, extensions, confine=root)
                if found is not None or "refused" in why:
                    path, reason = found, (why if found is None else None)
                    break
        if path is None:
            failures.append(Failure(image, reason))
            continue
        stem = Path(image).name
        for ext in IMAGE_EXTENSIONS:
            if stem.lower().endswith(ext):
                stem = stem[: -len(ext)]
        patient, eye = parse_patient_eye(stem)
        records.append(Record(image, str(path), grade, patient, eye))
    if conflicted:
        records = [r for r in records if r.image_id not in conflicted]
    return records, failures


def read_eyepacs(data_dir, labels=None) -> Dataset:
    """EyePACS / Kaggle 2015: ``<id>_<left|right>.jpeg`` files and ``trainLabels.csv`` (``image,level``), the
    images in ``data_dir`` or its ``train/`` folder, the labels in ``data_dir`` or beside it."""
    root = Path(data_dir)
    labels = Path(labels) if labels else _first_existing(root / "trainLabels.csv", root.parent / "trainLabels.csv")
    rows = read_csv_rows(labels, ("image", "level"))
    # Kaggle's download (and `retina-scale synth`) is trainLabels.csv beside a train/ folder: accept either.
    records, failures = _records_from_rows(rows, root, "image", "level", (".jpeg", ".jpg", ".png"),
                                           search_dirs=("train",))
    return Dataset(records, failures, "eyepacs", str(root))


def read_aptos(data_dir, labels=None) -> Dataset:
    """APTOS 2019: ``train.csv`` (``id_code,diagnosis``) and ``<id_code>.png`` in the folder or ``train_images/``."""
    root = Path(data_dir)
    labels = Path(labels) if labels else _first_existing(root / "train.csv", root.parent / "train.csv")
    rows = read_csv_rows(labels, ("id_code", "diagnosis"))
    records, failures = _records_from_rows(
        rows, root, "id_code", "diagnosis", (".png", ".jpg", ".jpeg"), search_dirs=("train_images",)
    )
    # APTOS names carry no patient: every image is its own patient.
    return Dataset(records, failures, "aptos", str(root))


def read_folders(data_dir) -> Dataset:
    """One sub-folder per grade: ``DIR/0/*.jpeg ... DIR/4/*.jpeg``. Other sub-folders are refused per image."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    records, failures, seen = [], [], {}
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not subdirs:
        raise UserError(f"data folder {root} has no sub-folders; expected one per grade: 0, 1, 2, 3, 4")
    for sub in subdirs:
        grade, reason = parse_label(sub.name)
        for f in sorted(sub.iterdir()):
            if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            image = f"{sub.name}/{f.name}"
            if reason:
                failures.append(Failure(image, f"folder {reason}"))
                continue
            if not _inside(f, root):  # the file, or its grade folder, is a link that leads out
                failures.append(Failure(image, LINK_LEADS_OUT))
                continue
            stem = f.stem
            if stem in seen:
                failures.append(Failure(image, f"duplicate image id {stem!r} (also {seen[stem]}); first kept"))
                continue
            seen[stem] = image
            patient, eye = parse_patient_eye(stem)
            records.append(Record(stem, str(f.resolve()), grade, patient, eye))
    return Dataset(records, failures, "folders", str(root))


def read_generic_csv(data_dir, labels, image_col: str, label_col: str) -> Dataset:
    """A CSV naming the image column and the label column; image cells are paths relative to the folder."""
    if not labels:
        raise UserError("--format csv needs --labels CSV")
    if not image_col or not label_col:
        raise UserError("--format csv needs --image-col and --label-col")
    root = Path(data_dir)
    rows = read_csv_rows(labels, (image_col, label_col))
    records, failures = _records_from_rows(rows, root, image_col, label_col, IMAGE_EXTENSIONS)
    return Dataset(records, failures, "csv", str(root))


def _first_existing(*paths: Path) -> Path:
    for p in paths:
        if p.is_file():
            return p
    return paths[0]


def detect_format(data_dir, labels=None, image_col=None) -> str:
    """Guess the layout: ``eyepacs`` / ``aptos`` from their labels files, ``csv`` when a column is named,
    ``folders`` when the sub-folders are grades."""
    root = Path(data_dir)
    if image_col:
        return "csv"
    name = Path(labels).name if labels else None
    # Kaggle's layouts keep the labels file in the data folder or beside it (train/ + trainLabels.csv).
    near = lambda f: (root / f).is_file() or (root.parent / f).is_file()  # noqa: E731
    if name == "trainLabels.csv" or (not labels and near("trainLabels.csv")):
        return "eyepacs"
    if name == "train.csv" or (not labels and near("train.csv")):
        return "aptos"
    if labels:
        head = Path(labels).read_bytes()[:4096].decode("utf-8", "replace").splitlines()[:1]
        cols = [c.strip() for c in head[0].split(",")] if head else []
        if "image" in cols and "level" in cols:
            return "eyepacs"
        if "id_code" in cols and "diagnosis" in cols:
            return "aptos"
    if root.is_dir() and any(p.is_dir() and p.name in {"0", "1", "2", "3", "4"} for p in root.iterdir()):
        return "folders"
    raise UserError(
        f"cannot tell the layout of {root}; pass --format with one of: {', '.join(FORMATS)}"
    )


def read_dataset(data_dir, labels=None, format: str | None = None, image_col=None, label_col=None) -> Dataset:
    """Read any supported layout (see the module docstring); ``format=None`` detects it."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    fmt = format or detect_format(root, labels, image_col)
    if fmt == "eyepacs":
        return read_eyepacs(root, labels)
    if fmt == "aptos":
        return read_aptos(root, labels)
    if fmt == "folders":
        return read_folders(root)
    if fmt == "csv":
        return read_generic_csv(root, labels, image_col, label_col)
    raise UserError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------- splits


def split_by_patient(
    records: list[Record], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, str]:
    """Assign every image to ``train``/``val``/``test`` by patient, stratified by the patient's worst grade.

    Both eyes of a patient always land in the same split. Within each stratum the patients are shuffled with
    ``seed`` and cut by the fractions (rounded to whole patients), so each split holds about the data set's
    grade distribution.

    Returns:
        ``{image_id: split}``.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_patient[r.patient].append(r)
    strata: dict[int, list[str]] = defaultdict(list)
    for patient, recs in by_patient.items():
        grades = [r.label for r in recs if r.label is not None]
        strata[max(grades) if grades else -1].append(patient)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for grade in sorted(strata):
        patients = sorted(strata[grade])
        rng.shuffle(patients)
        n = len(patients)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        for j, p in enumerate(patients):
            split = "test" if j < n_test else "val" if j < n_test + n_val else "train"
            for r in by_patient[p]:
                assignment[r.image_id] = split
    return assignment


def write_splits(splits: dict[str, str], records: list[Record], path) -> Path:
    """Write ``image,patient,eye,label,split`` to ``path`` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [[r.image_id, r.patient, r.eye or "", "" if r.label is None else r.label, splits[r.image_id]]
            for r in records if r.image_id in splits]
    write_csv(path, ["image", "patient", "eye", "label", "split"], rows)
    return path


def read_splits(path) -> dict[str, str]:
    """Read a split file written by :func:`write_splits`: ``{image_id: split}``."""
    rows = read_csv_rows(path, ("image", "split"))
    out = {}
    for row in rows:
        split = row["split"].strip()
        if split not in SPLIT_NAMES:
            raise UserError(f"split file {path}: split {split!r} for {row['image']!r}; accepted: {', '.join(SPLIT_NAMES)}")
        out[row["image"].strip()] = split
    return out


def ensure_splits(path, records: list[Record], val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0) -> dict[str, str]:
    """The run's split: read the split file ``path`` (a run's ``splits.csv``, see ``RunLayout.splits``) when
    it exists (a resumed or repeated run), else make it with :func:`split_by_patient` and write it there.

    Raises:
        ValueError: the existing file does not cover the records, or puts a patient's images in two splits.
    """
    path = Path(path)
    if path.is_file():
        splits = read_splits(path)
        missing = [r.image_id for r in records if r.image_id not in splits]
        if missing:
            raise UserError(
                f"split file {path} has no split for {len(missing)} image(s) (first: {missing[0]}); "
                "remove it to make a new split, or pass the records it was made for"
            )
        seen: dict[str, str] = {}
        for r in records:
            if seen.setdefault(r.patient, splits[r.image_id]) != splits[r.image_id]:
                raise UserError(f"split file {path} puts patient {r.patient!r} in two splits")
        return {r.image_id: splits[r.image_id] for r in records}
    splits = split_by_patient(records, val_fraction, test_fraction, seed)
    write_splits(splits, records, path)
    return splits


# -------------------------------------------------------------------------------- both eyes of a patient
PAIRED = ""
ONE_EYE = "one eye only"
SAME_EYE = "two photos of the same eye"
UNKNOWN_EYE = "eye not known"
"""Why a photo has no fellow (:func:`pair_eyes`); ``PAIRED`` (empty): it has one."""


def pair_eyes(patients, eyes) -> tuple[np.ndarray, list[str]]:
    """Each photo's fellow: the index of the other eye's photo of the same patient, or -1, with the reason.

    A photo is paired only when its patient has exactly one photo of each eye (``left`` and ``right``) among
    those given; otherwise its reason says why not (every photo of a patient with two photos of one eye: that
    eye's and the other eye's, whose fellow would be a guess).

    >>> fellow, why = pair_eyes(["1", "1", "2", "3", "3", "4"], ["left", "right", "left", "left", "left", None])
    >>> fellow.tolist(), why
    ([1, 0, -1, -1, -1, -1], ['', '', 'one eye only', 'two photos of the same eye', 'two photos of the same eye', \
'eye not known'])
    """
    by_patient: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        by_patient.setdefault(str(patient), []).append(i)
    fellow = np.full(len(eyes), -1, np.int64)
    reasons = [ONE_EYE] * len(eyes)
    for members in by_patient.values():
        seen = Counter(eyes[i] for i in members)
        doubled = seen["left"] > 1 or seen["right"] > 1  # which photo is the fellow? none is sure
        for i in members:
            if eyes[i] not in ("left", "right"):
                reasons[i] = UNKNOWN_EYE
            elif doubled:
                reasons[i] = SAME_EYE
        if len(members) == 2 and seen["left"] == 1 and seen["right"] == 1:
            fellow[members[0]], fellow[members[1]] = members[1], members[0]
            reasons[members[0]] = reasons[members[1]] = PAIRED
    return fellow, reasons
