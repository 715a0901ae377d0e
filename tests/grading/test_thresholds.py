"""Cut-offs the validation set cannot place keep their defaults, and the fit says so (issue 16, defect 6)."""

import numpy as np

from retina_scale.grading.evaluation import evaluate_predictions, format_evaluation
from retina_scale.grading.kappa import quadratic_weighted_kappa
from retina_scale.grading.thresholds import (
    DEFAULT_THRESHOLDS, apply_thresholds, fit_thresholds, optimize_thresholds, unidentifiable_cuts,
)


def test_a_validation_set_of_one_grade_keeps_the_default_cut_offs():
    # The audit's case: every validation image is grade 0, kappa is undefined there, and the search used to move
    # the first cut-off below every score (-0.297), so that every grade-0 test image was graded 1.
    rng = np.random.default_rng(0)
    scores = rng.uniform(-0.4, 0.45, size=40)  # every image graded 0 at the defaults: kappa undefined there
    assert optimize_thresholds(np.zeros(40, int), scores) == DEFAULT_THRESHOLDS
    fit = fit_thresholds(np.zeros(40, int), scores)
    assert fit.thresholds == DEFAULT_THRESHOLDS and fit.kept == (0, 1, 2, 3) and fit.grades == (0,)
    assert "holds only grade 0" in fit.note and "kappa is undefined" in fit.note
    record = fit.to_dict()
    assert record["optimized"] == [False] * 4 and record["kept"] == [0.5, 1.5, 2.5, 3.5]
    assert record["grades_present"] == [0] and record["note"] == fit.note
    # Graded with these cut-offs, the grade-0 images stay grade 0 (the search used to grade them all 1).
    assert (apply_thresholds(scores, fit.thresholds) == 0).all()


def test_cut_offs_above_the_highest_grade_present_keep_their_defaults():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=200)  # grades 0 and 1 only
    scores = y + rng.normal(0.3, 0.4, size=200)
    fit = fit_thresholds(y, scores)
    assert fit.kept == (1, 2, 3) and fit.thresholds[1:] == DEFAULT_THRESHOLDS[1:]
    assert fit.thresholds[0] != 0.5  # the one cut-off between grades present is optimised
    assert quadratic_weighted_kappa(y, apply_thresholds(scores, fit.thresholds)) >= quadratic_weighted_kappa(
        y, apply_thresholds(scores))
    assert "grades 0, 1 only" in fit.note and "1.5, 2.5, 3.5" in fit.note
    assert unidentifiable_cuts([2, 3, 3]) == (0, 1, 3) and unidentifiable_cuts([0, 4]) == ()


def test_every_grade_present_optimises_every_cut_off_and_says_nothing():
    y = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    scores = [0.1, 0.7, 0.9, 1.1, 1.8, 2.0, 2.2, 3.0, 3.3, 4.0]
    fit = fit_thresholds(y, scores)
    assert fit.kept == () and fit.note == "" and fit.to_dict()["optimized"] == [True] * 4
    assert fit.thresholds == optimize_thresholds(y, scores)


def test_the_evaluation_report_repeats_the_note():
    fit = fit_thresholds([0, 0, 0], [0.1, 0.2, 0.3])
    result = evaluate_predictions([0, 1, 2], [0.1, 1.2, 2.2], fit.thresholds, n_boot=0)
    result["thresholds_fit"] = fit.to_dict()  # as the trainer writes evaluation.json
    assert f"Thresholds: {fit.note}" in format_evaluation(result).splitlines()
