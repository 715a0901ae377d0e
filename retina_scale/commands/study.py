"""The resolution study (Li et al.'s analysis) on the embedded synthetic benchmark, or on your data.

Runs the stepwise ladder, the top stage from scratch for the same training time, and the throughput
measurement, then writes REPORT.md, report.json and figures/ into the study folder. Run it again to
resume after an interruption; finished steps are not repeated.

Examples:
  retina-scale study                      # CPU: 112 -> 224 -> 448 -> 896 at width 0.25 (size it first: config.study_preset)
  retina-scale study --full               # GPU: the paper's four stages at full width
  retina-scale study --data ~/eyepacs --out runs/study-eyepacs stages.2.epochs=10
  retina-scale report --run runs/resolution-study/runs/stepwise   # the report of any stepwise run
"""

from __future__ import annotations

from retina_scale.utils.errors import UserError

DEFAULT_OUT = {False: "runs/resolution-study", True: "runs/resolution-study-full"}
PRESET = {False: "study", True: "study-full"}


def add_arguments(parser):
    parser.add_argument("--out", help=f"study folder (default {DEFAULT_OUT[False]}, or {DEFAULT_OUT[True]} with --full)")
    parser.add_argument("--full", action="store_true",
                        help="the paper's 112 -> 224 -> 448 -> 896 ladder at full width (a GPU machine)")
    parser.add_argument("--config", help=f"a preset or YAML/JSON config instead of the study's ({PRESET[False]}, "
                                         f"{PRESET[True]})")
    parser.add_argument("--data", help="your data folder instead of the synthetic benchmark")
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch control (report part 7)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement (part 8)")
    parser.add_argument("--throughput-steps", type=int, default=20, help="timed training steps per stage (20)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. stages.0.epochs=3")


def build_config(args):
    """The ladder's config: the preset (or --config) with --data and the overrides applied."""
    import json

    from retina_scale.config import load_train_config

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.data={json.dumps(args.data)}")  # a JSON string is a YAML string
    return load_train_config(args.config or PRESET[args.full], overrides)


def run(args) -> int:
    if args.throughput_steps < 1:
        raise UserError(f"--throughput-steps must be >= 1; got {args.throughput_steps}")
    config = build_config(args)
    from retina_scale.evidence.study import run_study
    from retina_scale.training.stepwise import TrainingError

    try:
        summary = run_study(args.out or DEFAULT_OUT[args.full], config, scratch=not args.no_scratch,
                            throughput=not args.no_throughput, throughput_steps=args.throughput_steps,
                            verbose=0 if args.quiet else 1)
    except TrainingError as exc:
        raise UserError(str(exc)) from None
    print(f"Report: {summary['report_md']}")
    return 0
