"""Speed of the synthetic generator: photos per second, per worker, at 1024 px (the default size).

Runs ``generate_dataset`` into temporary folders with 1 worker and with K workers in the same run (so the
two are compared on the same, possibly shared, machine), then times ``render_fundus`` alone per background.

    python benchmarks/synth_speed.py --count 16 --workers 2 --size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import cv2
    import numpy as np
    import skimage

    from retina_scale.data import synthetic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    rows = []
    for workers in sorted({1, args.workers}):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            synthetic.generate_dataset(os.path.join(tmp, "set"), args.count, size=args.size, seed=0,
                                       prior="balanced", workers=workers, progress=False)
            dt = time.perf_counter() - t0
        rows.append(dict(workers=workers, count=args.count, seconds=dt, images_per_s=args.count / dt,
                         images_per_s_per_worker=args.count / dt / workers))
    # rendering alone (no JPEG, no disk), per background, in this process; the first real photo pays for the
    # one-off analysis of skimage's retina (vessel centre-lines), so it is warmed up first
    synthetic.render_fundus(0, 0, size=args.size, background="real")
    render = {}
    for background in ("procedural", "real"):
        times = []
        for i in range(max(4, args.count // 4)):
            t0 = time.perf_counter()
            synthetic.render_fundus(i, i % 5, size=args.size, background=background)
            times.append(time.perf_counter() - t0)
        render[background] = float(np.median(times))

    print(f"synthetic generator speed, {args.size} px photos, balanced prior (grades 0-4 equally often)")
    print(f"machine: {platform.machine()} {os.cpu_count()} logical CPUs ({platform.processor() or 'n/a'}), "
          f"Python {platform.python_version()}, NumPy {np.__version__}, OpenCV {cv2.__version__}, "
          f"scikit-image {skimage.__version__}")
    print()
    print("| workers | photos | seconds | photos/s | photos/s per worker |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['count']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} "
              f"| {r['images_per_s_per_worker']:.2f} |")
    print()
    print("| background | median seconds per photo (render only, 1 process) |")
    print("|---|---|")
    for k, v in render.items():
        print(f"| {k} | {v:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(runs=rows, render_median_s=render), fh, indent=2)


if __name__ == "__main__":
    main()
