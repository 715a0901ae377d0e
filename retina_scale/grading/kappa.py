"""Quadratic weighted kappa, the metric of the Kaggle 2015 DR challenge and of the paper.

Functions: :func:`as_grades` (checks an array of whole-number grades), :func:`confusion_matrix` and
:func:`quadratic_weighted_kappa` (scikit-learn's, after the checks, with every grade ``0..K-1`` as a
label), and :func:`kappa_from_confusion`, the same kappa from a confusion matrix: scikit-learn has no
function for that, and the bootstrap of :mod:`retina_scale.grading.evaluation` and the threshold
search count their matrices themselves (one ``bincount`` per resample). Importing this module does
not import TensorFlow or Keras.
"""

from __future__ import annotations

import warnings

import numpy as np

from retina_scale.config import NUM_GRADES
from retina_scale.utils.errors import UserError

__all__ = ["as_grades", "confusion_matrix", "kappa_from_confusion", "quadratic_weighted_kappa"]


def as_grades(values, name: str, num_classes: int) -> np.ndarray:
    """1-D int64 grades in ``[0, num_classes)``; integer-valued floats are accepted."""
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise UserError(f"{name} must be a 1-D array of grades, got shape {array.shape}")
    if array.dtype.kind not in "iufb":
        raise UserError(f"{name} must hold numbers, got dtype {array.dtype}")
    as_float = array.astype(np.float64)
    if not np.all(np.isfinite(as_float)) or not np.all(as_float == np.round(as_float)):
        raise UserError(f"{name} must hold whole-number grades 0..{num_classes - 1}")
    grades = as_float.astype(np.int64)
    if grades.size and (grades.min() < 0 or grades.max() >= num_classes):
        raise UserError(
            f"{name} must hold grades 0..{num_classes - 1}, got values from {grades.min()} to "
            f"{grades.max()}"
        )
    return grades


def _checked_pair(y_true, y_pred, num_classes: int, sample_weight):
    """``(true, pred, weights)`` checked: grades in range, the same length, weights finite and >= 0."""
    true = as_grades(y_true, "y_true", num_classes)
    pred = as_grades(y_pred, "y_pred", num_classes)
    if true.shape != pred.shape:
        raise UserError(f"y_true and y_pred differ in length: {true.size} vs {pred.size}")
    weights = None
    if sample_weight is not None:
        weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if weights.shape != true.shape:
            raise UserError(f"sample_weight has {weights.size} values for {true.size} examples")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise UserError("sample_weight must be finite and non-negative")
    return true, pred, weights


def confusion_matrix(y_true, y_pred, num_classes: int = NUM_GRADES, sample_weight=None) -> np.ndarray:
    """The ``(K, K)`` confusion matrix: rows are true grades, columns predicted grades.

    ``sklearn.metrics.confusion_matrix`` with ``labels=range(K)``, after the checks of
    :func:`as_grades`; an empty input gives a matrix of zeros (scikit-learn refuses it).

    Args:
        y_true, y_pred: 1-D arrays of whole-number grades in ``0..K-1``, the same length.
        num_classes: ``K``. Every grade gets a row and a column, present or not.
        sample_weight: optional non-negative weight per example (counts are then float sums).

    Returns:
        A float64 array; with no weights its entries are whole counts.

    Example:
        >>> confusion_matrix([0, 0, 1, 4], [0, 3, 1, 0], num_classes=5)[0].tolist()
        [1.0, 0.0, 0.0, 1.0, 0.0]
    """
    from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

    true, pred, weights = _checked_pair(y_true, y_pred, num_classes, sample_weight)
    if true.size == 0:
        return np.zeros((num_classes, num_classes))
    matrix = sklearn_confusion_matrix(true, pred, labels=np.arange(num_classes), sample_weight=weights)
    return matrix.astype(np.float64)


def kappa_from_confusion(matrix) -> float:
    """Quadratic weighted kappa of a confusion matrix (rows true, columns predicted).

    ``kappa = 1 - sum(W * O) / sum(W * E)`` with ``W[i, j] = (i - j)**2`` and ``E`` the outer product
    of the row and column totals divided by the total. Returns ``nan`` when kappa is undefined (no
    examples, or every example has the same true and predicted grade), as scikit-learn does.

    Example:
        >>> kappa_from_confusion([[1, 0, 0], [0, 0, 1], [0, 0, 1]])  # 1 - 1 / 5, worked out in the tests
        0.8
    """
    observed = np.asarray(matrix, dtype=np.float64)
    k = observed.shape[0]
    if observed.ndim != 2 or observed.shape != (k, k):
        raise UserError(f"confusion matrix must be square, got shape {observed.shape}")
    total = observed.sum()
    if total <= 0:
        return float("nan")
    grades = np.arange(k, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / total
    denominator = float(np.sum(weights * expected))
    if denominator <= 0:
        return float("nan")
    return float(1.0 - np.sum(weights * observed) / denominator)


def quadratic_weighted_kappa(
    y_true, y_pred_grades, num_classes: int = NUM_GRADES, sample_weight=None
) -> float:
    """Quadratic weighted Cohen's kappa between true and predicted grades.

    ``sklearn.metrics.cohen_kappa_score(y_true, y_pred, weights="quadratic",
    labels=range(num_classes))`` after the checks of :func:`as_grades`. Note the ``labels``: without it
    scikit-learn weights disagreements by the distance between the *indices of the grades present*,
    so a set holding only grades 0, 2 and 4 would be scored as if they were 0, 1 and 2. Here the
    weights always use the grades.

    Args:
        y_true: 1-D whole-number grades.
        y_pred_grades: 1-D whole-number predicted grades (see
            :func:`retina_scale.grading.thresholds.apply_thresholds`).
        num_classes: number of grades.
        sample_weight: optional weight per example.

    Returns:
        kappa in ``[-1, 1]``, or ``nan`` when undefined (no examples, or one grade everywhere);
        scikit-learn's warning about it is not repeated.

    Example:
        >>> quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
        1.0
    """
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import cohen_kappa_score

    true, pred, weights = _checked_pair(y_true, y_pred_grades, num_classes, sample_weight)
    if true.size == 0 or (weights is not None and not weights.sum() > 0):
        return float("nan")
    with warnings.catch_warnings():
        # One grade everywhere: scikit-learn warns and returns nan (older versions divide by zero).
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = cohen_kappa_score(true, pred, weights="quadratic", labels=np.arange(num_classes),
                                  sample_weight=weights)
    return float(kappa) if np.isfinite(kappa) else float("nan")
