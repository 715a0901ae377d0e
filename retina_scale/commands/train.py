"""Train the ladder of stages (the paper's Algorithm 1): build each stage, carry the previous
stage's weights over by layer name, fine-tune, evaluate and export. Without --data, the embedded
synthetic data set is made (or reused) in the run folder. Run the same command again to resume.

Examples:
  retina-scale train                                   # the 'quick' preset on synthetic data
  retina-scale train --config paper --data ~/eyepacs   # the paper's ladder on EyePACS
  retina-scale train stages.0.epochs=3 optim.lr=1e-3   # any config value, as key=value
  retina-scale train --config paper --tune tune.max_trials=8   # Keras Tuner picks each stage's lr
"""

from __future__ import annotations

import argparse

from retina_scale.config import FORMATS, STRATEGIES


def add_arguments(parser):
    parser.add_argument("--config", default="quick",
                        help="a preset (quick, paper, study, study-full) or a YAML/JSON config file (default: quick)")
    parser.add_argument("--data", help="a data folder (EyePACS, APTOS, one folder per grade, or CSV); "
                                       "default: the embedded synthetic data set")
    parser.add_argument("--labels", help="the labels CSV, if not where the format expects it")
    parser.add_argument("--format", choices=FORMATS, help="the data layout")
    parser.add_argument("--name", help="run name: the run folder is <runs_dir>/<name>")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="tf.distribute strategy (default: chosen from the machine and TF_CONFIG)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                        help="search each stage's learning rate with Keras Tuner before training it (tune.enabled; "
                             "off in the presets: their rates beat a short search, README); --no-tune uses the "
                             "config's learning rates")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="do not write the run's report (REPORT.md and figures in <run>/report/) at the end")
    parser.add_argument("positional_overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, same as --set")


def build_config(args):
    from retina_scale.config import load_train_config

    overrides = list(args.overrides)
    for flag, key in (("data", "data.data"), ("labels", "data.labels"), ("format", "data.format"),
                      ("name", "name"), ("strategy", "strategy")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={_yaml_string(value)}")
    if getattr(args, "tune", None) is not None:
        overrides.append(f"tune.enabled={'true' if args.tune else 'false'}")
    overrides += args.positional_overrides
    return load_train_config(args.config, overrides)


def _yaml_string(value: str) -> str:
    import json

    return json.dumps(value)  # a JSON string is a YAML string: paths with ':' or spaces stay strings


def run(args) -> int:
    import json

    from retina_scale.utils.typed_config import to_yaml

    config = build_config(args)
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    from retina_scale.training.stepwise import StepwiseScaler, stage_rows
    from retina_scale.training.tuning import search_hook

    verbose = 0 if args.quiet else 2 if getattr(args, "verbose", False) else 1
    # A TrainingError (the loss kept diverging) is a UserError: the CLI prints it as one line.
    scaler = StepwiseScaler(config, lr_search=search_hook(config, verbose=verbose), verbose=verbose)
    report = scaler.run()
    summary = write_run_report(report) if args.report and scaler.is_chief else None
    if args.quiet:
        print(json.dumps({"run_dir": report["run_dir"], "report": summary and summary["report_md"], "stages": [
            {k: s[k] for k in ("stage", "size", "val_kappa", "test_kappa", "seconds", "export_path")}
            for s in stage_rows(report)]}))
    elif summary is not None:
        from retina_scale.evidence.report import format_closing

        searched = any(s.get("lr_source") == "search" for s in report["stages"])
        print("\n" + format_closing(summary, stage_rows(report)[-1].get("export_path"), searched))
    return 0


def write_run_report(report: dict) -> dict | None:
    """REPORT.md and figures in ``<run>/report/`` (``retina-scale report``), when the test split was evaluated."""
    from retina_scale.evidence.report import write_report

    if not any(s.get("test_images") for s in report["stages"]):
        return None  # no test split: nothing to report beyond report.md
    return write_report(report["run_dir"])
