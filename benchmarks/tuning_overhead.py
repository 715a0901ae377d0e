#!/usr/bin/env python3
"""What the learning-rate search costs in a stepwise run: per stage, the search's wall time and the
sum of its trials' times beside the stage's own training time, measured in the same run.

    python benchmarks/tuning_overhead.py --out /tmp/tuning-bench [KEY=VALUE ...]

Runs the ``quick`` preset (search on: 3 trials of one epoch on a quarter of the training draw per
stage) in ``OUT/runs/bench`` and writes ``OUT/tuning_overhead.json``; KEY=VALUE overrides the config.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import keras_tuner
    import tensorflow as tf

    from retina_scale.config import load_train_config
    from retina_scale.training.stepwise import StepwiseScaler
    from retina_scale.training.tuning import search_hook
    from retina_scale.utils.fileio import write_json

    out = Path(args.out)
    config = load_train_config("quick", [f"runs_dir={json.dumps(str(out / 'runs'))}", "name=bench", "export=false",
                                         *args.overrides])
    t0 = time.time()
    report = StepwiseScaler(config, lr_search=search_hook(config, verbose=0), verbose=0).run()
    wall = time.time() - t0
    rows = []
    for s in report["stages"]:
        search = s.get("search") or {}
        rows.append({"stage": s["stage"], "size": s["size"], "epochs": s["epochs"], "train_seconds": s["seconds"],
                     "search_trials": len(search.get("trials", [])), "trial_seconds": search.get("seconds"),
                     "search_wall_seconds": search.get("wall_seconds"), "lr": s["lr"], "lr_source": s["lr_source"],
                     "val_kappa": s["val_kappa"]})
    result = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "tensorflow": tf.__version__, "keras_tuner": keras_tuner.__version__,
              "total_wall_seconds": round(wall, 1), "stages": rows}
    write_json(out / "tuning_overhead.json", result)
    print("stage   size  epochs  train s  trials  trial s  search wall s  search/train  lr")
    for r in rows:
        ratio = r["search_wall_seconds"] / r["train_seconds"] if r["train_seconds"] else float("nan")
        print(f"{r['stage']:<7} {r['size']:>4}  {r['epochs']:>6}  {r['train_seconds']:>7.0f}  {r['search_trials']:>6}  "
              f"{r['trial_seconds']:>7.0f}  {r['search_wall_seconds']:>13.0f}  {ratio:>12.2f}  {r['lr']:.3g}")
    print(f"total wall {wall:.0f} s")


if __name__ == "__main__":
    main()
