import keras
import numpy as np
import pytest

from retina_scale.config import STAGE_NAMES
from retina_scale.models.convnet import build_model, get_stage
from retina_scale.models.layers import GridRMSPool2D, Maxout

# Weights of the exact design, counted by hand from Table I (see ../shared/PAPER.md, our bracket).
PAPER_WEIGHTS = {"tiny": 1.557e6, "small": 3.557e6, "median": 8.145e6, "large": 24.400e6}


def test_stage_lookup_by_name_size_and_index():
    assert [get_stage(n).input_size for n in STAGE_NAMES] == [112, 224, 448, 896, 1792]
    assert get_stage(448).name == "median"
    assert get_stage("896").name == "large"
    assert get_stage("stage6").input_size == 3584


@pytest.mark.parametrize("bad", ["huge", 300, 0, 56, "stage0", None, 2.5])
def test_unknown_stage_names_the_valid_choices(bad):
    with pytest.raises(ValueError, match="accepted: tiny, small, median, large"):
        get_stage(bad)


@pytest.mark.parametrize("width", [0, -0.5, float("nan"), "wide"])
def test_non_positive_width_is_refused(width):
    with pytest.raises(ValueError, match="width must be a positive number"):
        build_model("tiny", width=width)


@pytest.mark.parametrize("stage", ["tiny", "small", "median", "large"])
def test_weights_match_the_paper_design(stage):
    model = build_model(stage, kernel_initializer="zeros")
    assert abs(model.count_params() / PAPER_WEIGHTS[stage] - 1) < 0.02


def test_tiny_stage_is_exactly_table_one():
    model = build_model("tiny", kernel_initializer="zeros")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size[0], c.strides[0], c.padding) for c in convs] == [
        (32, 5, 2, "same"), (32, 3, 1, "same"),
        (64, 5, 2, "same"), (64, 3, 1, "same"), (64, 3, 1, "same"),
        (128, 3, 1, "same"), (128, 3, 1, "same"), (128, 3, 1, "same"),
    ]
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert [(p.pool_size, p.strides) for p in pools] == [((3, 3), (2, 2))] * 2
    lrelu = [layer for layer in model.layers if isinstance(layer, keras.layers.LeakyReLU)]
    assert len(lrelu) == len(convs)
    head = [(type(layer).__name__, layer.name) for layer in model.layers[-8:]]
    assert head == [
        ("GridRMSPool2D", "head_rmspool"), ("Flatten", "head_flatten"),
        ("Dense", "head_dense1"), ("Maxout", "head_maxout1"), ("Dropout", "head_dropout"),
        ("Dense", "head_dense2"), ("Maxout", "head_maxout2"), ("Dense", "head_grade"),
    ]
    assert model.get_layer("head_dense1").units == 1024 and model.get_layer("head_maxout1").units == 512


@pytest.mark.parametrize("stage,extra", [("small", [256] * 3), ("median", [256] * 3 + [512] * 2),
                                         ("large", [256] * 3 + [512] * 2 + [1024] * 2)])
def test_each_stage_adds_blocks_to_the_previous(stage, extra):
    model = build_model(stage, kernel_initializer="zeros")
    filters = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert filters == [32, 32, 64, 64, 64, 128, 128, 128] + extra


@pytest.mark.parametrize("stage", ["tiny", "small", "median"])
def test_last_feature_map_is_7x7_at_the_stage_size(stage):
    spec = get_stage(stage)
    model = build_model(spec, width=0.125, kernel_initializer="zeros")
    last_conv = [layer for layer in model.layers if isinstance(layer, keras.layers.LeakyReLU)][-1]
    probe = keras.Model(model.inputs[0], last_conv.output)
    assert probe(np.zeros((1, spec.input_size, spec.input_size, 3), "float32")).shape[1:3] == (7, 7)


def test_model_runs_on_any_input_size():
    model = build_model("tiny", width=0.125, seed=0)
    for shape in [(2, 112, 112, 3), (1, 224, 160, 3), (1, 64, 80, 3), (3, 500, 333, 3)]:
        out = np.asarray(model(np.random.default_rng(0).uniform(0, 255, shape).astype("float32")))
        assert out.shape == (shape[0], 1) and np.isfinite(out).all()
    assert model.inputs[0].shape == (None, None, None, 3)


@pytest.mark.parametrize("channels", [1, 4])
def test_model_refuses_non_rgb_images(channels):
    model = build_model("tiny", width=0.125, seed=0)
    with pytest.raises(ValueError, match="3 channels"):
        model(np.zeros((1, 112, 112, channels), "float32"))


def test_fifth_stage_builds_at_1792():
    spec = get_stage("xlarge")
    model = build_model(spec, width=0.0625, kernel_initializer="zeros")
    filters = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert spec.input_size == 1792 and filters[-2:] == [128, 128]  # 2048 * 1/16
    assert model.get_layer("block6_pool") is not None and model.get_layer("block7_conv2") is not None


def test_width_multiplier_scales_every_layer():
    model = build_model("small", width=0.25, kernel_initializer="zeros")
    filters = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert filters == [8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert model.get_layer("head_dense1").units == 256
    assert model.get_layer("head_maxout2").units == 128
    full = build_model("small", kernel_initializer="zeros").count_params()
    assert model.count_params() < full / 10


def test_orthogonal_initialisation_and_seed():
    a = build_model("tiny", width=0.25, seed=7)
    b = build_model("tiny", width=0.25, seed=7)
    c = build_model("tiny", width=0.25, seed=8)
    kernel = np.asarray(a.get_layer("head_dense2").kernel)  # (128, 256): orthonormal rows
    np.testing.assert_allclose(kernel @ kernel.T, np.eye(kernel.shape[0]), atol=1e-4)
    conv = np.asarray(a.get_layer("block3_conv2").kernel).reshape(-1, 32)  # columns orthogonal
    gram = conv.T @ conv
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-4)
    for layer in a.layers:
        for wa, wb in zip(layer.get_weights(), b.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(wa, wb)
    assert not np.allclose(a.get_layer("block1_conv1").kernel, c.get_layer("block1_conv1").kernel)


def test_layer_names_are_stable_across_stages():
    tiny = {layer.name for layer in build_model("tiny", 0.125, kernel_initializer="zeros").layers}
    small = {layer.name for layer in build_model("small", 0.125, kernel_initializer="zeros").layers}
    assert tiny < small
    assert small - tiny == {"block3_pool", "block4_conv1", "block4_conv1_lrelu", "block4_conv2",
                            "block4_conv2_lrelu", "block4_conv3", "block4_conv3_lrelu"}


def test_full_model_round_trips_through_keras_file_in_safe_mode(tmp_path):
    model = build_model("small", width=0.125, seed=3, l2=5e-4)
    path = tmp_path / "small.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("head_rmspool"), GridRMSPool2D)
    assert isinstance(loaded.get_layer("head_maxout1"), Maxout)
    x = np.random.default_rng(1).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    assert len(loaded.losses) == len(model.losses) > 0


def test_min_filters_floors_every_block_after_the_width_and_keeps_names():
    from retina_scale.models.convnet import build_model

    def filters(model):
        return {layer.name: layer.filters for layer in model.layers if layer.name.startswith("block")
                and layer.name.endswith(tuple(f"conv{i}" for i in range(1, 4)))}

    plain = build_model("small", width=0.25, kernel_initializer="zeros")
    floored = build_model("small", width=0.25, min_filters=16, kernel_initializer="zeros")
    assert filters(plain)["block1_conv1"] == 8 and filters(plain)["block2_conv1"] == 16
    assert filters(floored) == {name: max(n, 16) for name, n in filters(plain).items()}
    assert filters(floored)["block1_conv2"] == 16 and filters(floored)["block4_conv1"] == 64  # 256 x 0.25
    assert [layer.name for layer in floored.layers] == [layer.name for layer in plain.layers]
    assert floored.get_layer("head_dense1").units == plain.get_layer("head_dense1").units  # the head is not floored
    # Off by default: the same model, and the same config, as before the option existed.
    assert "min_filters" not in plain.get_config() and floored.get_config()["min_filters"] == 16
    assert filters(build_model("small", width=0.25, min_filters=0, kernel_initializer="zeros")) == filters(plain)
    with pytest.raises(ValueError, match="min_filters must be a whole number >= 0"):
        build_model("tiny", width=0.25, min_filters=-1)


def test_a_floored_model_round_trips_through_its_config():
    from retina_scale.models.convnet import RetinaConvNet, build_model

    model = build_model("tiny", width=0.25, min_filters=16, kernel_initializer="zeros")
    again = RetinaConvNet.from_config(model.get_config())
    assert again.get_layer("block1_conv1").filters == 16 and again.count_params() == model.count_params()


# ------------------------------------------------------------------ issue 14's options: pooling and aux head
def _weight_shapes(model):
    return {layer.name: [tuple(w.shape) for w in layer.weights] for layer in model.layers if layer.weights}


def test_max_pooling_changes_the_pooling_layer_and_nothing_else():
    from retina_scale.models.layers import GridMaxPool2D

    rms = build_model("small", width=0.125, seed=4)
    mx = build_model("small", width=0.125, seed=4, head_pooling="max")
    assert isinstance(mx.get_layer("head_maxpool"), GridMaxPool2D)
    names = [layer.name for layer in rms.layers]
    assert [layer.name for layer in mx.layers] == [n if n != "head_rmspool" else "head_maxpool" for n in names]
    # The same 2x2 grid: every weighted layer has the same shapes (and, same seed, the same initial weights).
    assert _weight_shapes(mx) == _weight_shapes(rms)
    for layer in rms.layers:
        for a, b in zip(layer.get_weights(), mx.get_layer(layer.name if layer.name != "head_rmspool"
                                                          else "head_maxpool").get_weights()):
            np.testing.assert_array_equal(a, b)
    assert mx.get_config()["head_pooling"] == "max" and "head_pooling" not in rms.get_config()


def test_attention_pooling_gives_the_head_one_vector_of_the_last_blocks_channels():
    from retina_scale.models.layers import AttentionPool2D

    rms = build_model("small", width=0.125, seed=4)
    att = build_model("small", width=0.125, seed=4, head_pooling="attention")
    channels = 32  # block 4 of small: 256 x 0.125
    assert isinstance(att.get_layer("head_attnpool"), AttentionPool2D)
    assert tuple(att.get_layer("head_attnpool").kernel.shape) == (channels, 1)
    assert tuple(att.get_layer("head_dense1").kernel.shape) == (channels, 128)
    assert tuple(rms.get_layer("head_dense1").kernel.shape) == (4 * channels, 128)
    same = {k: v for k, v in _weight_shapes(rms).items() if k != "head_dense1"}
    assert {k: v for k, v in _weight_shapes(att).items() if k not in ("head_dense1", "head_attnpool")} == same
    # It starts as mean pooling (zero scoring kernel), and runs on any input size as the grid poolings do.
    np.testing.assert_array_equal(np.asarray(att.get_layer("head_attnpool").kernel), 0.0)
    out = np.asarray(att(np.random.default_rng(0).uniform(0, 255, (2, 180, 250, 3)).astype("float32")))
    assert out.shape == (2, 1) and np.isfinite(out).all()


@pytest.mark.parametrize("aux, units", [("ordinal", 4), ("classification", 5)])
def test_aux_head_adds_one_output_and_changes_nothing_else(aux, units):
    from retina_scale.models.convnet import grade_output

    plain = build_model("tiny", width=0.125, seed=5)
    both = build_model("tiny", width=0.125, seed=5, aux=aux)
    x = np.random.default_rng(2).uniform(0, 255, (3, 112, 112, 3)).astype("float32")
    outputs = both(x)
    assert isinstance(outputs, list) and [tuple(o.shape) for o in outputs] == [(3, 1), (3, units)]
    head = both.get_layer("head_aux")
    assert head.units == units and head.input is both.get_layer("head_maxout2").output
    assert both.count_params() == plain.count_params() + 64 * units + units  # maxout2 at width 1/8: 64 units
    # The same seed gives the same network beside the new head: the same grade.
    np.testing.assert_array_equal(np.asarray(grade_output(outputs)), np.asarray(plain(x)))
    assert grade_output(plain(x)).shape == (3, 1)
    assert both.get_config()["aux"] == aux and "aux" not in plain.get_config()


def test_regression_model_is_the_grade_alone_with_the_same_weights():
    from retina_scale.models.convnet import RetinaConvNet, regression_model

    both = build_model("tiny", width=0.125, seed=6, aux="ordinal", head_pooling="attention")
    for layer in both.layers:  # away from the seed's initial weights, so a rebuilt net cannot pass by itself
        layer.set_weights([w + 0.01 for w in layer.get_weights()])
    grade = regression_model(both)
    assert isinstance(grade, RetinaConvNet) and grade.aux == "none" and grade.head_pooling == "attention"
    assert "head_aux" not in [layer.name for layer in grade.layers]
    assert grade.count_params() == both.count_params() - both.get_layer("head_aux").count_params()
    x = np.random.default_rng(3).uniform(0, 255, (2, 112, 112, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(grade(x)), np.asarray(both(x)[0]), rtol=1e-6, atol=1e-6)
    plain = build_model("tiny", width=0.125, seed=6)
    assert regression_model(plain) is plain


def test_aux_attention_model_round_trips_through_keras_file_in_safe_mode(tmp_path):
    model = build_model("tiny", width=0.125, seed=7, l2=5e-4, head_pooling="attention", aux="classification")
    model.get_layer("head_attnpool").kernel.assign(np.linspace(-1, 1, 16).reshape(16, 1).astype("float32"))
    path = tmp_path / "aux.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert (loaded.aux, loaded.head_pooling, loaded.input_size) == ("classification", "attention", 112)
    x = np.random.default_rng(4).uniform(0, 255, (2, 112, 112, 3)).astype("float32")
    for a, b in zip(loaded(x), model(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert len(loaded.losses) == len(model.losses) == 13  # 8 convolutions, 4 dense (head_aux too), the attention


@pytest.mark.parametrize("kwargs, message", [({"head_pooling": "avg"}, "head_pooling must be one of rms, max, attention"),
                                             ({"aux": "focal"}, "aux must be one of none, ordinal, classification")])
def test_unknown_head_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model("tiny", width=0.125, **kwargs)
