"""Referable-DR operating points: chosen on validation, met there, optimal among all thresholds (checked by
brute force), reported when they cannot be had, measured on test with patient-bootstrap intervals."""

import numpy as np
import pytest

from retina_scale.grading.operating_points import (
    POINTS, choose_operating_points, evaluate_operating_points, format_operating_points,
)
from retina_scale.utils.errors import UserError


def _hand_made():
    """50 eyes without referable DR at scores 0.0, 0.1, ..., 4.9; 40 referable eyes: 30 above every other eye
    (5.0 ... 7.9) and 10 among the top negatives (4.85, 4.75, ..., 3.95)."""
    negatives = np.arange(50) / 10
    positives = np.concatenate([5.0 + np.arange(30) / 10, 4.85 - np.arange(10) / 10])
    grades = np.concatenate([np.arange(50) % 2, 2 + np.arange(40) % 3])
    return grades, np.concatenate([negatives, positives])


def test_hand_made_scores_give_the_known_points():
    grades, scores = _hand_made()
    chosen = choose_operating_points(grades, scores)
    points = chosen["points"]
    assert (chosen["n_referable"], chosen["n_not_referable"]) == (40, 50)
    # High specificity: one false positive (4.9) allowed out of 50 (98 % exactly); 4.85 refers 31 of 40. The
    # threshold lies halfway to the next score below (4.8).
    assert points["high_specificity"]["threshold"] == pytest.approx(4.825)
    assert points["high_specificity"]["val_sensitivity"] == 31 / 40
    assert points["high_specificity"]["val_specificity"] == 49 / 50
    # High sensitivity: 39 of 40 referred first at 4.05, where 4.1 ... 4.9 (9 eyes) are false positives.
    assert points["high_sensitivity"]["threshold"] == pytest.approx(4.025)
    assert points["high_sensitivity"]["val_sensitivity"] == 39 / 40
    assert points["high_sensitivity"]["val_specificity"] == 41 / 50
    # Youden: each step down the 10 mixed positives gains 0.025 sensitivity for 0.02 specificity: J 0.8 at 3.95.
    assert points["youden"]["threshold"] == pytest.approx(3.925)
    assert (points["youden"]["val_sensitivity"], points["youden"]["val_specificity"]) == (1.0, 0.8)
    assert all(points[name]["met"] and points[name]["reason"] is None for name in POINTS)


def _rates(referable, scores, t):
    referred = scores >= t
    return referred[referable].mean(), (~referred[~referable]).mean()


@pytest.mark.parametrize("seed", range(6))
def test_random_scores_meet_their_constraints_and_no_threshold_does_better(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(80, 400))
    grades = rng.integers(0, 5, size=n)
    # Informative but overlapping scores, rounded so that ties occur.
    scores = np.round(grades * rng.uniform(0.3, 1.0) + rng.normal(0, 1.0, size=n), 1)
    chosen = choose_operating_points(grades, scores)["points"]
    referable = grades >= 2
    candidates = [_rates(referable, scores, t) for t in np.unique(scores)]
    for name in POINTS:
        assert chosen[name]["met"], chosen[name]["reason"]
        sens, spec = _rates(referable, scores, chosen[name]["threshold"])
        assert (sens, spec) == (chosen[name]["val_sensitivity"], chosen[name]["val_specificity"])
        assert np.min(np.abs(scores - chosen[name]["threshold"])) >= 0.05 - 1e-9  # halfway between 0.1-apart scores
    sens, spec = _rates(referable, scores, chosen["high_specificity"]["threshold"])
    assert spec >= 0.98
    assert sens == max(s for s, p in candidates if p >= 0.98)
    sens, spec = _rates(referable, scores, chosen["high_sensitivity"]["threshold"])
    assert sens >= 0.975
    assert spec == max(p for s, p in candidates if s >= 0.975)
    sens, spec = _rates(referable, scores, chosen["youden"]["threshold"])
    assert sens + spec == pytest.approx(max(s + p for s, p in candidates), abs=1e-12)


def test_a_split_without_referable_eyes_reports_every_point_as_not_met():
    chosen = choose_operating_points([0, 1, 0, 1], [0.1, 0.9, 0.3, 1.2])
    for name in POINTS:
        point = chosen["points"][name]
        assert not point["met"] and point["threshold"] is None and point["val_sensitivity"] is None
        assert "holds no referable eye" in point["reason"]


def test_constraints_that_cannot_be_met_are_reported_not_replaced():
    # The five highest scores are eyes without referable DR: any threshold that refers a referable eye refers
    # those five too (specificity at most 95 %), and the lowest score is a referable eye (only referring
    # every eye reaches 97.5 % sensitivity).
    grades = np.array([2] + [0] * 95 + [3] * 20 + [1] * 5)
    scores = np.array([0.0] + list(np.linspace(0.1, 1.0, 95)) + list(np.linspace(1.5, 2.5, 20)) + [3.0] * 5)
    chosen = choose_operating_points(grades, scores)["points"]
    assert not chosen["high_specificity"]["met"] and chosen["high_specificity"]["threshold"] is None
    assert "no threshold refers a referable eye with specificity >= 98.0%" in chosen["high_specificity"]["reason"]
    assert not chosen["high_sensitivity"]["met"]
    assert "only referring every eye reaches sensitivity >= 97.5%" in chosen["high_sensitivity"]["reason"]
    assert chosen["youden"]["met"]  # the 20 grade-3 eyes above the 95 grade-0 ones: J > 0
    text = format_operating_points(choose_operating_points(grades, scores))
    assert "not met" in text and "only referring every eye" in text


def test_scores_that_rank_referable_eyes_last_have_no_youden_point():
    chosen = choose_operating_points([2, 3, 0, 1], [0.1, 0.2, 0.8, 0.9])["points"]
    assert not chosen["youden"]["met"] and "better than chance" in chosen["youden"]["reason"]


def test_bad_scores_are_one_line_errors():
    with pytest.raises(UserError, match="finite"):
        choose_operating_points([0, 2], [0.1, float("nan")])
    with pytest.raises(UserError, match="one value per grade"):
        choose_operating_points([0, 2, 3], [0.1, 0.2])
    with pytest.raises(UserError, match="empty"):
        choose_operating_points([], [])


def test_test_rates_with_patient_bootstrap_intervals():
    grades, scores = _hand_made()
    chosen = choose_operating_points(grades, scores)
    rng = np.random.default_rng(5)
    t_grades = rng.integers(0, 5, size=120)
    t_scores = t_grades * 1.2 + rng.normal(0, 1.0, size=120) + 1.5
    patients = np.repeat(np.arange(60), 2)  # two eyes each
    result = evaluate_operating_points(chosen, t_grades, t_scores, groups=patients, n_boot=200, seed=1)
    referable = t_grades >= 2
    assert result["bootstrap"]["unit"] == "patient" and result["bootstrap"]["n_units"] == 60
    for name in POINTS:
        point = result["points"][name]
        sens, spec = _rates(referable, t_scores, point["threshold"])
        assert point["test_sensitivity"]["value"] == pytest.approx(sens)
        assert point["test_specificity"]["value"] == pytest.approx(spec)
        for stat in (point["test_sensitivity"], point["test_specificity"]):
            assert stat["ci_low"] <= stat["value"] <= stat["ci_high"] and stat["n_valid"] == 200
    # Specificity at the high-specificity point on these test scores: far below 98 %, the interval too.
    high_spec = result["points"]["high_specificity"]
    assert high_spec["holds_on_test"] is (high_spec["test_specificity"]["ci_high"] >= 0.98)
    assert "youden" in result["points"] and "holds_on_test" not in result["points"]["youden"]
    roc = result["test_roc"]
    assert roc["fpr"][0] == 0.0 and roc["fpr"][-1] == 1.0 and roc["tpr"][-1] == 1.0
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    # The chosen points are unchanged (validation numbers kept beside the test ones).
    assert result["points"]["youden"]["val_sensitivity"] == chosen["points"]["youden"]["val_sensitivity"]
    assert "test_sensitivity" not in chosen["points"]["youden"]
    text = format_operating_points(result)
    assert "Gulshan" in text and "90.3%" in text and "93.4%" in text


def test_unmet_points_have_no_test_rates():
    chosen = choose_operating_points([0, 1, 0, 1], [0.1, 0.9, 0.3, 1.2])
    result = evaluate_operating_points(chosen, [0, 2, 3, 1], [0.2, 2.0, 3.0, 0.5], n_boot=20)
    assert all("test_sensitivity" not in p for p in result["points"].values())
    assert result["bootstrap"]["unit"] == "image"
