"""Write the embedded synthetic DR data set (EyePACS layout), or draw its contact sheet.

Examples:

    retina-scale synth --out data/synth --count 2000 --size 1024 --seed 0 --workers 2
    retina-scale synth --out data/balanced --count 500 --prior balanced --label-noise 0.1 --framing eyepacs
    retina-scale synth --gallery docs/synthetic_gallery.png

The folder gets ``train/<patient>_<left|right>.jpeg``, ``lesions.csv`` (every lesion drawn: kind, position,
size in px and um, quadrant), ``images.csv`` (eye, true grade, background, anatomy), ``summary.json`` and,
last and atomically, ``trainLabels.csv`` (``image,level``).
"""

from __future__ import annotations

import argparse
import json
import os

from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import atomic_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--count", type=int, default=None, help="number of photos (two per patient)")
    parser.add_argument("--size", type=int, default=1024,
                        help="diameter of the fundus disc in px, 64-4096 (default 1024; field = 12 mm)")
    parser.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    parser.add_argument("--prior", default="eyepacs",
                        help="grade distribution: eyepacs (paper's Table II, default), balanced, or a,b,c,d,e")
    parser.add_argument("--label-noise", type=float, default=0.0,
                        help="probability that a written label moves to an adjacent grade (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1; output is identical)")
    parser.add_argument("--framing", choices=("none", "eyepacs"), default="none",
                        help="eyepacs: wide camera canvas, off-centre fundus, some dark/blurred/notched photos")
    parser.add_argument("--real-fraction", type=float, default=0.3,
                        help="fraction of photos on the real skimage background (default 0.3)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--gallery", metavar="FILE.png",
                        help="draw a contact sheet (one row per grade, photos and lesion crops at 112-896 px)")


def run(args: argparse.Namespace) -> int:
    from retina_scale.data import synthetic

    if args.gallery is None and args.out is None:
        raise UserError("nothing to do: give --out DIR --count N to write a data set, or --gallery FILE.png")
    if args.gallery is not None:
        if not args.gallery.lower().endswith(".png"):
            raise UserError(f"gallery file {args.gallery!r} must end in .png")
        make_gallery(args.gallery, size=args.size, seed=args.seed)
        print(f"gallery written to {args.gallery}")
    if args.out is None:
        return 0
    if args.count is None:
        raise UserError("--count is required with --out (a whole number >= 0)")
    framing = None if args.framing == "none" else args.framing
    summary = synthetic.generate_dataset(
        args.out, args.count, size=args.size, seed=args.seed, prior=args.prior,
        label_noise=args.label_noise, workers=args.workers, framing=framing, overwrite=args.overwrite,
        progress=not args.no_progress, real_fraction=args.real_fraction,
    )
    total = max(summary["count"], 1)
    print(f"{summary['count']} photos of {summary['size']} px in {summary['out_dir']} (seed {summary['seed']})")
    print(f"{'grade':>5}  {'photos':>7}  {'share':>6}  {'prior':>6}")
    for g, (n, p) in enumerate(zip(summary["levels"], summary["prior"])):
        print(f"{g:>5}  {n:>7}  {n / total:>6.1%}  {p:>6.1%}")
    print(f"{'lesion kind':<24}{'count':>8}")
    for kind, n in sorted(summary["lesions"].items(), key=lambda kv: -kv[1]):
        print(f"{kind:<24}{n:>8}")
    print(json.dumps({k: summary[k] for k in ("out_dir", "count", "size", "seed", "levels", "lesions")}))
    return 0


# Which lesion a grade's row zooms on, in order of preference.
_CROP_KINDS = {
    1: ("microaneurysm",),
    2: ("microaneurysm", "hard_exudate", "dot_blot_haemorrhage"),
    3: ("irma", "venous_beading", "dot_blot_haemorrhage"),
    4: ("nvd", "nve", "preretinal_haemorrhage", "irma", "dot_blot_haemorrhage"),
}
GALLERY_RESOLUTIONS = (112, 224, 448, 896)


def make_gallery(path: str, size: int = 1024, seed: int = 0, photos_per_grade: int = 3,
                 crop_mm: float = 1.5) -> None:
    """Contact sheet: one row per grade, ``photos_per_grade`` photos and a crop of one lesion at 112-896 px.

    The crops show the same ``crop_mm`` square of retina around the lesion after resizing the whole photo to
    each resolution (area interpolation), then enlarged with nearest-neighbour so each pixel stays visible.
    """
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from retina_scale.data.synthetic import render_fundus, validate_size

    size = validate_size(size)
    ncols = photos_per_grade + len(GALLERY_RESOLUTIONS)
    fig, axes = plt.subplots(5, ncols, figsize=(1.6 * ncols, 1.7 * 5), dpi=90)
    rng = np.random.default_rng(seed)
    for grade in range(5):
        crop_done = False
        for j in range(photos_per_grade):
            eye = ("right", "left")[j % 2]
            background = "real" if j == 1 else "procedural"
            img, lesions = render_fundus(int(rng.integers(2 ** 31)), grade, size=size, eye=eye,
                                         background=background)
            ax = axes[grade, j]
            ax.imshow(cv2.resize(img, (160, 160), interpolation=cv2.INTER_AREA))
            ax.set_title(f"grade {grade}, {eye}, {background[:4]}.", fontsize=7)
            if crop_done:
                continue
            target = None
            for kind in _CROP_KINDS.get(grade, ()):
                cands = sorted((r for r in lesions if r["kind"] == kind), key=lambda r: r["size_px"])
                if cands:
                    target = cands[len(cands) // 2]  # the median-sized one: neither the easiest nor the hardest
                    break
            if target is None and lesions:
                target = lesions[0]
            if target is None:
                cx, cy = size / 2, size / 2
                label = "no lesion (centre)"
            else:
                cx, cy = target["x"], target["y"]
                label = f"{target['kind'].replace('_', ' ')} {target['size_um']:.0f} um"
            for k, res in enumerate(GALLERY_RESOLUTIONS):
                small = cv2.resize(img, (res, res), interpolation=cv2.INTER_AREA)
                half = max(2, int(round(res * crop_mm / 12.0 / 2)))
                x, y = int(cx * res / size), int(cy * res / size)
                padded = np.pad(small, ((half, half), (half, half), (0, 0)))
                crop = padded[y:y + 2 * half, x:x + 2 * half]
                ax = axes[grade, photos_per_grade + k]
                ax.imshow(cv2.resize(crop, (160, 160), interpolation=cv2.INTER_NEAREST))
                ax.set_title(f"{res} px" + ("" if k else f"\n{label}"), fontsize=7)
            crop_done = True
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"retina-scale synthetic fundus photographs (drawn at {size} px; crops: {crop_mm} mm square)",
                 fontsize=9)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
