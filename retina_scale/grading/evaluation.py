"""Evaluation of DR grade predictions: kappa, the paper's Table IV rows, referable DR, with bootstrap CIs.

:func:`evaluate_predictions` takes true grades and the model's continuous scores (the regression
output), cuts the scores into grades with the given thresholds and reports:

- ``kappa``: quadratic weighted kappa;
- ``confusion_matrix``: 5 x 5 counts, rows = true grade, columns = predicted grade;
- ``table_iv``: the rows of the paper's Table IV, each one-vs-rest: ``no_dr`` (grade 0),
  ``any_dr`` (grade >= 1), ``mild_dr`` (grade 1), each with ``precision``, ``recall`` and ``f1``;
- ``referable``: referable DR (grade >= 2) ``sensitivity`` and ``specificity`` of the thresholded
  grade, and ``auc``, the ROC AUC of the continuous score for referable DR;
- ``mild_dr_auc``: the ROC AUC of the continuous score for mild DR (grade 1) against no DR (grade 0), on
  the images of those two grades only: does the score rank a photo with microaneurysms only above a
  healthy one, whatever the cut-offs.

Every statistic is a dict ``{"value", "ci_low", "ci_high", "n_valid"}``: the point estimate and a
percentile bootstrap interval (95 % by default) over ``n_valid`` resamples in which the statistic is
defined (e.g. a resample without a referable eye has no sensitivity). A statistic that is undefined
on the data itself is ``None``. When ``groups`` (patient ids) is given, the bootstrap resamples
patients with all their images, since the two eyes of a patient are not independent.
:func:`bootstrap_statistics` is that bootstrap for any statistic of weighted items (the lesion hit
rates of ``retina_scale.evidence.explain`` use it).

A note on the paper: computed from the confusion matrix of its Fig. 3 (rows = true grade), the
recall of No DR, any DR and mild DR is 0.932 / 0.842 / 0.466 and the precision 0.943 / 0.815 /
0.312: the paper's Table IV prints these two columns the other way round. We use the standard
definitions (precision = TP / predicted positives), as scikit-learn does.

The stepwise trainer adds ``thresholds_fit`` to the result it writes as a stage's ``evaluation.json``:
which cut-offs were optimised on validation and which kept their defaults because the validation split
could not place them (``retina_scale.grading.thresholds.ThresholdFit``), with a ``note`` that
:func:`format_evaluation` repeats.

The result holds only plain ints, floats, strings, lists, dicts and ``None``: ``json.dumps`` it as
it is. :func:`format_evaluation` renders it as a table a person can read.

Example:
    >>> result = evaluate_predictions([0, 0, 1, 2, 4, 3], [0.1, 0.7, 1.2, 2.2, 3.8, 2.4], n_boot=200)
    >>> round(result["kappa"]["value"], 3)
    0.912
    >>> print(format_evaluation(result))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from retina_scale.config import NUM_GRADES
from retina_scale.grading.kappa import as_grades, kappa_from_confusion
from retina_scale.grading.thresholds import apply_thresholds, validate_thresholds
from retina_scale.utils.errors import UserError

__all__ = ["all_statistics", "bootstrap_statistics", "evaluate_predictions", "format_evaluation"]

# The one-vs-rest rows of the paper's Table IV: name -> (label, grades counted as positive).
TABLE_IV_ROWS = {
    "no_dr": ("No DR (grade 0)", (0,)),
    "any_dr": ("Any DR (grade >= 1)", (1, 2, 3, 4)),
    "mild_dr": ("Mild DR (grade 1)", (1,)),
}
REFERABLE_GRADES = (2, 3, 4)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def _one_vs_rest(matrix: np.ndarray, positive: Sequence[int]) -> tuple[float, float, float, float]:
    """(TP, FP, FN, TN) of a confusion matrix when ``positive`` grades are the positive class."""
    is_pos = np.zeros(matrix.shape[0], dtype=bool)
    is_pos[list(positive)] = True
    tp = matrix[np.ix_(is_pos, is_pos)].sum()
    fn = matrix[np.ix_(is_pos, ~is_pos)].sum()
    fp = matrix[np.ix_(~is_pos, is_pos)].sum()
    tn = matrix[np.ix_(~is_pos, ~is_pos)].sum()
    return tp, fp, fn, tn


class _Statistics:
    """All reported statistics for one weighting of the examples (1 each, or bootstrap counts)."""

    def __init__(self, grades: np.ndarray, predicted: np.ndarray, scores: np.ndarray):
        self.cells = grades * NUM_GRADES + predicted
        # For the AUC: examples grouped by distinct score, in increasing order of score.
        _, self.score_rank = np.unique(scores, return_inverse=True)
        self.n_scores = int(self.score_rank.max()) + 1 if scores.size else 0
        self.referable = np.isin(grades, REFERABLE_GRADES)
        self.mild, self.no_dr = grades == 1, grades == 0

    def confusion(self, weights: np.ndarray) -> np.ndarray:
        counts = np.bincount(self.cells, weights=weights, minlength=NUM_GRADES**2)
        return counts.reshape(NUM_GRADES, NUM_GRADES)

    def auc(self, weights: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
        """Weighted ROC AUC: P(score of a ``positive`` eye > score of a ``negative`` one), ties 1/2; images in
        neither mask do not count."""
        pos = np.bincount(self.score_rank, weights=weights * positive, minlength=self.n_scores)
        neg = np.bincount(self.score_rank, weights=weights * negative, minlength=self.n_scores)
        neg_below = np.cumsum(neg) - neg
        return _ratio(float(np.sum(pos * (neg_below + 0.5 * neg))), float(pos.sum() * neg.sum()))

    def __call__(self, weights: np.ndarray) -> dict[str, float]:
        matrix = self.confusion(weights)
        out = {"kappa": kappa_from_confusion(matrix)}
        for name, (_, positive) in TABLE_IV_ROWS.items():
            tp, fp, fn, _ = _one_vs_rest(matrix, positive)
            out[f"{name}.precision"] = _ratio(tp, tp + fp)
            out[f"{name}.recall"] = _ratio(tp, tp + fn)
            out[f"{name}.f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
        tp, fp, fn, tn = _one_vs_rest(matrix, REFERABLE_GRADES)
        out["referable.sensitivity"] = _ratio(tp, tp + fn)
        out["referable.specificity"] = _ratio(tn, tn + fp)
        out["referable.auc"] = self.auc(weights, self.referable, ~self.referable)
        out["mild_dr_auc"] = self.auc(weights, self.mild, self.no_dr)
        return out


def _clean(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def evaluate_predictions(
    y_true,
    scores,
    thresholds: Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups=None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Evaluates continuous grade predictions against true grades, with bootstrap intervals.

    Args:
        y_true: 1-D whole-number true grades 0..4.
        scores: 1-D finite continuous predictions (the regression output), same length.
        thresholds: the 4 cut-offs that turn scores into grades (default 0.5, 1.5, 2.5, 3.5);
            e.g. those from ``retina_scale.grading.thresholds.optimize_thresholds``.
        n_boot: number of bootstrap resamples; 0 computes point estimates only (intervals ``None``).
        seed: seed of the resampling; the same seed gives the same intervals.
        groups: optional id per image (e.g. patient id, ints or strings). When given, the bootstrap
            resamples groups with all their images instead of single images.
        confidence: coverage of the percentile interval, in (0, 1).

    Returns:
        A JSON-serialisable dict; see the module docstring for its keys.

    Raises:
        ValueError: empty input, lengths that differ, grades outside 0..4, non-finite scores, bad
            thresholds, or a bad ``n_boot``/``confidence``.
    """
    cuts = validate_thresholds(thresholds, NUM_GRADES)
    grades, values = _checked_input(y_true, scores, n_boot, confidence)
    predicted = apply_thresholds(values, cuts)  # also rejects NaN / inf scores
    statistics = _Statistics(grades, predicted, values)
    summary, n_units, unit = bootstrap_statistics(statistics, grades.size, groups, n_boot, seed, confidence)
    return {
        "n_images": int(grades.size),
        "n_patients": None if groups is None else n_units,
        "thresholds": [float(t) for t in cuts],
        "kappa": summary["kappa"],
        "confusion_matrix": statistics.confusion(np.ones(grades.size)).astype(int).tolist(),
        "table_iv": {
            name: {m: summary[f"{name}.{m}"] for m in ("precision", "recall", "f1")}
            for name in TABLE_IV_ROWS
        },
        "referable": {
            m: summary[f"referable.{m}"] for m in ("sensitivity", "specificity", "auc")
        },
        "mild_dr_auc": summary["mild_dr_auc"],
        "bootstrap": {
            "method": "percentile",
            "n_boot": int(n_boot),
            "seed": int(seed),
            "confidence": float(confidence),
            "unit": unit,
            "n_units": int(n_units),
        },
    }


def _checked_input(y_true, scores, n_boot, confidence) -> tuple[np.ndarray, np.ndarray]:
    """The true grades and the scores as 1-D arrays; clear errors for what cannot be evaluated."""
    grades = as_grades(y_true, "y_true", NUM_GRADES)
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or values.size != grades.size:
        raise UserError(
            f"scores must be 1-D with one value per grade: got shape {values.shape} for "
            f"{grades.size} grades"
        )
    if grades.size == 0:
        raise UserError("nothing to evaluate: y_true and scores are empty")
    _check_bootstrap(n_boot, confidence)
    return grades, values


def _check_bootstrap(n_boot, confidence) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise UserError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise UserError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")


def bootstrap_statistics(statistic, n_items: int, groups=None, n_boot: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> tuple[dict[str, dict[str, Any]], int, str]:
    """Point estimates and percentile bootstrap intervals of weighted statistics.

    Args:
        statistic: ``statistic(weights) -> {name: value}``, where ``weights`` holds one float per item (all 1
            for the point estimate; how many times each item was drawn in a resample). A value that is
            undefined in a resample is NaN there.
        n_items: the number of items (images, photos).
        groups: optional id per item (a patient id): the bootstrap then draws groups with all their items.
        n_boot: resamples (0: point estimates only, intervals ``None``).
        seed: seed of the resampling.
        confidence: coverage of the intervals, in (0, 1).

    Returns:
        ``({name: {"value", "ci_low", "ci_high", "n_valid"}}, number of units drawn, "image" or "patient")``.

    Example:
    >>> hits = np.array([1.0, 0.0, 1.0, 1.0])
    >>> summary, n, unit = bootstrap_statistics(lambda w: {"rate": float(np.sum(w * hits) / np.sum(w))}, 4,
    ...                                         groups=["a", "a", "b", "c"], n_boot=50)
    >>> summary["rate"]["value"], n, unit
    (0.75, 3, 'patient')
    """
    _check_bootstrap(n_boot, confidence)
    unit_of_image, n_units, unit = _resampling_units(groups, n_items)
    point = statistic(np.ones(n_items))
    samples = _bootstrap(statistic, unit_of_image, n_units, int(n_boot), seed)
    summary = {name: _summarise(value, samples.get(name, []), confidence) for name, value in point.items()}
    return summary, n_units, unit


def _resampling_units(groups, n_images: int) -> tuple[np.ndarray, int, str]:
    """``(unit of each image, number of units, "image" or "patient")``: what the bootstrap draws."""
    if groups is None:
        return np.arange(n_images), n_images, "image"
    group_array = np.asarray(groups)
    if group_array.ndim != 1 or group_array.size != n_images:
        raise UserError(
            f"groups must hold one id per image: got shape {group_array.shape} for "
            f"{n_images} images"
        )
    _, unit_of_image = np.unique(group_array, return_inverse=True)
    unit_of_image = unit_of_image.reshape(-1)
    return unit_of_image, int(unit_of_image.max()) + 1, "patient"


def _bootstrap(statistics, unit_of_image: np.ndarray, n_units: int, n_boot: int,
               seed: int) -> dict[str, list[float]]:
    """Every statistic on ``n_boot`` resamples of the units (drawn with replacement).

    A resample is a count per unit; each image weighs its unit's count, so one ``bincount`` per
    resample gives the confusion matrix (no copy of the data).
    """
    samples: dict[str, list[float]] = {}
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        picks = np.bincount(rng.integers(0, n_units, size=n_units), minlength=n_units)
        for name, value in statistics(picks[unit_of_image].astype(np.float64)).items():
            samples.setdefault(name, []).append(value)
    return samples


def _summarise(value: float, drawn: list[float], confidence: float) -> dict[str, Any]:
    """``{"value", "ci_low", "ci_high", "n_valid"}``: the percentile interval over the finite draws."""
    tail = 100.0 * (1.0 - float(confidence)) / 2.0
    finite = np.asarray(drawn, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    low = high = None
    if finite.size:
        low, high = (float(q) for q in np.percentile(finite, [tail, 100.0 - tail]))
    return {"value": _clean(value), "ci_low": low, "ci_high": high, "n_valid": int(finite.size)}


def _cell(stat: dict[str, Any]) -> str:
    """``0.8551 [0.8492, 0.8610]``, with ``n/a`` for undefined values."""
    value = "n/a" if stat["value"] is None else f"{stat['value']:.4f}"
    if stat["ci_low"] is None:
        return value
    return f"{value} [{stat['ci_low']:.4f}, {stat['ci_high']:.4f}]"


def format_evaluation(result: dict[str, Any]) -> str:
    """Renders a result of :func:`evaluate_predictions` as a plain-text report."""
    boot = result["bootstrap"]
    lines = [
        f"Evaluation of {result['n_images']} images"
        + (f" from {result['n_patients']} patients" if result["n_patients"] is not None else "")
        + "; thresholds "
        + " / ".join(f"{t:.3f}" for t in result["thresholds"]),
    ]
    note = (result.get("thresholds_fit") or {}).get("note")
    if note:  # added by the trainer: cut-offs the validation split could not place kept their defaults
        lines.append(f"Thresholds: {note}")
    if boot["n_boot"]:
        lines.append(
            f"Intervals in brackets: {boot['confidence']:.0%} percentile bootstrap over "
            f"{boot['n_boot']} resamples of {boot['unit']}s (seed {boot['seed']})"
        )
    lines += ["", f"Quadratic weighted kappa  {_cell(result['kappa'])}", ""]

    width = 26
    header = f"{'':22}" + "".join(f"{h:<{width}}" for h in ("precision", "recall", "F1"))
    lines += ["Table IV rows (one-vs-rest)", header.rstrip()]
    for name, (label, _) in TABLE_IV_ROWS.items():
        row = result["table_iv"][name]
        cells = "".join(f"{_cell(row[m]):<{width}}" for m in ("precision", "recall", "f1"))
        lines.append(f"{label:22}{cells}".rstrip())

    lines += ["", "Referable DR (grade >= 2)"]
    for key, label in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                       ("auc", "AUC (score)")):
        lines.append(f"  {label:20}{_cell(result['referable'][key])}")
    if "mild_dr_auc" in result:  # absent from evaluation.json files written before it existed
        lines += ["", "Mild DR (grade 1) against no DR (grade 0)",
                  f"  {'AUC (score)':20}{_cell(result['mild_dr_auc'])}"]

    partial = [
        name for name, stat in all_statistics(result)
        if boot["n_boot"] and stat["n_valid"] < boot["n_boot"]
    ]
    if partial:
        lines.append(
            "  (undefined in some resamples, interval over the others: " + ", ".join(partial) + ")"
        )

    matrix = result["confusion_matrix"]
    cell_width = max(6, max(len(str(v)) for row in matrix for v in row) + 2)
    lines += ["", "Confusion matrix (rows: true grade, columns: predicted grade)"]
    lines.append("true\\pred" + "".join(f"{g:>{cell_width}}" for g in range(len(matrix))))
    for grade, row in enumerate(matrix):
        lines.append(f"{grade:>9}" + "".join(f"{v:>{cell_width}}" for v in row))
    return "\n".join(lines)


def all_statistics(result: dict[str, Any]):
    """Every ``(name, statistic)`` of an ``evaluate_predictions`` result: kappa, the Table IV rows, referable DR,
    mild DR against no DR."""
    yield "kappa", result["kappa"]
    for name, row in result["table_iv"].items():
        for metric, stat in row.items():
            yield f"{name}.{metric}", stat
    for metric, stat in result["referable"].items():
        yield f"referable.{metric}", stat
    if "mild_dr_auc" in result:
        yield "mild_dr_auc", result["mild_dr_auc"]
