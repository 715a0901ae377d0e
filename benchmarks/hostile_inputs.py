"""Hostile and careless input (issue 16): builds each case, runs the command a user would run, prints the table
``case | command | expected | observed`` that docs/RELIABILITY.md records, and the peak memory (``ru_maxrss`` of
a ``retina-scale predict`` / ``prepare`` subprocess) for a normal photo, the largest accepted photos and a
rejected 20000x20000 PNG bomb.

Every case is built here, the big ones included (the test suite keeps only cheap headers); nothing is downloaded.
Cases of the other half of issue 16 (config, runs and clients) are plain calls of the code paths they concern, so
their ``observed`` column tells what the checked-out code does; the ones that need a training run are not run.

Usage (about a minute on 2 cores for the table, ``--skip-memory``; about a minute for the peak-memory
subprocesses alone, ``--memory-only``)::

    python benchmarks/hostile_inputs.py [--json out.json] [--skip-memory | --memory-only]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "data"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from fundus_fixtures import draw_fundus, write_csv  # noqa: E402
from hostile_fixtures import cut_jpeg, png_bomb, png_claiming, tiff_claiming, with_exif_orientation  # noqa: E402

LADDER = [112, 224, 448, 896]
ROWS: list[dict] = []


def row(case: str, command: str, expected: str, observed: str, ok: bool, group: str = "input") -> None:
    ROWS.append({"case": case, "command": command, "expected": expected, "observed": observed, "ok": bool(ok),
                 "group": group})


def _crafted_disc(width: int, height: int, radius: int) -> bytes:
    """A ``width`` x ``height`` PNG holding the middle of a disc of ``radius`` px: under the pixel limit, but its
    fitted disc's bounding square is as large as the crafter likes."""
    img = np.zeros((height, width, 3), np.uint8)
    cv2.circle(img, (width // 2, height // 2), radius, (60, 100, 200), -1)
    return cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()


def _cut_png(bgr) -> bytes:
    from hostile_fixtures import png_chunk

    data = cv2.imencode(".png", bgr)[1].tobytes()
    return data[: len(data) // 2] + png_chunk(b"IEND", b"")


def _jpeg(bgr, quality=90, **flags) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] + [v for k, v in flags.items() for v in (getattr(cv2, k), v)]
    return cv2.imencode(".jpg", np.ascontiguousarray(bgr), params)[1].tobytes()


def _retina(width: int, height: int, disc: int) -> np.ndarray:
    """The scikit-image fundus scaled to a ``disc``-px disc, off-centre in a black ``width`` x ``height`` frame."""
    import skimage.data

    canvas = np.zeros((height, width, 3), np.uint8)
    disc_img = cv2.resize(skimage.data.retina()[..., ::-1], (disc, disc), interpolation=cv2.INTER_CUBIC)
    y, x = (height - disc) // 2, (width - disc) // 3
    canvas[y : y + disc, x : x + disc] = disc_img
    return canvas


# ------------------------------------------------------------------------------------------------- inputs


def build_predict_folder(folder: Path) -> dict[str, str]:
    """The hostile photo folder for ``retina-scale predict``: {file name: expected start of its error cell,
    "" for graded}."""
    folder.mkdir(parents=True)
    photo = _jpeg(draw_fundus(width=640, height=480, seed=3))
    files = {
        "good.jpeg": (photo, ""),
        "bomb_20000x20000.png": (png_bomb(20000, 20000), "image too large (20000x20000"),
        "header_claims_4294967295.png": (png_claiming(2**32 - 1, 2**32 - 1), "image too large (4294967295x"),
        "cut_half_plus_ffd9.jpeg": (cut_jpeg(photo), "truncated JPEG (its image data"),
        "cut_progressive.jpeg": (cut_jpeg(_jpeg(draw_fundus(width=640, height=480, seed=4),
                                                IMWRITE_JPEG_PROGRESSIVE=1), 0.4), "truncated JPEG (its image data"),
        "no_end_marker.jpeg": (photo[: len(photo) // 2], "truncated JPEG (no end-of-image marker)"),
        "cut_half_plus_iend.png": (_cut_png(draw_fundus(width=640, height=480)), "cannot decode: Invalid PNG data"),
        "crafted_20000x1000_disc.png": (_crafted_disc(20000, 1000, 9800), "no fundus found (its bounding square"),
        "exif_orientation_6.jpeg": (with_exif_orientation(photo, 6), ""),
        "scan.tif": (cv2.imencode(".tif", draw_fundus())[1].tobytes(), "TIFF image; predict_images decodes"),
        "scan.bmp": (cv2.imencode(".bmp", draw_fundus())[1].tobytes(), "BMP image; predict_images decodes"),
        "png_named.jpeg": (cv2.imencode(".png", draw_fundus(width=640, height=480, seed=3))[1].tobytes(), ""),
        "=cmd|calc.jpeg": (photo, ""),
        "noquant.jpeg": (photo.replace(b"\xff\xdb", b"\xff\xfe"), "cannot decode: jpeg::Uncompress failed"),
        "empty.jpeg": (b"", "empty file"),
        "text.png": (b"hello, not a photo", "not an image"),
        "gray.png": (cv2.imencode(".png", cv2.cvtColor(draw_fundus(), cv2.COLOR_BGR2GRAY))[1].tobytes(), "grayscale"),
        "tiny.jpeg": (_jpeg(draw_fundus(width=50, height=40)), "image too small"),
        "black.jpeg": (_jpeg(np.zeros((300, 400, 3), np.uint8)), "no fundus found"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "z.jpeg").symlink_to("/dev/zero")
    os.mkfifo(folder / "f.jpeg")
    expected = {name: want for name, (_, want) in files.items()}
    expected.update({"z.jpeg": "not a regular file (device)", "f.jpeg": "not a regular file (FIFO)"})
    return expected


def build_eyepacs_folder(root: Path, outside: Path) -> dict[str, str]:
    """An EyePACS-layout folder for ``retina-scale prepare``: {image id: expected reason, "" for prepared}."""
    (root / "train").mkdir(parents=True)
    outside.mkdir(parents=True, exist_ok=True)
    good = draw_fundus(seed=1)
    photo = _jpeg(good)
    files = {
        "1_left.jpeg": photo,
        "2_left.png": png_bomb(20000, 20000),
        "2_right.tif": tiff_claiming(30000, 30000),
        "3_left.jpeg": cut_jpeg(photo),
        "3_right.jpeg": with_exif_orientation(photo, 6),
        "4_left.jpeg": cv2.imencode(".png", good)[1].tobytes(),
        "5_left.jpeg": b"",
        "5_right.jpeg": photo[: len(photo) // 2],
        "6_left.jpeg": _jpeg(cv2.cvtColor(good, cv2.COLOR_BGR2GRAY)),
        "6_right.png": cv2.imencode(".png", good.astype(np.uint16) * 257)[1].tobytes(),
        "7_left.jpeg": _jpeg(draw_fundus(width=50, height=40)),
        "7_right.jpeg": _jpeg(np.zeros((240, 320, 3), np.uint8)),
        "10_left.png": _crafted_disc(20000, 1000, 9800),
        "10_right.png": _cut_png(good),
    }
    for name, data in files.items():
        (root / "train" / name).write_bytes(data)
    (outside / "secret.jpeg").write_bytes(photo)
    (root / "train" / "link_left.jpeg").symlink_to(outside / "secret.jpeg")
    os.mkfifo(root / "train" / "fifo_left.jpeg")
    expected = {"1_left": "", "2_left": "image too large (20000x20000", "2_right.tif": "image too large (30000x30000",
                "3_left": "truncated JPEG (its image data", "3_right": "", "4_left": "",
                "5_left": "empty file", "5_right": "truncated JPEG (no end-of-image marker)",
                "6_left": "grayscale image", "6_right": "16-bit image", "7_left": "too small to hold a fundus",
                "7_right": "no fundus found", "10_left": "no fundus found (its bounding square, 19607x19607",
                "10_right": "corrupt image (OpenCV cannot decode it)", "link_left": "outside the data folder (refused: link leads out)",
                "fifo_left": "file not found", "8_left": "file not found", "9_left": "outside 0-4",
                "9_right": "not a number", "../outside/secret": "outside the data folder (refused: '..'",
                str(outside / "secret"): "absolute path"}
    labels = [[k, 1] for k in expected if k not in ("9_left", "9_right")] + [["9_left", 7], ["9_right", "severe"]]
    write_csv(root / "trainLabels.csv", ["image", "level"], labels)
    return expected


# ------------------------------------------------------------------------------------------ running commands


def cli(*args) -> tuple[int, str, str]:
    """``retina-scale ARGS`` in this process: (exit status, stdout, stderr)."""
    from retina_scale.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# Runs the command in a grandchild and prints its ru_maxrss: a child forked straight from this process (which
# holds TensorFlow, ~1 GB) would inherit this process's resident size as its starting maximum.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
print(usage.ru_maxrss, code)
sys.exit(code & 255)
"""


def subprocess_peak(args, tmp: Path, limit_s: int = 120, preexec=None, cwd=ROOT) -> tuple[int, float, str]:
    """Run ``python -m retina_scale ARGS`` in ``cwd``: (exit status, peak RSS in MiB of that process alone, the
    last line of its stderr that is not TensorFlow's or libjpeg's chatter)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    # stderr through a pipe, not a file: a file-size limit set by ``preexec`` would cut a file short.
    try:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, "-m", "retina_scale", *map(str, args)], cwd=cwd,
                              env=env, capture_output=True, preexec_fn=preexec, timeout=limit_s,
                              start_new_session=True)
    except subprocess.TimeoutExpired as err:
        return -9, float("nan"), f"killed after {err.timeout} s"
    rss_kib, code = proc.stdout.decode().split()[-2:]
    chatter = ("Corrupt JPEG", "WARNING: All log", "I0000", "E0000", "W0000", "predict:", "prepare:")
    lines = [x for x in proc.stderr.decode(errors="replace").splitlines() if x.strip() and not x.startswith(chatter)]
    return int(code), int(rss_kib) / 1024, lines[-1] if lines else ""


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def predict_cases(model: Path, tmp: Path) -> float:
    folder = tmp / "photos"
    expected = build_predict_folder(folder)
    out = tmp / "predictions.csv"
    # From inside the folder, as `--images .`: the image cells are the bare file names.
    code, peak, last = subprocess_peak(["predict", "--model", model, "--images", ".", "--out", out,
                                        "--batch-size", "4"], tmp, cwd=folder)
    got = {r["image"]: r for r in _read_csv(out)} if out.exists() else {}
    cmd = "retina-scale predict --images DIR"
    for name, want in expected.items():
        cell = got.get(name) or got.get("'" + name) or {}
        observed = cell.get("error") or (f"graded (grade {cell.get('grade')})" if cell.get("grade") else "no row")
        ok = want in observed if want else observed.startswith("graded")
        row(f"predict: {name}", cmd, want or "graded", observed[:110], ok)
    formula = [r["image"] for r in got.values() if "=cmd|calc" in r["image"]]
    row("predict: CSV cell of =cmd|calc.jpeg", cmd, "starts with ' (spreadsheet-safe)",
        repr(formula[0][:1]) if formula else "no row", bool(formula) and formula[0].startswith("'"))
    row("predict: whole folder", cmd, "exit 0, one row per file, CSV written",
        f"exit {code}, {len(got)} rows of {len(expected)} files{'' if code == 0 else ': ' + last}",
        code == 0 and len(got) == len(expected))
    return peak


def prepare_cases(tmp: Path) -> None:
    root, outside = tmp / "eyepacs", tmp / "outside"
    expected = build_eyepacs_folder(root, outside)
    cache = tmp / "cache"
    code, out, err = cli("prepare", "--data", root, "--sizes", "112,896", "--out", cache, "--workers", 1,
                         "--no-progress")
    failures = {r["image"]: r["reason"] for r in _read_csv(cache / "failures.csv")}
    cmd = "retina-scale prepare --data DIR"
    for image, want in expected.items():
        observed = failures.get(image, "prepared")
        row(f"prepare: {image}", cmd, want or "prepared", observed[:110],
            want in observed if want else observed == "prepared")
    (root / "trainLabels.csv").write_bytes("image,level\n1_l\xe9ft,0\n".encode("cp1252"))
    code, _, err = cli("prepare", "--data", root, "--out", tmp / "c2", "--no-progress")
    row("prepare: labels CSV not UTF-8", cmd, "exit 2, one line", f"exit {code}: {err.strip()[:90]}",
        code == 2 and len(err.strip().splitlines()) == 1)
    folders = tmp / "folders"
    (folders / "1").mkdir(parents=True)
    (folders / "1" / "a_left.jpeg").write_bytes(_jpeg(draw_fundus(seed=2)))
    (folders / "1" / "b_left.jpeg").symlink_to(outside / "secret.jpeg")
    from retina_scale.data.sources import read_dataset

    reasons = {f.image: f.reason for f in read_dataset(folders).failures}
    row("prepare: folders layout, 1/b_left.jpeg -> outside", "retina-scale prepare --format folders",
        "outside the data folder", reasons.get("1/b_left.jpeg", "accepted")[:110],
        "outside the data folder" in reasons.get("1/b_left.jpeg", ""))


def interrupted_prepare_case(tmp: Path) -> None:
    """kill -9 after every image is journalled, before the manifest; rerun with --normalize graham."""
    from unittest import mock

    import retina_scale.data.cache as cache_module

    root = tmp / "small"
    root.mkdir()
    for i in range(8):
        (root / f"{i}_left.jpeg").write_bytes(_jpeg(draw_fundus(seed=i)))
    write_csv(root / "trainLabels.csv", ["image", "level"], [[f"{i}_left", i % 5] for i in range(8)])
    cache = tmp / "interrupted"
    args = ("prepare", "--data", root, "--sizes", "64", "--out", cache, "--workers", 1, "--no-progress")
    with mock.patch.object(cache_module, "_manifest_rows", side_effect=KeyboardInterrupt):
        first = cli(*args)[0]
    code, out, err = cli(*args, "--normalize", "graham")
    mixed = code == 0 and "skipped 8" in out
    observed = (f"exit {code}: {err.strip()[:100]}" if code else
                f"exit 0, {'8 none images kept as graham (mixed)' if mixed else out.strip().splitlines()[-1][:80]}")
    row("prepare interrupted (exit %d), rerun with --normalize graham" % first, "retina-scale prepare (rerun)",
        "refused with one line, or rebuilt", observed, code == 2 and len(err.strip().splitlines()) == 1)


def exif_parity_case() -> None:
    import tensorflow as tf

    from retina_scale.config import PreprocessConfig
    from retina_scale.data.fundus import preprocess_file
    from retina_scale.serving.preprocess import preprocess_batch, preprocess_spec

    spec = preprocess_spec({"normalize": "none", "sizes": LADDER}, 112)
    photo = _jpeg(_retina(600, 450, 400), 95)
    for orientation in (2, 6):
        tagged = with_exif_orientation(photo, orientation)
        images, _ = tf.function(lambda x: preprocess_batch(x, spec))(tf.constant([tagged]))
        want = preprocess_file("a.jpeg", LADDER, PreprocessConfig(), data=tagged).images[112]
        diff = float(np.abs(images.numpy()[0] - want).mean())
        row(f"EXIF orientation {orientation}: cache vs predict_images", "prepare / predict_images",
            "same pixels on both paths (mean diff <= 0.5)", f"mean diff {diff:.2f} grey levels", diff <= 0.5)


# ------------------------------------------------------------------------------------------------ memory


def memory_cases(model: Path, tmp: Path) -> list[dict]:
    """Peak RSS of one predict / prepare subprocess per input."""
    sets = {
        "one EyePACS-size JPEG (3888x2592)": [("eyepacs.jpeg", _jpeg(_retina(3888, 2592, 2400), 95))],
        "largest accepted: 7744x5164 PNG (39.99 Mpx)": [("largest.png", cv2.imencode(
            ".png", _retina(7744, 5164, 4900), [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes())],
        "rejected bomb: 20000x20000 PNG": [("bomb.png", png_bomb(20000, 20000))],
    }
    sets["crafted: 40000x1000 PNG, disc square just under 2 x max_pixels (accepted)"] = [
        ("crafted.png", _crafted_disc(40000, 1000, 4440))]
    sets["largest accepted, 4 at once (the graph runs 4 photos in parallel)"] = [
        (f"largest{i}.png", sets["largest accepted: 7744x5164 PNG (39.99 Mpx)"][0][1]) for i in range(4)]
    results = []
    for label, files in sets.items():
        folder = tmp / f"mem-{len(results)}"
        folder.mkdir()
        for name, data in files:
            (folder / name).write_bytes(data)
        size_mb = sum(len(d) for _, d in files) / 2**20
        start = time.perf_counter()
        code, peak, last = subprocess_peak(["predict", "--model", model, "--images", folder, "--out",
                                            folder / "p.csv", "--batch-size", "4"], tmp)
        rows = _read_csv(folder / "p.csv") if (folder / "p.csv").exists() else []
        results.append({"input": label, "command": "retina-scale predict", "file_mb": round(size_mb, 1),
                        "peak_rss_mib": round(peak), "seconds": round(time.perf_counter() - start, 1),
                        "exit": code, "rows": [r["error"][:60] or "graded" for r in rows]})
        if "4 at once" in label:
            continue
        write_csv(folder / "trainLabels.csv", ["image", "level"], [[Path(n).stem, 0] for n, _ in files])
        start = time.perf_counter()
        code, peak, _ = subprocess_peak(["prepare", "--data", folder, "--sizes", ",".join(map(str, LADDER)),
                                         "--out", folder / "cache", "--workers", 1, "--no-progress"], tmp)
        failed = _read_csv(folder / "cache" / "failures.csv") if (folder / "cache" / "failures.csv").exists() else []
        results.append({"input": label, "command": "retina-scale prepare (sizes 112-896)", "file_mb": round(size_mb, 1),
                        "peak_rss_mib": round(peak), "seconds": round(time.perf_counter() - start, 1), "exit": code,
                        "rows": [f["reason"][:60] for f in failed] or ["prepared"]})
    return results


# ------------------------------------------------------------- config, runs and clients (the other half)


def config_cases() -> None:
    from retina_scale.config import load_train_config

    cases = [("optim.lr_drop_factor", -1), ("optim.lr", float("inf")), ("model.width", float("inf")),
             ("optim.weight_decay", -1.0), ("optim.clipnorm", -1.0), ("model.l2", -1.0), ("resample.r", -0.5),
             ("nan.max_events", -1), ("optim.lr_drop_at", 5), ("model_name", "../../.."), ("eval_bootstrap", -5)]
    for key, value in cases:
        mapping, node = {}, None
        *path, last = key.split(".")
        node = mapping
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
        try:
            load_train_config(mapping)
            observed, ok = "accepted", False
        except ValueError as err:
            observed, ok = f"refused: {str(err).splitlines()[0][:90]}", len(str(err).splitlines()) == 1
        row(f"config {key}: {value}", "retina-scale train --config run.yaml", "refused with one line before any work",
            observed, ok, "config")


def yaml_bomb_case(tmp: Path) -> None:
    """A billion-laughs value for name:, loaded in a subprocess capped at 1 GiB of address space and 60 s."""
    lines = ["name:", '  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (tmp / "bomb.yaml").write_text("\n".join(lines) + "\n")
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from retina_scale.config import load_train_config\n"
            "try:\n    load_train_config(sys.argv[1])\nexcept ValueError as e:\n    print('refused:', str(e)[:90])\n")

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(tmp / "bomb.yaml"), str(ROOT)], capture_output=True,
                              text=True, timeout=60, preexec_fn=cap)
        tail = (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1:] or [""])
        observed = (tail if isinstance(tail, str) else tail[0])[:90]
    except subprocess.TimeoutExpired:
        observed = "still running after 60 s (killed)"
    row("YAML bomb (billion laughs) as name:", "retina-scale train --config bomb.yaml",
        "one-line error, little memory", f"{observed} ({time.perf_counter() - start:.1f} s, 1 GiB cap)",
        observed.startswith("refused"), "config")


def rest_client_case() -> None:
    """A server that answers 200 with HTML: the client must raise ServingError."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from retina_scale.serving.client import ServingClient, ServingError

    class Html(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b"<html>oops</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ServingClient(f"http://127.0.0.1:{server.server_address[1]}", "retina", timeout=5, retries=0).predict([b"x"])
        observed, ok = "returned without error", False
    except ServingError as err:
        observed, ok = f"ServingError: {str(err)[:80]}", True
    except Exception as err:  # what the issue saw: a raw JSONDecodeError
        observed, ok = f"{type(err).__name__}: {str(err)[:70]}", False
    finally:
        server.shutdown()
    row("REST: 200 with an HTML body", "ServingClient.predict", "ServingError", observed, ok, "clients")


def load_export_case(tmp: Path) -> None:
    """A SavedModel whose get_metadata writes a file: load_export must not run it."""
    import tensorflow as tf

    from retina_scale.serving.export import FORMAT, FORMAT_VERSION, load_export

    marker = tmp / "written_by_the_graph.txt"

    class Crafted(tf.Module):
        @tf.function(input_signature=[])
        def get_metadata(self):
            with tf.control_dependencies([tf.io.write_file(str(marker), "pwned")]):
                return {"metadata_json": tf.identity(json.dumps({"stage": "tiny", "input_size": 112,
                                                                 "thresholds": [0.5, 1.5, 2.5, 3.5],
                                                                 "preprocessing": None}))}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def serve(self, images):
            return {"grade": tf.zeros([tf.shape(images)[0]], tf.int32)}

    folder = tmp / "crafted" / "1"
    module = Crafted()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve,
                                                          "get_metadata": module.get_metadata})
    (folder / "metadata.json").write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                      "stage": "tiny", "input_size": 112,
                                                      "thresholds": [0.5, 1.5, 2.5, 3.5], "preprocessing": None}))
    try:
        load_export(folder)
        observed = "loaded"
    except ValueError as err:
        observed = f"refused: {str(err)[:60]}"
    wrote = marker.exists()
    row("load_export of a SavedModel whose get_metadata writes a file", "load_export / retina-scale predict",
        "the graph is not run (no file written)", f"{observed}; file {'WRITTEN' if wrote else 'not written'}",
        not wrote, "clients")


def output_error_case(model: Path, tmp: Path) -> None:
    """predict whose CSV cannot be written (RLIMIT_FSIZE of 64 bytes stands in for a full disk)."""
    folder = tmp / "one"
    folder.mkdir()
    (folder / "a.jpeg").write_bytes(_jpeg(draw_fundus(seed=5)))

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    code, _, last = subprocess_peak(["predict", "--model", model, "--images", folder, "--out", tmp / "full.csv"],
                                    tmp, preexec=small_files)
    row("predict with a full disk (writes fail: EFBIG)", "retina-scale predict --out FULL", "exit 2, one line",
        f"exit {code}: {last[:90]}", code == 2, "runs")


NOT_RUN = [
    ("second `retina-scale train` on a running run folder (lock)", "retina-scale train x2"),
    ("thresholds from a validation split that holds one grade", "retina-scale train (a trained stage's scores)"),
    ("stage killed after its last epoch: 'resuming at epoch 13 of 12'", "retina-scale train (resume)"),
    ("REST: garbage JSON, a list, wrong types, no size cap, dripping server", "ServingClient.predict"),
]


# -------------------------------------------------------------------------------------------------- main


def _print_table(rows: list[dict]) -> None:
    from retina_scale.utils.tables import markdown_table

    print("\n".join(markdown_table(["case", "command", "expected", "observed", "as expected"],
                                   [[r["case"], r["command"], r["expected"], r["observed"], "yes" if r["ok"] else "NO"]
                                    for r in rows])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows and the memory figures here")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the peak-memory subprocesses")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from retina_scale.models import build_model
    from retina_scale.serving.export import export_saved_model

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = export_saved_model(build_model("tiny", width=0.125, seed=0), tmp / "models", "bench",
                                   metadata={"preprocessing": {"normalize": "none", "sizes": LADDER}})
        peak_batch = None
        if not args.memory_only:
            prepare_cases(tmp)
            interrupted_prepare_case(tmp)
            peak_batch = predict_cases(model, tmp)
            exif_parity_case()
            config_cases()
            yaml_bomb_case(tmp)
            rest_client_case()
            load_export_case(tmp)
            output_error_case(model, tmp)
            for case, command in NOT_RUN:
                row(case, command, "see the other helper's tests", "not run by this script", True, "runs")
        memory = [] if args.skip_memory else memory_cases(model, tmp)
    if ROWS:
        _print_table(ROWS)
        print(f"\npeak RSS of the hostile predict run above: {peak_batch:.0f} MiB")
    if memory:
        from retina_scale.utils.tables import markdown_table

        print()
        print("\n".join(markdown_table(["input", "command", "file MB", "peak RSS MiB", "s", "rows"],
                                       [[m["input"], m["command"], m["file_mb"], m["peak_rss_mib"], m["seconds"],
                                         "; ".join(m["rows"])] for m in memory])))
    machine = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
               "tensorflow": tf.__version__, "opencv": cv2.__version__, "load": os.getloadavg(),
               "seconds": round(time.perf_counter() - started, 1)}
    print("\n" + json.dumps(machine))
    if args.json:
        from retina_scale.utils.fileio import write_text

        write_text(args.json, json.dumps({"machine": machine, "rows": ROWS, "memory": memory,
                                          "peak_rss_hostile_predict_mib": peak_batch and round(peak_batch)},
                                         indent=2) + "\n")
    return 0 if all(r["ok"] for r in ROWS if r["group"] == "input") else 1


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
