"""Readers of each layout, bad rows, and patient-level splits."""

from __future__ import annotations

from collections import Counter

import pytest

from fundus_fixtures import draw_fundus, write_csv, write_jpeg, write_png
from retina_scale.data.sources import (
    Record, detect_format, ensure_splits, parse_patient_eye, read_dataset, read_splits, split_by_patient, write_splits,
)


def test_eyepacs_reader_parses_patient_eye_and_labels(eyepacs_dir):
    ds = read_dataset(eyepacs_dir)
    assert ds.format == "eyepacs"
    assert ds.failures == []
    assert len(ds.records) == 20
    by_id = {r.image_id: r for r in ds.records}
    assert by_id["103_right"].patient == "103" and by_id["103_right"].eye == "right"
    assert by_id["103_right"].label == (3 + 1) % 5
    assert by_id["107_left"].label == 7 % 5
    assert by_id["107_left"].path.endswith("107_left.jpeg")


def test_aptos_reader_finds_pngs_in_train_images(tmp_path):
    root = tmp_path / "aptos"
    (root / "train_images").mkdir(parents=True)
    for i, code in enumerate(["000c1434d8d7", "001639a390f0", "0024cdab0c1e"]):
        write_png(root / "train_images" / f"{code}.png", draw_fundus(seed=i))
    write_csv(root / "train.csv", ["id_code", "diagnosis"], [["000c1434d8d7", 2], ["001639a390f0", 4], ["0024cdab0c1e", 1]])
    ds = read_dataset(root)
    assert ds.format == "aptos"
    assert [(r.image_id, r.label) for r in ds.records] == [("000c1434d8d7", 2), ("001639a390f0", 4), ("0024cdab0c1e", 1)]
    # APTOS names carry no patient: each image is its own patient.
    assert {r.patient for r in ds.records} == {"000c1434d8d7", "001639a390f0", "0024cdab0c1e"}
    assert all(r.eye is None for r in ds.records)


def test_folders_reader_takes_grade_from_folder_and_refuses_other_folders(tmp_path):
    root = tmp_path / "folders"
    for grade in ("0", "2", "4", "7", "unsorted"):
        (root / grade).mkdir(parents=True)
        write_jpeg(root / grade / f"p{grade}_left.jpg", draw_fundus())
    ds = read_dataset(root)
    assert ds.format == "folders"
    assert sorted((r.image_id, r.label, r.patient, r.eye) for r in ds.records) == [
        ("p0_left", 0, "p0", "left"), ("p2_left", 2, "p2", "left"), ("p4_left", 4, "p4", "left")]
    reasons = {f.image: f.reason for f in ds.failures}
    assert "outside 0-4" in reasons["7/p7_left.jpg"]
    assert "not a number" in reasons["unsorted/punsorted_left.jpg"]


def test_generic_csv_with_named_columns_and_sub_folders(tmp_path):
    root = tmp_path / "clinic"
    (root / "2024").mkdir(parents=True)
    write_jpeg(root / "2024" / "A17-OD.jpg", draw_fundus(seed=1))
    write_jpeg(root / "2024" / "A17-OS.jpg", draw_fundus(seed=2))
    labels = tmp_path / "grades.csv"
    write_csv(labels, ["file", "dr_grade", "comment"], [["2024/A17-OD.jpg", "3", "x"], ["2024/A17-OS", "1.0", "y"]])
    ds = read_dataset(root, labels=labels, format="csv", image_col="file", label_col="dr_grade")
    assert ds.failures == []
    got = {r.image_id: (r.label, r.patient, r.eye) for r in ds.records}
    assert got == {"2024/A17-OD.jpg": (3, "A17", "right"), "2024/A17-OS": (1, "A17", "left")}


def test_bad_rows_each_get_their_own_reason(eyepacs_dir, tmp_path):
    (tmp_path / "secret.jpeg").write_bytes(b"x")
    rows = [["100_left", 0], ["100_right", 7], ["101_left", "abc"], ["101_right", ""],
            ["102_left", 1], ["102_left", 1],  # duplicate, same label: first kept
            ["103_left", 2], ["103_left", 4],  # duplicate, conflicting labels: both refused
            ["../secret", 1], [str(tmp_path / "secret"), 1], ["999_left", 0]]
    write_csv(eyepacs_dir / "trainLabels.csv", ["image", "level"], rows)
    ds = read_dataset(eyepacs_dir)
    assert sorted(r.image_id for r in ds.records) == ["100_left", "102_left"]
    reasons = Counter()
    for f in ds.failures:
        reasons[f.image] += 1
    text = {f.image: f.reason for f in ds.failures}
    assert "outside 0-4" in text["100_right"]
    assert "not a number" in text["101_left"]
    assert "empty" in text["101_right"]
    assert "duplicate" in text["102_left"] and "first kept" in text["102_left"]
    assert "different label" in text["103_left"]
    assert "outside the data folder" in text["../secret"]
    assert "absolute path" in text[str(tmp_path / "secret")]
    assert "not found" in text["999_left"]


def test_links_that_lead_out_of_the_data_folder_are_refused_in_every_layout(tmp_path):
    """Issue 16: ``link_left`` whose ``train/link_left.jpeg`` points outside was accepted; the folders layout did
    no check. Real paths are confined to the data folder's real path; links that stay inside are fine."""
    outside = tmp_path / "outside"
    outside.mkdir()
    write_jpeg(outside / "secret.jpeg", draw_fundus(seed=7))
    root = tmp_path / "eyepacs"
    (root / "train").mkdir(parents=True)
    write_jpeg(root / "train" / "1_left.jpeg", draw_fundus(seed=1))
    (root / "train" / "link_left.jpeg").symlink_to(outside / "secret.jpeg")
    (root / "link_right.jpeg").symlink_to(outside / "secret.jpeg")
    (root / "train" / "inside_left.jpeg").symlink_to(root / "train" / "1_left.jpeg")  # stays inside: fine
    write_csv(root / "trainLabels.csv", ["image", "level"],
              [["1_left", 0], ["link_left", 1], ["link_right", 1], ["inside_left", 2]])
    ds = read_dataset(root)
    assert sorted(r.image_id for r in ds.records) == ["1_left", "inside_left"]
    reasons = {f.image: f.reason for f in ds.failures}
    assert set(reasons) == {"link_left", "link_right"}
    assert all("outside the data folder (refused: link leads out)" in r for r in reasons.values())
    assert all(str(outside) not in r.path for r in ds.records)

    folders = tmp_path / "folders"
    (folders / "1").mkdir(parents=True)
    write_jpeg(folders / "1" / "a_left.jpeg", draw_fundus(seed=2))
    (folders / "1" / "b_left.jpeg").symlink_to(outside / "secret.jpeg")
    (folders / "2").symlink_to(outside, target_is_directory=True)  # a whole grade folder leading out
    ds = read_dataset(folders)
    assert [r.image_id for r in ds.records] == ["a_left"]
    reasons = {f.image: f.reason for f in ds.failures}
    assert set(reasons) == {"1/b_left.jpeg", "2/secret.jpeg"} and all("link leads out" in r for r in reasons.values())


def test_csv_in_another_encoding_or_without_its_columns_is_a_clear_error(eyepacs_dir):
    write_csv(eyepacs_dir / "trainLabels.csv", ["image", "level"], [["100_left", "0"], ["é_left", "1"]], encoding="latin-1")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_dataset(eyepacs_dir)
    write_csv(eyepacs_dir / "trainLabels.csv", ["name", "grade"], [["100_left", "0"]])
    with pytest.raises(ValueError, match=r"lacks column\(s\) image, level; it has: name, grade"):
        read_dataset(eyepacs_dir)


def test_detect_format_and_patient_parsing(eyepacs_dir, tmp_path):
    assert detect_format(eyepacs_dir) == "eyepacs"
    with pytest.raises(ValueError, match="pass --format"):
        detect_format(tmp_path)
    assert parse_patient_eye("10_left") == ("10", "left")
    assert parse_patient_eye("A17-OD") == ("A17", "right")
    assert parse_patient_eye("scan42") == ("scan42", None)


def _population(n_patients=400, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        g = int(rng.choice(5, p=[0.6, 0.1, 0.15, 0.08, 0.07]))
        for eye in ("left", "right"):
            grade = max(0, g - int(rng.integers(0, 2)))
            records.append(Record(f"{p}_{eye}", f"/x/{p}_{eye}.jpeg", grade, str(p), eye))
    return records


def test_split_keeps_patients_whole_and_is_stratified_and_seeded(tmp_path):
    records = _population()
    splits = split_by_patient(records, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert set(splits) == {r.image_id for r in records}
    by_patient = {}
    for r in records:
        by_patient.setdefault(r.patient, set()).add(splits[r.image_id])
    assert all(len(s) == 1 for s in by_patient.values()), "a patient spans two splits"
    # Stratified by the patient's worst grade: every split's share of each stratum is near its fraction.
    worst = {p: max(r.label for r in records if r.patient == p) for p in by_patient}
    for grade in range(5):
        patients = [p for p in by_patient if worst[p] == grade]
        test_share = sum(next(iter(by_patient[p])) == "test" for p in patients) / len(patients)
        assert abs(test_share - 0.2) <= 0.5 / len(patients) + 1e-9, (grade, test_share)
    assert split_by_patient(records, 0.1, 0.2, seed=3) == splits
    assert split_by_patient(records, 0.1, 0.2, seed=4) != splits
    path = write_splits(splits, records, tmp_path / "run" / "splits.csv")
    assert read_splits(path) == splits
    with pytest.raises(ValueError, match="below 1"):
        split_by_patient(records, 0.5, 0.5)


def test_ensure_splits_writes_once_then_reuses_and_checks(tmp_path):
    records = _population(50)
    first = ensure_splits(tmp_path / "run" / "splits.csv", records, 0.2, 0.2, seed=1)
    assert (tmp_path / "run" / "splits.csv").is_file()
    # A second call (a resumed run) reads the file, whatever seed it is given.
    assert ensure_splits(tmp_path / "run" / "splits.csv", records, 0.2, 0.2, seed=99) == first
    extra = records + [Record("new_left", "/x/new_left.jpeg", 0, "new", "left")]
    with pytest.raises(ValueError, match="no split for 1 image"):
        ensure_splits(tmp_path / "run" / "splits.csv", extra)
