#!/usr/bin/env python3
"""Issue 17's table for finished runs: the top stage alone, with test-time augmentation, with both-eye fusion,
and the stage ensemble, each with its test kappa, 95 % patient-bootstrap interval and images/s.

For each run folder, `retina-scale evaluate` scores the top stage on the test split (its own validation cut-offs)
with 1 and with N views (`--tta N`), and the top stage averaged with the stage below (`--ensemble`, cut-offs fitted
on validation), each process timing its own model calls; the fusion row is the run's fusion stage
(`fusion/evaluation.json`; its cost is the top stage's forward pass, which gives both the features and the
single-eye grade, plus a small network: the plain row's images/s is its bound). Runs go one after the other;
nothing else should compute meanwhile.

    python benchmarks/beyond_paper.py runs/stepwise-vs-scratch/seed-*/runs/stepwise --tta 8 \
        --json benchmarks/beyond_paper_2core.json
"""

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from retina_scale.run_layout import RunLayout  # noqa: E402
from retina_scale.utils.fileio import read_json, write_json  # noqa: E402
from retina_scale.utils.hardware import cpu_flags, cpu_model  # noqa: E402


def evaluate(stage_dir: Path, run: RunLayout, extra: list[str], out: Path) -> dict:
    """``retina-scale evaluate`` of a stage on the run's test split, in its own process; its JSON result."""
    command = [sys.executable, "-m", "retina_scale", "evaluate", "--model", str(stage_dir), "--cache",
               str(run.cache), "--split", "test", "--splits", str(run.splits), "--out", str(out), "--json", *extra]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return read_json(out)


def run_rows(run_dir: Path, draws: int, scratch: Path) -> dict:
    """The rows of one run: ``{name: {"kappa": {value, ci_low, ci_high}, "images_per_second": ...}}``."""
    run = RunLayout.from_folder(run_dir)
    top = [s for s in run.stages() if s.best_keras.is_file()][-1]
    plain = evaluate(top.dir, run, ["--tta", "1"], scratch / "plain.json")
    tta = evaluate(top.dir, run, ["--tta", str(draws)], scratch / "tta.json")
    ensemble = evaluate(top.dir, run, ["--ensemble"], scratch / "ensemble.json")
    rows = {"top stage alone": _row(plain, plain["prediction"]["images_per_second"]),
            f"TTA {draws}": _row(tta, tta["prediction"]["images_per_second"]),
            "stage ensemble": _row(ensemble, ensemble["prediction"]["images_per_second"])}
    fusion = run.root / "fusion" / "evaluation.json"
    if fusion.is_file():
        rows["fusion"] = _row(read_json(fusion), plain["prediction"]["images_per_second"])
    return {"run": str(run_dir), "stage": top.name, "rows": rows}


def _row(evaluation: dict, images_per_second) -> dict:
    return {"kappa": evaluation["kappa"], "images_per_second": images_per_second,
            "mild_dr_auc": evaluation.get("mild_dr_auc")}


def table(runs: list[dict]) -> str:
    names = list(dict.fromkeys(name for r in runs for name in r["rows"]))
    lines = ["| row | " + " | ".join(Path(r["run"]).parent.parent.name or r["run"] for r in runs)
             + " | mean gain over the top stage | images/s (mean) |", "|---" * (len(runs) + 3) + "|"]
    for name in names:
        cells, gains, rates = [], [], []
        for r in runs:
            row, base = r["rows"].get(name), r["rows"]["top stage alone"]
            if row is None:
                cells.append("-")
                continue
            k = row["kappa"]
            cells.append(f"{k['value']:.3f} [{k['ci_low']:.3f}, {k['ci_high']:.3f}]")
            gains.append(k["value"] - base["kappa"]["value"])
            rates.append(row["images_per_second"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.fmean(gains):+.4f} | "
                     f"{statistics.fmean(rates):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run folders")
    parser.add_argument("--tta", type=int, default=8, help="views of the TTA row (default 8)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    results = []
    for run_dir in args.runs:
        scratch = Path(run_dir) / "beyond_paper"
        scratch.mkdir(exist_ok=True)
        print(f"{run_dir} ...", flush=True)
        results.append(run_rows(Path(run_dir), args.tta, scratch))
    print(table(results))
    if args.json:
        write_json(args.json, {"command": " ".join(["benchmarks/beyond_paper.py", *(argv or sys.argv[1:])]),
                               "machine": {"cpu": cpu_model(), "avx512f": "avx512f" in cpu_flags(),
                                           "amx_bf16": "amx_bf16" in cpu_flags()}, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
