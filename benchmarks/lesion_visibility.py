"""How visible each lesion kind is after resizing the photo to 112 / 224 / 448 / 896 px.

For every lesion of ``lesions.csv`` (of a freshly generated synthetic set, read back from its JPEGs), the
photo is resized with area interpolation to each resolution, and in the green channel:

* peak contrast = the most extreme value inside the lesion's radius (at least 1 px) minus the median of an
  annulus of local background around it (darkest value for red lesions, brightest for exudates and
  cotton-wool spots);
* visibility = |peak contrast| / (1.4826 * MAD of that annulus), i.e. the lesion's peak measured in units of
  the local background's variation (texture, vessels, camera noise, JPEG).

A control row measures the same statistic at random points of the field (radius of a 50 um spot): a lesion
kind is only visible where it clearly exceeds the control. Nothing here is tuned; the numbers are what the
generator draws.

    python benchmarks/lesion_visibility.py --count 40 --size 1024
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESOLUTIONS = (112, 224, 448, 896)
BRIGHT = {"hard_exudate", "cotton_wool_spot"}


def visibility(green, x, y, radius, bright):
    import numpy as np

    h, w = green.shape
    r_in = max(radius, 1.0)
    r_out = r_in + max(4.0, 1.5 * r_in)
    x0, x1 = int(max(0, np.floor(x - r_out - 1))), int(min(w, np.ceil(x + r_out + 2)))
    y0, y1 = int(max(0, np.floor(y - r_out - 1))), int(min(h, np.ceil(y + r_out + 2)))
    win = green[y0:y1, x0:x1].astype(np.float64)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d = np.hypot(xx - x, yy - y)
    inner = win[d <= r_in]
    ring = win[(d >= r_in + 1.5) & (d <= r_out)]
    if inner.size == 0 or ring.size < 8:
        return None
    med = np.median(ring)
    noise = 1.4826 * np.median(np.abs(ring - med)) + 0.5  # +0.5 grey level: 8-bit quantisation floor
    peak = inner.max() - med if bright else med - inner.min()
    return peak / noise


def main() -> None:
    import cv2
    import numpy as np
    import skimage

    from retina_scale.data import synthetic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    values = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set")
        synthetic.generate_dataset(out, args.count, size=args.size, seed=args.seed, prior="balanced",
                                   workers=args.workers, progress=True)
        with open(os.path.join(out, "lesions.csv"), newline="") as fh:
            lesions = list(csv.DictReader(fh))
        by_image = defaultdict(list)
        for r in lesions:
            by_image[r["image"]].append(r)
        with open(os.path.join(out, "images.csv"), newline="") as fh:
            images = list(csv.DictReader(fh))
        for im in images:
            photo = cv2.imread(os.path.join(out, "train", im["image"] + ".jpeg"))[..., ::-1]
            size = photo.shape[0]
            for res in RESOLUTIONS:
                s = res / size
                green = cv2.resize(photo, (res, res), interpolation=cv2.INTER_AREA)[..., 1]
                for r in by_image[im["image"]]:
                    v = visibility(green, (float(r["x"]) + 0.5) * s - 0.5, (float(r["y"]) + 0.5) * s - 0.5,
                                   0.5 * float(r["size_px"]) * s, r["kind"] in BRIGHT)
                    if v is not None:
                        values[r["kind"]][res].append(v)
                # control: random points in the field, not at a lesion
                for _ in range(10):
                    t, rad = rng.uniform(0, 2 * np.pi), 0.45 * size * np.sqrt(rng.uniform())
                    x, y = float(im["field_x"]) + rad * np.cos(t), float(im["field_y"]) + rad * np.sin(t)
                    v = visibility(green, (x + 0.5) * s - 0.5, (y + 0.5) * s - 0.5,
                                   0.5 * 50 / float(im["um_per_px"]) * s, False)
                    if v is not None:
                        values["(control: random points, 50 um)"][res].append(v)

    print(f"lesion visibility (green channel) after area-resizing {args.count} photos drawn at {args.size} px "
          f"(balanced prior, seed {args.seed})")
    print(f"machine: {platform.machine()} {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
          f"NumPy {np.__version__}, OpenCV {cv2.__version__}, scikit-image {skimage.__version__}")
    print()
    header = "| lesion kind | n | " + " | ".join(f"{r} px: median (% > 3)" for r in RESOLUTIONS) + " |"
    print(header)
    print("|---|---|" + "---|" * len(RESOLUTIONS))
    order = [k for k in synthetic.LESION_KINDS if k in values] + [k for k in values if k.startswith("(")]
    result = {}
    for kind in order:
        cells = []
        result[kind] = {}
        for res in RESOLUTIONS:
            v = np.array(values[kind][res])
            med, frac = float(np.median(v)), float(np.mean(v > 3))
            result[kind][res] = dict(n=int(v.size), median=med, frac_above_3=frac)
            cells.append(f"{med:.1f} ({100 * frac:.0f} %)")
        print(f"| {kind.replace('_', ' ')} | {len(values[kind][RESOLUTIONS[-1]])} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
