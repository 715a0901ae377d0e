"""Tests of the synthetic fundus generator (retina_scale.data.synthetic) and `retina-scale synth`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from retina_scale import cli
from retina_scale.data import synthetic as syn

REPO = Path(__file__).resolve().parents[2]


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def lesion_records(rows):
    """lesions.csv rows -> {image: [record dicts]} with the types grade_from_lesions expects."""
    out = defaultdict(list)
    for r in rows:
        out[r["image"]].append(dict(kind=r["kind"], quadrant=r["quadrant"], x=float(r["x"]), y=float(r["y"]),
                                    size_px=float(r["size_px"]), size_um=float(r["size_um"])))
    return out


@pytest.fixture
def synth_cli(monkeypatch):
    """cli.main restricted to the synth subcommand (other subcommands live in other modules/branches)."""
    monkeypatch.setattr(cli, "COMMANDS", {"synth": cli.COMMANDS["synth"]})

    def run(*argv):
        return cli.main(["synth", *map(str, argv)])

    return run


@pytest.fixture(scope="module")
def balanced_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("balanced") / "set"
    summary = syn.generate_dataset(out, count=30, size=160, seed=11, prior="balanced", progress=False)
    return out, summary


# ----------------------------------------------------------------------------------------------------------
# Determinism and layout
# ----------------------------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files_whatever_the_worker_count(tmp_path):
    a, b, c = tmp_path / "w1", tmp_path / "w2", tmp_path / "seed2"
    prior = "0.1,0.2,0.2,0.25,0.25"
    syn.generate_dataset(a, count=7, size=96, seed=5, prior=prior, workers=1, progress=False)
    syn.generate_dataset(b, count=7, size=96, seed=5, prior=prior, workers=2, progress=False)
    syn.generate_dataset(c, count=7, size=96, seed=6, prior=prior, workers=1, progress=False)
    # the set exercises both backgrounds and grades 1-4 (all lesion code paths)
    images = read_csv(a / "images.csv")
    assert {r["background"] for r in images} == {"real", "procedural"}
    assert {int(r["level"]) for r in images} == {1, 2, 3, 4}
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "summary.json")
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "summary.json")
    assert files_a == files_b
    assert len([f for f in files_a if f.suffix == ".jpeg"]) == 7
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # a different seed changes the photos (so the comparison above could fail)
    assert (a / "train" / "1_left.jpeg").read_bytes() != (c / "train" / "1_left.jpeg").read_bytes()
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    for key in ("levels", "lesions", "count", "seed"):
        assert sa[key] == sb[key]


def test_layout_is_eyepacs_and_labels_match_the_drawn_lesions(balanced_set):
    out, summary = balanced_set
    labels = read_csv(out / "trainLabels.csv")
    assert list(labels[0]) == ["image", "level"]
    names = [r["image"] for r in labels]
    assert names[:4] == ["1_left", "1_right", "2_left", "2_right"]
    assert sorted(p.stem for p in (out / "train").glob("*.jpeg")) == sorted(names)
    for name in names:
        img = cv2.imread(str(out / "train" / f"{name}.jpeg"))
        assert img is not None and img.shape == (160, 160, 3)
    images = {r["image"]: r for r in read_csv(out / "images.csv")}
    lesions = lesion_records(read_csv(out / "lesions.csv"))
    for r in labels:
        # no label noise: the written level is the drawn grade, and the drawn lesions imply it
        assert int(r["level"]) == int(images[r["image"]]["true_level"])
        assert syn.grade_from_lesions(lesions.get(r["image"], [])) == int(r["level"]), r["image"]
    assert summary["levels"] == np.bincount([int(r["level"]) for r in labels], minlength=5).tolist()


# ----------------------------------------------------------------------------------------------------------
# Priors, patients, label noise
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prior", ["eyepacs", "balanced", "0.1,0.2,0.3,0.25,0.15"])
def test_prior_is_honoured_statistically(prior):
    from scipy.stats import chisquare

    specs = syn.plan_dataset(20000, seed=3, prior=prior)
    expected = syn.parse_prior(prior) * len(specs)
    observed = np.bincount([s.level for s in specs], minlength=5)
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)
    # both eyes separately follow the prior too
    left = np.bincount([s.level for s in specs if s.eye == "left"], minlength=5)
    assert chisquare(left, expected / 2).pvalue > 1e-3


def test_eyepacs_prior_is_the_papers_table_ii():
    counts = np.array([25810, 2443, 5292, 873, 708])
    assert np.allclose(syn.parse_prior("eyepacs"), counts / counts.sum(), atol=2e-4)


def test_fellow_eyes_have_correlated_grades():
    specs = syn.plan_dataset(20000, seed=4, prior="balanced")
    by_patient = defaultdict(dict)
    for s in specs:
        by_patient[s.patient][s.eye] = s.true_level
    pairs = np.array([(d["left"], d["right"]) for d in by_patient.values()])
    same = np.mean(pairs[:, 0] == pairs[:, 1])
    near = np.mean(np.abs(pairs[:, 0] - pairs[:, 1]) <= 1)
    assert same > 0.5  # independent eyes under a balanced prior would agree 20 % of the time
    assert near > 0.9


def test_label_noise_moves_labels_to_adjacent_grades_at_the_requested_rate():
    specs = syn.plan_dataset(20000, seed=8, prior="balanced", label_noise=0.2)
    moved = [s for s in specs if s.level != s.true_level]
    assert abs(len(moved) / len(specs) - 0.2) < 0.015
    assert all(abs(s.level - s.true_level) == 1 and 0 <= s.level <= 4 for s in moved)
    assert all(s.level == s.true_level for s in syn.plan_dataset(2000, seed=8, prior="balanced"))


# ----------------------------------------------------------------------------------------------------------
# Clinical grading rules
# ----------------------------------------------------------------------------------------------------------

def _recs(kind, quadrant, n):
    return [dict(kind=kind, quadrant=quadrant)] * n


def test_grade_from_lesions_applies_the_clinical_rules():
    assert syn.grade_from_lesions([]) == 0
    assert syn.grade_from_lesions(_recs("microaneurysm", "superonasal", 5)) == 1
    assert syn.grade_from_lesions(_recs("microaneurysm", "superonasal", 5)
                                  + _recs("hard_exudate", "inferotemporal", 1)) == 2
    # 4-2-1: more than 20 haemorrhages in EACH of the four quadrants
    three = sum((_recs("dot_blot_haemorrhage", q, 25) for q in syn.QUADRANTS[:3]), [])
    assert syn.grade_from_lesions(three + _recs("dot_blot_haemorrhage", syn.QUADRANTS[3], 20)) == 2
    assert syn.grade_from_lesions(three + _recs("flame_haemorrhage", syn.QUADRANTS[3], 21)) == 3
    # venous beading in two quadrants, not one
    assert syn.grade_from_lesions(_recs("venous_beading", "superonasal", 3)) == 2
    assert syn.grade_from_lesions(_recs("venous_beading", "superonasal", 1)
                                  + _recs("venous_beading", "inferonasal", 1)) == 3
    assert syn.grade_from_lesions(_recs("irma", "inferonasal", 1)) == 3
    for kind in syn.PROLIFERATIVE:
        assert syn.grade_from_lesions(_recs(kind, "inferonasal", 1)) == 4


@pytest.mark.parametrize("background", ["procedural", "real"])
def test_rendered_photos_satisfy_their_grade(background):
    for seed in range(3):
        for grade in range(5):
            img, lesions = syn.render_fundus(seed * 7 + grade, grade, size=128, background=background)
            kinds = {r["kind"] for r in lesions}
            assert syn.grade_from_lesions(lesions) == grade, (seed, grade, kinds)
            if grade == 0:
                assert not lesions
            if grade == 1:
                assert kinds == {"microaneurysm"} and len(lesions) <= 8
            if grade == 3:
                haem = defaultdict(int)
                beading = set()
                for r in lesions:
                    if r["kind"] in syn.INTRARETINAL_HAEMORRHAGES:
                        haem[r["quadrant"]] += 1
                    if r["kind"] == "venous_beading":
                        beading.add(r["quadrant"])
                rule_4 = all(haem[q] > 20 for q in syn.QUADRANTS)
                assert rule_4 or len(beading) >= 2 or "irma" in kinds
                assert not kinds & set(syn.PROLIFERATIVE)
            if grade == 4:
                assert kinds & {"nvd", "nve", "preretinal_haemorrhage", "vitreous_haemorrhage"}


def test_lesion_sizes_stay_inside_the_physical_ranges(balanced_set):
    out, _ = balanced_set
    rows = read_csv(out / "lesions.csv")
    images = {r["image"]: r for r in read_csv(out / "images.csv")}
    kinds = {r["kind"] for r in rows}
    assert {"microaneurysm", "dot_blot_haemorrhage"} <= kinds
    for r in rows:
        lo, hi = syn.LESION_SIZE_UM[r["kind"]]
        size_um = float(r["size_um"])
        assert lo - 0.01 <= size_um <= hi + 0.01, r
        um_per_px = float(images[r["image"]]["um_per_px"])
        assert abs(float(r["size_px"]) * um_per_px - size_um) <= 0.02 * size_um + 0.05
        assert abs(um_per_px - 12000 / 160) < 1e-6
        x, y = float(r["x"]), float(r["y"])
        assert 0 <= x < 160 and 0 <= y < 160
    # every kind the issue lists is drawn somewhere in a proliferative photo set
    drawn = set()
    for seed in range(12):
        for grade in (2, 3, 4):
            drawn |= {r["kind"] for r in syn.render_fundus(100 + seed, grade, size=96,
                                                            background=("real", "procedural")[seed % 2])[1]}
    assert drawn == set(syn.LESION_KINDS)


# ----------------------------------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("background", ["procedural", "real"])
def test_the_optic_disc_is_on_the_nasal_side_of_each_eye(background):
    for seed in range(3):
        for eye in ("right", "left"):
            img, _, meta = syn.render_fundus(seed, 0, size=192, eye=eye, background=background,
                                             return_meta=True)
            # the disc is the brightest blob of the photo: find it from the pixels, not from the metadata
            lum = cv2.GaussianBlur(img.astype(np.float32).mean(axis=2), (0, 0), 192 / 40)
            _, _, _, (bx, by) = cv2.minMaxLoc(lum)
            if eye == "right":
                assert bx > 96 + 20, (seed, eye, bx)
            else:
                assert bx < 96 - 20, (seed, eye, bx)
            assert abs(bx - meta["disc_x"]) < 192 / 7 and abs(by - meta["disc_y"]) < 192 / 7
            # the macula is temporal to the disc, about two disc-diameters away
            dist = abs(meta["fovea_x"] - meta["disc_x"]) / meta["disc_diameter_px"]
            assert 1.7 < dist < 3.0
            assert 1 / 9 < meta["disc_diameter_px"] / 192 < 1 / 5.5


def test_left_eye_is_the_mirror_geometry_of_the_right():
    right, lr = syn.render_fundus(9, 2, size=128, eye="right")
    left, ll = syn.render_fundus(9, 2, size=128, eye="left")
    # same seed: the left photo is the right one mirrored (up to independent camera noise)
    diff = np.abs(left[:, ::-1].astype(int) - right.astype(int))
    assert np.median(diff) <= 4
    assert [round(127 - r["x"], 3) for r in lr] == [round(r["x"], 3) for r in ll]


def test_eyepacs_framing_is_a_wide_canvas_with_the_lesions_moved_along(tmp_path):
    widths = set()
    for seed in range(12):  # enough seeds that some take the darker branch
        img, lesions, meta = syn.render_fundus(seed, 2, size=128, framing="eyepacs", return_meta=True)
        h, w = img.shape[:2]
        assert img.dtype == np.uint8 and img.ndim == 3
        assert h == 128 and 1.35 < w / h < 1.6
        widths.add(meta["field_x"])
        assert img[:, : int(meta["field_x"] - 66)].max() == 0  # black margin left of the fundus
        for r in lesions:
            assert abs(r["x"] - meta["field_x"]) < 64 and 0 <= r["y"] < 128
    assert len(widths) > 1  # the fundus is placed off-centre by different amounts


# ----------------------------------------------------------------------------------------------------------
# Calibration against skimage.data.microaneurysms()
# ----------------------------------------------------------------------------------------------------------

def test_microaneurysm_contrast_and_profile_match_the_real_detail():
    """Tolerances: relative depth +-0.05, FWHM +-10 %, normalised radial profile +-0.08 at every radius."""
    ref = syn.reference_microaneurysms()
    depths = [r["depth"] for r in ref]
    # the constants in the module are the measured range
    assert syn.MA_GREEN_DEPTH[0] <= min(depths) + 0.01 and max(depths) - 0.01 <= syn.MA_GREEN_DEPTH[1]
    assert abs(min(depths) - syn.MA_GREEN_DEPTH[0]) < 0.02 and abs(max(depths) - syn.MA_GREEN_DEPTH[1]) < 0.02
    mean_profile = np.mean([r["profile"] for r in ref], axis=0)
    anat = syn.Anatomy(size=1024, centre=(0, 0), radius=1e4, disc=(1e4, 1e4), disc_diameter=146, fovea=(0, 0))
    for r in ref:
        # a drawn microaneurysm of the same width and depth, at a sub-pixel position, on a flat background
        img = np.full((48, 48, 3), 0.4, np.float32)
        painter = syn.LesionPainter(np.random.default_rng(0), img, anat)
        painter.microaneurysm(24.3, 23.6, diameter_px=r["fwhm"], depth=r["depth"])
        m = syn.measure_dark_spot(img[..., 1], 24, 24)
        assert abs(m["depth"] - r["depth"]) < 0.05
        assert abs(m["fwhm"] - r["fwhm"]) < 0.1 * r["fwhm"]
        assert np.max(np.abs(m["profile"] - mean_profile)) < 0.08, (m["profile"], mean_profile)
    # in full rendered photos (texture, vessels, vignetting, noise), microaneurysms of the reference's width
    # keep the reference's contrast
    measured = []
    for seed in range(6):
        img, lesions = syn.render_fundus(seed, 1, size=1024, background=("procedural", "real")[seed % 2])
        for r in lesions:
            if 3.0 <= r["size_px"] <= 5.0:
                m = syn.measure_dark_spot(img[..., 1], r["x"], r["y"])
                measured.append(m["depth"])
    assert len(measured) >= 3
    assert min(depths) - 0.12 < np.median(measured) < max(depths) + 0.05, measured


# ----------------------------------------------------------------------------------------------------------
# Command line and bad input
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--prior", "uniformish"], "unknown prior"),
    (["--prior", "0.5,0.2,0.1,0.1,0.2"], "sums to"),
    (["--prior", "0.5,0.5"], "exactly 5"),
    (["--count", "-3"], "count -3"),
    (["--size", "32"], "64 to 4096"),
    (["--label-noise", "1.5"], "label noise"),
    (["--workers", "0"], "workers"),
])
def test_bad_input_gives_one_line_error_and_writes_nothing(synth_cli, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    argv = ["--out", out, "--count", 2, "--size", 96, "--no-progress"] + extra
    rc = synth_cli(*argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "error:" in err and needle in err, err
    assert not (out / "trainLabels.csv").exists()


def test_non_empty_folder_is_refused_without_overwrite(synth_cli, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = synth_cli("--out", out, "--count", 2, "--size", 96, "--no-progress")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--overwrite" in err
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert synth_cli("--out", out, "--count", 4, "--size", 96, "--no-progress", "--overwrite") == 0
    assert len(read_csv(out / "trainLabels.csv")) == 4
    # overwriting with a smaller set leaves no stale photos beside the new labels, and the user's file alone
    assert synth_cli("--out", out, "--count", 2, "--size", 96, "--no-progress", "--overwrite") == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["1_left.jpeg", "1_right.jpeg"]
    assert [r["image"] for r in read_csv(out / "trainLabels.csv")] == ["1_left", "1_right"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_failure_midway_leaves_no_trainlabels(tmp_path, monkeypatch):
    from retina_scale.data.synthetic import writer

    calls = {"n": 0}
    real = writer._render_one

    def flaky(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(job)

    monkeypatch.setattr(writer, "_render_one", flaky)
    with pytest.raises(RuntimeError):
        syn.generate_dataset(tmp_path / "out", count=5, size=96, progress=False)
    assert not (tmp_path / "out" / "trainLabels.csv").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))
    assert not list((tmp_path / "out").rglob("*.tmp*"))  # atomic_path's temporary names end in .tmp.jpeg
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["1_left.jpeg", "1_right.jpeg"]


def test_stale_photos_and_temporary_files_are_removed_and_nothing_else(tmp_path):
    from retina_scale.data.synthetic.writer import remove_stale_photos

    names = ["1_left.jpeg", "1_right.jpeg", "2_left.jpeg", "2_left.jpeg.tmp", ".2_right.jpeg.k3_x9abc.tmp.jpeg",
             "notes.txt", "1_left.png", "x_left.jpeg", ".hidden.jpeg"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_photos(str(tmp_path), ["1_left", "1_right"])
    assert removed == [".2_right.jpeg.k3_x9abc.tmp.jpeg", "2_left.jpeg", "2_left.jpeg.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - set(removed))


def test_dataset_summary_counts_grades_and_lesion_kinds():
    from retina_scale.data.synthetic.writer import dataset_summary

    specs = syn.plan_dataset(7, seed=2, prior="balanced")
    rows = [{"kind": "microaneurysm"}] * 3 + [{"kind": "nvd"}]
    s = dataset_summary("/d", specs, rows, size=96, seed=2, probs=[0.2] * 5, label_noise=0.0, framing=None,
                        real_fraction=0.3)
    assert s["count"] == 7 and sum(s["levels"]) == 7
    assert s["levels"] == [sum(sp.level == g for sp in specs) for g in range(5)]
    assert s["lesions"] == {"microaneurysm": 3, "nvd": 1}
    assert s["labels"] == os.path.join("/d", "trainLabels.csv") and s["prior"] == [0.2] * 5


def test_cli_writes_the_set_and_prints_a_table_and_json(synth_cli, tmp_path, capsys):
    out = tmp_path / "set"
    rc = synth_cli("--out", out, "--count", 4, "--size", 96, "--seed", 2, "--prior", "0,0,0,0,1",
                   "--label-noise", "0", "--framing", "eyepacs", "--no-progress")
    text = capsys.readouterr().out
    assert rc == 0
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["levels"] == [0, 0, 0, 0, 4]
    assert [r["level"] for r in read_csv(out / "trainLabels.csv")] == ["4"] * 4
    img = cv2.imread(str(out / "train" / "1_left.jpeg"))
    assert img.shape[0] == 96 and img.shape[1] > 1.3 * 96


def test_gallery_is_a_small_png_with_one_row_per_grade(synth_cli, tmp_path):
    path = tmp_path / "sheet.png"
    assert synth_cli("--gallery", path, "--size", 160) == 0
    img = cv2.imread(str(path))
    assert img is not None and path.stat().st_size < 1_000_000
    h, w = img.shape[:2]
    assert w > h  # 7 columns by 5 rows of tiles


def test_generator_does_not_import_tensorflow():
    code = ("import sys, retina_scale.data.synthetic, retina_scale.commands.synth; "
            "sys.exit(1 if 'tensorflow' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0
