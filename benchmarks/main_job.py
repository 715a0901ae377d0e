#!/usr/bin/env python3
"""The main job as a newcomer meets it (issue 15): `python scripts/stepwise.py` from a clean clone, timed, and
whether two such runs give the same numbers.

`--same-twice` clones this repository's HEAD twice into a scratch folder, runs the command in each, one after
the other, and compares every number of `report.json` and of each stage's `evaluation.json`, timings aside
(keys naming seconds, paths and dates). `--seeds 1,2,3` runs the command once per seed (`seed=N`) in one clone
and tabulates each stage's test kappa with its interval. Extra arguments after `--` go to the command. Prints a
table and writes JSON with `--json`.

    python benchmarks/main_job.py --same-twice --json benchmarks/main_job_same_twice.json
    python benchmarks/main_job.py --seeds 1,2,3 --json benchmarks/main_job_seeds.json -- --no-tune
"""

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "path", "checkpoint", "keras_model", "run_dir", "project_dir", "created", "time")


def numbers_of(value, where=""):
    """``{json path: value}`` of every leaf of ``value``, leaving out the keys that name timings or paths."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not any(v in key for v in VOLATILE):
                out.update(numbers_of(item, f"{where}/{key}"))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(numbers_of(item, f"{where}/{i}"))
        return out
    return {where: value}


def run_results(run_dir: Path) -> dict:
    """report.json and every stage's evaluation.json of a finished run, as ``{file: {json path: value}}``."""
    files = [run_dir / "report.json", *sorted(run_dir.glob("stages/*/evaluation.json"))]
    return {str(f.relative_to(run_dir)): numbers_of(json.loads(f.read_text())) for f in files}


def differences(a: dict, b: dict) -> list[str]:
    """Every json path whose value differs between two runs' results (or that only one has)."""
    out = []
    for name in sorted(a.keys() | b.keys()):
        x, y = a.get(name, {}), b.get(name, {})
        out += [f"{name}{k}: {x.get(k)!r} != {y.get(k)!r}" for k in sorted(x.keys() | y.keys()) if x.get(k) != y.get(k)]
    return out


def clean_clone(scratch: Path, name: str) -> Path:
    target = scratch / name
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    return target


def run_main_job(clone: Path, args: list[str], log: Path) -> float:
    """Runs ``python scripts/stepwise.py ARGS`` in ``clone`` (output to ``log``); returns the wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "scripts/stepwise.py", *args], cwd=clone, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args) or 'the main job'} failed in {clone} (rc {done.returncode}); see {log}")
    return time.perf_counter() - start


def same_twice(scratch: Path, extra: list[str]) -> dict:
    runs = []
    for name in ("a", "b"):
        clone = clean_clone(scratch, name)
        seconds = run_main_job(clone, extra, scratch / f"{name}.log")
        runs.append({"clone": str(clone), "seconds": round(seconds, 1), "results": run_results(clone / "runs" / "quick")})
        print(f"run {name}: {seconds:.0f} s", flush=True)
    diff = differences(runs[0]["results"], runs[1]["results"])
    compared = sum(len(v) for v in runs[0]["results"].values())
    print(f"{compared} numbers compared; {len(diff)} differ" + "".join(f"\n  {d}" for d in diff[:20]))
    return {"seconds": [r["seconds"] for r in runs], "numbers_compared": compared, "differences": diff,
            "identical": not diff}


def seed_table(scratch: Path, seeds: list[int], extra: list[str]) -> dict:
    clone = clean_clone(scratch, "seeds")
    rows = []
    for seed in seeds:
        name = f"seed{seed}"
        seconds = run_main_job(clone, [f"seed={seed}", f"name={name}", f"export_dir=saved_models/{name}", *extra],
                               scratch / f"{name}.log")
        run_dir = clone / "runs" / name
        report = json.loads((run_dir / "report.json").read_text())
        kappas = []
        for stage in report["stages"]:
            kappa = json.loads((run_dir / "stages" / f"{stage['index']}-{stage['stage']}" / "evaluation.json").read_text())["kappa"]
            kappas.append({"stage": stage["stage"], "size": stage["size"], "lr": stage["lr"],
                           "lr_source": stage["lr_source"], **{k: kappa[k] for k in ("value", "ci_low", "ci_high")}})
        rows.append({"seed": seed, "seconds": round(seconds, 1), "stages": kappas,
                     "rises": all(b["value"] > a["value"] for a, b in zip(kappas, kappas[1:]))})
        print(f"seed {seed}: " + " -> ".join(f"{k['value']:.3f}" for k in kappas) + f" ({seconds:.0f} s)", flush=True)
    return {"seeds": rows}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--same-twice", action="store_true")
    parser.add_argument("--seeds", default="")
    parser.add_argument("--json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not args.same_twice and not args.seeds:
        parser.error("say --same-twice and/or --seeds")
    scratch = Path(tempfile.mkdtemp(prefix="main-job-"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    out = {"commit": commit, "command": "python scripts/stepwise.py " + " ".join(extra), "cpu": cpu,
           "python": platform.python_version()}
    try:
        if args.same_twice:
            out["same_twice"] = same_twice(scratch, extra)
        if args.seeds:
            out.update(seed_table(scratch, [int(s) for s in args.seeds.split(",")], extra))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
