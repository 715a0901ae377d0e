"""Weights, forward multiply-adds and activations per image of every stage of the network family,
counted from the built Keras models, beside the paper's Fig. 4 figures and the ratio ours / paper."""

from __future__ import annotations

import json

from retina_scale.utils.errors import UserError


def add_arguments(parser):
    parser.add_argument(
        "--stages",
        default="tiny,small,median,large",
        help="comma-separated stage names or input sizes (default: the paper's four stages)",
    )
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier (default 1.0, the paper's)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per stage")
    parser.add_argument("--plot", metavar="FILE", help="also draw the paper's Fig. 4 analogue to this PNG")


def run(args) -> int:
    from retina_scale.models.complexity import (
        family_complexity,
        format_table,
        plot_complexity,
    )
    from retina_scale.models.convnet import get_stage

    stages = [s for s in (part.strip() for part in args.stages.split(",")) if s]
    if not stages:
        raise UserError("--stages is empty; give e.g. tiny,small,median,large")
    specs = [get_stage(s) for s in stages]
    if not args.width > 0:
        raise UserError(f"--width must be a positive number; got {args.width}")
    records = family_complexity(specs, width=args.width)
    if args.plot:
        plot_complexity(records, args.plot)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(format_table(records))
        if args.plot:
            print(f"figure written to {args.plot}")
    return 0
