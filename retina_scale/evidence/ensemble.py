"""The stage ensemble (issue 17): a run's stage averaged with the stage below it, each at its own input size.

Each member grades the image at its own size from the cache (the 448 px stage the 448 px image, the 224 px stage
the 224 px one); the ensemble's continuous grade is the plain mean of the two. Its four cut-offs are optimised for
that mean on the validation split (``grading.thresholds.fit_thresholds``), never on the evaluated split, and the
evaluation is the usual one (``grading.evaluation.evaluate_predictions``, patient bootstrap). The top stage alone
is evaluated beside it on the same images at its own recorded thresholds, and each has its images per second, so
the gain and its cost read side by side. ``retina-scale evaluate --ensemble`` is the command.

>>> import numpy as np
>>> lower = (np.array([1.0, 3.0]), np.array([0.0, 2.0]), np.array(["a", "b"]))
>>> top = (np.array([2.0, 0.0]), np.array([2.0, 0.0]), np.array(["b", "a"]))  # the same images, another order
>>> ids, labels, scores = mean_scores([lower, top])
>>> ids.tolist(), labels.tolist(), scores.tolist()
(['a', 'b'], [0.0, 2.0], [0.5, 2.5])
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from retina_scale.run_layout import RunLayout, StageLayout
from retina_scale.utils.errors import UserError


@dataclasses.dataclass(frozen=True)
class Members:
    """The two stages of an ensemble and the run they belong to."""

    lower: StageLayout
    top: StageLayout
    run: RunLayout


def resolve_members(path) -> Members:
    """The stage ``path`` names (a stage folder of a run, or a run folder: its last stage with a best.keras) and
    the stage below it.

    Args:
        path: ``runs/NAME/stages/<i>-<name>`` or ``runs/NAME``.

    Raises:
        UserError: ``path`` is an export, a .keras file or any other folder; the stage is the run's first; the
            stage below it is missing or has no best.keras yet.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    if path.is_dir() and RunLayout(path).stages_dir.is_dir():
        run = RunLayout.from_folder(path)
        done = [s for s in run.stages() if s.best_keras.is_file()]
        if not done:
            raise UserError(f"run {path} has no finished stage (no best.keras); train it first (retina-scale train)")
        top = done[-1]
    else:
        index, _, name = path.name.partition("-")
        if not (path.is_dir() and index.isdigit() and name and path.parent.name == "stages"):
            raise UserError(f"--ensemble needs a run's stages: give a run folder (runs/NAME) or a stage folder "
                            f"(runs/NAME/stages/<i>-<name>), not an export or a .keras file; got {path}")
        top = StageLayout(path, int(index), name)
        run = RunLayout.from_folder(top.run_root)
        if not top.best_keras.is_file():
            raise UserError(f"stage {path} has no best.keras (not finished); train it first")
    below = [s for s in run.stages() if s.index == top.index - 1]
    if top.index <= 1:
        raise UserError(f"--ensemble averages a stage with the stage below it, and {top.dir.name} is the run's "
                        "first stage; give stage 2 or above")
    if not below or not below[0].best_keras.is_file():
        raise UserError(f"--ensemble: the stage below {top.dir.name} (stage {top.index - 1}) is missing or has no "
                        f"best.keras in {run.stages_dir}; train it, or evaluate without --ensemble")
    return Members(below[0], top, run)


def mean_scores(passes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, labels, scores)`` sorted by id, the scores the mean of the passes' scores for each image.

    Args:
        passes: one ``(scores, labels, ids)`` per member, each over the same images in any order.

    Raises:
        ValueError: the passes do not hold the same images.
    """
    ordered = []
    for scores, labels, ids in passes:
        order = np.argsort(np.asarray(ids))
        ordered.append((np.asarray(scores, np.float64)[order], np.asarray(labels)[order], np.asarray(ids)[order]))
    ids, labels = ordered[0][2], ordered[0][1]
    if any(len(o[2]) != len(ids) or (o[2] != ids).any() for o in ordered):
        raise ValueError("the ensemble's members were given different images")
    return ids, labels, np.mean(np.stack([o[0] for o in ordered]), axis=0)


def _graded(ids, labels, scores):
    keep = ~np.isnan(labels.astype(np.float64))
    return ids[keep], labels[keep].astype(int), scores[keep]


def evaluate_ensemble(validation, evaluated, top_thresholds, splits_file, n_boot: int, seed: int = 0) -> dict:
    """The ensemble's evaluation on the evaluated split, with its cut-offs fitted on validation, and the top stage
    alone on the same images (``top_stage_alone``).

    Args:
        validation: ``[lower, top]``, each ``(scores, labels, ids)`` on the validation split.
        evaluated: the same on the split to evaluate.
        top_thresholds: the top stage's own cut-offs (its state.json), for the top stage alone.
        splits_file: the run's splits.csv: each image's patient, for the patient bootstrap.
        n_boot: bootstrap resamples.
        seed: the bootstrap's seed.
    """
    from retina_scale.grading.evaluation import evaluate_predictions
    from retina_scale.grading.thresholds import fit_thresholds
    from retina_scale.training.stage import patients_of

    _, v_labels, v_scores = _graded(*mean_scores(validation))
    if not v_labels.size:
        raise UserError("the validation split has no graded image to fit the ensemble's cut-offs on")
    fit = fit_thresholds(v_labels, v_scores, where="validation")
    ids, labels, scores = _graded(*mean_scores(evaluated))
    _, _, top_scores = _graded(*mean_scores(evaluated[1:]))
    groups = patients_of(splits_file, ids)
    evaluation = evaluate_predictions(labels, scores, [float(t) for t in fit.thresholds], n_boot=n_boot, seed=seed,
                                      groups=groups)
    evaluation["thresholds_fit"] = dict(fit.to_dict(), n_images=int(v_labels.size))
    alone = evaluate_predictions(labels, top_scores, list(top_thresholds), n_boot=n_boot, seed=seed, groups=groups)
    evaluation["top_stage_alone"] = {k: alone[k] for k in ("kappa", "thresholds", "mild_dr_auc") if k in alone}
    return evaluation


def _interval(stat: dict) -> str:
    from retina_scale.utils.tables import number

    return f"{number(stat['value'], '.3f')} [{number(stat.get('ci_low'), '.3f')}, {number(stat.get('ci_high'), '.3f')}]"


def ensemble_text(evaluation: dict) -> str:
    """The ensemble's lines for people: members, cut-offs and where they were fitted, kappa against the top stage
    alone, and the images per second of each (``evaluation["ensemble"]`` as ``retina-scale evaluate`` fills it)."""
    info, fit, alone = evaluation["ensemble"], evaluation["thresholds_fit"], evaluation["top_stage_alone"]
    cuts = " ".join(f"{t:.3f}" for t in evaluation["thresholds"])
    optimistic = " - the evaluated split itself, so optimistic" if info["split"] == "val" else ""
    return "\n".join([
        f"Stage ensemble: mean grade of {info['lower']} ({info['lower_size']} px) and {info['top']} "
        f"({info['top_size']} px), on split {info['split']}",
        f"Cut-offs {cuts}: optimised for the mean grade on the validation split ({fit['n_images']} graded "
        f"images){optimistic}",
        f"Kappa: ensemble {_interval(evaluation['kappa'])}; top stage alone {_interval(alone['kappa'])} at its own "
        "cut-offs " + " ".join(f"{t:.3f}" for t in alone["thresholds"]),
        f"Cost: ensemble {info['images_per_second']} images/s, top stage alone {info['top_images_per_second']} "
        f"images/s (same process, model time only, {info['tta_draws']} view(s) per image)",
    ])
