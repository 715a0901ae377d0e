"""Screening operating points for referable DR (grade >= 2): thresholds on the continuous score.

A screening programme acts on "refer or not", so it needs a threshold on the score, chosen on validation:

- ``high_specificity``: the highest sensitivity among the thresholds with specificity >= 98 %;
- ``high_sensitivity``: the highest specificity among the thresholds with sensitivity >= 97.5 %;
- ``youden``: the highest sensitivity + specificity - 1 (Youden's J).

An eye is referred when its score is ``>=`` the threshold. The threshold lies halfway between the lowest
referred validation score and the next score below it (scikit-learn's ``roc_curve`` gives the scores), so an
eye scored a hair differently elsewhere (another batch, the export's graph) falls on the same side. Among equally good thresholds the one with the higher specificity wins (for
``high_sensitivity``, the higher sensitivity).

:func:`choose_operating_points` says so when a point cannot be had, instead of falling back to another: its
``met`` is false, its ``threshold`` None and its ``reason`` one sentence. That is the case when validation
lacks referable or non-referable eyes, when the only thresholds with specificity >= 98 % refer no referable eye,
when only referring every eye reaches sensitivity >= 97.5 %, and when no threshold beats chance (J = 0).

:func:`evaluate_operating_points` measures each chosen point on test data with percentile bootstrap intervals
(``retina_scale.grading.evaluation.bootstrap_statistics``, resampling patients when ``groups`` is given), and
keeps the test ROC curve for the report's figure. :data:`GULSHAN_EYEPACS1` holds Gulshan et al.'s (JAMA 2016)
two EyePACS-1 points for reference.

Example:
    >>> points = choose_operating_points([0, 0, 0, 2, 3, 4], [0.1, 0.4, 2.5, 1.9, 2.6, 3.5])
    >>> {name: p["threshold"] for name, p in points["points"].items()}
    {'high_specificity': 2.55, 'high_sensitivity': 1.15, 'youden': 2.55}
    >>> points["points"]["high_specificity"]["val_sensitivity"], points["points"]["high_sensitivity"]["val_specificity"]
    (0.6666666666666666, 0.6666666666666666)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from retina_scale.config import NUM_GRADES
from retina_scale.grading.evaluation import REFERABLE_GRADES, bootstrap_statistics
from retina_scale.grading.kappa import as_grades
from retina_scale.utils.errors import UserError
from retina_scale.utils.tables import text_table

__all__ = ["GULSHAN_EYEPACS1", "POINTS", "ROW_HEADER", "choose_operating_points", "evaluate_operating_points", "evaluation_text",
           "format_operating_points", "operating_point_rows", "refer"]

POINTS = ("high_specificity", "high_sensitivity", "youden")
MIN_SPECIFICITY = 0.98
MIN_SENSITIVITY = 0.975

GULSHAN_EYEPACS1 = {
    "high_specificity": {"sensitivity": 0.903, "specificity": 0.981},
    "high_sensitivity": {"sensitivity": 0.975, "specificity": 0.934},
}
"""Gulshan et al., JAMA 2016, EyePACS-1 referable DR: the algorithm's two operating points."""

_EPS = 1e-12  # rates are ratios of counts: a tolerance far below 1 / count only absorbs rounding


def _checked(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """``(referable mask, float64 scores)``; one-line errors for what cannot be used."""
    grades = as_grades(y_true, "y_true", NUM_GRADES)
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or values.size != grades.size:
        raise UserError(f"scores must be 1-D with one value per grade: got shape {values.shape} for "
                        f"{grades.size} grades")
    if not np.all(np.isfinite(values)):
        raise UserError("scores must be finite numbers (a NaN or infinite score cannot be thresholded)")
    if grades.size == 0:
        raise UserError("no eye to choose or measure operating points on: y_true and scores are empty")
    return np.isin(grades, REFERABLE_GRADES), values


def refer(scores, threshold: float) -> np.ndarray:
    """Whether each score is referred at ``threshold`` (``score >= threshold``)."""
    return np.asarray(scores, dtype=np.float64) >= float(threshold)


def _rates(referable: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    referred = refer(scores, threshold)
    return float(referred[referable].mean()), float((~referred[~referable]).mean())


def choose_operating_points(y_true, scores, min_specificity: float = MIN_SPECIFICITY,
                            min_sensitivity: float = MIN_SENSITIVITY) -> dict[str, Any]:
    """Chooses the three referable-DR thresholds on validation grades ``y_true`` (0-4) and scores.

    Returns:
        ``{"chosen_on", "n_referable", "n_not_referable", "min_specificity", "min_sensitivity", "points"}``;
        ``points`` maps each name of :data:`POINTS` to ``{"met", "threshold", "val_sensitivity",
        "val_specificity", "rule", "reason"}`` (``threshold`` and the rates None and ``reason`` a sentence
        when ``met`` is false). Plain JSON types only.
    """
    from sklearn.metrics import roc_curve

    referable, values = _checked(y_true, scores)
    rules = {"high_specificity": f"highest sensitivity with specificity >= {min_specificity:.1%}",
             "high_sensitivity": f"highest specificity with sensitivity >= {min_sensitivity:.1%}",
             "youden": "highest sensitivity + specificity - 1 (Youden's J)"}
    n_pos, n_neg = int(referable.sum()), int((~referable).sum())
    out = {"chosen_on": "validation", "n_referable": n_pos, "n_not_referable": n_neg,
           "min_specificity": float(min_specificity), "min_sensitivity": float(min_sensitivity), "points": {}}
    missing = ("no referable eye (grade >= 2)" if n_pos == 0 else
               "no eye without referable DR (grade < 2)" if n_neg == 0 else None)
    if missing:
        out["points"] = {name: _unmet(rules[name], f"the validation split holds {missing}") for name in POINTS}
        return out
    fpr, tpr, thresholds = roc_curve(referable, values, drop_intermediate=False)
    spec = 1.0 - fpr
    choices = {
        "high_specificity": _best(spec >= min_specificity - _EPS, (tpr, spec)),
        "high_sensitivity": _best(tpr >= min_sensitivity - _EPS, (spec, tpr)),
        "youden": _best(np.ones_like(tpr, bool), (tpr + spec - 1.0, spec)),
    }
    reasons = {
        "high_specificity": (lambda i: tpr[i] <= 0, f"no threshold refers a referable eye with specificity >= "
                             f"{min_specificity:.1%} on validation ({n_neg} eyes without referable DR)"),
        "high_sensitivity": (lambda i: spec[i] <= 0, f"only referring every eye reaches sensitivity >= "
                             f"{min_sensitivity:.1%} on validation ({n_pos} referable eyes)"),
        "youden": (lambda i: tpr[i] + spec[i] - 1.0 <= _EPS, "no threshold separates referable eyes better than "
                   "chance on validation (Youden's J = 0)"),
    }
    for name in POINTS:
        i = choices[name]
        degenerate, reason = reasons[name]
        if degenerate(i):
            out["points"][name] = _unmet(rules[name], reason)
            continue
        threshold = float((thresholds[i] + thresholds[i + 1]) / 2)  # a met point never refers every eye
        sensitivity, specificity = _rates(referable, values, threshold)
        out["points"][name] = {"met": True, "threshold": threshold, "val_sensitivity": sensitivity,
                               "val_specificity": specificity, "rule": rules[name], "reason": None}
    return out


def _best(allowed: np.ndarray, keys: tuple[np.ndarray, np.ndarray]) -> int:
    """The index among ``allowed`` with the largest ``keys[0]``, ties to the largest ``keys[1]``, then the first."""
    candidates = np.flatnonzero(allowed)
    primary = keys[0][candidates]
    top = candidates[primary >= primary.max() - _EPS]
    return int(top[np.argmax(keys[1][top])])


def _unmet(rule: str, reason: str) -> dict[str, Any]:
    return {"met": False, "threshold": None, "val_sensitivity": None, "val_specificity": None, "rule": rule,
            "reason": reason}


def evaluate_operating_points(chosen: dict[str, Any], y_true, scores, groups=None, n_boot: int = 1000,
                              seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Each chosen point's sensitivity and specificity on test data, with bootstrap intervals.

    Args:
        chosen: what :func:`choose_operating_points` returned (on validation).
        y_true, scores: the test grades (0-4) and continuous scores.
        groups: a patient id per image: the bootstrap resamples patients with both their eyes.
        n_boot, seed, confidence: the bootstrap's (``bootstrap_statistics``).

    Returns:
        ``chosen`` with, per met point, ``test_sensitivity`` and ``test_specificity`` (``{"value", "ci_low",
        "ci_high", "n_valid"}``) and ``holds_on_test`` (for the two constrained points: whether the constraint's
        target is inside or below the test interval), plus ``bootstrap`` (its settings) and ``test_roc``
        (``fpr``, ``tpr``: the test ROC curve, for the figure; None without both classes).
    """
    referable, values = _checked(y_true, scores)
    met = {name: p["threshold"] for name, p in chosen["points"].items() if p["met"]}
    referred = {name: refer(values, t) for name, t in met.items()}
    pos, neg = referable.astype(np.float64), (~referable).astype(np.float64)

    def statistic(weights):
        out = {}
        n_pos, n_neg = float(np.sum(weights * pos)), float(np.sum(weights * neg))
        for name, r in referred.items():
            out[f"{name}.sensitivity"] = np.sum(weights * pos * r) / n_pos if n_pos > 0 else np.nan
            out[f"{name}.specificity"] = np.sum(weights * neg * ~r) / n_neg if n_neg > 0 else np.nan
        return out

    summary, n_units, unit = bootstrap_statistics(statistic, values.size, groups, n_boot, seed, confidence)
    result = {**chosen, "points": {name: dict(p) for name, p in chosen["points"].items()}}
    targets = {"high_specificity": ("test_specificity", chosen["min_specificity"]),
               "high_sensitivity": ("test_sensitivity", chosen["min_sensitivity"])}
    for name in met:
        point = result["points"][name]
        point["test_sensitivity"] = summary[f"{name}.sensitivity"]
        point["test_specificity"] = summary[f"{name}.specificity"]
        if name in targets:
            key, target = targets[name]
            high = point[key]["ci_high"] if point[key]["ci_high"] is not None else point[key]["value"]
            point["holds_on_test"] = None if high is None else bool(high >= target - _EPS)
    result["test_images"] = int(values.size)
    result["bootstrap"] = {"method": "percentile", "n_boot": int(n_boot), "seed": int(seed),
                           "confidence": float(confidence), "unit": unit, "n_units": int(n_units)}
    result["test_roc"] = _roc(referable, values)
    return result


def _roc(referable: np.ndarray, values: np.ndarray) -> dict[str, list[float]] | None:
    """The ROC curve's corners (scikit-learn's ``roc_curve``), rounded to 5 decimals: enough for a figure."""
    from sklearn.metrics import roc_curve

    if referable.all() or not referable.any():
        return None
    fpr, tpr, _ = roc_curve(referable, values)
    return {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}


def _rate(stat) -> str:
    if stat is None or stat.get("value") is None:
        return "n/a"
    text = f"{stat['value']:.1%}"
    if stat.get("ci_low") is not None:
        text += f" [{stat['ci_low']:.1%}, {stat['ci_high']:.1%}]"
    return text


def operating_point_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per point: name, threshold, validation sensitivity / specificity, test sensitivity / specificity
    with intervals (``n/a`` without a test split), whether the target holds on test; an unmet point's reason."""
    rows = []
    for name in POINTS:
        p = result["points"].get(name)
        if p is None:
            continue
        if not p["met"]:
            rows.append((name, "not met", "-", "-", "-", "-", p["reason"]))
            continue
        holds = {True: "yes", False: "no", None: "-"}[p.get("holds_on_test")]
        rows.append((name, f"{p['threshold']:.4f}", f"{p['val_sensitivity']:.1%}", f"{p['val_specificity']:.1%}",
                     _rate(p.get("test_sensitivity")), _rate(p.get("test_specificity")), holds))
    return rows


ROW_HEADER = ("point", "threshold", "val sensitivity", "val specificity", "test sensitivity [CI]",
              "test specificity [CI]", "target holds on test (or why not met)")


def format_operating_points(result: dict[str, Any]) -> str:
    """The operating points as a text table for people, with Gulshan et al.'s two EyePACS-1 points below."""
    lines = [f"Referable-DR operating points (refer when score >= threshold; chosen on validation: "
             f"{result['n_referable']} referable, {result['n_not_referable']} not)",
             text_table(ROW_HEADER, operating_point_rows(result))]
    lines.append("target holds on test: the target (specificity 98 % / sensitivity 97.5 %) is inside or below "
                 "the test interval")
    lines.append("Gulshan et al. 2016, EyePACS-1: " + "; ".join(
        f"{name} sensitivity {g['sensitivity']:.1%}, specificity {g['specificity']:.1%}"
        for name, g in GULSHAN_EYEPACS1.items()))
    return "\n".join(lines)


def evaluation_text(evaluation: dict[str, Any]) -> str:
    """``format_evaluation``'s text of an evaluation, then how its scores were made when averaged over
    test-time augmentation views (``tta_draws``) and its operating points (``operating_points``), if it has them."""
    from retina_scale.grading.evaluation import format_evaluation

    text = format_evaluation(evaluation)
    if evaluation.get("tta_draws", 1) > 1:
        text += f"\nScores: the mean over {evaluation['tta_draws']} test-time augmentation views of each image"
    if evaluation.get("operating_points"):
        text += "\n\n" + format_operating_points(evaluation["operating_points"])
    return text
