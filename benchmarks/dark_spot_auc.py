#!/usr/bin/env python3
"""Is mild DR in the cached images at all? A training-free dark-spot detector's AUC for grade 1 against grade 0,
per input size, on a run's split (issue 14: the bar a network should clear).

Per photo, on the cached image the network reads at that size (Graham-normalised if the run was): the green channel,
the Hessian's smaller eigenvalue at a scale matched to a microaneurysm (sigma = its median radius at that size over
sqrt 2, at least 0.5 px), positive where the spot is darker than all around it (vessels, lines, give about zero),
times sigma^2, divided by the local standard deviation of the green channel (a Gaussian window 8 sigma wide); the
photo's score is the mean of its 3 strongest peaks inside 90 % of the fundus disc's radius (the rim is the camera's
edge). AUC of that score, grade 1 against grade 0 (true grades from lesions.csv), with a patient-bootstrap interval.
Nothing is fitted, so the split used does not matter for bias; the test split is the one the networks are scored on.

    python benchmarks/dark_spot_auc.py --run runs/resolution-study/runs/stepwise \
        --lesions runs/resolution-study/data/synthetic/lesions.csv --json benchmarks/dark_spot_auc_study.json
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retina_scale.run_layout import RunLayout  # noqa: E402
from retina_scale.utils.fileio import write_json  # noqa: E402
from retina_scale.utils.tables import text_table  # noqa: E402

MA_DIAMETER_PER_PX = 4.0 / 896  # the benchmark's median microaneurysm: about 4 px across at 896 px on a 1024 px fundus


def spot_score(rgb: np.ndarray, sigma: float, peaks: int = 3) -> float:
    """The photo's dark-spot score (module docstring) from its cached RGB image."""
    from scipy import ndimage
    from skimage.feature import hessian_matrix, hessian_matrix_eigvals

    green = rgb[..., 1].astype(np.float64)
    eig = hessian_matrix_eigvals(hessian_matrix(green, sigma=sigma, order="rc", use_gaussian_derivatives=False))
    blob = np.maximum(eig[1], 0.0) * sigma**2  # eig sorted descending: both > 0 at a dark spot
    window = 8.0 * sigma
    mean = ndimage.gaussian_filter(green, window)
    local_sd = np.sqrt(np.maximum(ndimage.gaussian_filter(green**2, window) - mean**2, 1e-6))
    response = blob / local_sd
    size = green.shape[0]
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (0.45 * size) ** 2
    response = np.where(inside, response, 0.0)
    maxima = (response == ndimage.maximum_filter(response, size=max(3, int(4 * sigma) | 1))) & (response > 0)
    top = np.sort(response[maxima])[::-1][:peaks]
    return float(top.mean()) if top.size else 0.0


def size_auc(run: RunLayout, size: int, split: str, grades: dict, n_boot: int) -> dict:
    """AUC (grade 1 vs 0) of the dark-spot score on one cached size, with a patient bootstrap."""
    import cv2

    from retina_scale.data.cache import read_manifest
    from retina_scale.data.sources import parse_patient_eye, read_splits
    from retina_scale.grading.evaluation import bootstrap_statistics
    from sklearn.metrics import roc_auc_score

    splits = read_splits(run.splits)
    frame = read_manifest(run.cache, size)
    chosen = [(i, p) for i, p in zip(frame["image"], frame["path"]) if splits.get(i) == split and grades.get(i) in (0, 1)]
    sigma = max(0.5, MA_DIAMETER_PER_PX * size / 2 / np.sqrt(2))
    scores = np.array([spot_score(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), sigma) for _, p in chosen])
    labels = np.array([grades[i] for i, _ in chosen])
    groups = np.array([parse_patient_eye(i)[0] for i, _ in chosen])
    def auc(weights):
        keep = weights > 0
        if len(set(labels[keep])) < 2:
            return {"auc": float("nan")}
        return {"auc": float(roc_auc_score(labels[keep], scores[keep], sample_weight=weights[keep]))}

    stats, _, _ = bootstrap_statistics(auc, len(labels), groups, n_boot)
    return {"size": size, "sigma": round(sigma, 3), "photos": len(labels), "grade1": int(labels.sum()),
            "auc": stats["auc"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run folder (its cache and splits.csv)")
    parser.add_argument("--lesions", required=True, help="the synthetic set's lesions.csv (true grades)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sizes", default=None, help="comma-separated cached sizes (default: every stage's)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    from retina_scale.data.cache import read_config, read_manifest
    from retina_scale.evidence.explain import read_lesions, true_grade

    run = RunLayout.from_folder(args.run)
    lesions = read_lesions(args.lesions)
    frame = read_manifest(run.cache)
    grades = {image: true_grade(lesions.get(image, [])) for image in frame["image"]}  # no lesion: grade 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sorted(read_config(run.cache)["sizes"])
    rows = [size_auc(run, size, args.split, grades, args.bootstrap) for size in sizes]
    print(text_table(("size", "sigma", "photos", "grade 1", "AUC [95 % CI]"),
                     [(str(r["size"]), str(r["sigma"]), str(r["photos"]), str(r["grade1"]), f"{r['auc']['value']:.3f} "
                       f"[{r['auc']['ci_low']:.3f}, {r['auc']['ci_high']:.3f}]") for r in rows]))
    if args.json:
        write_json(args.json, {"command": " ".join(["benchmarks/dark_spot_auc.py", *(argv or sys.argv[1:])]),
                               "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
