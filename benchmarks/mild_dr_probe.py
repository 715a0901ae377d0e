"""Can a stage's network learn mild DR (microaneurysms only) at all when asked to? A focused probe.

Starting from a stage's best weights, train on grade 0 and grade 1 images only (balanced draw, the
same regression head and loss, targets 0 and 1), and after every round of steps report the AUC of the
score for grade 1 against grade 0 on the run's validation split. If the AUC climbs well above 0.5,
the microaneurysms reach the network and the ladder's training simply did not learn them; if it stays
near 0.5, the signal is lost before the network (data, cache, augmentation) or beyond its capacity.

Usage::

    python benchmarks/mild_dr_probe.py --stage-dir runs/resolution-study/runs/stepwise/stages/3-median \
        --rounds 6 --steps 40 [--no-augment] --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _run_and_stage(stage_dir: Path):
    """The ``RunLayout`` of the run that holds ``stage_dir`` (``stages/<i>-<name>/``) and the stage's
    ``StageLayout`` (None if ``stage_dir`` is not one of its stages)."""
    from retina_scale.run_layout import RunLayout

    run = RunLayout.from_folder(stage_dir.parent.parent)
    found = [s for s in run.stages() if s.dir.resolve() == stage_dir.resolve()]
    return run, (found[0] if found else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage-dir", required=True, help="a finished stage folder (holds best.npz)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40, help="training steps per round")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, help="global batch size (default: the run's)")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import numpy as np
    import pandas as pd
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    from retina_scale.config import AugmentConfig, ResampleConfig, TrainConfig
    from retina_scale.data.pipeline import CacheInput
    from retina_scale.models.convnet import get_stage
    from retina_scale.training.checkpoint import restore_checkpoint
    from retina_scale.training.distribute import DistributedTrainer
    from retina_scale.training.optim import make_optimizer
    from retina_scale.training.stage import build_stage_model
    from retina_scale.utils.typed_config import load_config

    run, stage = _run_and_stage(Path(args.stage_dir))
    if stage is None:
        ap.error(f"{args.stage_dir} is not a stage folder of a run (stages/<i>-<name>/)")
    config = load_config(TrainConfig, run.config)
    state = json.loads(stage.state.read_text())
    spec = get_stage(state["stage"])
    cache = run.cache
    splits = pd.read_csv(run.splits, dtype={"image": str})
    splits = splits[splits["label"].isin([0, 1])]

    with tempfile.TemporaryDirectory() as tmp:
        split_file = Path(tmp) / "splits01.csv"
        splits.to_csv(split_file, index=False)
        augment = None if args.no_augment else config.augment or AugmentConfig()
        train = CacheInput(cache, spec.input_size, split="train", split_file=split_file, augment=augment,
                           resample=ResampleConfig(r=1.0, w0="balanced"), seed=1)
        val = CacheInput(cache, spec.input_size, split="val", split_file=split_file, augment=None, resample=None)
        strategy = tf.distribute.get_strategy()
        model = build_stage_model(config, spec)
        restore_checkpoint(model, None, stage.best)
        optimizer = make_optimizer(config.optim, lr=args.lr)
        batch = args.batch or config.global_batch_size
        trainer = DistributedTrainer(model, optimizer, strategy, batch)
        examples = train.dataset(batch, training=True, epochs=1000).unbatch()
        iterator = trainer.distribute_training(lambda: examples)

        def auc():
            scores, labels = [], []
            for images, y in val.dataset(batch, training=False):
                scores.append(np.asarray(model(images, training=False)).reshape(-1))
                labels.append(y.numpy())
            scores, labels = np.concatenate(scores), np.concatenate(labels)
            return float(roc_auc_score(labels == 1, scores)), float(scores[labels == 0].mean()), float(scores[labels == 1].mean())

        rows = []
        a, m0, m1 = auc()
        rows.append({"round": 0, "steps": 0, "val_auc": a, "mean_score_0": m0, "mean_score_1": m1, "loss": None})
        print(f"{spec.name} {spec.input_size} px, augment {'off' if args.no_augment else 'on'}: "
              f"{len(train)} train / {len(val)} val images of grades 0-1")
        print(f"round 0: val AUC(1 vs 0) {a:.3f}  mean score 0: {m0:.2f}  1: {m1:.2f}")
        t0 = time.time()
        for r in range(1, args.rounds + 1):
            loss = trainer.train_steps(iterator, args.steps)
            a, m0, m1 = auc()
            rows.append({"round": r, "steps": r * args.steps, "val_auc": a, "mean_score_0": m0, "mean_score_1": m1,
                         "loss": loss})
            print(f"round {r}: {r * args.steps} steps, loss {loss:.3f}, val AUC(1 vs 0) {a:.3f}  mean score 0: {m0:.2f}  "
                  f"1: {m1:.2f}  ({time.time() - t0:.0f} s)", flush=True)
    result = {"stage": spec.name, "size": spec.input_size, "augment": not args.no_augment, "lr": args.lr,
              "batch": batch, "rounds": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
