"""Benchmark of batch prediction: ``retina-scale predict`` (the export's predict_images signature: decode, disc,
crop, resize, network, all in the graph) in images/s, beside the cache's OpenCV preprocessing of the same photos
(one process) measured in the same run, so the ratio means something on a shared machine.

Photos: EyePACS-size 3888x2592 JPEGs (quality 95) holding the scikit-image fundus off-centre, and 1024-px
synthetic photos; the model is the thin tiny stage (112 px, width 0.125) unless --model gives an export.

Usage::

    python benchmarks/predict_throughput.py --images 32 --batch-size 16 --json benchmarks/predict_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _photos(folder: Path, n: int, kind: str):
    import cv2
    import numpy as np

    if kind == "eyepacs":
        import skimage.data

        rgb = skimage.data.retina()
        canvas = np.zeros((2592, 3888, 3), np.uint8)
        canvas[600 : 600 + rgb.shape[0], 1200 : 1200 + rgb.shape[1]] = rgb
        base = canvas[..., ::-1]
    for i in range(n):
        if kind == "synthetic":
            from retina_scale.data.synthetic import render_fundus

            img, _ = render_fundus(i, i % 5, size=1024)
            base = img[..., ::-1]
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(base), [cv2.IMWRITE_JPEG_QUALITY, 95])
        (folder / f"{kind}_{i:05d}.jpg").write_bytes(buf.tobytes())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="photos per kind")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", help="an export folder (default: export a thin tiny model)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from retina_scale.cli import main as cli
    from retina_scale.config import PreprocessConfig
    from retina_scale.data.fundus import preprocess_file

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs", "python": platform.python_version(),
               "tensorflow": tf.__version__, "batch_size": args.batch_size, "images_per_kind": args.images}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from retina_scale.models import build_model
            from retina_scale.serving.export import export_saved_model

            model = str(export_saved_model(build_model("tiny", width=0.125, seed=0), tmp / "models", "bench"))
        results["model"] = "thin tiny (112 px, width 0.125)" if args.model is None else args.model
        for kind in ("eyepacs", "synthetic"):
            folder = tmp / kind
            folder.mkdir()
            _photos(folder, args.images, kind)
            files = sorted(folder.iterdir())
            # Warm up (graph tracing) on a copy of one photo, outside the timing.
            warm = tmp / f"warm_{kind}"
            warm.mkdir()
            (warm / files[0].name).write_bytes(files[0].read_bytes())
            cli(["predict", "--model", model, "--images", str(warm), "--out", str(tmp / "warm.csv")])
            import contextlib
            import io

            text = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(text):
                rc = cli(["predict", "--model", model, "--images", str(folder), "--out", str(tmp / f"{kind}.csv"),
                          "--batch-size", str(args.batch_size), "--json"])
            total_s = time.perf_counter() - start  # with loading the SavedModel
            assert rc == 0
            predict_s = json.loads(text.getvalue())["seconds"]  # reading, grading and writing only
            start = time.perf_counter()
            for f in files:
                preprocess_file(f, (112,), PreprocessConfig())
            opencv_s = time.perf_counter() - start
            results[kind] = {
                "predict_images_per_s": round(len(files) / predict_s, 2),
                "predict_command_seconds_with_model_load": round(total_s, 2),
                "opencv_preprocess_images_per_s": round(len(files) / opencv_s, 2),
                "ratio_predict_to_opencv": round(opencv_s / predict_s, 3),
            }
    print(json.dumps(results, indent=2))
    if args.json:
        from retina_scale.utils.fileio import write_text

        write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
