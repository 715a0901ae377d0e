#!/usr/bin/env python3
"""What `deterministic: true` costs: the training step's img/s with and without TensorFlow's op determinism.

Each (mode, stage) runs in its own process (op determinism is process-wide and cannot be turned off), alternating
modes, `--repeats` times; prints a table and writes JSON with `--json`.

    python benchmarks/determinism_cost.py --stages tiny,small,median --repeats 2 --json benchmarks/determinism_cost.json
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ONE = """
import json, sys
from retina_scale.config import load_train_config
from retina_scale.models.convnet import get_stage
from retina_scale.evidence.throughput import train_images_per_second
mode, stage, width = sys.argv[1], sys.argv[2], sys.argv[3]
config = load_train_config("quick", [f"model.width={width}", f"deterministic={'true' if mode == 'on' else 'false'}"])
if mode == "on":
    from retina_scale.training.stage import make_deterministic
    make_deterministic(config.seed)
print(json.dumps(train_images_per_second(config, get_stage(stage), steps=20, min_seconds=3.0)))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="tiny,small,median")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    rows = []
    for stage in args.stages.split(","):
        runs = {"off": [], "on": []}
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                out = subprocess.run([sys.executable, "-c", ONE, mode, stage, str(args.width)],
                                     capture_output=True, text=True, check=True, cwd=root).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
        off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
        rows.append({"stage": stage, "width": args.width, "off_img_s": off, "on_img_s": on, "ratio": on / off,
                     "runs": runs})
        print(f"{stage:7s} width {args.width}: off {off:7.1f} img/s, on {on:7.1f} img/s, on/off {on / off:.2f} "
              f"(runs off {runs['off']}, on {runs['on']})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
