"""Quadratic weighted kappa: a streaming Keras metric and the numpy tools around it.

The network predicts the DR grade as one continuous number (a regression, as in the Kaggle 2015
solutions the paper builds on). Grades come from cutting that number with four thresholds; a score
``s`` gets grade ``g`` when ``thresholds[g-1] <= s < thresholds[g]`` (so a score exactly on a cut-off
goes to the higher grade). The default cut-offs are 0.5 / 1.5 / 2.5 / 3.5; :func:`optimize_thresholds`
tunes them for kappa on a validation set, as team o_O and B. Graham did.

Contents:

- :class:`QuadraticKappa`: a ``keras.metrics.Metric`` that accumulates a confusion matrix over every
  batch it sees, so the kappa it reports is the kappa of the whole validation set (not a mean of
  per-batch kappas). Its state is one ``(K, K)`` variable created with ``aggregation="sum"``; Keras
  makes metric variables ``synchronization="on_read"``, so under ``tf.distribute`` each replica
  counts its own examples and reading the variable in cross-replica context (where Keras computes
  the epoch's logs) sums the replicas' matrices.
- numpy functions: :func:`validate_thresholds`, :func:`apply_thresholds`, :func:`confusion_matrix`,
  :func:`kappa_from_confusion`, :func:`quadratic_weighted_kappa`, :func:`optimize_thresholds`.

Importing this module does not import TensorFlow or Keras: :class:`QuadraticKappa` is defined the
first time it is accessed, so light tools (``retina_scale.evaluation``) can use the numpy functions.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

NUM_GRADES = 5
DEFAULT_THRESHOLDS = (0.5, 1.5, 2.5, 3.5)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "NUM_GRADES",
    "QuadraticKappa",
    "apply_thresholds",
    "confusion_matrix",
    "kappa_from_confusion",
    "optimize_thresholds",
    "quadratic_weighted_kappa",
    "validate_thresholds",
]


# --------------------------------------------------------------------------------------------------
# numpy functions
# --------------------------------------------------------------------------------------------------


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
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if thresholds is None:
        return tuple(float(g) + 0.5 for g in range(num_classes - 1))
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise ValueError(
            f"thresholds must be {num_classes - 1} numbers, got {thresholds!r}"
        ) from None
    if len(values) != num_classes - 1:
        raise ValueError(
            f"expected {num_classes - 1} thresholds for {num_classes} grades, got {len(values)}: "
            f"{list(values)}"
        )
    if not all(np.isfinite(values)):
        raise ValueError(f"thresholds must be finite numbers, got {list(values)}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"thresholds must be strictly increasing, got {list(values)}")
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
        raise ValueError(f"scores must be finite numbers; {bad} of {values.size} are NaN or inf")
    return np.searchsorted(cuts, values, side="right").astype(np.int64)


def _as_grades(values, name: str, num_classes: int) -> np.ndarray:
    """1-D int64 grades in ``[0, num_classes)``; integer-valued floats are accepted."""
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of grades, got shape {array.shape}")
    if array.dtype.kind not in "iufb":
        raise ValueError(f"{name} must hold numbers, got dtype {array.dtype}")
    as_float = array.astype(np.float64)
    if not np.all(np.isfinite(as_float)) or not np.all(as_float == np.round(as_float)):
        raise ValueError(f"{name} must hold whole-number grades 0..{num_classes - 1}")
    grades = as_float.astype(np.int64)
    if grades.size and (grades.min() < 0 or grades.max() >= num_classes):
        raise ValueError(
            f"{name} must hold grades 0..{num_classes - 1}, got values from {grades.min()} to "
            f"{grades.max()}"
        )
    return grades


def confusion_matrix(y_true, y_pred, num_classes: int = NUM_GRADES, sample_weight=None) -> np.ndarray:
    """The ``(K, K)`` confusion matrix: rows are true grades, columns predicted grades.

    Args:
        y_true, y_pred: 1-D arrays of whole-number grades in ``0..K-1``, the same length.
        num_classes: ``K``. Every grade gets a row and a column, present or not.
        sample_weight: optional non-negative weight per example (counts are then float sums).

    Returns:
        A float64 array; with no weights its entries are whole counts.
    """
    true = _as_grades(y_true, "y_true", num_classes)
    pred = _as_grades(y_pred, "y_pred", num_classes)
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.size} vs {pred.size}")
    weights = None
    if sample_weight is not None:
        weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if weights.shape != true.shape:
            raise ValueError(f"sample_weight has {weights.size} values for {true.size} examples")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError("sample_weight must be finite and non-negative")
    counts = np.bincount(true * num_classes + pred, weights=weights, minlength=num_classes**2)
    return counts.astype(np.float64).reshape(num_classes, num_classes)


def kappa_from_confusion(matrix) -> float:
    """Quadratic weighted kappa of a confusion matrix (rows true, columns predicted).

    ``kappa = 1 - sum(W * O) / sum(W * E)`` with ``W[i, j] = (i - j)**2`` and ``E`` the outer product
    of the row and column totals divided by the total. Returns ``nan`` when kappa is undefined (no
    examples, or every example has the same true and predicted grade), as scikit-learn does.
    """
    observed = np.asarray(matrix, dtype=np.float64)
    k = observed.shape[0]
    if observed.ndim != 2 or observed.shape != (k, k):
        raise ValueError(f"confusion matrix must be square, got shape {observed.shape}")
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

    Equals ``sklearn.metrics.cohen_kappa_score(y_true, y_pred, weights="quadratic",
    labels=range(num_classes))``. Note the ``labels``: without it scikit-learn weights disagreements
    by the distance between the *indices of the grades present*, so a set holding only grades 0, 2
    and 4 would be scored as if they were 0, 1 and 2. Here the weights always use the grades.

    Args:
        y_true: 1-D whole-number grades.
        y_pred_grades: 1-D whole-number predicted grades (see :func:`apply_thresholds`).
        num_classes: number of grades.
        sample_weight: optional weight per example.

    Returns:
        kappa in ``[-1, 1]``, or ``nan`` when undefined.

    Example:
        >>> quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
        1.0
    """
    return kappa_from_confusion(confusion_matrix(y_true, y_pred_grades, num_classes, sample_weight))


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
    true = _as_grades(y_true, "y_true", num_classes)
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.shape != true.shape:
        raise ValueError(f"y_true and scores differ in length: {true.size} vs {values.size}")
    if true.size == 0:
        raise ValueError("cannot optimise thresholds on an empty set")
    if not np.all(np.isfinite(values)):
        raise ValueError("scores must be finite numbers (found NaN or inf)")
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be a positive integer, got {max_passes!r}")

    order = np.argsort(values, kind="stable")
    values, true = values[order], true[order]
    grades = np.arange(num_classes, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2
    row_totals = np.bincount(true, minlength=num_classes).astype(np.float64)

    def current_kappa() -> float:
        predicted = np.searchsorted(thresholds, values, side="right")
        return kappa_from_confusion(confusion_matrix(true, predicted, num_classes))

    best = current_kappa()
    best = -np.inf if np.isnan(best) else best
    for _ in range(max_passes):
        moved = False
        for g in range(num_classes - 1):
            lower = thresholds[g - 1] if g > 0 else -np.inf
            upper = thresholds[g + 1] if g < num_classes - 2 else np.inf
            # Examples with lower <= score < upper are graded g or g+1 depending on thresholds[g].
            start = np.searchsorted(values, lower, side="left")
            stop = np.searchsorted(values, upper, side="left")
            if stop == start:
                continue
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
            m = int(np.argmax(kappas))  # the first (lowest) best split: deterministic
            if kappas[m] <= best + 1e-12:
                continue
            if m == 0:
                new = (lower + inside[0]) / 2 if np.isfinite(lower) else inside[0] - 0.5
            elif m == inside.size:
                new = (inside[-1] + upper) / 2 if np.isfinite(upper) else inside[-1] + 0.5
            else:
                new = (inside[m - 1] + inside[m]) / 2
            thresholds[g] = float(new)
            best = float(kappas[m])
            moved = True
        if not moved:
            break
    return validate_thresholds(thresholds, num_classes)


# --------------------------------------------------------------------------------------------------
# The Keras metric (defined lazily, so that importing this module does not import TensorFlow)
# --------------------------------------------------------------------------------------------------


def _define_quadratic_kappa():
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="retina_scale")
    class QuadraticKappa(keras.metrics.Metric):
        """Streaming quadratic weighted kappa of a regression output cut into grades.

        Each batch adds to a ``(K, K)`` confusion matrix (rows true grade, columns predicted grade);
        ``result()`` is the kappa of everything seen since the last ``reset_state()``, so in
        ``fit``/``evaluate`` it is the kappa of the whole validation set. Predictions are cut with
        ``thresholds`` (a score on a cut-off goes to the higher grade); true values are rounded and
        clipped to ``0..K-1``. Returns 0 while kappa is undefined (no examples yet, or a single
        grade everywhere), so callbacks that monitor it always see a number.

        Distribution: the confusion matrix is a metric variable with ``aggregation="sum"`` (Keras
        metric variables are ``synchronization="on_read"``): each replica counts its own examples,
        and a read in cross-replica context sums them. Keras reads the metrics in cross-replica
        context at the end of each epoch of ``fit``/``evaluate``, so epoch logs hold the kappa of the
        whole set. The per-batch values in the progress bar are computed inside each replica and
        averaged across replicas, so under a multi-replica strategy they are only approximate.

        The counts are float32: exact up to 2**24 (16.7 million) examples per cell.

        Args:
            num_classes: number of grades (5).
            thresholds: ``num_classes - 1`` strictly increasing cut-offs; default 0.5, 1.5, ...
            name: metric name (the key in the logs, e.g. ``val_kappa``).
            dtype: dtype of the result.

        Example:
            >>> model.compile(optimizer="sgd", loss="mse", metrics=[QuadraticKappa()])
            >>> # model.fit(..., validation_data=val) then logs "val_kappa" each epoch
        """

        def __init__(self, num_classes=NUM_GRADES, thresholds=None, name="kappa", dtype=None):
            super().__init__(name=name, dtype=dtype)
            self.thresholds = validate_thresholds(thresholds, num_classes)
            self.num_classes = int(num_classes)
            self.confusion = self.add_variable(
                shape=(self.num_classes, self.num_classes),
                initializer="zeros",
                dtype="float32",
                aggregation="sum",
                name="confusion_matrix",
            )

        def update_state(self, y_true, y_pred, sample_weight=None):
            k = self.num_classes
            y_pred = ops.convert_to_tensor(y_pred)
            if len(y_pred.shape) > 1 and y_pred.shape[-1] not in (None, 1):
                raise ValueError(
                    f"QuadraticKappa expects one regression output per example (shape (batch,) or "
                    f"(batch, 1)), got shape {tuple(y_pred.shape)}"
                )
            pred_scores = ops.reshape(ops.cast(y_pred, "float32"), (-1,))
            true_grades = ops.reshape(ops.cast(ops.convert_to_tensor(y_true), "float32"), (-1,))
            true_grades = ops.cast(ops.clip(ops.round(true_grades), 0.0, k - 1.0), "int32")
            pred_grades = ops.zeros_like(true_grades)
            for cut in self.thresholds:
                pred_grades = pred_grades + ops.cast(ops.greater_equal(pred_scores, cut), "int32")
            cells = ops.one_hot(true_grades * k + pred_grades, k * k, dtype="float32")
            if sample_weight is not None:
                weights = ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1))
                cells = cells * weights
            self.confusion.assign_add(ops.reshape(ops.sum(cells, axis=0), (k, k)))

        def result(self):
            k = self.num_classes
            observed = ops.convert_to_tensor(self.confusion)
            grades = ops.arange(k, dtype="float32")
            weights = ops.square(ops.expand_dims(grades, 1) - ops.expand_dims(grades, 0))
            total = ops.sum(observed)
            expected = ops.divide_no_nan(
                ops.outer(ops.sum(observed, axis=1), ops.sum(observed, axis=0)), total
            )
            numerator = ops.sum(weights * observed)
            denominator = ops.sum(weights * expected)
            kappa = ops.where(
                denominator > 0, 1.0 - ops.divide_no_nan(numerator, denominator), 0.0
            )
            return ops.cast(kappa, self.dtype)

        def get_config(self):
            return {
                **super().get_config(),
                "num_classes": self.num_classes,
                "thresholds": list(self.thresholds),
            }

    QuadraticKappa.__module__ = __name__
    return QuadraticKappa


def __getattr__(name):  # PEP 562: build the Keras class on first use only
    if name == "QuadraticKappa":
        cls = _define_quadratic_kappa()
        globals()["QuadraticKappa"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
