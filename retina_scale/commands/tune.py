"""Search one stage's learning rate with Keras Tuner, without training the stage.

Every trial starts from the stage's initial weights (the first stage: orthogonal initialisation;
a later stage: transferred from the previous stage's best weights, so train the earlier stages
first), trains tune.epochs epochs on tune.data_fraction of the training draw with the trial's
learning rate and is scored by validation kappa. The Keras Tuner project is the stage's
tuning/ folder of the run: run the command again to continue an interrupted search, raise
tune.max_trials to add trials. A later 'retina-scale train --tune' on the same run reuses the
finished search instead of repeating it.

Examples:
  retina-scale tune --stage tiny                                 # the quick preset's run folder
  retina-scale tune --run runs/quick --stage small tune.max_trials=8 tune.tuner=bayesian
  retina-scale tune --config paper --data ~/eyepacs --stage tiny tune.lr_min=1e-4

Distributed search (Keras Tuner's chief/worker mode; the same command in every process):
  KERASTUNER_TUNER_ID=chief   KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 retina-scale tune ...
  KERASTUNER_TUNER_ID=worker0 KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 retina-scale tune ...
  KERASTUNER_TUNER_ID=worker1 KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 retina-scale tune ...
"""

from __future__ import annotations


def add_arguments(parser):
    from retina_scale.commands import train

    train.add_arguments(parser)
    parser.add_argument("--stage", required=True, help="the stage to search: its name in the ladder (tiny, small, "
                                                        "...) or its 1-based position")
    parser.add_argument("--run", help="an existing run folder: its config.yaml is the config (overrides apply "
                                      "on top), and the search goes into its stages/<i>-<stage>/tuning/")
    parser.add_argument("--json", action="store_true", help="print the search's result as JSON")


def run(args) -> int:
    import json
    import os
    import sys

    from retina_scale.commands.train import build_config
    from retina_scale.run_layout import RunLayout
    from retina_scale.utils.fileio import read_json
    from retina_scale.utils.typed_config import to_yaml

    if args.run:
        run = RunLayout(args.run)
        if not run.config.is_file():
            raise FileNotFoundError(f"no run folder at {run.root} (no config.yaml in it)")
        args.config = str(run.config)
        args.overrides = [f"runs_dir={json.dumps(str(run.root.parent))}", f"name={json.dumps(run.root.name)}",
                          *args.overrides]
    config = build_config(args)
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    from retina_scale.training.tuning import (
        LearningRateSearch,
        build_search_space,
        stage_context,
    )

    build_search_space(config.tune)  # a bad space is refused before any work
    log = (lambda text: None) if args.quiet else print
    context = stage_context(config, args.stage, verbose=0 if args.quiet else 1, log=log)
    if context.layout.state.exists():
        state = read_json(context.layout.state)
        print(f"note: stage {context.stage.name} has started training (lr {state.get('lr'):.3g}, "
              f"{state.get('lr_source')}); a resumed run keeps that rate, whatever this search finds", file=sys.stderr)
    search = LearningRateSearch(verbose=0 if args.quiet else 1, log=log)
    result = search(context)
    if result is None:  # a worker of a distributed search: the chief writes the results
        if args.json:
            print(json.dumps({"tuner_id": os.environ.get("KERASTUNER_TUNER_ID"), "role": "worker",
                              "trials": search.last_tuner.trials_run_here}))
        return 0
    if args.json:
        print(json.dumps(result.to_dict()))
    elif args.quiet:
        print(f"{result.stage}: lr {result.lr:.4g} (trial {result.best_trial} of {len(result.trials)})")
    return 0
