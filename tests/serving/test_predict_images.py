"""Tests of the predict_images signature: in-graph preprocessing against the cache's OpenCV code (parity),
per-image errors, bad input, and TensorFlow's own saved_model_cli on it."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from retina_scale.config import PreprocessConfig
from retina_scale.data.fundus import BadImage, preprocess_file
from retina_scale.data.synthetic import render_fundus
from retina_scale.models import build_model
from retina_scale.serving.export import export_saved_model, load_export
from retina_scale.serving.preprocess import preprocess_batch, preprocess_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fundus_fixtures import draw_fundus  # noqa: E402
from hostile_fixtures import cut_jpeg, png_claiming, with_exif_orientation  # noqa: E402

SIZE = 112
LADDER = [112, 224, 448, 896]  # the cache's sizes in a full stepwise run
# Measured on these photos (see README, "Serving with TensorFlow Serving"): largest mean / max abs diff seen
# was 0.32 / 3 grey levels without normalisation and 1.18 / 8 with Graham's; the bounds leave a small margin.
TOLERANCE = {"none": (0.5, 4), "graham": (1.5, 12)}


def _jpeg(bgr, quality=95):
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _png(bgr):
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def photos():
    """Photos of every kind the data tests use: (name, bytes, file name)."""
    out = []
    for seed in range(3):
        rgb, _ = render_fundus(seed, seed + 1, size=512)
        out.append((f"synthetic{seed}", _jpeg(rgb[..., ::-1]), "a.jpg"))
    rgb = skimage.data.retina()
    canvas = np.zeros((2592, 3888, 3), np.uint8)
    canvas[1050 : 1050 + rgb.shape[0], 2350 : 2350 + rgb.shape[1]] = rgb  # off-centre, EyePACS-size frame
    out.append(("retina_in_canvas", _jpeg(canvas[..., ::-1]), "a.jpg"))
    out.append(("dark", _jpeg(draw_fundus(width=500, height=400, cx=230, cy=210, r=170, brightness=0.12)), "a.jpg"))
    out.append(("cut_top_bottom", _jpeg(draw_fundus(width=400, height=300, r=170)), "a.jpg"))
    out.append(("png", _png(draw_fundus(width=400, height=300, seed=3)), "a.png"))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, photos):
    """A thin model exported with the full ladder's cache sizes, thresholds cut between its photo scores."""
    model = build_model("tiny", width=0.125, seed=0)
    cache = np.stack([
        preprocess_file(f, LADDER, PreprocessConfig(), data=b).images[SIZE] for _, b, f in photos
    ]).astype(np.float32)
    scores = np.sort(model.predict(cache, verbose=0).ravel())
    gaps = np.diff(scores)
    cuts = np.sort(np.argsort(gaps)[-4:])  # the four widest gaps: grades as far from a tie as the data allow
    thresholds = tuple(float(scores[i] + scores[i + 1]) / 2 for i in cuts)
    base = tmp_path_factory.mktemp("saved_models")
    # Operating points at the lowest and the highest cut: referred at high sensitivity = grade >= 1, at high
    # specificity = grade 4.
    points = {"points": {"high_sensitivity": {"met": True, "threshold": thresholds[0]},
                         "high_specificity": {"met": True, "threshold": thresholds[3]}}}
    path = export_saved_model(model, base, "retina", thresholds=thresholds, operating_points=points,
                              metadata={"preprocessing": {"normalize": "none", "sizes": LADDER}})
    return dict(model=model, path=path, cache=cache, thresholds=thresholds)


@pytest.mark.parametrize("normalize", ["none", "graham"])
def test_in_graph_preprocessing_matches_the_cache(photos, normalize):
    spec = preprocess_spec({"normalize": normalize, "sizes": LADDER}, SIZE)
    images, errors = tf.function(lambda x: preprocess_batch(x, spec))(tf.constant([b for _, b, _ in photos]))
    assert list(errors.numpy()) == [b""] * len(photos)
    for (name, data, fname), got in zip(photos, images.numpy()):
        want = preprocess_file(fname, LADDER, PreprocessConfig(normalize=normalize), data=data).images[SIZE]
        diff = np.abs(got - want.astype(np.float32))
        mean_tol, max_tol = TOLERANCE[normalize]
        assert diff.mean() <= mean_tol and diff.max() <= max_tol, (name, diff.mean(), diff.max())
        # Not vacuous: the images are fundus crops, not blank.
        assert want.std() > 3 and want.max() >= 25, name


def test_predict_images_grades_photos_as_the_cache_images_are_graded(exported, photos):
    serve, meta = load_export(exported["path"])
    predict, _ = load_export(exported["path"], signature="predict_images")
    from_cache = serve(images=tf.constant(exported["cache"]))
    from_photos = predict(images=tf.constant([b for _, b, _ in photos]))
    assert from_photos["valid"].numpy().all()
    np.testing.assert_array_equal(from_photos["grade"].numpy(), from_cache["grade"].numpy())
    np.testing.assert_array_equal(from_photos["referable"].numpy(), from_cache["referable"].numpy())
    np.testing.assert_allclose(from_photos["grade_continuous"].numpy(), from_cache["grade_continuous"].numpy(),
                               atol=0.02)
    assert len(set(from_cache["grade"].numpy().tolist())) >= 3  # the comparison covers several grades
    # The operating points' outputs: score >= each point's threshold (the lowest and the highest cut here).
    grade = from_photos["grade"].numpy()
    np.testing.assert_array_equal(from_photos["refer_high_sensitivity"].numpy(), grade >= 1)
    np.testing.assert_array_equal(from_photos["refer_high_specificity"].numpy(), grade >= 4)
    assert from_photos["refer_high_sensitivity"].numpy().any() and not from_photos["refer_high_sensitivity"].numpy().all()
    assert from_photos["refer_high_specificity"].dtype == tf.bool
    assert meta["signatures"]["predict_images"]["outputs"]["error"].startswith("string")
    assert "no per-grade scores" in meta["head"]


def test_unusable_photos_get_an_error_each_and_do_not_stop_the_batch(exported, photos):
    predict, _ = load_export(exported["path"], signature="predict_images")
    good = photos[0][1]
    gray = _png(cv2.cvtColor(draw_fundus(), cv2.COLOR_BGR2GRAY))
    batch = [good, b"this is not an image", b"", good[: len(good) // 2], gray,
             _jpeg(draw_fundus(width=60, height=60)), _jpeg(np.zeros((300, 300, 3), np.uint8)), good]
    out = predict(images=tf.constant(batch))
    valid = out["valid"].numpy().tolist()
    errors = [e.decode() for e in out["error"].numpy()]
    assert valid == [True, False, False, False, False, False, False, True]
    expected = ["", "not an image", "empty file", "truncated JPEG", "grayscale", "too small", "no fundus found", ""]
    for err, want in zip(errors, expected):
        assert (want in err) if want else err == "", errors
    grade = out["grade"].numpy()
    assert (grade[1:7] == -1).all() and np.isnan(out["grade_continuous"].numpy()[1:7]).all()
    assert not out["referable"].numpy()[1:7].any()
    assert not out["refer_high_sensitivity"].numpy()[1:7].any() and not out["refer_high_specificity"].numpy()[1:7].any()
    alone = predict(images=tf.constant([good]))
    assert grade[0] == grade[7] == alone["grade"].numpy()[0]
    np.testing.assert_allclose(out["grade_continuous"].numpy()[[0, 7]], alone["grade_continuous"].numpy()[0],
                               rtol=1e-5)


def test_a_jpeg_broken_past_its_header_fails_the_request_as_documented(exported, photos):
    """What the header checks cannot see fails the decoder, hence the whole request (HTTP 400 from TF Serving)."""
    predict, _ = load_export(exported["path"], signature="predict_images")
    broken = photos[0][1].replace(b"\xff\xdb", b"\xff\xfe")  # no quantisation table left
    with pytest.raises(tf.errors.InvalidArgumentError, match="Invalid JPEG data"):
        predict(images=tf.constant([photos[0][1], broken]))


def test_predict_images_refuses_wrong_dtypes_and_ranks(exported):
    predict, _ = load_export(exported["path"], signature="predict_images")
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        predict(images=tf.zeros([2, 112, 112, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"string tensor of shape \(batch,\)"):
        predict(images=tf.constant([[b"a", b"b"]]))
    with pytest.raises(ValueError, match="signature must be"):
        load_export(exported["path"], signature="nope")


def test_a_bad_preprocessing_record_is_refused_before_writing(tmp_path):
    model = build_model("tiny", width=0.125, seed=0)
    with pytest.raises(ValueError, match="normalize must be 'none' or 'graham'"):
        export_saved_model(model, tmp_path, "m", metadata={"preprocessing": {"normalize": "clahe"}})
    assert not any((tmp_path / "m").glob("[0-9]*"))


# ------------------------------------------------------------------------------ hostile input (issue 16)


def _in_graph(spec, batch):
    images, errors = tf.function(lambda x: preprocess_batch(x, spec))(tf.constant(batch))
    return images.numpy(), [e.decode() for e in errors.numpy()]


def test_too_many_pixels_is_an_error_row_read_from_the_header_and_the_rest_is_graded(exported, photos):
    """A 20000x20000 PNG made predict use 7 GB and abort the batch: the header's size is now checked before
    decoding (these PNGs claim the size in their header; their data would not even decode)."""
    predict, _ = load_export(exported["path"], signature="predict_images")
    good = photos[0][1]
    batch = [good, png_claiming(20000, 20000), png_claiming(0xFFFFFFFF, 0xFFFFFFFF), png_claiming(8000, 5001), good]
    out = predict(images=tf.constant(batch))
    errors = [e.decode() for e in out["error"].numpy()]
    assert out["valid"].numpy().tolist() == [True, False, False, False, True], errors
    assert errors[1].startswith("image too large (20000x20000 = 400.0 Mpx; the limit is 40 Mpx")
    assert errors[2].startswith("image too large (4294967295x4294967295")  # no 32-bit wrap-around
    assert errors[3].startswith("image too large (8000x5001 = 40.0 Mpx")
    assert out["grade"].numpy()[0] == out["grade"].numpy()[4] >= 0


def test_the_pixel_limit_comes_from_the_exports_record():
    photo = _jpeg(draw_fundus(width=400, height=300))  # 0.12 Mpx
    low = preprocess_spec({"normalize": "none", "max_pixels": 100_000}, SIZE)
    high = preprocess_spec({"normalize": "none", "max_pixels": 120_000}, SIZE)
    assert _in_graph(low, [photo])[1][0].startswith("image too large (400x300 = 0.1 Mpx; the limit is 0.1 Mpx")
    assert _in_graph(high, [photo])[1] == [""]
    with pytest.raises(ValueError, match="max_pixels must be an integer"):
        preprocess_spec({"normalize": "none", "max_pixels": "many"}, SIZE)


def test_a_crafted_disc_whose_square_dwarfs_the_limit_is_refused_as_in_the_cache():
    """A 20000x1000 PNG (20 Mpx) holding the middle of a 9800-px disc made the graph use 8 GB for its crop
    square; the square may hold at most twice max_pixels (the same photo, scaled down, against a lower limit)."""
    img = np.zeros((100, 2000, 3), np.uint8)
    cv2.circle(img, (1000, 50), 980, (60, 100, 200), -1)
    data = _png(img)
    low = preprocess_spec({"normalize": "none", "max_pixels": 1_000_000}, SIZE)
    high = preprocess_spec({"normalize": "none", "max_pixels": 2_000_000}, SIZE)
    assert _in_graph(low, [data])[1] == [
        "no fundus found (its bounding square, 1961x1961 px, would hold more than twice max_pixels)"]
    assert _in_graph(high, [data])[1] == [""]
    with pytest.raises(BadImage, match="its bounding square, 1961x1961 px"):
        preprocess_file("a.png", (SIZE,), PreprocessConfig(max_pixels=1_000_000), data=data)


def test_a_jpeg_cut_short_with_an_end_marker_is_an_error_row_as_in_the_cache(photos):
    """Defect 4: the first half of a JPEG plus FF D9 was graded (libjpeg fills grey and only warns)."""
    spec = preprocess_spec({"normalize": "none", "sizes": LADDER}, SIZE)
    whole = [b for name, b, _ in photos if name in ("synthetic0", "retina_in_canvas", "dark")]
    prog = _jpeg_progressive(draw_fundus(width=640, height=480, seed=8))
    cut = [cut_jpeg(b, f) for b, f in zip(whole + [prog], (0.5, 0.5, 0.8, 0.5))]
    images, errors = _in_graph(spec, whole + [prog] + cut)
    assert errors[:4] == ["", "", "", ""]
    for data, err in zip(cut, errors[4:]):
        assert err.startswith("truncated JPEG (its image data stops"), err
        with pytest.raises(BadImage, match="truncated JPEG"):  # the cache refuses the same photos
            preprocess_file("a.jpeg", LADDER, PreprocessConfig(), data=data)


@pytest.mark.parametrize("orientation", [2, 6])
def test_exif_orientation_is_ignored_on_both_paths_so_they_agree(orientation):
    """Defect 5: the cache rotated or mirrored a photo by its EXIF orientation, the graph did not (13-15 grey
    levels apart). One rule on both paths: pixels as stored."""
    bgr = np.zeros((400, 500, 3), np.uint8)
    bgr[20:380, 40:400] = cv2.resize(skimage.data.retina(), (360, 360), interpolation=cv2.INTER_AREA)[..., ::-1]
    tagged = with_exif_orientation(_jpeg(bgr), orientation)
    spec = preprocess_spec({"normalize": "none", "sizes": LADDER}, SIZE)
    (got,), errors = _in_graph(spec, [tagged])
    assert errors == [""]
    want = preprocess_file("a.jpeg", LADDER, PreprocessConfig(), data=tagged).images[SIZE]
    diff = np.abs(got - want.astype(np.float32))
    assert diff.mean() <= TOLERANCE["none"][0] and diff.max() <= TOLERANCE["none"][1], (diff.mean(), diff.max())
    # Not vacuous: the photo turned or mirrored as EXIF says is far from it.
    turned = cv2.flip(bgr, 1) if orientation == 2 else cv2.rotate(bgr, cv2.ROTATE_90_CLOCKWISE)
    other = preprocess_file("b.jpeg", LADDER, PreprocessConfig(), data=_jpeg(turned)).images[SIZE]
    assert np.abs(got - other.astype(np.float32)).mean() > 10


def test_tiff_and_bmp_are_named_not_called_not_an_image():
    spec = preprocess_spec("none", SIZE)
    tiff = cv2.imencode(".tif", draw_fundus())[1].tobytes()
    bmp = cv2.imencode(".bmp", draw_fundus())[1].tobytes()
    _, errors = _in_graph(spec, [tiff, bmp, b"GIF89a not ours"])
    assert errors[0].startswith("TIFF image; predict_images decodes JPEG and PNG only")
    assert errors[1].startswith("BMP image; predict_images decodes JPEG and PNG only")
    assert errors[2].startswith("not an image (unknown file signature")


def _jpeg_progressive(bgr):
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    return buf.tobytes()


@pytest.mark.slow  # saved_model_cli processes load TensorFlow: ~11 s
def test_saved_model_cli_shows_and_runs_predict_images(exported, photos, tmp_path):
    path = str(exported["path"])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    # numpy fixed-width bytes: JPEG ends in FF D9, so no trailing NUL is lost.
    np.save(tmp_path / "photos.npy", np.array([photos[0][1], b"junk"]))
    # Both tools at once (each starts TensorFlow, seconds on a loaded machine).
    show = subprocess.Popen(cli + ["show", "--dir", path, "--tag_set", "serve", "--signature_def", "predict_images"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run = subprocess.Popen(cli + ["run", "--dir", path, "--tag_set", "serve", "--signature_def", "predict_images",
                                  "--inputs", f"images={tmp_path / 'photos.npy'}", "--outdir", str(tmp_path / "out")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    shown, shown_err = show.communicate(timeout=300)
    _, ran_err = run.communicate(timeout=300)
    assert show.returncode == 0, shown_err[-2000:]
    assert run.returncode == 0, ran_err[-2000:]
    assert "inputs['images']" in shown and "DT_STRING" in shown and "(-1)" in shown
    for name in ("grade_continuous", "grade", "referable", "refer_high_sensitivity", "refer_high_specificity",
                 "valid", "error"):
        assert f"outputs['{name}']" in shown
    expected = exported["model"].predict(exported["cache"][:1], verbose=0).ravel()[0]
    got = np.load(tmp_path / "out" / "grade_continuous.npy")
    assert abs(got[0] - expected) < 0.02 and np.isnan(got[1])
    assert np.load(tmp_path / "out" / "valid.npy").tolist() == [True, False]
    for name, threshold in (("refer_high_sensitivity", exported["thresholds"][0]),
                            ("refer_high_specificity", exported["thresholds"][3])):
        assert np.load(tmp_path / "out" / f"{name}.npy").tolist() == [bool(got[0] >= threshold), False]
