"""Cut-offs that turn the network's continuous grade into DR grades 0-4.

The network predicts the DR grade as one continuous number (a regression, as in the Kaggle 2015
solutions the paper builds on). Grades come from cutting that number with four thresholds; a score
``s`` gets grade ``g`` when ``thresholds[g-1] <= s < thresholds[g]`` (so a score exactly on a cut-off
goes to the higher grade). The default cut-offs are 0.5 / 1.5 / 2.5 / 3.5; :func:`optimize_thresholds`
tunes them for kappa on a validation set, as team o_O and B. Graham did.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from retina_scale.config import NUM_GRADES
from retina_scale.grading.kappa import as_grades, confusion_matrix, quadratic_weighted_kappa
from retina_scale.utils.errors import UserError

DEFAULT_THRESHOLDS = (0.5, 1.5, 2.5, 3.5)

__all__ = [
    "DEFAULT_THRESHOLDS", "ThresholdFit", "apply_thresholds", "fit_thresholds", "optimize_thresholds",
    "unidentifiable_cuts", "validate_thresholds",
]


def validate_thresholds(thresholds: Iterable[float] | None, num_classes: int = NUM_GRADES) -> tuple:
    """Checks cut-offs and returns them as a tuple of floats.

    Args:
        thresholds: ``num_classes - 1`` finite, strictly increasing numbers, or ``None`` for the
            defaults ``0.5, 1.5, ...``.
        num_classes: number of grades (5 for the International Clinical DR scale).

    Raises:
        ValueError: wrong count, a value that is not a finite number, or not strictly increasing.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise UserError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if thresholds is None:
        return tuple(float(g) + 0.5 for g in range(num_classes - 1))
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise UserError(
            f"thresholds must be {num_classes - 1} numbers, got {thresholds!r}"
        ) from None
    if len(values) != num_classes - 1:
        raise UserError(
            f"expected {num_classes - 1} thresholds for {num_classes} grades, got {len(values)}: "
            f"{list(values)}"
        )
    if not all(np.isfinite(values)):
        raise UserError(f"thresholds must be finite numbers, got {list(values)}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UserError(f"thresholds must be strictly increasing, got {list(values)}")
    return values


def apply_thresholds(scores, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> np.ndarray:
    """Cuts continuous scores into integer grades.

    Grade ``g`` is the number of thresholds ``<= score``: with the defaults, 0.49 -> 0, 0.5 -> 1,
    3.7 -> 4, -2 -> 0.

    Args:
        scores: array-like of finite numbers, any shape (``(n, 1)`` model outputs are fine).
        thresholds: ``K - 1`` strictly increasing cut-offs.

    Returns:
        An int64 array of the same shape as ``scores``.

    Example:
        >>> apply_thresholds([0.2, 0.5, 1.9, 9.0]).tolist()
        [0, 1, 2, 4]
    """
    thresholds = tuple(thresholds)  # a generator is read once
    cuts = np.asarray(validate_thresholds(thresholds, len(thresholds) + 1))
    values = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = int(np.sum(~np.isfinite(values)))
        raise UserError(f"scores must be finite numbers; {bad} of {values.size} are NaN or inf")
    return np.searchsorted(cuts, values, side="right").astype(np.int64)


def _best_cut(
    base: np.ndarray, true_in: np.ndarray, grade: int, weights: np.ndarray, row_totals: np.ndarray
) -> np.ndarray:
    """Kappa for every split of the examples of one interval between ``grade`` and ``grade + 1``.

    ``true_in`` holds the true grades of the examples whose scores lie in the interval, sorted by
    score; split ``m`` gives the first ``m`` of them ``grade`` and the rest ``grade + 1``. ``base`` is
    the confusion matrix of all the other examples. Returns an array of ``len(true_in) + 1`` kappas.
    """
    k = base.shape[0]
    onehot = np.zeros((true_in.size + 1, k))
    np.add.at(onehot, (np.arange(1, true_in.size + 1), true_in), 1.0)
    low = np.cumsum(onehot, axis=0)  # (M+1, K): true-grade counts of the first m examples
    high = low[-1] - low
    observed = np.broadcast_to(base, (true_in.size + 1, k, k)).copy()
    observed[:, :, grade] += low
    observed[:, :, grade + 1] += high
    total = row_totals.sum()
    columns = observed.sum(axis=1)  # (M+1, K)
    expected = row_totals[None, :, None] * columns[:, None, :] / total
    numerator = np.einsum("ij,mij->m", weights, observed)
    denominator = np.einsum("ij,mij->m", weights, expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, 1.0 - numerator / denominator, -np.inf)


def optimize_thresholds(
    y_true,
    scores,
    initial: Sequence[float] | None = None,
    num_classes: int = NUM_GRADES,
    max_passes: int = 50,
) -> tuple:
    """Finds the cut-offs that maximise quadratic weighted kappa on a validation set.

    Exact coordinate ascent: starting from ``initial`` (default 0.5, 1.5, 2.5, 3.5), each pass moves
    one threshold at a time to the best position between its neighbours, trying every split of the
    scores lying there (kappa changes only where a threshold crosses a score, so this search is exact
    for that coordinate; it costs ``O(n K^2)``). A threshold moves only when that strictly raises
    kappa, so kappa never decreases, the order of the thresholds is kept, and the result is
    deterministic. New cut-offs are put halfway between the two scores they separate (half a grade
    beyond the scores at the ends). Passes stop when none moves, or after ``max_passes``.

    A cut-off between grades ``g`` and ``g + 1`` moves only when the data holds a grade ``<= g`` and a
    grade ``> g`` (:func:`unidentifiable_cuts`): otherwise kappa says nothing about where it belongs (with
    a single grade, kappa is undefined) and it keeps its starting value. :func:`fit_thresholds` also
    says which cut-offs were kept.

    Coordinate ascent finds a point no single threshold can improve, not always the global optimum;
    starting from the usual cut-offs it is what o_O and Graham did by hand. Thresholds tuned on a
    small validation set overfit it: tune on the whole validation set, report on a test set.

    Args:
        y_true: 1-D whole-number true grades.
        scores: 1-D continuous predictions (e.g. the regression output), finite.
        initial: starting cut-offs, ``num_classes - 1`` strictly increasing numbers.
        num_classes: number of grades.
        max_passes: upper bound on the number of passes over the thresholds.

    Returns:
        A tuple of ``num_classes - 1`` strictly increasing floats.

    Example:
        >>> y = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        >>> s = [0.1, 0.7, 0.9, 1.1, 1.8, 2.0, 2.2, 3.0, 3.3, 4.0]
        >>> quadratic_weighted_kappa(y, apply_thresholds(s, optimize_thresholds(y, s)))
        1.0
    """
    thresholds = list(validate_thresholds(initial, num_classes))
    true, values = _search_input(y_true, scores, num_classes, max_passes)
    order = np.argsort(values, kind="stable")
    values, true = values[order], true[order]
    grades = np.arange(num_classes, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2
    row_totals = np.bincount(true, minlength=num_classes).astype(np.float64)

    best = quadratic_weighted_kappa(true, np.searchsorted(thresholds, values, side="right"), num_classes)
    best = -np.inf if np.isnan(best) else best
    movable = [g for g in range(num_classes - 1) if g not in unidentifiable_cuts(true, num_classes)]
    for _ in range(max_passes):
        moved = False
        for g in movable:
            move = _best_move(thresholds, g, values, true, weights, row_totals)
            if move is None or move[0] <= best + 1e-12:
                continue
            best, thresholds[g] = move
            moved = True
        if not moved:
            break
    return validate_thresholds(thresholds, num_classes)


def unidentifiable_cuts(y_true, num_classes: int = NUM_GRADES) -> tuple[int, ...]:
    """The (0-based) cut-offs that the grades ``y_true`` cannot place: those without a grade on each side.

    Cut-off ``g`` (between grades ``g`` and ``g + 1``) trades errors between the examples graded ``<= g``
    and those graded ``> g``; with none on one side, kappa is undefined (a single grade) or only pushes the
    cut-off past every score, which says nothing about images of the missing grades.

    >>> unidentifiable_cuts([0, 0, 1, 2]), unidentifiable_cuts([3, 3]), unidentifiable_cuts([0, 4])
    ((2, 3), (0, 1, 2, 3), ())
    """
    true = as_grades(y_true, "y_true", num_classes)
    if true.size == 0:
        return tuple(range(num_classes - 1))
    low, high = int(true.min()), int(true.max())
    return tuple(g for g in range(num_classes - 1) if not low <= g < high)


@dataclasses.dataclass(frozen=True)
class ThresholdFit:
    """The cut-offs :func:`fit_thresholds` found, and those it had to keep at their starting values."""

    thresholds: tuple
    kept: tuple  # 0-based indices of the cut-offs kept (unidentifiable from the data)
    grades: tuple  # the grades present in the data
    where: str = "validation"

    @property
    def note(self) -> str:
        """One line for the log, ``""`` when every cut-off was optimised."""
        if not self.kept:
            return ""
        values = ", ".join(f"{self.thresholds[g]:g}" for g in self.kept)
        if len(self.grades) == 1:
            return (f"the {self.where} set holds only grade {self.grades[0]}, where kappa is undefined: the "
                    f"cut-offs were not optimised and keep their starting values {values}")
        return (f"the {self.where} set holds grades {', '.join(map(str, self.grades))} only: cut-off(s) "
                f"{values} have no {self.where} image on one side, so they keep their starting values")

    def to_dict(self) -> dict:
        """The record for ``evaluation.json``: which cut-offs were optimised, on which grades, and the note."""
        return {"optimized_on": self.where, "grades_present": list(self.grades),
                "optimized": [g not in self.kept for g in range(len(self.thresholds))],
                "kept": [self.thresholds[g] for g in self.kept], "note": self.note}


def fit_thresholds(y_true, scores, initial: Sequence[float] | None = None, num_classes: int = NUM_GRADES,
                   where: str = "validation") -> ThresholdFit:
    """:func:`optimize_thresholds`, with the record of which cut-offs it could not place.

    >>> fit = fit_thresholds([0, 0, 0], [0.1, 0.7, 0.9])
    >>> fit.thresholds, fit.kept
    ((0.5, 1.5, 2.5, 3.5), (0, 1, 2, 3))
    >>> print(fit.note[:60])
    the validation set holds only grade 0, where kappa is undefi
    """
    thresholds = optimize_thresholds(y_true, scores, initial, num_classes)
    grades = tuple(int(g) for g in np.unique(as_grades(y_true, "y_true", num_classes)))
    return ThresholdFit(thresholds, unidentifiable_cuts(y_true, num_classes), grades, where)


def _search_input(y_true, scores, num_classes: int, max_passes) -> tuple[np.ndarray, np.ndarray]:
    """The checked grades and scores of :func:`optimize_thresholds` (clear errors for bad input)."""
    true = as_grades(y_true, "y_true", num_classes)
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.shape != true.shape:
        raise UserError(f"y_true and scores differ in length: {true.size} vs {values.size}")
    if true.size == 0:
        raise UserError("cannot optimise thresholds on an empty set")
    if not np.all(np.isfinite(values)):
        raise UserError("scores must be finite numbers (found NaN or inf)")
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise UserError(f"max_passes must be a positive integer, got {max_passes!r}")
    return true, values


def _best_move(
    thresholds: list, g: int, values: np.ndarray, true: np.ndarray, weights: np.ndarray,
    row_totals: np.ndarray,
) -> tuple[float, float] | None:
    """``(kappa, cut-off)``: the best position of ``thresholds[g]`` between its neighbours.

    ``values`` are the scores sorted, ``true`` their grades. The first (lowest) best split wins, so
    the search is deterministic. None when no score lies between the neighbours.
    """
    num_classes = len(thresholds) + 1
    lower = thresholds[g - 1] if g > 0 else -np.inf
    upper = thresholds[g + 1] if g < num_classes - 2 else np.inf
    # Examples with lower <= score < upper are graded g or g+1 depending on thresholds[g].
    start = np.searchsorted(values, lower, side="left")
    stop = np.searchsorted(values, upper, side="left")
    if stop == start:
        return None
    predicted = np.searchsorted(thresholds, values, side="right")
    outside = np.ones(values.size, dtype=bool)
    outside[start:stop] = False
    base = confusion_matrix(true[outside], predicted[outside], num_classes)
    kappas = _best_cut(base, true[start:stop], g, weights, row_totals)
    inside = values[start:stop]
    # Split m is reachable only between distinct scores (ties share a grade).
    valid = np.ones(inside.size + 1, dtype=bool)
    valid[1:-1] = inside[1:] > inside[:-1]
    kappas = np.where(valid, kappas, -np.inf)
    m = int(np.argmax(kappas))
    # The new cut-off lies halfway between the two scores it separates (half a grade beyond the ends).
    if m == 0:
        new = (lower + inside[0]) / 2 if np.isfinite(lower) else inside[0] - 0.5
    elif m == inside.size:
        new = (inside[-1] + upper) / 2 if np.isfinite(upper) else inside[-1] + 0.5
    else:
        new = (inside[m - 1] + inside[m]) / 2
    return float(kappas[m]), float(new)
