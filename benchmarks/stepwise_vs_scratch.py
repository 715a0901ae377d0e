#!/usr/bin/env python3
"""Stepwise against from scratch at the same wall-clock time, on several seeds (issue 14).

For each seed, runs the resolution study (`scripts/resolution_study.py`: the ladder, then its top stage
trained from orthogonal initialisation for the ladder's training time) with `seed=N`, all seeds on the same
photos and cache (made once, by the first seed). The default ladder is the quick preset's, 112 -> 224 -> 448
on a 512 px fundus (about 10 minutes a seed on a 2-core CPU); `--config study` runs the 896 px ladder.
Extra arguments after `--` go to the study command (config overrides such as `data.normalize=graham`).

Reports per seed and as mean and sample standard deviation over the seeds:
- the final test kappa of the ladder's top stage and of the scratch run (patient-bootstrap intervals per seed);
- the training seconds each needed to first reach the scratch run's best validation kappa (the kappa at
  cut-offs optimised on validation, the measure that picks the epochs), and their ratio.

    python benchmarks/stepwise_vs_scratch.py --seeds 1,2,3 --out runs/stepwise-vs-scratch \
        --json benchmarks/stepwise_vs_scratch_2core.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from retina_scale.utils.fileio import write_json  # noqa: E402
from retina_scale.utils.hardware import cpu_flags, cpu_model  # noqa: E402


def study_command(config: str, out: Path, seed: int, shared: Path | None, extra: list[str]) -> list[str]:
    """The study command line of one seed; seeds after the first read the first seed's photos and cache."""
    command = [sys.executable, str(ROOT / "scripts" / "resolution_study.py"), "--config", config, "--out", str(out),
               "--no-throughput", "--quiet", f"seed={seed}", *extra]
    if shared is not None:
        command += [f"data.data={json.dumps(str(shared / 'data' / 'synthetic'))}",
                    f"data.cache={json.dumps(str(shared / 'data' / 'cache'))}"]
    return command


def seed_row(seed: int, report: dict, wall: float) -> dict:
    """One seed's comparison from its study's report.json."""
    c = report["scratch"]
    ladder_reach, scratch_reach = c["ladder_time_to_scratch_best"], c["scratch_time_to_scratch_best"]
    return {
        "seed": seed,
        "stage": c["stage"],
        "ladder_test_kappa": c["ladder_test_kappa"],
        "scratch_test_kappa": c["scratch_test_kappa"],
        "ladder_seconds": c["ladder_seconds"],
        "scratch_seconds": c["scratch_seconds"],
        "scratch_epochs": c["scratch_epochs"],
        "scratch_best_val_kappa": c["scratch_best_val_kappa"],
        "ladder_time_to_scratch_best": ladder_reach,
        "scratch_time_to_scratch_best": scratch_reach,
        "reach_ratio": (ladder_reach / scratch_reach) if ladder_reach is not None and scratch_reach else None,
        "study_wall_seconds": round(wall, 1),
    }


def spread(values: list) -> dict:
    """Mean, sample standard deviation, min and max of the values that exist (None: a seed that never reached)."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    sd = statistics.stdev(present) if len(present) > 1 else None
    return {"n": len(present), "mean": statistics.fmean(present), "sd": sd, "min": min(present), "max": max(present)}


def summarise(rows: list[dict]) -> dict:
    return {
        "ladder_test_kappa": spread([r["ladder_test_kappa"]["value"] for r in rows]),
        "scratch_test_kappa": spread([r["scratch_test_kappa"]["value"] for r in rows]),
        "kappa_difference": spread([r["ladder_test_kappa"]["value"] - r["scratch_test_kappa"]["value"] for r in rows]),
        "ladder_time_to_scratch_best": spread([r["ladder_time_to_scratch_best"] for r in rows]),
        "scratch_time_to_scratch_best": spread([r["scratch_time_to_scratch_best"] for r in rows]),
        "reach_ratio": spread([r["reach_ratio"] for r in rows]),
        "seeds_where_ladder_reached": sum(r["ladder_time_to_scratch_best"] is not None for r in rows),
    }


def _f(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict], summary: dict) -> str:
    lines = ["| seed | ladder test kappa [95 % CI] | scratch test kappa [95 % CI] | ladder s to scratch's best | "
             "scratch s to its best | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lk, sk = r["ladder_test_kappa"], r["scratch_test_kappa"]
        lines.append(f"| {r['seed']} | {_f(lk['value'])} [{_f(lk['ci_low'])}, {_f(lk['ci_high'])}] | "
                     f"{_f(sk['value'])} [{_f(sk['ci_low'])}, {_f(sk['ci_high'])}] | "
                     f"{_f(r['ladder_time_to_scratch_best'], 0)} | {_f(r['scratch_time_to_scratch_best'], 0)} | "
                     f"{_f(r['reach_ratio'], 2)} |")
    s = summary
    lines.append(f"| mean (sd) | {_f(s['ladder_test_kappa']['mean'])} ({_f(s['ladder_test_kappa']['sd'])}) | "
                 f"{_f(s['scratch_test_kappa']['mean'])} ({_f(s['scratch_test_kappa']['sd'])}) | "
                 f"{_f(s['ladder_time_to_scratch_best']['mean'], 0)} ({_f(s['ladder_time_to_scratch_best']['sd'], 0)}) | "
                 f"{_f(s['scratch_time_to_scratch_best']['mean'], 0)} "
                 f"({_f(s['scratch_time_to_scratch_best']['sd'], 0)}) | {_f(s['reach_ratio']['mean'], 2)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    parser.add_argument("--config", default="quick", help="the ladder's preset or config file (default quick)")
    parser.add_argument("--out", default="runs/stepwise-vs-scratch", help="folder of the seeds' studies")
    parser.add_argument("--json", help="write the rows and the summary here")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out).resolve()
    rows, shared = [], None
    for seed in seeds:
        folder = out / f"seed-{seed}"
        start = time.perf_counter()
        print(f"seed {seed}: {folder}", flush=True)
        subprocess.run(study_command(args.config, folder, seed, shared, extra), check=True)
        rows.append(seed_row(seed, json.loads((folder / "report.json").read_text()), time.perf_counter() - start))
        shared = shared or folder
    summary = summarise(rows)
    print(table(rows, summary))
    if args.json:
        result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                  "machine": {"cpu": cpu_model(), "avx512f": "avx512f" in cpu_flags(),
                              "amx_bf16": "amx_bf16" in cpu_flags(), "cores": os.cpu_count()},
                  "python": platform.python_version(),
                  "config": args.config, "extra": extra, "rows": rows, "summary": summary}
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
