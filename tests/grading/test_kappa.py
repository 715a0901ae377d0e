"""Tests of retina_scale.grading: kappa and thresholds."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from retina_scale.grading.kappa import confusion_matrix, kappa_from_confusion, quadratic_weighted_kappa
from retina_scale.grading.thresholds import apply_thresholds, optimize_thresholds, validate_thresholds

REPO_ROOT = Path(__file__).resolve().parents[2]
LABELS = list(range(5))


def counted_confusion(y_true, y_pred, weights=None):
    """A confusion matrix counted here with np.add.at, independent of the code under test."""
    matrix = np.zeros((5, 5))
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1.0 if weights is None else weights)
    return matrix


def noisy_grades(rng, n, noise=0.9):
    """EyePACS-like class balance; scores are the grade plus Gaussian noise."""
    y = rng.choice(5, size=n, p=[0.73, 0.07, 0.15, 0.025, 0.025])
    return y, y + rng.normal(0.0, noise, size=n)


# --------------------------------------------------------------------------------------- kappa
# quadratic_weighted_kappa and confusion_matrix are scikit-learn's; kappa_from_confusion is the
# numpy formula the bootstrap and the threshold search use. The tests check both against values
# worked out by hand, and the numpy formula against scikit-learn.


def test_kappa_worked_out_by_hand():
    # true 0 1 2, predicted 0 2 2: observed O has ones at (0,0), (1,2), (2,2); sum(W*O) = (1-2)^2 = 1.
    # Row totals 1 1 1, column totals 1 0 2, n = 3: E[i,j] = row_i * col_j / 3, and
    # sum(W*E) = (4*2 + 1*1 + 1*2 + 4*1) / 3 = 5, so kappa = 1 - 1/5.
    assert quadratic_weighted_kappa([0, 1, 2], [0, 2, 2]) == pytest.approx(0.8, abs=1e-12)
    assert kappa_from_confusion(counted_confusion([0, 1, 2], [0, 2, 2])) == pytest.approx(0.8, abs=1e-12)
    # Weight 2 on the last example is that example twice: rows 1 1 2, columns 1 0 3, n = 4,
    # sum(W*O) = 1, sum(W*E) = (4*3 + 1*1 + 1*3 + 4*2) / 4 = 6, so kappa = 1 - 1/6.
    weighted = quadratic_weighted_kappa([0, 1, 2], [0, 2, 2], sample_weight=[1, 1, 2])
    assert weighted == pytest.approx(5 / 6, abs=1e-12)
    assert weighted == pytest.approx(quadratic_weighted_kappa([0, 1, 2, 2], [0, 2, 2, 2]), abs=1e-12)
    # true 0 0 1 2 4 3, predicted 0 1 1 2 4 2: sum(W*O) = 2 and n * sum(W*E) = 136, so 1 - 12/136.
    assert quadratic_weighted_kappa([0, 0, 1, 2, 4, 3], [0, 1, 1, 2, 4, 2]) == pytest.approx(1 - 12 / 136)


def test_kappa_by_hand_and_undefined_cases():
    # Perfect agreement, and perfect reversal of two equally frequent grades 0 and 4.
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == pytest.approx(1.0)
    assert quadratic_weighted_kappa([0, 4], [4, 0]) == pytest.approx(-1.0)
    # Undefined (as in sklearn): one grade everywhere, or nothing at all; nan, not an exception.
    assert np.isnan(quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]))
    assert np.isnan(quadratic_weighted_kappa([], []))
    assert np.isnan(quadratic_weighted_kappa([0, 1], [0, 1], sample_weight=[0, 0]))
    assert np.isnan(kappa_from_confusion(np.zeros((5, 5))))
    assert np.isnan(kappa_from_confusion(counted_confusion([3, 3], [3, 3])))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_kappa_from_confusion_equals_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    y, scores = noisy_grades(rng, 500)
    pred = apply_thresholds(scores)
    weights = rng.uniform(0.1, 3.0, size=y.size)
    want = cohen_kappa_score(y, pred, weights="quadratic", labels=LABELS)
    assert kappa_from_confusion(counted_confusion(y, pred)) == pytest.approx(want, abs=1e-12)
    assert quadratic_weighted_kappa(y, pred) == pytest.approx(want, abs=1e-12)
    want = cohen_kappa_score(y, pred, weights="quadratic", labels=LABELS, sample_weight=weights)
    assert kappa_from_confusion(counted_confusion(y, pred, weights)) == pytest.approx(want, abs=1e-12)
    assert quadratic_weighted_kappa(y, pred, sample_weight=weights) == pytest.approx(want, abs=1e-12)


def test_kappa_uses_grades_not_indices_of_present_grades():
    # Only grades 0, 1, 4 present: sklearn without labels= re-indexes them 0, 1, 2.
    y = np.array([0, 0, 1, 1, 4, 4, 0, 1])
    pred = np.array([0, 1, 1, 4, 4, 0, 0, 0])
    ours = quadratic_weighted_kappa(y, pred)
    assert ours == pytest.approx(kappa_from_confusion(counted_confusion(y, pred)), abs=1e-12)
    assert ours != pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-3)


def test_confusion_matrix_rows_are_true_grades():
    cm = confusion_matrix([0, 0, 1, 4], [0, 3, 1, 0])
    expected = np.zeros((5, 5))
    expected[0, 0] = expected[0, 3] = expected[1, 1] = expected[4, 0] = 1
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.float64
    weighted = confusion_matrix([0, 0, 1], [0, 0, 2], sample_weight=[0.5, 2.0, 3.0])
    assert weighted[0, 0] == 2.5 and weighted[1, 2] == 3.0 and weighted.sum() == 5.5
    # Every grade has a row and a column, present or not; an empty input is all zeros.
    assert confusion_matrix([2], [2], num_classes=3).tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    np.testing.assert_array_equal(confusion_matrix([], []), np.zeros((5, 5)))


def test_apply_thresholds_boundaries():
    # A score on a cut-off goes to the higher grade; beyond the ends clamps to 0 and 4.
    got = apply_thresholds([-3.0, 0.4999, 0.5, 1.5, 2.49, 3.5, 99.0])
    np.testing.assert_array_equal(got, [0, 0, 1, 2, 2, 4, 4])
    np.testing.assert_array_equal(apply_thresholds([[0.9], [2.1]], (1.0, 2.0, 3.0, 4.0)), [[0], [2]])
    # Three cut-offs make four grades; a generator of cut-offs is read once.
    np.testing.assert_array_equal(apply_thresholds([0.9, 2.1, 5.0], (t for t in (1, 2, 3))), [0, 2, 3])


@pytest.mark.parametrize(
    "thresholds, message",
    [
        ((0.5, 1.5, 2.5), "expected 4 thresholds for 5 grades, got 3"),
        ((0.5, 1.5, 2.5, 3.5, 4.5), "expected 4 thresholds for 5 grades, got 5"),
        ((0.5, 2.5, 1.5, 3.5), "strictly increasing"),
        ((0.5, 1.5, 1.5, 3.5), "strictly increasing"),
        ((0.5, float("nan"), 2.5, 3.5), "finite"),
        (("a", 1, 2, 3), "must be 4 numbers"),
    ],
)
def test_bad_thresholds_give_clear_errors(thresholds, message):
    with pytest.raises(ValueError, match=message):
        validate_thresholds(thresholds)
    with pytest.raises(ValueError, match=message):
        optimize_thresholds([0, 1, 2], [0.0, 1.0, 2.0], initial=thresholds)


def test_bad_grades_and_scores_give_clear_errors():
    with pytest.raises(ValueError, match=r"y_true must hold grades 0..4, got values from 0 to 5"):
        quadratic_weighted_kappa([0, 5], [0, 1])
    with pytest.raises(ValueError, match="whole-number"):
        quadratic_weighted_kappa([0.5, 1], [0, 1])
    with pytest.raises(ValueError, match="differ in length: 2 vs 3"):
        quadratic_weighted_kappa([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="1 of 2 are NaN or inf"):
        apply_thresholds([0.1, float("nan")])
    with pytest.raises(ValueError, match="sample_weight has 1 values for 2 examples"):
        confusion_matrix([0, 1], [0, 1], sample_weight=[1.0])
    with pytest.raises(ValueError, match="finite and non-negative"):
        quadratic_weighted_kappa([0, 1], [0, 1], sample_weight=[1.0, -1.0])
    with pytest.raises(ValueError, match="1-D array of grades"):
        confusion_matrix([[0, 1], [1, 0]], [0, 1])


# ----------------------------------------------------------------------------- threshold search


def test_optimized_thresholds_beat_defaults_and_are_locally_optimal():
    rng = np.random.default_rng(3)
    y, scores = noisy_grades(rng, 3000, noise=0.8)
    scores = 0.8 * scores + 0.3  # a biased regressor: the default cut-offs are off
    default = quadratic_weighted_kappa(y, apply_thresholds(scores))
    best_cuts = optimize_thresholds(y, scores)
    best = quadratic_weighted_kappa(y, apply_thresholds(scores, best_cuts))
    assert best > default + 0.005
    assert list(best_cuts) == sorted(best_cuts)
    # No single threshold moved anywhere between its neighbours does better (checked on a grid).
    for i in range(4):
        lo = best_cuts[i - 1] if i else scores.min() - 1
        hi = best_cuts[i + 1] if i < 3 else scores.max() + 1
        for value in np.linspace(lo, hi, 202)[1:-1]:
            cuts = list(best_cuts)
            cuts[i] = value
            assert quadratic_weighted_kappa(y, apply_thresholds(scores, cuts)) <= best + 1e-12
    # Deterministic.
    assert optimize_thresholds(y, scores) == best_cuts


def test_optimized_thresholds_recover_known_cutoffs():
    rng = np.random.default_rng(4)
    scores = rng.uniform(-0.5, 4.5, size=4000)
    true_cuts = (0.3, 1.2, 2.7, 3.9)
    y = np.digitize(scores, true_cuts)  # grade = number of cut-offs <= score
    found = optimize_thresholds(y, scores)
    assert quadratic_weighted_kappa(y, apply_thresholds(scores, found)) == pytest.approx(1.0)
    np.testing.assert_allclose(found, true_cuts, atol=0.01)


def test_optimize_thresholds_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        optimize_thresholds([0, 1, 2], [0.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        optimize_thresholds([], [])
    with pytest.raises(ValueError, match="finite"):
        optimize_thresholds([0, 1], [0.0, float("inf")])
