"""``retina-scale prepare``: outputs, resume and repair, every bad input, exit codes."""

from __future__ import annotations

import csv
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from fundus_fixtures import draw_fundus, write_csv, write_jpeg
from retina_scale import cli
from retina_scale.data.cache import parse_sizes, read_manifest


@pytest.fixture
def prepare(monkeypatch, capsys):
    """Run ``retina-scale prepare ARGS`` in-process; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(cli, "COMMANDS", {"prepare": cli.COMMANDS["prepare"]})

    def _run(*args):
        code = cli.main(["prepare", "--no-progress", *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def _failures(cache):
    with open(cache / "failures.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {r["image"]: r["reason"] for r in rows}


def test_prepare_writes_every_size_and_a_manifest(eyepacs_dir, tmp_path, prepare):
    cache = tmp_path / "cache"
    code, out, _ = prepare("--data", eyepacs_dir, "--sizes", "64,32", "--out", cache, "--workers", 2)
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("prepared 20, skipped 0 (already cached), failed 0")
    m = read_manifest(cache, 64)
    assert len(m) == 20
    assert set(m["patient"]) == {str(100 + p) for p in range(10)}
    row = m[m["image"] == "104_right"].iloc[0]
    assert int(row["label"]) == 0 and row["eye"] == "right"
    for size in (32, 64):
        img = cv2.imread(str(cache / str(size) / "104_right.jpg"), cv2.IMREAD_UNCHANGED)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
    # The fixtures' disc centre is at x = 150 + patient, y = 118 (pixel centres), radius 108.
    assert abs(float(row["disc_cx"]) - 154.5) <= 2 and abs(float(row["disc_cy"]) - 118.5) <= 2
    assert abs(float(row["disc_r"]) - 108) <= 2
    assert _failures(cache) == {}
    assert not (cache / ".journal.jsonl").exists()
    assert not [p for p in cache.rglob(".*tmp*")], "temporary files left behind"


def test_prepare_resumes_and_repairs(eyepacs_dir, tmp_path, prepare):
    cache = tmp_path / "cache"
    assert prepare("--data", eyepacs_dir, "--sizes", "32,48", "--out", cache, "--workers", 1)[0] == 0
    good = (cache / "48" / "101_left.jpg").read_bytes()
    code, out, _ = prepare("--data", eyepacs_dir, "--sizes", "32,48", "--out", cache, "--workers", 1)
    assert code == 0 and "prepared 0, skipped 20" in out
    (cache / "48" / "101_left.jpg").unlink()  # deleted
    p = cache / "32" / "102_left.jpg"
    p.write_bytes(p.read_bytes()[:100])  # truncated
    code, out, _ = prepare("--data", eyepacs_dir, "--sizes", "32,48", "--out", cache, "--workers", 1)
    assert code == 0 and "prepared 2, skipped 18" in out
    assert (cache / "48" / "101_left.jpg").read_bytes() == good
    assert cv2.imread(str(p)).shape == (32, 32, 3)
    # Same-size damage is only seen by --verify, which checks the CRC-32.
    q = cache / "48" / "105_right.jpg"
    size = q.stat().st_size
    q.write_bytes(b"\0" * size)
    assert "prepared 0, skipped 20" in prepare("--data", eyepacs_dir, "--sizes", "32,48", "--out", cache)[1]
    code, out, _ = prepare("--data", eyepacs_dir, "--sizes", "32,48", "--out", cache, "--verify", "--workers", 1)
    assert "prepared 1, skipped 19" in out
    assert cv2.imread(str(q)).shape == (48, 48, 3)
    # A changed source photo is redone; a new size is added to the cached images.
    write_jpeg(eyepacs_dir / "100_left.jpeg", draw_fundus(seed=99, cx=140))
    code, out, _ = prepare("--data", eyepacs_dir, "--sizes", "32,48,40", "--out", cache, "--workers", 1)
    assert "prepared 20, skipped 0" in out
    assert len(read_manifest(cache, 40)) == 20 and len(read_manifest(cache, 48)) == 20


def test_an_interrupted_run_is_resumed_from_its_journal(eyepacs_dir, tmp_path, prepare):
    cache = tmp_path / "cache"
    prepare("--data", eyepacs_dir, "--sizes", "32", "--out", cache, "--workers", 1)
    # Simulate a run killed before writing the manifest: only the journal of finished images remains.
    import json

    from retina_scale.data.cache import _read_state

    state = _read_state(cache)
    (cache / "manifest.csv").unlink()
    lines = [json.dumps({"image": k, **v}) for k, v in list(state.items())[:5]]
    (cache / ".journal.jsonl").write_text("\n".join(lines) + '\n{"image": "torn', encoding="utf-8")
    code, out, _ = prepare("--data", eyepacs_dir, "--sizes", "32", "--out", cache, "--workers", 1)
    assert code == 0 and "prepared 15, skipped 5" in out


def _cmyk_jpeg(path):
    Image.fromarray(draw_fundus()[:, :, ::-1]).convert("CMYK").save(path, "JPEG")


def test_every_bad_input_is_listed_with_its_own_reason(tmp_path, prepare):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "outside.jpeg").write_bytes(b"x")
    good = draw_fundus(seed=1)
    write_jpeg(root / "1_left.jpeg", good)
    write_jpeg(root / "1_right.jpeg", draw_fundus(seed=2))
    (root / "2_left.jpeg").write_bytes(b"")
    full = cv2.imencode(".jpg", good)[1].tobytes()
    (root / "2_right.jpeg").write_bytes(full[: len(full) // 2])
    (root / "3_left.jpeg").write_bytes(cv2.imencode(".png", good)[1].tobytes())
    write_jpeg(root / "3_right.jpeg", cv2.cvtColor(good, cv2.COLOR_BGR2GRAY))
    _cmyk_jpeg(root / "4_left.jpeg")
    (root / "4_right.png").write_bytes(cv2.imencode(".png", good.astype(np.uint16) * 257)[1].tobytes())
    write_jpeg(root / "5_left.jpeg", draw_fundus(width=50, height=40))
    write_jpeg(root / "5_right.jpeg", np.zeros((240, 320, 3), np.uint8))
    write_jpeg(root / "6_left.jpeg", good)
    write_jpeg(root / "6_right.jpeg", good)
    rows = [["1_left", 0], ["1_right", 2], ["9_left", 1], ["2_left", 1], ["2_right", 1], ["3_left", 1],
            ["3_right", 1], ["4_left", 1], ["4_right", 1], ["5_left", 1], ["5_right", 1],
            ["6_left", 9], ["6_right", "severe"], ["1_left", 0], ["../outside", 1], [str(tmp_path / "outside"), 1]]
    write_csv(root / "trainLabels.csv", ["image", "level"], rows)
    cache = tmp_path / "cache"
    code, out, _ = prepare("--data", root, "--sizes", "32", "--out", cache, "--workers", 2)
    assert code == 0
    # 3_left, PNG content in a .jpeg file, is used: the content decides, as in the serving graph (issue 16).
    assert "prepared 3, skipped 0 (already cached), failed 13" in out.splitlines()[-1]
    f = _failures(cache)
    expected = {
        "9_left": "file not found", "2_left": "empty file", "2_right": "truncated JPEG",
        "3_right": "grayscale image", "4_left": "CMYK JPEG",
        "4_right": "16-bit image", "5_left": "too small to hold a fundus", "5_right": "no fundus found",
        "6_left": "outside 0-4", "6_right": "not a number", "1_left": "duplicate image id",
        "../outside": "outside the data folder", str(tmp_path / "outside"): "absolute path",
    }
    assert set(f) == set(expected)
    for image, reason in expected.items():
        assert reason in f[image], (image, f[image])
    assert len(set(f.values())) == len(f)
    assert sorted(read_manifest(cache, 32)["image"]) == ["1_left", "1_right", "3_left"]
    assert prepare("--data", root, "--sizes", "32", "--out", cache, "--strict")[0] == 1


def test_nothing_usable_exits_1_and_whole_command_errors_exit_2(tmp_path, prepare):
    root = tmp_path / "data"
    root.mkdir()
    (root / "1_left.jpeg").write_bytes(b"")
    write_csv(root / "trainLabels.csv", ["image", "level"], [["1_left", 0]])
    code, out, _ = prepare("--data", root, "--sizes", "32", "--out", tmp_path / "c1")
    assert code == 1 and "prepared 0, skipped 0 (already cached), failed 1" in out
    write_csv(root / "trainLabels.csv", ["image", "level"], [["1_léft", 0]], encoding="cp1252")
    code, _, err = prepare("--data", root, "--sizes", "32", "--out", tmp_path / "c2")
    assert code == 2 and "not UTF-8" in err and len(err.strip().splitlines()) == 1
    write_csv(root / "trainLabels.csv", ["id", "grade"], [["1_left", 0]])
    code, _, err = prepare("--data", root, "--sizes", "32", "--out", tmp_path / "c3")
    assert code == 2 and "lacks column(s) image, level" in err
    code, _, err = prepare("--data", root, "--sizes", "32,abc", "--out", tmp_path / "c4")
    assert code == 2 and "--sizes must be comma-separated integers" in err
    code, _, err = prepare("--data", tmp_path / "nope", "--out", tmp_path / "c5")
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c3").exists()


def test_a_cache_keeps_its_preprocessing(eyepacs_dir, tmp_path, prepare):
    cache = tmp_path / "cache"
    assert prepare("--data", eyepacs_dir, "--sizes", "32", "--out", cache, "--normalize", "graham", "--workers", 1,
                   "--image-format", "png")[0] == 0
    img = cv2.imread(str(cache / "32" / "100_left.png"))
    assert (img[0, 0] == 128).all()  # Graham: grey outside 90 % of the radius
    code, _, err = prepare("--data", eyepacs_dir, "--sizes", "32", "--out", cache, "--image-format", "png")
    assert code == 2 and "was prepared with preprocessing" in err
    code, _, err = prepare("--data", eyepacs_dir, "--sizes", "32", "--out", cache, "--normalize", "graham")
    assert code == 2 and "holds png files, not jpeg" in err


def _interrupt_before_the_end(monkeypatch, prepare, *args):
    """Run prepare until every image is made and journalled, then stop it as ``kill -9`` would before the
    manifest and cache.json are written."""
    import retina_scale.data.cache as cache_module

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(cache_module, "_manifest_rows", killed)
        assert prepare(*args)[0] == 130  # the CLI's exit status for an interrupted command


def test_an_interrupted_cache_rerun_with_other_options_is_refused_not_mixed(eyepacs_dir, tmp_path, prepare,
                                                                             monkeypatch):
    """Issue 16: kill -9 during prepare, rerun with --normalize graham: 'none' images must not be kept as
    graham ones (cache.json, written at the end, cannot tell: the journal's entries record it)."""
    cache = tmp_path / "cache"
    common = ("--data", eyepacs_dir, "--sizes", "32", "--out", cache, "--workers", 1)
    _interrupt_before_the_end(monkeypatch, prepare, *common)
    assert (cache / ".journal.jsonl").is_file() and not (cache / "cache.json").exists()
    code, _, err = prepare(*common, "--normalize", "graham")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds 20 image(s) from an interrupted run made with" in err and "'normalize': 'none'" in err
    code, _, err = prepare(*common, "--image-format", "png")
    assert code == 2 and "'image_format': 'jpeg'" in err
    assert not (cache / "manifest.csv").exists()  # nothing was mixed in
    code, out, _ = prepare(*common)  # the same options finish it
    assert code == 0 and "prepared 0, skipped 20" in out
    img = cv2.imread(str(cache / "32" / "100_left.jpg"))
    assert img[0, 0].max() <= 10  # black outside the disc: 'none', not Graham's grey


def test_prepare_refuses_bombs_fifos_and_oversized_photos_and_uses_the_rest(tmp_path, prepare):
    from hostile_fixtures import png_claiming

    root = tmp_path / "data"
    root.mkdir()
    write_jpeg(root / "1_left.jpeg", draw_fundus(seed=1))
    (root / "1_right.png").write_bytes(png_claiming(20000, 20000))
    os.mkfifo(root / "2_left.jpeg")
    write_jpeg(root / "2_right.jpeg", draw_fundus(width=400, height=300, seed=2))  # 0.12 Mpx
    write_csv(root / "trainLabels.csv", ["image", "level"], [["1_left", 0], ["1_right", 1], ["2_left", 1],
                                                              ["2_right", 1]])
    cache = tmp_path / "cache"
    code, out, _ = prepare("--data", root, "--sizes", "32", "--out", cache, "--workers", 1, "--max-pixels", 100000)
    assert code == 0 and "prepared 1, skipped 0 (already cached), failed 3" in out.splitlines()[-1]
    f = _failures(cache)
    assert "image too large (20000x20000" in f["1_right"] and "image too large (400x300" in f["2_right"]
    assert "not found" in f["2_left"]  # a FIFO is not a file: never opened
    code, _, err = prepare("--data", root, "--sizes", "32", "--out", tmp_path / "c2", "--max-pixels", 10)
    assert code == 2 and "max_pixels must be an integer from 4096" in err


def test_parse_sizes():
    assert parse_sizes("448, 112,224,112") == (112, 224, 448)
    with pytest.raises(ValueError, match="between 16 and 4096"):
        parse_sizes("8")


@pytest.mark.parametrize("framing", [None, "eyepacs"])
def test_prepare_reads_the_synthetic_data_set_of_retina_scale_synth(tmp_path, framing):
    from retina_scale.data.sources import read_dataset
    from retina_scale.data.synthetic import generate_dataset

    from retina_scale.data.cache import prepare_cache

    generate_dataset(str(tmp_path / "synth"), 6, size=160, seed=1, framing=framing, progress=False)
    ds = read_dataset(tmp_path / "synth" / "train")  # trainLabels.csv beside train/, as on Kaggle
    assert ds.format == "eyepacs" and ds.failures == [] and len(ds.records) == 6
    same = read_dataset(tmp_path / "synth")  # or the folder holding both
    assert [(r.image_id, r.path, r.label) for r in same.records] == [(r.image_id, r.path, r.label) for r in ds.records]
    assert {r.eye for r in ds.records} == {"left", "right"} and len({r.patient for r in ds.records}) == 3
    result = prepare_cache(ds, tmp_path / "cache", sizes=(64,), workers=1, progress=False)
    assert result.prepared == 6
    m = read_manifest(tmp_path / "cache", 64)
    # The generator draws a fundus 160 px across; EyePACS framing widens the frame around it.
    assert (abs(m["disc_r"].astype(float) - 80) <= 2).all(), m["disc_r"].tolist()
    if framing is None:
        assert (abs(m["disc_cx"].astype(float) - 80) <= 2).all() and (abs(m["disc_cy"].astype(float) - 80) <= 2).all()


# ------------------------------------------------------------------------------- the what-to-redo planner

def _plan(records, state, sizes=(32, 64), sources=None, broken=()):
    """plan_cache with a fake file system: ``sources`` {path: (bytes, mtime)}, ``broken`` {(key, size)}."""
    from retina_scale.data.cache import plan_cache

    sources = {r.path: (100, 7) for r in records} if sources is None else sources

    def stat(path):
        if path not in sources:
            raise FileNotFoundError(2, "No such file or directory")
        return sources[path]

    return plan_cache(records, state, sizes, stat, lambda key, size, rec: (key, size) not in broken)


def _entry(path, files, source_bytes=100, mtime=7):
    return {"source": path, "source_bytes": source_bytes, "source_mtime_ns": mtime, "files": files,
            "disc": [1.0, 2.0, 3.0], "width": 10, "height": 10}


def test_planner_redoes_only_what_is_new_changed_missing_or_damaged():
    from retina_scale.data.sources import Record

    recs = [Record(f"{i}_left", f"/d/{i}_left.jpeg", 0, str(i), "left") for i in range(6)]
    both = {"32": [10, 1], "64": [20, 2]}
    state = {
        "0_left": _entry("/d/0_left.jpeg", dict(both)),  # intact: kept
        "1_left": _entry("/d/1_left.jpeg", {"32": [10, 1]}),  # a size is missing: only it is made
        "2_left": _entry("/d/2_left.jpeg", dict(both), mtime=6),  # the source changed: every size
        "3_left": _entry("/d/3_left.jpeg", dict(both)),  # its 64 px file is damaged: only that size
        "4_left": _entry("/elsewhere/4_left.jpeg", dict(both)),  # same id, another source file: every size
    }  # 5_left is new
    plan = _plan(recs, state, broken={("3_left", "64")})
    assert list(plan.keep) == ["0_left"] and plan.keep["0_left"] is state["0_left"]
    redo = {r.image: r for r in plan.redo}
    assert sorted(redo) == ["1_left", "2_left", "3_left", "4_left", "5_left"]
    assert redo["1_left"].sizes == (64,) and redo["1_left"].kept_files == {"32": [10, 1]}
    assert redo["3_left"].sizes == (64,) and redo["3_left"].kept_files == both
    for image in ("2_left", "4_left", "5_left"):
        assert redo[image].sizes == (32, 64) and redo[image].kept_files == {}, image
    assert (redo["5_left"].source_bytes, redo["5_left"].source_mtime_ns) == (100, 7)
    assert plan.vanished == [] and plan.keys == {r.image_id: r.image_id for r in recs}


def test_planner_reports_a_vanished_source_and_adds_new_sizes():
    from retina_scale.data.sources import Record

    recs = [Record("a b", "/d/a b.jpeg", 1, "a", None), Record("gone", "/d/gone.jpeg", 2, "g", None)]
    state = {"a b": _entry("/d/a b.jpeg", {"32": [10, 1]})}
    plan = _plan(recs, state, sizes=(32, 48), sources={"/d/a b.jpeg": (100, 7)})
    assert [(f.image, f.reason.split(" (")[0]) for f in plan.vanished] == [("gone", "file not found")]
    assert [(r.image, r.sizes) for r in plan.redo] == [("a b", (48,))]
    assert plan.keys["a b"] != "a b" and " " not in plan.keys["a b"]  # a file-name-safe key
    assert "gone" in plan.keys and not plan.keep
    # nothing cached yet: everything is made, nothing kept
    fresh = _plan(recs[:1], {}, sizes=(32, 48), sources={"/d/a b.jpeg": (100, 7)})
    assert [(r.image, r.sizes, r.kept_files) for r in fresh.redo] == [("a b", (32, 48), {})]


def test_the_cache_records_its_data_folder_as_an_absolute_path(eyepacs_dir, tmp_path, prepare, monkeypatch):
    """Given relative to the folder it runs in, the data folder is still found by a reader running elsewhere."""
    import json
    import os

    monkeypatch.chdir(eyepacs_dir.parent)
    code, _, _ = prepare("--data", eyepacs_dir.name, "--sizes", "32", "--out", tmp_path / "cache")
    assert code == 0
    root = json.loads((tmp_path / "cache" / "cache.json").read_text())["data"]["root"]
    assert os.path.isabs(root) and os.path.samefile(root, eyepacs_dir)
