#!/usr/bin/env python3
"""The resolution study (Li et al.'s analysis) on the embedded synthetic benchmark, or on your data.

Runs the stepwise ladder, the top stage from scratch for the same training time, and the throughput
measurement, then writes REPORT.md, report.json and figures/ into the study folder. Run it again to
resume after an interruption; finished steps are not repeated.

Examples:
  python scripts/resolution_study.py                      # CPU: 112 -> 224 -> 448 at width 0.25, ~1-1.5 h
  python scripts/resolution_study.py --full               # GPU: the paper's four stages at full width
  python scripts/resolution_study.py --data ~/eyepacs --out runs/study-eyepacs stages.2.epochs=10
  retina-scale report --run runs/resolution-study/runs/stepwise   # the report of any stepwise run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="study folder (default runs/resolution-study, or runs/resolution-study-full)")
    parser.add_argument("--full", action="store_true",
                        help="the paper's 112 -> 224 -> 448 -> 896 ladder at full width (a GPU machine)")
    parser.add_argument("--config", help="a preset or YAML/JSON config instead of the study's (study, study-full)")
    parser.add_argument("--data", help="your data folder instead of the synthetic benchmark")
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch control (report part 7)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement (part 8)")
    parser.add_argument("--throughput-steps", type=int, default=20, help="timed training steps per stage (20)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. stages.0.epochs=3")
    args = parser.parse_args(argv)

    from retina_scale.utils.typed_config import ConfigError
    from retina_scale.evidence.study import run_study
    from retina_scale.config import load_train_config

    preset = args.config or ("study-full" if args.full else "study")
    out = args.out or ("runs/resolution-study-full" if args.full else "runs/resolution-study")
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.data={json.dumps(args.data)}")  # a JSON string is a YAML string
    if args.throughput_steps < 1:
        parser.error(f"--throughput-steps must be >= 1; got {args.throughput_steps}")
    try:
        config = load_train_config(preset, overrides)
        summary = run_study(out, config, scratch=not args.no_scratch, throughput=not args.no_throughput,
                            throughput_steps=args.throughput_steps, verbose=0 if args.quiet else 1)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"resolution_study: error: {exc}", file=sys.stderr)
        return 2
    print(f"Report: {summary['report_md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
