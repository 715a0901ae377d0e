"""Tests of retina_scale.evidence.explain: Grad-CAM on hand-built models whose evidence is known, the lesion
coordinate mapping against hand-computed values and against the cache's own preprocessing, the hottest region,
the lesion hit rates on constructed heat maps, and an export's network rebuilt from its weights read as data."""

import json

import cv2
import numpy as np
import pytest

from retina_scale.evidence.explain import (fundus_mask, grad_cam, hottest, lesion_hit_rates, load_export_model,
                                           photo_reduction, photo_to_cache, target_layer)

SIZE = 32
RED_AT, GREEN_AT = (9, 10), (22, 22)  # (x, y) centres of a 3x3 red and a 3x3 green patch


def _two_colour_model(red_weight, green_weight):
    """Channel 0 sees red, channel 1 green (1x1 convolutions, no mixing); 4x4 max-pool to an 8x8 map; the grade
    is a weighted mean of the two channels: the evidence is where the weighted colour is."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(2, 1, use_bias=False, name="block1_conv1")(inputs)
    x = keras.layers.LeakyReLU(negative_slope=0.01, name="block1_conv1_lrelu")(x)
    x = keras.layers.MaxPooling2D(4, name="block1_pool")(x)
    x = keras.layers.Conv2D(2, 1, use_bias=False, name="block2_conv1")(x)
    x = keras.layers.LeakyReLU(negative_slope=0.01, name="block2_conv1_lrelu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, name="head_grade")(x)
    model = keras.Model(inputs, out)
    pick = np.zeros((1, 1, 3, 2), np.float32)
    pick[0, 0, 0, 0] = pick[0, 0, 1, 1] = 1.0 / 255
    model.get_layer("block1_conv1").set_weights([pick])
    model.get_layer("block2_conv1").set_weights([np.eye(2, dtype=np.float32).reshape(1, 1, 2, 2)])
    model.get_layer("head_grade").set_weights([np.array([[red_weight], [green_weight]], np.float32),
                                               np.zeros(1, np.float32)])
    return model


def _two_patches():
    image = np.zeros((1, SIZE, SIZE, 3), np.float32)
    (rx, ry), (gx, gy) = RED_AT, GREEN_AT
    image[0, ry - 1:ry + 2, rx - 1:rx + 2, 0] = 255.0
    image[0, gy - 1:gy + 2, gx - 1:gx + 2, 1] = 255.0
    return image


@pytest.mark.parametrize("weights, evidence, other", [((4.0, 0.0), RED_AT, GREEN_AT), ((0.0, 4.0), GREEN_AT, RED_AT)])
def test_grad_cam_hot_where_the_weighted_evidence_is(weights, evidence, other, _fresh_keras_session):
    model = _two_colour_model(*weights)
    images = _two_patches()
    assert target_layer(model) == "block2_conv1_lrelu"
    heat, scores, peak = grad_cam(model, images)
    assert heat.shape == (1, SIZE, SIZE) and heat.max() == pytest.approx(1.0) and heat.min() >= 0.0
    assert scores == pytest.approx(np.asarray(model(images)).reshape(-1), abs=1e-6) and peak[0] > 0
    hot = hottest(heat[0])
    # Both patches light up the feature maps; only the one the grade depends on is hot.
    assert hot[evidence[1], evidence[0]] and not hot[other[1], other[0]]
    assert heat[0, other[1], other[0]] == pytest.approx(0.0, abs=1e-6)


def test_grad_cam_is_zero_when_nothing_raises_the_grade(_fresh_keras_session):
    model = _two_colour_model(-4.0, 0.0)  # red lowers the grade: no positive evidence anywhere
    heat, _, peak = grad_cam(model, _two_patches())
    assert peak[0] == 0.0 and not heat.any()


def test_default_layer_is_the_last_convolution_of_the_stage(_fresh_keras_session):
    from retina_scale.models import build_model

    assert target_layer(build_model("small", width=0.125, kernel_initializer="zeros")) == "block4_conv3_lrelu"
    assert target_layer(build_model("median", width=0.125, kernel_initializer="zeros")) == "block5_conv2_lrelu"


def test_photo_to_cache_hand_computed():
    # Disc (500, 400) radius 300: the square is x 200..799, y 100..699 (side 600), shrunk by 120 / 600 = 0.2.
    # The photo pixel (500, 400) spans 500..501 in edge coordinates: (500.5 - 200) * 0.2 = 60.1 -> centre 59.6.
    xs, ys = photo_to_cache([500.0, 200.0, 799.0], [400.0, 100.0, 699.0], (500.0, 400.0, 300.0), 120)
    np.testing.assert_allclose(xs, [59.6, -0.4, 119.4], atol=1e-9)
    np.testing.assert_allclose(ys, [59.6, -0.4, 119.4], atol=1e-9)
    # Decoded at 1/2: the disc is (250, 200) radius 150 there, the square x 100..399 (side 300), scale 0.4;
    # the photo pixel 500 is decoded pixel (500.5 / 2 = 250.25 in edges) -> (250.25 - 100) * 0.4 - 0.5 = 59.6.
    xs, _ = photo_to_cache(500.0, 400.0, (500.0, 400.0, 300.0), 120, reduction=2)
    assert float(xs) == pytest.approx(59.6, abs=1e-9)
    # An odd disc: radius 300.4 -> side 601 at full resolution, x0 = round(501 - 300.5) = 200 (half to even).
    xs, _ = photo_to_cache(500.0, 400.0, (501.0, 400.0, 300.4), 120)
    assert float(xs) == pytest.approx(300.5 * 120 / 601 - 0.5, abs=1e-9)


def _photo_with_dot(width, height, disc, dot, sigma):
    """A grey fundus disc on black with one dark Gaussian dot (RGB uint8)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    inside = (xx - disc[0]) ** 2 + (yy - disc[1]) ** 2 <= disc[2] ** 2
    dip = 120.0 * np.exp(-((xx - dot[0]) ** 2 + (yy - dot[1]) ** 2) / (2 * sigma ** 2))
    grey = np.where(inside, 180.0 - dip, 0.0)
    return np.repeat(np.round(grey)[..., None], 3, axis=2).astype(np.uint8)


def _dark_centroid(image, x, y, half=5, background=180.0):
    px, py = int(round(x)), int(round(y))
    window = image[py - half:py + half + 1, px - half:px + half + 1, 1].astype(np.float64)
    weight = np.clip(background - window, 0, None)
    yy, xx = np.mgrid[py - half:py + half + 1, px - half:px + half + 1]
    return float((weight * xx).sum() / weight.sum()), float((weight * yy).sum() / weight.sum())


def test_photo_to_cache_follows_the_caches_crop_and_resize(tmp_path):
    """A dark dot drawn at a known place in a 2000x1600 photo lands where photo_to_cache says, in the images
    the cache's own preprocessing makes (decoded at 1/4, disc found, cropped, resized to 224 then 112)."""
    from retina_scale.data.fundus import preprocess_file

    dot = (1207.3, 655.8)
    photo = _photo_with_dot(2000, 1600, (1010.0, 790.0, 700.0), dot, sigma=8.0)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), photo[..., ::-1])
    out = preprocess_file(path, (112, 224))
    assert out.reduction == 4 == photo_reduction(2000, 1600, out.disc.r, 224)
    for size in (112, 224):
        x, y = photo_to_cache(dot[0], dot[1], out.disc, size, out.reduction)
        cx, cy = _dark_centroid(out.images[size], float(x), float(y))
        # Within 0.03 px (measured: under 0.01); ignoring the 1/4 decode (reduction 1) puts it 0.06-0.19 px off.
        assert abs(cx - float(x)) < 0.03 and abs(cy - float(y)) < 0.03, (size, (cx, cy), (float(x), float(y)))


def test_hottest_is_five_percent_of_the_fundus_disc_only():
    heat = np.zeros((64, 64))
    heat[:6, :6] = 5.0  # a hot corner outside the disc does not count
    heat[30:34, 30:34] = 1.0
    disc = fundus_mask(64)
    hot = hottest(heat)
    assert hot.sum() == round(0.05 * disc.sum()) and not (hot & ~disc).any()
    assert hot[30:34, 30:34].all()  # the hottest pixels inside the disc come first


def _lesions_at(points, kind="microaneurysm"):
    return [(kind, float(x), float(y)) for x, y in points]


def test_hit_rate_is_one_on_a_map_hot_at_the_lesions_and_zero_elsewhere():
    lesions = {"1_left": _lesions_at([(20, 22), (40, 30), (33, 45)]),
               "2_left": _lesions_at([(25, 25)]) + _lesions_at([(44, 20)], "dot_blot_haemorrhage"),
               "3_right": _lesions_at([(30, 40)], "hard_exudate")}
    grades = {"1_left": 1, "2_left": 2, "3_right": 2}
    on = {}
    for image, points in lesions.items():
        heat = np.zeros((64, 64))
        for _, x, y in points:
            heat[int(y), int(x)] = 1.0
        on[image] = heat
    rates = lesion_hit_rates(on, lesions, grades)
    # The microaneurysms of the grade-2 photo are not counted: only grade-1 photos count for them.
    assert rates["microaneurysm"]["value"] == 1.0 and rates["microaneurysm"]["n_lesions"] == 3
    assert rates["microaneurysm"]["n_photos"] == 1 and rates["microaneurysm"]["chance"] == 0.05
    assert rates["haemorrhage"]["value"] == 1.0 and rates["haemorrhage"]["n_lesions"] == 1
    assert rates["exudate"]["value"] == 1.0 and rates["exudate"]["n_photos"] == 1

    elsewhere = {}
    for image in lesions:
        heat = np.zeros((64, 64))
        heat[2:16, 25:39] = 1.0  # 196 pixels at the top of the disc, more than its hottest 5 % (161 pixels)
        elsewhere[image] = heat
    rates = lesion_hit_rates(elsewhere, lesions, grades)
    assert {group: r["value"] for group, r in rates.items()} == {"microaneurysm": 0.0, "haemorrhage": 0.0,
                                                                 "exudate": 0.0}


def test_a_flat_map_scores_chance_and_the_patient_bootstrap_gives_an_interval():
    rng = np.random.default_rng(0)
    heat_maps, lesions, grades, patients = {}, {}, {}, {}
    for i in range(60):
        image = f"{i // 2}_{'left' if i % 2 else 'right'}"
        heat_maps[image] = np.zeros((48, 48))  # no evidence anywhere: the hot region is drawn at random
        r, t = 20 * np.sqrt(rng.uniform(size=10)), rng.uniform(0, 2 * np.pi, size=10)
        lesions[image] = _lesions_at(zip(23.5 + r * np.cos(t), 23.5 + r * np.sin(t)))
        grades[image], patients[image] = 1, str(i // 2)
    rates = lesion_hit_rates(heat_maps, lesions, grades, patients, n_boot=200, seed=1)["microaneurysm"]
    assert rates["n_lesions"] == 600 and rates["n_photos"] == 60
    assert 0.02 < rates["value"] < 0.09  # chance is 0.05; 600 lesions: standard error about 0.009
    assert rates["ci_low"] < rates["value"] < rates["ci_high"] and rates["n_valid"] == 200


@pytest.fixture(scope="module")
def thin_export(tmp_path_factory):
    from retina_scale.models import build_model
    from retina_scale.serving.export import export_saved_model

    model = build_model("tiny", width=0.125, seed=0, min_filters=8)
    base = tmp_path_factory.mktemp("exports")
    path = export_saved_model(model, base, "retina", thresholds=(0.4, 1.2, 2.6, 3.1),
                              metadata={"preprocessing": {"normalize": "graham", "mask": True, "sizes": [112]}})
    images = np.random.default_rng(0).uniform(0, 255, (2, 112, 112, 3)).astype(np.float32)
    return path, images, np.asarray(model(images, training=False)).reshape(-1)


@pytest.mark.slow
def test_an_export_is_rebuilt_from_its_weights_without_running_it(thin_export, monkeypatch):
    import tensorflow as tf

    path, images, expected = thin_export

    def refuse(*args, **kwargs):
        raise AssertionError("the SavedModel was loaded")

    monkeypatch.setattr(tf.saved_model, "load", refuse)
    target = load_export_model(path)
    assert target.input_size == 112 and target.thresholds == (0.4, 1.2, 2.6, 3.1) and not target.notes
    assert target.preprocessing == {"normalize": "graham", "mask": True, "sizes": [112]}
    np.testing.assert_allclose(np.asarray(target.model(images, training=False)).reshape(-1), expected, atol=1e-5)
    # An export written before metadata.json recorded model_config: rebuilt from stage, width and the filters.
    meta = json.loads((path / "metadata.json").read_text())
    del meta["model_config"]
    (path / "metadata.json").write_text(json.dumps(meta))
    old = load_export_model(path)
    assert old.notes and "model_config" in old.notes[0]
    np.testing.assert_allclose(np.asarray(old.model(images, training=False)).reshape(-1), expected, atol=1e-5)


@pytest.mark.slow
def test_an_export_that_is_not_ours_is_refused(thin_export, tmp_path):
    import shutil

    from retina_scale.utils.errors import UserError

    path, _, _ = thin_export
    copy = tmp_path / "1"
    shutil.copytree(path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["format"] = "someone.else"
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not a retina_scale SavedModel"):
        load_export_model(copy)


@pytest.mark.slow  # an export and a .keras file: ~8 s
def test_a_model_with_issue_14s_head_is_explained_by_its_grade(tmp_path, _fresh_keras_session):
    from retina_scale.evidence.explain import load_stage
    from retina_scale.models import build_model
    from retina_scale.serving.export import export_saved_model

    model = build_model("tiny", width=0.125, seed=3, head_pooling="attention", aux="classification")
    model.get_layer("head_attnpool").kernel.assign(np.linspace(-1, 1, 16).reshape(16, 1).astype(np.float32))
    images = np.random.default_rng(1).uniform(0, 255, (2, 112, 112, 3)).astype(np.float32)
    grade = np.asarray(model(images)[0]).reshape(-1)
    model.save(tmp_path / "best.keras")
    # A stage's best.keras keeps its aux head; explain reads the network without it: Grad-CAM of the grade.
    stage = load_stage(tmp_path / "best.keras")
    assert stage.model.aux == "none" and stage.model.head_pooling == "attention"
    heat, scores, _ = grad_cam(stage.model, images)
    np.testing.assert_allclose(scores, grade, rtol=1e-5, atol=1e-6)
    assert heat.shape == (2, 112, 112)
    # An export of it is rebuilt from its model_config (the attention pooling, no aux head) and its weights.
    target = load_export_model(export_saved_model(model, tmp_path / "exports", "aux"))
    np.testing.assert_allclose(np.asarray(target.model(images, training=False)).reshape(-1), grade, atol=1e-5)


@pytest.mark.parametrize("peak, flat", [(0.0, True), (0.7, False)])
def test_an_overlay_draws_no_hottest_region_for_a_flat_map(tmp_path, monkeypatch, peak, flat):
    import retina_scale.evidence.explain as explain
    from retina_scale.run_layout import ExplainLayout

    drawn = {}
    monkeypatch.setattr(explain, "draw_overlay", lambda path, image, heat, title, hot=None, lesions=(): drawn.update(
        title=title, hot=hot))
    target = explain.Explainable(model=None, input_size=32, thresholds=(0.5, 1.5, 2.5, 3.5), preprocessing={},
                                 description="test")
    heat = np.zeros((32, 32)) if flat else np.random.default_rng(0).random((32, 32))
    photo = explain.Photo("1_left", "1_left", load=None)
    row, _ = explain._photo_result(target, photo, np.zeros((32, 32, 3)), None, "", ExplainLayout(tmp_path), None,
                                   0.05, 0, True, (heat, 0.3, peak))
    assert row["grade"] == 0 and row["overlay"] == "overlays/1_left.png"
    assert ("flat Grad-CAM" in drawn["title"]) is flat
    assert (drawn["hot"] is None) is flat  # a flat map's hottest 5 % would be a random tie-break
