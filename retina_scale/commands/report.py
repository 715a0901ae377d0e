"""The resolution report of a finished stepwise run (Li et al.'s Tables III-IV and Figs. 2-5):
kappa per stage with bootstrap intervals, no/any/mild DR and referable-DR figures, validation loss
curves, the last stage's confusion heat map, complexity, kappa against stage; and, for a resolution
study folder (retina-scale study), stepwise against from scratch and throughput.

Writes REPORT.md, report.json and figures/*.png into --out (default: <run>/report, or the study folder).

Examples:
  retina-scale report --run runs/quick                        # a stepwise run
  retina-scale report --run runs/quick --measure              # also time each stage on this machine
  retina-scale report --run runs/resolution-study             # a study: ladder, scratch, throughput
"""

from __future__ import annotations

import json
from pathlib import Path

from retina_scale.run_layout import RunLayout, StudyLayout
from retina_scale.utils.errors import UserError


def add_arguments(parser):
    parser.add_argument("--run", required=True,
                        help="a stepwise run folder (holds report.json) or a resolution study folder (holds runs/stepwise)")
    parser.add_argument("--out", help="output folder (default: <run>/report for a run, the folder itself for a study)")
    parser.add_argument("--scratch", help="a from-scratch run of the top stage to compare with (a study finds its own)")
    parser.add_argument("--throughput", help="a throughput.json to include (a study finds its own)")
    parser.add_argument("--measure", action="store_true",
                        help="measure throughput now (training step, input, export, fp32 peak; minutes) into <out>/throughput.json")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per stage with --measure (20)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of the findings")


def resolve(args) -> dict:
    """Run, scratch, throughput and output paths from the arguments (a study folder fills them in)."""
    from retina_scale.utils.fileio import read_json

    run = Path(args.run)
    if not run.exists():
        raise FileNotFoundError(f"no such run folder: {run}")
    study = hit_rates = None
    scratch = Path(args.scratch) if args.scratch else None
    throughput = Path(args.throughput) if args.throughput else None
    out = Path(args.out) if args.out else None
    folder = StudyLayout(run)
    if folder.is_study():  # a study folder (its own report.json is ours)
        run = folder.ladder.root
        if scratch is None and folder.scratch.report_json.exists():
            scratch = folder.scratch.root
        if throughput is None and folder.throughput.exists():
            throughput = folder.throughput
        if folder.timings.exists():
            study = read_json(folder.timings)
        from retina_scale.evidence.explain import study_hit_rates

        hit_rates = study_hit_rates(folder)
        out = out or folder.root
    elif not RunLayout(run).report_json.exists():
        raise FileNotFoundError(f"{run} holds no finished stepwise run (no report.json) and no study (no "
                                "runs/stepwise/report.json); train it first with 'retina-scale train'")
    for name, path in (("--scratch", scratch), ("--throughput", throughput)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{name}: no such file or folder: {path}")
    return {"run": run, "scratch": scratch, "throughput": throughput, "out": out or RunLayout(run).report_dir,
            "study": study, "hit_rates": hit_rates}


def run(args) -> int:
    from retina_scale.evidence.report import write_report
    from retina_scale.run_layout import ReportLayout

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1; got {args.steps}")
    paths = resolve(args)
    throughput = paths["throughput"]
    if args.measure:
        from retina_scale.evidence.throughput import (
            format_throughput,
            measure_run_throughput,
        )
        from retina_scale.utils.fileio import write_json

        result = measure_run_throughput(paths["run"], steps=args.steps, log=None if args.json else print)
        throughput = ReportLayout(paths["out"]).throughput
        throughput.parent.mkdir(parents=True, exist_ok=True)
        write_json(throughput, result)
        if not args.json:
            print(format_throughput(result))
    summary = write_report(paths["run"], paths["out"], scratch_dir=paths["scratch"], throughput_file=throughput,
                           study=paths["study"], hit_rates=paths["hit_rates"])
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "complexity"}, indent=2))
    else:
        for line in summary["findings"]:
            print(f"- {line}")
        print(f"Report: {summary['report_md']}")
    return 0
