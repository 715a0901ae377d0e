"""Why is mild DR (grade 1, microaneurysms only) missed? Separating "the network cannot see it" from
"the thresholds throw it away", per stage of a finished run.

For each stage's best model (``best.keras``) on a split of the run's cache (no augmentation):

* mean regression score per true grade;
* AUC of the score for grade 1 against grade 0: how well the network *ranks* mild DR above no DR,
  whatever the thresholds;
* Spearman correlation, within grade-1 images, between the score and the image's number of
  microaneurysms (from the synthetic set's ``lesions.csv``): does the score respond to MAs at all;
* mild-DR recall with the run's validation-optimised thresholds, and the best mild-DR F1 any single
  0|1 cut-off could give on this split (an optimistic ceiling: the cut is chosen on the same images).

Usage::

    python benchmarks/mild_dr_diagnosis.py --run runs/resolution-study/runs/stepwise \
        --lesions runs/resolution-study/data/synthetic/lesions.csv --split test --json out.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def diagnose_stage(stage_dir: Path, cache: Path, splits: Path, split: str, ma_counts: dict) -> dict:
    import numpy as np
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from retina_scale.commands.evaluate import load_predictor
    from retina_scale.data.pipeline import CacheInput
    from retina_scale.grading.thresholds import apply_thresholds

    predict, thresholds, size, _ = load_predictor(str(stage_dir))
    inp = CacheInput(cache, size, split=split, split_file=splits, augment=None, resample=None)
    scores, labels, ids = [], [], []
    for images, y, image_ids in inp.dataset(32, training=False, include_ids=True):
        scores.append(predict(images))
        labels.append(y.numpy())
        ids += [i.decode() for i in image_ids.numpy()]
    scores, labels = np.concatenate(scores), np.concatenate(labels).astype(int)
    grade = {g: scores[labels == g] for g in range(5)}
    zero_one = labels <= 1
    auc = float(roc_auc_score(labels[zero_one] == 1, scores[zero_one])) if len(grade[1]) and len(grade[0]) else None
    mild = labels == 1
    counts = np.array([ma_counts.get(i, 0) for i, m in zip(ids, mild) if m])
    rho = float(spearmanr(counts, scores[mild]).statistic) if mild.sum() > 2 and counts.std() > 0 else None
    predicted = apply_thresholds(scores, thresholds)
    recall = float(((predicted == 1) & mild).sum() / max(1, mild.sum()))
    best_f1, best_cut = 0.0, None
    for cut in np.unique(scores[zero_one]):
        tp = ((scores >= cut) & (scores < thresholds[1]) & mild).sum()
        fp = ((scores >= cut) & (scores < thresholds[1]) & ~mild).sum()
        fn = mild.sum() - tp
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        if f1 > best_f1:
            best_f1, best_cut = float(f1), float(cut)
    return {
        "stage": stage_dir.name, "size": size, "split": split, "n": int(len(labels)),
        "mean_score_per_grade": {g: (float(v.mean()) if len(v) else None) for g, v in grade.items()},
        "auc_mild_vs_none": auc, "spearman_score_vs_ma_count_in_grade1": rho,
        "mild_recall_at_run_thresholds": recall, "threshold_0_1": thresholds[0],
        "best_mild_f1_any_cut": best_f1, "best_cut": best_cut,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished stepwise run folder")
    ap.add_argument("--lesions", help="the synthetic set's lesions.csv (for the MA-count correlation)")
    from retina_scale.config import SPLIT_NAMES

    ap.add_argument("--split", default="test", choices=SPLIT_NAMES)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from retina_scale.run_layout import RunLayout
    from retina_scale.utils.fileio import write_text

    run = RunLayout.from_folder(args.run)
    ma_counts = Counter()
    if args.lesions:
        with open(args.lesions, newline="") as f:
            for row in csv.DictReader(f):
                if row["kind"] == "microaneurysm":
                    ma_counts[row["image"]] += 1
    results = []
    for stage in run.stages():
        r = diagnose_stage(stage.dir, run.cache, run.splits, args.split, ma_counts)
        results.append(r)
        means = " / ".join("-" if v is None else f"{v:.2f}" for v in r["mean_score_per_grade"].values())
        rho = r["spearman_score_vs_ma_count_in_grade1"]
        print(f"{r['stage']:10} {r['size']:4} px  mean score by grade {means}  AUC(1 vs 0) {r['auc_mild_vs_none']:.3f}  "
              f"rho(score, #MA | grade 1) {'-' if rho is None else f'{rho:.2f}'}  mild recall {r['mild_recall_at_run_thresholds']:.3f} "
              f"(0|1 cut {r['threshold_0_1']:.2f})  best mild F1 any cut {r['best_mild_f1_any_cut']:.3f}")
    if args.json:
        write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
