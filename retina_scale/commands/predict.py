"""Grade a folder (or CSV list) of fundus photos with an exported model, no server needed.

Runs the export's predict_images signature: the photos are decoded and preprocessed in the graph
exactly as TF Serving would, so batch results and served results agree. The folder is walked lazily
and read batch by batch (memory stays constant whatever its size); a photo that cannot be used gets
its reason in the error column and the run goes on. predictions.csv (image, grade, grade_continuous,
referable, refer_high_sensitivity, refer_high_specificity, error) is written under a temporary name and renamed
into place when the run finishes; a
text cell that a spreadsheet would run as a formula (starting with = + - @, a tab or a carriage
return, e.g. a file named "=cmd|calc.jpeg") is written with a leading apostrophe.

--images takes a folder (searched recursively for .jpg/.jpeg/.png/.tif/.tiff/.bmp files) or a CSV
file whose 'image' column (else its first column) lists photo paths, relative to the CSV's folder.
Only regular files are read (not a FIFO, a device or a link to one), up to a size set by the export's
pixel limit. The content decides the format, as in TF Serving, which gets no file name: a PNG named
.jpeg is graded. TIFF and BMP files are listed so that every photo of the folder has a row, but the
graph decodes JPEG and PNG only (TensorFlow has no TIFF decoder), so their row says so.

With an export of a run with both-eye fusion (``fusion.enabled``: it has ``predict_patient``), photos named
``<patient>_left`` and ``<patient>_right`` in the same folder (as EyePACS names them, e.g. ``10_left.jpeg``) are
graded together, and a ``fusion`` column says with which fellow photo, or why a photo was graded alone by the
single-eye model (one eye only, two photos of the same eye, a name without the eye, a fellow photo that failed):
a photo is never paired with a guess. Rows graded with their fellow leave refer_high_sensitivity and
refer_high_specificity empty (those points belong to the single-eye model).

refer_high_sensitivity and refer_high_specificity say whether the photo is referred at the export's operating
points for referable DR (chosen on validation: sensitivity >= 97.5 %, specificity >= 98 %); they are empty when
the export has no such point (made before operating points existed, or the point was not met), and the command
says so. --tta N averages the grade over N test-time augmentation views of each photo (an export made with
--tta averages its own views already).

Example:
    retina-scale predict --model saved_models/retina --images photos/ --out predictions.csv
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

from retina_scale.utils.console import bar_interval
from retina_scale.utils.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
REFER_COLUMNS = ["refer_high_sensitivity", "refer_high_specificity"]
COLUMNS = ["image", "grade", "grade_continuous", "referable", *REFER_COLUMNS, "error"]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(text: str) -> str:
    """``text`` as a spreadsheet shows it and never runs it: a leading apostrophe before = + - @ tab CR.

    >>> csv_safe("=cmd|' /C calc'!A0.jpeg"), csv_safe("photos/a.jpeg")
    ("'=cmd|' /C calc'!A0.jpeg", 'photos/a.jpeg')
    """
    return "'" + text if text.startswith(_FORMULA_START) else text


def decode_error_reason(message: str, limit: int = 300) -> str:
    """The reason in a TensorFlow error message, without its node names, op names and Python stack.

    >>> decode_error_reason("Graph execution error:\\n\\nDetected at node map/DecodeJpeg defined at (most recent "
    ...     "call last):\\n<stack traces unavailable>\\njpeg::Uncompress failed. Invalid JPEG data or crop window."
    ...     "\\n\\t [[{{node map/DecodeJpeg}}]] [Op:__inference_signature_wrapper_predict_images_12332]")
    'jpeg::Uncompress failed. Invalid JPEG data or crop window.'
    """
    import re

    kept = []
    for line in message.splitlines():
        line = re.sub(r"\{\{(function_)?node [^}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]", "", line).strip()
        if not line or line.startswith(("Graph execution error", "Detected at node", "File ", "Traceback",
                                        "<stack traces unavailable>")):
            continue
        if line.endswith("(most recent call last):"):
            continue
        kept.append(line)
    text = "; ".join(kept) or message.strip().splitlines()[0] if message.strip() else "unknown error"
    return text[:limit]


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="export folder: saved_models/NAME (newest version) or NAME/VERSION")
    parser.add_argument("--images", required=True, help="a folder of photos, or a CSV listing them")
    parser.add_argument("--out", required=True, help="the predictions CSV to write")
    parser.add_argument("--batch-size", type=int, default=16, help="photos per call (default 16)")
    parser.add_argument("--tta", type=int, help="average the grade over N test-time augmentation views "
                        "(default: the export's own, 1 = off)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def resolve_export(path) -> Path:
    """A version folder from ``NAME/VERSION`` or ``NAME`` (its newest version)."""
    from retina_scale.serving.export import list_versions

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    if path.is_dir() and not (path / "saved_model.pb").exists():
        versions = list_versions(path)
        if versions:
            return path / str(versions[-1])
    return path


def _walk(folder: Path):
    """Image files under ``folder``, lazily (os.scandir; one directory's iterator open per depth)."""
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = os.scandir(current)
        except OSError as err:
            yield current, f"cannot list folder ({err.strerror})"
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    yield Path(entry.path), None


def _from_csv(csv_file: Path):
    with open(csv_file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise UserError(f"{csv_file} is empty; expected a CSV with an 'image' column of photo paths")
        column = header.index("image") if "image" in header else 0
        for row in reader:
            if len(row) > column and row[column].strip():
                p = Path(row[column].strip())
                yield (p if p.is_absolute() else csv_file.parent / p), None


def list_images(images):
    """A generator of ``(path, error or None)`` and the number of entries (a cheap first pass)."""
    images = Path(images)
    if not images.exists():
        raise FileNotFoundError(f"--images {images} does not exist")
    if images.is_dir():
        source = lambda: _walk(images)  # noqa: E731
    elif images.suffix.lower() == ".csv":
        source = lambda: _from_csv(images)  # noqa: E731
    else:
        raise UserError(f"--images must be a folder of photos or a .csv file listing them; got {images}")
    total = sum(1 for _ in source())
    return source(), total


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def max_file_bytes(meta: dict) -> int:
    """The largest file read for an export: from the pixel limit its graph applies (its record's
    ``max_pixels``, else the default)."""
    from retina_scale.config import MAX_PIXELS
    from retina_scale.data.fundus import file_size_limit

    record = meta.get("preprocessing")
    limit = record.get("max_pixels", MAX_PIXELS) if isinstance(record, dict) else MAX_PIXELS
    return file_size_limit(limit if isinstance(limit, int) else MAX_PIXELS)


def _read(path, max_bytes: int):
    """``(bytes, None)`` or ``(None, reason)``: only a regular file of at most ``max_bytes`` is read."""
    from retina_scale.data.fundus import BadImage, read_image_file

    try:
        return read_image_file(path, max_bytes), None
    except BadImage as err:
        return None, str(err)
    except OSError as err:
        return None, f"cannot read file ({err.strerror or err})"


def predict_rows(predict, batch, max_bytes: int | None = None):
    """Rows for one batch of ``(path, error)``: reads the files (regular files of at most ``max_bytes``,
    default the default pixel limit's), calls the signature.

    When the whole call fails (a photo corrupt beyond what the graph's header checks catch, or out of memory
    with an export made before the graph had a pixel limit), each photo is retried alone so only the bad one
    gets an error row.
    """
    import tensorflow as tf

    max_bytes = max_file_bytes({}) if max_bytes is None else max_bytes
    rows, data, where = [], [], []
    for path, error in batch:
        row = {"image": str(path), "grade": "", "grade_continuous": "", "referable": "",
               **dict.fromkeys(REFER_COLUMNS, ""), "error": error or ""}
        if not error:
            payload, row["error"] = _read(path, max_bytes)
            if payload is not None:
                data.append(payload)
                where.append(len(rows))
                row["error"] = ""
        rows.append(row)
    if not data:
        return rows

    def fill(indices, payload):
        out = {k: v.numpy() for k, v in predict(images=tf.constant(payload)).items()}
        refer = [name for name in REFER_COLUMNS if name in out]  # an export without the point: left empty
        for j, i in enumerate(indices):
            if out["error"][j]:
                rows[i]["error"] = out["error"][j].decode("utf-8", "replace")
            else:
                rows[i].update(grade=int(out["grade"][j]), grade_continuous=f"{float(out['grade_continuous'][j]):.6f}",
                               referable=int(bool(out["referable"][j])),
                               **{name: int(bool(out[name][j])) for name in refer})

    failures = (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError)
    try:
        fill(where, data)
    except failures:
        for i, payload in zip(where, data):
            try:
                fill([i], [payload])
            except failures as err:
                rows[i]["error"] = "cannot decode: " + decode_error_reason(err.message)
    return rows


def load_predictor(export: Path, tta: int | None):
    """``(predict_images, metadata, views averaged)``: the export's own signature, or, with ``tta`` views asked
    of an export without TTA, its ``predict_images`` rebuilt in this process on its weights with those views."""
    from retina_scale.serving.export import load_export, predict_images_function

    predict, meta = load_export(export, signature="predict_images")
    baked = (meta.get("tta") or {}).get("draws", 1)
    if tta is None or tta == baked:
        return predict, meta, baked
    if baked > 1:
        raise UserError(f"export {export} averages {baked} test-time augmentation views already (it was made "
                        f"with --tta {baked}); leave out --tta, or give an export made without it")
    if meta.get("fusion"):
        raise UserError(f"export {export} grades both eyes together (predict_patient) with its own {baked} view(s); "
                        "leave out --tta")
    from retina_scale.evidence.explain import load_export_model

    return predict_images_function(load_export_model(export).model, meta, tta), meta, tta


def empty_refer_columns(meta: dict) -> dict[str, str]:
    """``{refer_* column: why it is empty}`` for an export's predictions: the columns it has no point for."""
    points = meta.get("operating_points")
    if not points:
        why = (f"the export ({meta.get('model_name')} version {meta.get('version')}) records no operating points "
               "(made before they existed)")
        return dict.fromkeys(REFER_COLUMNS, why)
    out = {}
    for column in REFER_COLUMNS:
        point = points["points"].get(column[len("refer_"):]) or {}
        if not point.get("met"):
            out[column] = f"operating point {column[len('refer_'):]} was not met on validation ({point.get('reason')})"
    return out


# ------------------------------------------------------------------------------------ both-eye fusion
FUSION_COLUMN = "fusion"
"""With an export that has ``predict_patient``: how the row was graded (with which fellow photo, or why alone)."""


def pair_by_name(items: list) -> tuple[list[tuple[int, int]], list[str]]:
    """The photos of ``items`` (``(path, error)``) that pair as one patient's left and right eye by file name
    (``<patient>_left`` / ``<patient>_right``, as EyePACS names them, in the same folder): ``(pairs of indices
    (left, right), the reason each other photo is graded alone)`` (``data.sources.pair_eyes``)."""
    from retina_scale.data.sources import pair_eyes, parse_patient_eye

    keys = [parse_patient_eye(Path(path).stem) for path, _ in items]
    patients = [f"{Path(path).parent}/{patient}" for (path, _), (patient, _) in zip(items, keys)]
    fellow, reasons = pair_eyes(patients, [eye for _, eye in keys])
    pairs = [(i, int(j)) for i, j in enumerate(fellow) if j > i]
    pairs = [(i, j) if keys[i][1] == "left" else (j, i) for i, j in pairs]
    return pairs, reasons


def predict_pair_rows(predict_patient, items: list, pairs: list, max_bytes: int) -> dict[int, dict]:
    """``{index: row}`` of the paired photos, graded by ``predict_patient`` (a photo that cannot be read goes in
    empty: its row has the read error, its fellow the single-eye grade)."""
    import tensorflow as tf

    rows, payload = {}, {}
    for i in {k for pair in pairs for k in pair}:
        path, error = items[i]
        data, read_error = (None, error) if error else _read(path, max_bytes)
        payload[i] = data or b""
        rows[i] = {"image": str(path), "grade": "", "grade_continuous": "", "referable": "",
                   **dict.fromkeys(REFER_COLUMNS, ""), "error": read_error or ""}
    def fill(batch):
        out = predict_patient(left=tf.constant([payload[i] for i, _ in batch]),
                              right=tf.constant([payload[j] for _, j in batch]))
        out = {k: v.numpy() for k, v in out.items()}
        for b, pair in enumerate(batch):
            for eye, i, other in (("left", pair[0], pair[1]), ("right", pair[1], pair[0])):
                _fill_eye(rows[i], out, eye, b, items[other][0])

    failures = (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError)
    for batch in _batches(pairs, 16):
        try:
            fill(batch)
        except failures:  # a photo corrupt beyond the header checks: each pair alone, so only its rows say so
            for pair in batch:
                try:
                    fill([pair])
                except failures as err:
                    for i in pair:
                        rows[i].update(error="cannot decode (this photo or its fellow): "
                                       + decode_error_reason(err.message), **{FUSION_COLUMN: ""})
    return rows


def _fill_eye(row: dict, out: dict, eye: str, b: int, fellow) -> None:
    if not out[f"{eye}_valid"][b]:
        row["error"] = row["error"] or out[f"{eye}_error"][b].decode("utf-8", "replace")
        row[FUSION_COLUMN] = ""
        return
    row.update(grade=int(out[f"{eye}_grade"][b]), grade_continuous=f"{float(out[f'{eye}_grade_continuous'][b]):.6f}",
               referable=int(bool(out[f"{eye}_referable"][b])))
    row[FUSION_COLUMN] = (f"with {fellow}" if out[f"{eye}_fused"][b]
                          else "single eye: the fellow photo failed")


def fusion_rows(export: Path, predict, items: list, max_bytes: int):
    """Every row of ``items`` with an export that has ``predict_patient``: pairs by file name through it, the other
    photos through ``predict`` (``predict_images``) with the reason in the ``fusion`` column."""
    from retina_scale.serving.export import load_export

    predict_patient, _ = load_export(export, signature="predict_patient")
    pairs, reasons = pair_by_name(items)
    paired = predict_pair_rows(predict_patient, items, pairs, max_bytes)
    alone = [i for i in range(len(items)) if i not in paired]
    for batch in _batches(alone, 16):
        for i, row in zip(batch, predict_rows(predict, [items[i] for i in batch], max_bytes)):
            paired[i] = {**row, FUSION_COLUMN: "" if row["error"] else f"single eye: {reasons[i]}"}
    for i in range(len(items)):
        yield paired[i]


def run(args) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer; got {args.batch_size}")
    if args.tta is not None:
        from retina_scale.data.tta import check_draws

        check_draws(args.tta, "--tta")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of --out {out} does not exist")
    items, total = list_images(args.images)
    from tqdm import tqdm

    from retina_scale.utils.fileio import atomic_path

    export = resolve_export(args.model)
    predict, meta, draws = load_predictor(export, args.tta)
    fusion = bool(meta.get("fusion"))  # an export with predict_patient: photos paired by file name
    counts = {"images": 0, "errors": 0, "referable": 0, **dict.fromkeys(REFER_COLUMNS, 0)}
    start = time.perf_counter()
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + [FUSION_COLUMN] * fusion)
        writer.writeheader()
        with tqdm(total=total, unit="img", desc="predict", file=sys.stderr, mininterval=bar_interval()) as bar:
            max_bytes = max_file_bytes(meta)
            rows = (fusion_rows(export, predict, list(items), max_bytes) if fusion else
                    (row for batch in _batches(items, args.batch_size) for row in predict_rows(predict, batch, max_bytes)))
            for row in rows:
                writer.writerow({**row, "image": csv_safe(row["image"]), "error": csv_safe(row["error"])})
                counts["images"] += 1
                counts["errors"] += bool(row["error"])
                for column in ("referable", *REFER_COLUMNS):
                    counts[column] += row[column] == 1
                bar.update(1)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    summary = {**counts, "out": str(out), "model": str(export), "stage": meta.get("stage"), "tta": draws,
               "seconds": round(seconds, 2), "images_per_second": round(counts["images"] / seconds, 2) if seconds else None,
               "empty_columns": empty_refer_columns(meta)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{counts['images']} photos graded with {export} ({meta.get('stage')}, {meta.get('input_size')} px"
              f"{f', mean of {draws} test-time augmentation views' if draws > 1 else ''}) in {seconds:.1f} s; "
              f"{counts['referable']} referable, {counts['errors']} with errors -> {out}")
        empty = summary["empty_columns"]
        present = [c for c in REFER_COLUMNS if c not in empty]
        if present:
            print("Referred at the operating points: " + ", ".join(f"{c[len('refer_'):]} {counts[c]}" for c in present))
        for why in dict.fromkeys(empty.values()):  # one line per reason
            print(f"{' and '.join(c for c in empty if empty[c] == why)} empty: {why}")
    return 0
