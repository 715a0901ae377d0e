"""The per-scale image cache that ``retina-scale prepare`` writes and the training input reads.

Layout of a cache folder::

    CACHE/cache.json          sizes, preprocessing, colour PCA of the data (for colour augmentation)
    CACHE/manifest.csv        one row per usable image: image, key, label, patient, eye, source, disc, and per
                              size the file's byte count and CRC-32 (bytes_224, crc_224, ...)
    CACHE/failures.csv        image,reason: every image that could not be used, this run
    CACHE/<size>/<key>.jpg    uint8 RGB squares: JPEG quality 95 (default) or lossless PNG (``.png``)

Every file is written under a temporary name and renamed into place, so an interrupted run leaves no half
file behind. While it runs, each finished image is appended to ``CACHE/.journal.jsonl`` with the preprocessing
and file format that made it; the next run reads the manifest and the journal and skips an image when its
source file is unchanged and every requested size is present with the recorded byte count (and, with
``verify=True``, the recorded CRC-32). Anything else is remade: a deleted, truncated or (with ``verify``)
altered output is repaired. A cache keeps the preprocessing it was started with, finished or not: a rerun with
other options after an interrupted run is refused with one line (``cache.json``, written at the end, cannot
tell, so the journal does).

Per-image files rather than TFRecord shards: resuming and repairing work per image and tf.data reads them in
parallel. JPEG at quality 95 by default: at 896 px it encodes 20x and decodes 5x faster than PNG and takes a
fifth of the space, for a mean error under one grey level (README, "Data"); ``image_format="png"`` is lossless.

Example:

```python
from retina_scale.data.sources import read_dataset
from retina_scale.data.cache import prepare_cache
result = prepare_cache(read_dataset("data/eyepacs"), "cache/eyepacs", sizes=(112, 224, 448, 896), workers=2)
print(result.summary())
```
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from retina_scale.config import PreprocessConfig
from retina_scale.data.fundus import BadImage
from retina_scale.data.sources import Dataset, Failure, Record
from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import write_bytes, write_csv, write_json
from retina_scale.utils.locking import locked_folder
from retina_scale.utils.parallel import parallel_map, worker_count

CACHE_VERSION = 1
MANIFEST = "manifest.csv"
FAILURES = "failures.csv"
CONFIG = "cache.json"
IMAGE_FORMATS = {"jpeg": ".jpg", "png": ".png"}
JOURNAL = ".journal.jsonl"
BASE_COLUMNS = ["image", "key", "label", "patient", "eye", "source", "source_bytes", "source_mtime_ns",
                "disc_cx", "disc_cy", "disc_r", "width", "height"]


def parse_sizes(text) -> tuple[int, ...]:
    """``"112,224"`` -> ``(112, 224)``; each size an integer from 16 to 4096."""
    items = text.split(",") if isinstance(text, str) else list(text)
    sizes = []
    for item in items:
        try:
            s = int(str(item).strip())
        except ValueError:
            raise UserError(f"--sizes must be comma-separated integers such as 112,224,448,896; got {text!r}") from None
        if not 16 <= s <= 4096:
            raise UserError(f"each size must be between 16 and 4096 px; got {s}")
        sizes.append(s)
    if not sizes:
        raise UserError("--sizes is empty; give e.g. 112,224,448,896")
    return tuple(sorted(set(sizes)))


def cache_key(image_id: str) -> str:
    """A file-name-safe, unique key for an image id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._") or "img"
    if safe != image_id:
        safe = f"{safe}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"
    return safe


@dataclasses.dataclass
class PrepareResult:
    """Counts of one ``prepare`` run and where its files are."""

    prepared: int
    skipped: int
    failed: int
    failures: list[Failure]
    out: Path

    def summary(self) -> str:
        return (f"prepared {self.prepared}, skipped {self.skipped} (already cached), failed {self.failed}"
                f"{' (see ' + str(self.out / FAILURES) + ')' if self.failed else ''}; cache: {self.out}")


# ---------------------------------------------------------------------------------------------- worker

def _init_worker():
    import cv2

    cv2.setNumThreads(1)


def _process(task: dict) -> dict:
    """Make the needed sizes of one image; runs in a worker process. Never raises for a bad image."""
    import cv2

    from retina_scale.data.fundus import preprocess_file

    out = {"image": task["image"]}
    try:
        config = PreprocessConfig(**task["config"])
        result = preprocess_file(task["path"], task["sizes"], config)
    except BadImage as exc:
        out["reason"] = str(exc)
        return out
    except FileNotFoundError:
        out["reason"] = "file not found"
        return out
    except OSError as exc:
        out["reason"] = f"cannot read the file ({exc.strerror or exc})"
        return out
    except Exception as exc:  # a bug or an exotic file: report it, do not kill the run
        out["reason"] = f"preprocessing failed ({type(exc).__name__}: {exc})"
        return out
    files = {}
    for size, rgb in result.images.items():
        if task["image_format"] == "png":
            params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
        else:
            params = [cv2.IMWRITE_JPEG_QUALITY, 95]
        ext = IMAGE_FORMATS[task["image_format"]]
        ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
        if not ok:
            out["reason"] = f"cannot encode the {size} px image"
            return out
        data = buf.tobytes()
        folder = Path(task["out"]) / str(size)
        write_bytes(folder / f"{task['key']}{ext}", data)
        files[str(size)] = [len(data), zlib.crc32(data)]
    d = result.disc
    out.update(files=files, disc=[round(d.cx, 2), round(d.cy, 2), round(d.r, 2)],
               width=result.info.width, height=result.info.height)
    return out


# ------------------------------------------------------------------------------------------ the cache

def _made_with(config: PreprocessConfig, image_format: str) -> dict:
    """What a journal entry records about how its files were made."""
    return {"preprocess": config.as_dict(), "image_format": image_format}


def _check_journal(entries: list[dict], made_with: dict, trusted: bool, out: Path) -> list[dict]:
    """The journal ``entries`` made as this run makes them (see :func:`_read_state`).

    Raises:
        UserError: an interrupted run made some entries with other preprocessing or another file format.
    """
    kept, other = [], []
    for entry in entries:
        record = {k: entry[k] for k in made_with if k in entry}
        if record == made_with or (not record and trusted):
            kept.append(entry)
        elif record:
            other.append(record)
    if other:
        raise UserError(
            f"cache {out} holds {len(other)} image(s) from an interrupted run made with {other[0]}, not "
            f"{made_with}; rerun with the same options to finish it, or use another --out"
        )
    return kept


def _read_state(out: Path, made_with: dict | None = None) -> dict[str, dict]:
    """Previous runs' entries: manifest rows, then journal lines (later wins).

    With ``made_with`` (what :func:`_made_with` returns for this run), journal entries made otherwise by an
    interrupted run are refused (UserError), and entries that record nothing (written before journals
    recorded it) are used only when ``cache.json`` exists, i.e. when the run that wrote them was checked
    against it; otherwise they are remade.
    """
    state: dict[str, dict] = {}
    manifest = out / MANIFEST
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                files = {}
                for col, value in row.items():
                    if col.startswith("bytes_") and value:
                        size = col[len("bytes_"):]
                        files[size] = [int(value), int(row.get(f"crc_{size}") or 0)]
                state[row["image"]] = {
                    "source": row["source"], "source_bytes": int(row["source_bytes"]),
                    "source_mtime_ns": int(row["source_mtime_ns"]), "files": files,
                    "disc": [float(row["disc_cx"]), float(row["disc_cy"]), float(row["disc_r"])],
                    "width": int(row["width"]), "height": int(row["height"]),
                }
    journal = out / JOURNAL
    entries = []
    if journal.is_file():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by an interruption
    if made_with is not None:
        entries = _check_journal(entries, made_with, (out / CONFIG).is_file(), out)
    for entry in entries:
        prev = state.get(entry["image"])
        if prev and prev["source"] == entry["source"] and prev["source_mtime_ns"] == entry["source_mtime_ns"]:
            prev["files"].update(entry["files"])
            entry = {**entry, "files": prev["files"]}
        state[entry["image"]] = entry
    return state


def _check_config(out: Path, sizes, config: PreprocessConfig, image_format: str) -> dict:
    path = out / CONFIG
    wanted = config.as_dict()
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if existing.get("preprocess") != wanted:
            raise FileExistsError(
                f"cache {out} was prepared with preprocessing {existing.get('preprocess')}, not {wanted}; "
                "use another --out or the same options"
            )
        if existing.get("image_format") != image_format:
            raise FileExistsError(
                f"cache {out} holds {existing.get('image_format')} files, not {image_format}; "
                "use another --out or the same --image-format"
            )
        existing["sizes"] = sorted(set(existing.get("sizes", [])) | set(sizes))
        return existing
    return {"version": CACHE_VERSION, "sizes": sorted(sizes), "preprocess": wanted, "image_format": image_format}


def _output_ok(out: Path, key: str, size: str, rec, verify: bool, ext: str) -> bool:
    """Is ``out/<size>/<key><ext>`` there with the recorded byte count (and, with ``verify``, CRC-32)?"""
    path = out / size / f"{key}{ext}"
    try:
        if path.stat().st_size != rec[0]:
            return False
    except OSError:
        return False
    if verify:
        return zlib.crc32(path.read_bytes()) == rec[1]
    return True


@dataclasses.dataclass(frozen=True)
class Redo:
    """One image to (re)process: the ``sizes`` to make, and the files of other sizes that stay valid."""

    image: str
    key: str
    path: str
    sizes: tuple[int, ...]
    source_bytes: int
    source_mtime_ns: int
    kept_files: dict  # size -> [bytes, crc]: the previous entry's files when the source is unchanged, else {}


@dataclasses.dataclass
class CachePlan:
    """What a ``prepare`` run has to do, decided before any image is read (see :func:`plan_cache`)."""

    redo: list[Redo]
    keep: dict[str, dict]  # image id -> its previous entry: unchanged source, every size present and intact
    vanished: list[Failure]  # records whose source file cannot be found
    keys: dict[str, str]  # image id -> cache key, for every record


def plan_cache(records: Iterable[Record], state: dict[str, dict], sizes: Iterable[int],
               source_stat: Callable[[str], tuple[int, int]], output_ok: Callable[[str, str, list], bool]) -> CachePlan:
    """Decide which images to (re)process, and which sizes, from the previous runs' ``state`` (what
    :func:`_read_state` returns). A pure function of its arguments: the file system is reached only through
    ``source_stat(path) -> (bytes, mtime_ns)`` (raises ``OSError`` for a missing file) and
    ``output_ok(key, size, [bytes, crc]) -> bool`` (is that cached file there and intact).

    An image is kept when its source is unchanged (same path, byte count and mtime) and every size is cached
    and intact; with an unchanged source only the missing or damaged sizes are remade; a new or changed
    source has every size remade.
    """
    plan = CachePlan([], {}, [], {})
    for rec in records:
        key = plan.keys[rec.image_id] = cache_key(rec.image_id)
        try:
            source_bytes, mtime_ns = source_stat(rec.path)
        except OSError as exc:
            plan.vanished.append(Failure(rec.image_id, f"file not found ({exc.strerror or exc})"))
            continue
        prev = state.get(rec.image_id)
        same_source = bool(prev and prev["source"] == rec.path and prev["source_bytes"] == source_bytes
                           and prev["source_mtime_ns"] == mtime_ns)
        kept = prev["files"] if same_source else {}
        missing = tuple(s for s in sizes if not (str(s) in kept and output_ok(key, str(s), kept[str(s)])))
        if missing:
            plan.redo.append(Redo(rec.image_id, key, rec.path, missing, source_bytes, mtime_ns, kept))
        else:
            plan.keep[rec.image_id] = prev
    return plan


def _source_stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _make_images(redo: list[Redo], out: Path, config: PreprocessConfig, image_format: str, workers: int | None,
                 progress: bool, entries: dict, failures: list) -> int:
    """Process ``redo`` in worker processes; each finished image goes to ``entries`` and the journal (so an
    interrupted run keeps it), each failed one to ``failures``. Returns the count of images made."""
    tasks = [{"image": r.image, "key": r.key, "path": r.path, "sizes": list(r.sizes), "out": str(out),
              "config": dataclasses.asdict(config), "image_format": image_format} for r in redo]
    by_image = {r.image: r for r in redo}
    if worker_count(workers, len(tasks)) == 1:
        _init_worker()
    # fork starts faster, but not once TensorFlow's thread pools run in this process
    method = "spawn" if "tensorflow" in sys.modules else "fork"
    prepared = 0
    with open(out / JOURNAL, "a", encoding="utf-8") as journal, \
            parallel_map(_process, tasks, workers, ordered=False, initializer=_init_worker, start_method=method,
                         progress=progress, desc="prepare") as results:
        for res in results:
            if "reason" in res:
                failures.append(Failure(res["image"], res["reason"]))
                continue
            r = by_image[res["image"]]
            entry = {"image": r.image, "source": r.path, "source_bytes": r.source_bytes,
                     "source_mtime_ns": r.source_mtime_ns, "files": {**r.kept_files, **res["files"]},
                     "disc": res["disc"], "width": res["width"], "height": res["height"],
                     **_made_with(config, image_format)}
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            entries[r.image] = entry
            prepared += 1
    return prepared


def _manifest_rows(records: Iterable[Record], keys: dict[str, str], entries: dict[str, dict], sizes: list[str]):
    """The manifest's header and rows: one row per record with an entry, in the records' order."""
    header = BASE_COLUMNS + [f"bytes_{s}" for s in sizes] + [f"crc_{s}" for s in sizes]
    rows = []
    for rec in records:
        e = entries.get(rec.image_id)
        if e is None:
            continue
        row = [rec.image_id, keys[rec.image_id], "" if rec.label is None else rec.label, rec.patient, rec.eye or "",
               e["source"], e["source_bytes"], e["source_mtime_ns"], *e["disc"], e["width"], e["height"]]
        row += [e["files"].get(s, ["", ""])[0] for s in sizes] + [e["files"].get(s, ["", ""])[1] for s in sizes]
        rows.append(row)
    return header, rows


@locked_folder("out", "cache", wait=True)  # one writer at a time; another waits, then reuses what it wrote
def prepare_cache(dataset: Dataset, out, sizes=(112, 224, 448, 896), config: PreprocessConfig = PreprocessConfig(),
                  workers: int | None = None, verify: bool = False, progress: bool = True,
                  image_format: str = "jpeg") -> PrepareResult:
    """Preprocess every record of ``dataset`` once for all ``sizes`` into ``out`` (see the module docstring).

    Args:
        dataset: what :func:`retina_scale.data.sources.read_dataset` returned; its failures are reported too.
        out: the cache folder (created if needed).
        sizes: square sizes in pixels.
        config: preprocessing options; a cache keeps the options it was made with.
        workers: processes (default: all cores); 1 runs in this process.
        verify: re-read every cached file and check its CRC-32 instead of only its byte count.
        progress: show a tqdm progress bar.
        image_format: ``"jpeg"`` (quality 95) or ``"png"`` (lossless).
    """
    sizes = parse_sizes(sizes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    ext = IMAGE_FORMATS[image_format]
    cfg = _check_config(out, sizes, config, image_format)
    for s in sizes:
        (out / str(s)).mkdir(exist_ok=True)
    output_ok = functools.partial(_output_ok, out, verify=verify, ext=ext)
    plan = plan_cache(dataset.records, _read_state(out, _made_with(config, image_format)), sizes, _source_stat,
                      output_ok)
    failures = list(dataset.failures) + plan.vanished
    entries = dict(plan.keep)
    prepared = _make_images(plan.redo, out, config, image_format, workers, progress, entries, failures)

    header, rows = _manifest_rows(dataset.records, plan.keys, entries, [str(s) for s in cfg["sizes"]])
    write_csv(out / FAILURES, ["image", "reason"], [[f.image, f.reason] for f in failures], lineterminator="\n")
    if rows:
        cfg["color_pca"] = color_pca(out, min(int(s) for s in cfg["sizes"]), [r[1] for r in rows], ext=ext)
    # Absolute: readers of the cache (explain's lesions.csv) run from other folders than the one that made it.
    cfg["data"] = {"root": os.path.abspath(dataset.root), "format": dataset.format}
    cfg["counts"] = {"images": len(rows), "failed": len(failures)}
    # cache.json before the manifest: a manifest (whose rows record no preprocessing) never exists without it.
    write_json(out / CONFIG, cfg)
    write_csv(out / MANIFEST, header, rows, lineterminator="\n")
    (out / JOURNAL).unlink(missing_ok=True)
    return PrepareResult(prepared, len(plan.keep), len(failures), failures, out)


def color_pca(out: Path, size: int, keys: list[str], max_images: int = 256, seed: int = 0, ext: str = ".jpg") -> dict:
    """Eigenvalues and eigenvectors of the RGB covariance of fundus pixels (0-255 scale), from a sample of
    cached images; the colour augmentation of the training input uses them (Krizhevsky-style PCA noise)."""
    import cv2

    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(keys))[:max_images]
    pixels = []
    for i in chosen:
        img = cv2.imread(str(out / str(size) / f"{keys[i]}{ext}"), cv2.IMREAD_COLOR)
        if img is None:
            continue
        rgb = img[:, :, ::-1].reshape(-1, 3)
        pixels.append(rgb[rgb.max(axis=1) > 10][::4].astype(np.float64))
    if not pixels or sum(len(p) for p in pixels) < 10:
        return {"eigenvalues": [0.0, 0.0, 0.0], "eigenvectors": np.eye(3).tolist()}
    cov = np.cov(np.concatenate(pixels), rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    return {"eigenvalues": [float(v) for v in vals[::-1]], "eigenvectors": vecs[:, ::-1].tolist()}


def read_manifest(cache_dir, size: int | None = None):
    """The cache's manifest as a pandas DataFrame (with a ``path`` column for ``size`` when given).

    Raises:
        FileNotFoundError: no manifest (not a cache, or ``prepare`` never finished).
        ValueError: ``size`` is not in the cache.
    """
    import pandas as pd

    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir} has no {MANIFEST}; run `retina-scale prepare --out {cache_dir}` first")
    df = pd.read_csv(path, dtype={"image": str, "key": str, "patient": str, "eye": str}, keep_default_na=False)
    if size is not None:
        col = f"bytes_{int(size)}"
        if col not in df.columns:
            have = sorted(int(c[6:]) for c in df.columns if c.startswith("bytes_"))
            raise UserError(f"size {size} is not in cache {cache_dir}; it has: {', '.join(map(str, have))}")
        df = df[df[col].astype(str) != ""].copy()
        ext = IMAGE_FORMATS[read_config(cache_dir).get("image_format", "png")]
        df["path"] = [str(cache_dir / str(int(size)) / f"{k}{ext}") for k in df["key"]]
    return df.reset_index(drop=True)


def read_config(cache_dir) -> dict:
    path = Path(cache_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir} has no {CONFIG}; run `retina-scale prepare` first")
    return json.loads(path.read_text(encoding="utf-8"))
