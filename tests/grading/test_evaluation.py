"""Tests of retina_scale.grading.evaluation: point estimates against sklearn, the paper's Fig. 3, bootstrap."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from retina_scale.grading.evaluation import all_statistics, evaluate_predictions, format_evaluation

# The paper's Fig. 3: confusion matrix of its large model on the EyePACS test set (rows true grade).
PAPER_FIG3 = np.array([
    [36853, 2296, 337, 36, 11],
    [1458, 1754, 540, 9, 1],
    [728, 1509, 4415, 1163, 46],
    [13, 23, 344, 793, 41],
    [15, 34, 151, 488, 518],
])


def synthetic(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.choice(5, size=n, p=[0.6, 0.12, 0.16, 0.06, 0.06])
    scores = np.round(y + rng.normal(0.0, 0.8, size=n), 1)  # rounded: ties for the AUC
    return y, scores


def test_point_estimates_equal_sklearn():
    y, scores = synthetic(600, seed=0)
    cuts = (0.4, 1.6, 2.4, 3.3)
    result = evaluate_predictions(y, scores, cuts, n_boot=0)
    pred = np.digitize(scores, cuts)
    np.testing.assert_array_equal(
        result["confusion_matrix"], skm.confusion_matrix(y, pred, labels=range(5))
    )
    assert result["kappa"]["value"] == pytest.approx(
        skm.cohen_kappa_score(y, pred, weights="quadratic", labels=range(5)), abs=1e-12
    )
    for row, positive in (("no_dr", y == 0), ("any_dr", y >= 1), ("mild_dr", y == 1)):
        truth = positive
        guess = {"no_dr": pred == 0, "any_dr": pred >= 1, "mild_dr": pred == 1}[row]
        got = result["table_iv"][row]
        assert got["precision"]["value"] == pytest.approx(skm.precision_score(truth, guess))
        assert got["recall"]["value"] == pytest.approx(skm.recall_score(truth, guess))
        assert got["f1"]["value"] == pytest.approx(skm.f1_score(truth, guess))
    ref = result["referable"]
    assert ref["sensitivity"]["value"] == pytest.approx(skm.recall_score(y >= 2, pred >= 2))
    assert ref["specificity"]["value"] == pytest.approx(skm.recall_score(y < 2, pred < 2))
    assert ref["auc"]["value"] == pytest.approx(skm.roc_auc_score(y >= 2, scores), abs=1e-12)
    assert ref["auc"]["ci_low"] is None and ref["auc"]["n_valid"] == 0  # n_boot=0


def test_hand_checked_example():
    # true 0 0 1 2 4 3, scores cut at 0.5/1.5/2.5/3.5 -> predicted 0 1 1 2 4 2
    result = evaluate_predictions([0, 0, 1, 2, 4, 3], [0.1, 0.7, 1.2, 2.2, 3.8, 2.4], n_boot=0)
    # sum((i - j)^2 * O) = 1 + 1 (true 0 -> 1, true 3 -> 2); the expected matrix from row totals
    # 2 1 1 1 1 and column totals 1 2 2 0 1 gives sum((i - j)^2 * E) = 136 / 6.
    assert result["kappa"]["value"] == pytest.approx(1 - 2 / (136 / 6), abs=1e-12)
    assert result["confusion_matrix"][0] == [1, 1, 0, 0, 0] and result["confusion_matrix"][3] == [0, 0, 1, 0, 0]
    rows = result["table_iv"]
    assert rows["no_dr"]["precision"]["value"] == 1.0  # 1 predicted 0, and it is 0
    assert rows["no_dr"]["recall"]["value"] == 0.5  # 1 of the 2 zeros found
    assert rows["any_dr"]["precision"]["value"] == pytest.approx(4 / 5)
    assert rows["mild_dr"]["precision"]["value"] == 0.5  # predicted 1 twice, right once
    assert rows["mild_dr"]["f1"]["value"] == pytest.approx(2 / 3)
    assert result["referable"]["sensitivity"]["value"] == 1.0  # 3 referable, all >= 2
    assert result["referable"]["specificity"]["value"] == 1.0
    # Every referable score (2.2, 3.8, 2.4) is above every other (0.1, 0.7, 1.2).
    assert result["referable"]["auc"]["value"] == 1.0


def test_paper_fig3_reproduces_table_iv_with_precision_and_recall_swapped():
    cells = PAPER_FIG3.ravel()
    y = np.repeat(np.repeat(np.arange(5), 5), cells)
    predicted = np.repeat(np.tile(np.arange(5), 5), cells)
    result = evaluate_predictions(y, predicted.astype(float), n_boot=0)
    np.testing.assert_array_equal(result["confusion_matrix"], PAPER_FIG3)
    assert result["kappa"]["value"] == pytest.approx(0.85548, abs=5e-6)  # paper's Table IV kappa
    # Paper's Table IV "precision / recall / F1": No DR 0.932/0.943/0.938, DR 0.842/0.815/0.829,
    # mild DR 0.466/0.312/0.370. The paper's precision is our recall and vice versa.
    rows = result["table_iv"]
    for row, (paper_p, paper_r) in {
        "no_dr": (0.932, 0.943), "any_dr": (0.842, 0.815), "mild_dr": (0.466, 0.312)
    }.items():
        assert rows[row]["recall"]["value"] == pytest.approx(paper_p, abs=5e-4)
        assert rows[row]["precision"]["value"] == pytest.approx(paper_r, abs=5e-4)
    assert rows["no_dr"]["f1"]["value"] == pytest.approx(0.938, abs=5e-4)
    assert rows["any_dr"]["f1"]["value"] == pytest.approx(0.829, abs=5e-4)
    # The paper's mild-DR F1 (0.370) is not the F1 of its own precision and recall (0.374).
    assert rows["mild_dr"]["f1"]["value"] == pytest.approx(2 * 0.466 * 0.312 / 0.778, abs=1e-3)


def test_intervals_contain_the_estimate_and_narrow_with_more_data():
    small = evaluate_predictions(*synthetic(300, seed=1), n_boot=300, seed=0)
    large = evaluate_predictions(*synthetic(3000, seed=1), n_boot=300, seed=0)
    for (name, s), (_, l) in zip(all_statistics(small), all_statistics(large)):
        for stat in (s, l):
            assert stat["ci_low"] <= stat["value"] <= stat["ci_high"], name
        assert l["n_valid"] == 300, name
        # sqrt(10) times the data: the interval should be about 3 times narrower.
        assert (l["ci_high"] - l["ci_low"]) < 0.6 * (s["ci_high"] - s["ci_low"]), name


def test_bootstrap_is_seeded():
    y, scores = synthetic(400, seed=2)
    a = evaluate_predictions(y, scores, n_boot=100, seed=7)
    b = evaluate_predictions(y, scores, n_boot=100, seed=7)
    c = evaluate_predictions(y, scores, n_boot=100, seed=8)
    assert a == b
    assert a["kappa"]["ci_low"] != c["kappa"]["ci_low"]
    assert a["kappa"]["value"] == c["kappa"]["value"]


def test_patient_bootstrap_resamples_patients():
    y, scores = synthetic(500, seed=3)
    # Each patient has two identical eyes: the two images carry no more information than one.
    twice_y, twice_scores = np.repeat(y, 2), np.repeat(scores, 2)
    patients = np.repeat([f"patient-{i:04d}" for i in range(y.size)], 2)
    by_patient = evaluate_predictions(twice_y, twice_scores, n_boot=200, seed=0, groups=patients)
    by_image = evaluate_predictions(twice_y, twice_scores, n_boot=200, seed=0)
    one_eye = evaluate_predictions(y, scores, n_boot=200, seed=0)
    assert by_patient["bootstrap"]["unit"] == "patient"
    assert by_patient["n_patients"] == 500 and by_patient["n_images"] == 1000
    for (name, p), (_, i), (_, o) in zip(
        all_statistics(by_patient), all_statistics(by_image), all_statistics(one_eye)
    ):
        # Resampling patients of the doubled set is resampling the single eyes.
        assert p["ci_low"] == pytest.approx(o["ci_low"], abs=1e-12), name
        assert p["ci_high"] == pytest.approx(o["ci_high"], abs=1e-12), name
        # Resampling images treats the two copies as independent: too narrow by about sqrt(2).
        assert (p["ci_high"] - p["ci_low"]) > 1.15 * (i["ci_high"] - i["ci_low"]), name


def test_result_is_plain_json_and_undefined_statistics_are_none():
    # No true or predicted mild DR at all: its precision, recall and F1 are undefined.
    y = np.array([0, 0, 0, 2, 2, 3, 4, 0])
    scores = np.array([0.1, 0.2, 2.1, 2.0, 1.9, 3.0, 4.0, 0.3])
    result = evaluate_predictions(y, scores, n_boot=50, seed=0)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    mild = result["table_iv"]["mild_dr"]
    assert mild["precision"]["value"] is None and mild["recall"]["value"] is None
    assert mild["f1"]["value"] is None
    text = format_evaluation(result)
    assert "Mild DR (grade 1)     n/a" in text


def test_format_evaluation_shows_the_numbers():
    y, scores = synthetic(300, seed=4)
    patients = np.arange(300) // 2
    result = evaluate_predictions(y, scores, (0.6, 1.4, 2.6, 3.4), n_boot=50, groups=patients)
    text = format_evaluation(result)
    kappa = result["kappa"]
    assert f"{kappa['value']:.4f} [{kappa['ci_low']:.4f}, {kappa['ci_high']:.4f}]" in text
    assert "300 images from 150 patients" in text and "0.600 / 1.400 / 2.600 / 3.400" in text
    auc = result["referable"]["auc"]
    assert f"AUC (score)         {auc['value']:.4f}" in text
    matrix_lines = text.splitlines()[-5:]
    for grade, line in enumerate(matrix_lines):
        assert [int(v) for v in line.split()] == [grade] + result["confusion_matrix"][grade]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(y_true=[0, 1], scores=[0.0]), "one value per grade"),
        (dict(y_true=[], scores=[]), "empty"),
        (dict(y_true=[0, 7], scores=[0.0, 1.0]), "grades 0..4"),
        (dict(y_true=[0, 1], scores=[0.0, float("nan")]), "NaN or inf"),
        (dict(y_true=[0, 1], scores=[0.0, 1.0], thresholds=(1, 2)), "expected 4 thresholds"),
        (dict(y_true=[0, 1], scores=[0.0, 1.0], groups=[1]), "one id per image"),
        (dict(y_true=[0, 1], scores=[0.0, 1.0], n_boot=-1), "n_boot"),
        (dict(y_true=[0, 1], scores=[0.0, 1.0], confidence=95), "confidence"),
    ],
)
def test_bad_input_gives_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(**kwargs)


def test_mild_dr_auc_on_hand_made_scores():
    # Grades 0 and 1 only count. Grade-1 scores 0.4 and 1.0 against grade-0 scores 0.1, 0.5, 0.9, 0.4:
    # 0.4 beats 0.1, ties 0.4 (1/2) -> 1.5; 1.0 beats all four -> 4; AUC = 5.5 / 8. The grade-2 (0.0) and
    # grade-4 (0.2) photos, scored below every grade-1 one, would change it if they counted.
    y = [0, 0, 0, 0, 1, 1, 2, 4]
    scores = [0.1, 0.5, 0.9, 0.4, 0.4, 1.0, 0.0, 0.2]
    result = evaluate_predictions(y, scores, n_boot=0)
    assert result["mild_dr_auc"]["value"] == pytest.approx(5.5 / 8, abs=1e-12)
    assert result["mild_dr_auc"]["ci_low"] is None
    keep = np.isin(y, (0, 1))
    assert result["mild_dr_auc"]["value"] == pytest.approx(
        skm.roc_auc_score(np.array(y)[keep] == 1, np.array(scores)[keep]), abs=1e-12)


def test_mild_dr_auc_has_a_patient_bootstrap_interval_and_a_line_in_the_report():
    y, scores = synthetic(400, seed=5)
    patients = np.arange(400) // 2
    result = evaluate_predictions(y, scores, (0.5, 1.5, 2.5, 3.5), n_boot=200, seed=2, groups=patients)
    auc = result["mild_dr_auc"]
    keep = y <= 1
    assert auc["value"] == pytest.approx(skm.roc_auc_score(y[keep] == 1, scores[keep]), abs=1e-12)
    assert auc["ci_low"] < auc["value"] < auc["ci_high"] and auc["n_valid"] == 200
    assert ("mild_dr_auc", auc) in list(all_statistics(result))
    text = format_evaluation(result)
    assert "Mild DR (grade 1) against no DR (grade 0)" in text
    assert f"AUC (score)         {auc['value']:.4f} [{auc['ci_low']:.4f}, {auc['ci_high']:.4f}]" in text
    # Without a grade-1 image it is undefined, not a number.
    assert evaluate_predictions([0, 0, 2, 3], [0.1, 0.3, 2.0, 3.1], n_boot=0)["mild_dr_auc"]["value"] is None
