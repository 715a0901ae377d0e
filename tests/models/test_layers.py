import keras
import numpy as np
import pytest

from retina_scale.models.layers import GridRMSPool2D, Maxout, RGBRescale, RMSPool2D


def rms_pool_reference(x, k, s):
    """Plain NumPy loops: sqrt(mean of squares) over valid windows."""
    b, h, w, c = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    out = np.zeros((b, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            window = x[:, i * s : i * s + k, j * s : j * s + k, :]
            out[:, i, j, :] = np.sqrt((window.astype(np.float64) ** 2).mean(axis=(1, 2)))
    return out


@pytest.mark.parametrize("shape,k,s", [((2, 7, 7, 3), 3, 3), ((1, 10, 8, 2), 3, 2), ((3, 5, 5, 1), 2, 1)])
def test_rmspool_matches_numpy_reference(shape, k, s):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    got = np.asarray(RMSPool2D(k, s)(x))
    np.testing.assert_allclose(got, rms_pool_reference(x, k, s), rtol=1e-5, atol=1e-5)


def test_grid_rmspool_equals_paper_pooling_on_7x7_and_adapts_elsewhere():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 7, 5)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(GridRMSPool2D(2)(x)), np.asarray(RMSPool2D(3, 3)(x)), rtol=1e-6, atol=1e-6
    )
    # 14x10 map: windows of 7x5, no remainder.
    y = rng.normal(size=(1, 14, 10, 2)).astype("float32")
    got = np.asarray(GridRMSPool2D(2)(y))
    assert got.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(got[0, 1, 0], np.sqrt((y[0, 7:14, 0:5] ** 2).mean(axis=(0, 1))), rtol=1e-5)


def test_maxout_matches_numpy_reference():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 12)).astype("float32")
    got = np.asarray(Maxout(6)(x))
    np.testing.assert_array_equal(got, x.reshape(4, 6, 2).max(axis=-1))
    got3 = np.asarray(Maxout(4)(x))
    np.testing.assert_array_equal(got3, x.reshape(4, 4, 3).max(axis=-1))


def test_maxout_refuses_indivisible_input():
    with pytest.raises(ValueError, match="multiple of 5"):
        Maxout(5)(np.zeros((1, 12), "float32"))


@pytest.mark.parametrize("channels", [1, 4])
def test_rescale_refuses_non_rgb(channels):
    with pytest.raises(ValueError, match=f"3 channels; got {channels} channel"):
        RGBRescale()(np.zeros((1, 8, 8, channels), "float32"))


def test_rescale_maps_0_255_to_minus1_1():
    got = np.asarray(RGBRescale()(np.array([0.0, 127.5, 255.0], "float32").reshape(1, 1, 3, 1).repeat(3, -1)))
    np.testing.assert_allclose(got[0, 0, :, 0], [-1.0, 0.0, 1.0])


def test_layers_round_trip_through_keras_file_in_safe_mode(tmp_path):
    inputs = keras.Input((None, None, 3))
    x = RGBRescale(name="rescale")(inputs)
    x = RMSPool2D(2, 1, name="rms")(x)
    x = GridRMSPool2D(2, name="grid")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, name="dense")(x)
    x = Maxout(3, name="maxout")(x)
    model = keras.Model(inputs, x)
    path = tmp_path / "layers.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert [type(layer).__name__ for layer in loaded.layers] == [type(layer).__name__ for layer in model.layers]
    assert loaded.get_layer("rms").strides == (1, 1) and loaded.get_layer("maxout").units == 3
    x = np.random.default_rng(3).uniform(0, 255, size=(2, 9, 11, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6)


# ------------------------------------------------------------------ the head's other poolings (issue 14)
def test_grid_maxpool_keeps_one_hot_pixel_where_rms_divides_it_by_three():
    from retina_scale.models.layers import GridMaxPool2D

    x = np.zeros((1, 7, 7, 2), "float32")
    x[0, 1, 1, 0] = 6.0  # one strong activation, in the top-left 3x3 window
    got_max = np.asarray(GridMaxPool2D(2)(x))
    got_rms = np.asarray(GridRMSPool2D(2)(x))
    expected = np.zeros((1, 2, 2, 2))
    expected[0, 0, 0, 0] = 6.0
    np.testing.assert_array_equal(got_max, expected)
    # RMS over the 9 values of the window: sqrt(36 / 9) = 2, a third of the activation.
    assert got_max[0, 0, 0, 0] / got_rms[0, 0, 0, 0] == pytest.approx(3.0, rel=1e-6)


def test_grid_maxpool_has_the_rms_pooling_windows():
    from retina_scale.models.layers import GridMaxPool2D

    rng = np.random.default_rng(4)
    y = rng.normal(size=(2, 14, 11, 3)).astype("float32")  # windows 7x5; the last column is dropped
    got = np.asarray(GridMaxPool2D(2)(y))
    assert got.shape == (2, 2, 2, 3)
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(got[:, i, j], y[:, 7 * i:7 * i + 7, 5 * j:5 * j + 5].max(axis=(1, 2)))
    with pytest.raises(ValueError, match=r"GridMaxPool2D\(grid=2\) needs a feature map of at least 2x2"):
        GridMaxPool2D(2).compute_output_shape((None, 1, 5, 3))


def _attention_reference(x, kernel):
    """NumPy: softmax over the positions of x @ kernel, then the weighted sum of the feature vectors."""
    b, h, w, c = x.shape
    scores = (x.astype(np.float64) @ kernel.astype(np.float64)).reshape(b, h * w)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return (x.reshape(b, h * w, c) * weights[..., None]).sum(axis=1), weights.reshape(b, h, w)


def test_attention_pool_matches_numpy_and_its_weights_sum_to_one():
    from retina_scale.models.layers import AttentionPool2D

    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 7, 7, 4)).astype("float32")
    pool = AttentionPool2D()
    pool.build(x.shape)
    kernel = rng.normal(size=(4, 1)).astype("float32")
    pool.kernel.assign(kernel)
    expected, expected_weights = _attention_reference(x, kernel)
    weights = np.asarray(pool.attention(x))
    assert weights.shape == (3, 7, 7)
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(pool(x)), expected, rtol=1e-5, atol=1e-6)


def test_attention_pool_of_a_uniform_score_map_is_mean_pooling():
    from retina_scale.models.layers import AttentionPool2D

    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 5, 6, 3)).astype("float32")
    x[..., 0] = 1.5  # the scored channel is the same at every position: every score is equal
    pool = AttentionPool2D()
    pool.build(x.shape)
    pool.kernel.assign(np.array([[4.0], [0.0], [0.0]], "float32"))
    np.testing.assert_allclose(np.asarray(pool(x)), x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    # The default zero kernel is a uniform score map too.
    np.testing.assert_allclose(np.asarray(AttentionPool2D()(x)), x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_attention_pool_can_pick_out_one_hot_position():
    from retina_scale.models.layers import AttentionPool2D

    x = np.zeros((1, 7, 7, 2), "float32")
    x[0, 5, 2] = [3.0, 2.0]  # one small lesion: a strong activation at one of the 49 positions
    pool = AttentionPool2D()
    pool.build(x.shape)
    pool.kernel.assign(np.array([[3.0], [0.0]], "float32"))
    weights = np.asarray(pool.attention(x))
    assert np.unravel_index(weights[0].argmax(), (7, 7)) == (5, 2) and weights[0, 5, 2] > 0.9
    # Mean (and RMS over the whole map) would give 3/49 of it; the attention keeps over 90 %.
    assert np.asarray(pool(x))[0, 0] > 0.9 * 3.0


def test_new_poolings_round_trip_through_config_and_keras_file_in_safe_mode(tmp_path):
    from retina_scale.models.layers import AttentionPool2D, GridMaxPool2D

    attention = AttentionPool2D(kernel_initializer="ones", kernel_regularizer=keras.regularizers.L2(1e-3))
    again = AttentionPool2D.from_config(attention.get_config())
    assert again.get_config() == attention.get_config()
    assert GridMaxPool2D.from_config(GridMaxPool2D(3).get_config()).grid == 3
    assert GridRMSPool2D(2, epsilon=1e-6).get_config()["epsilon"] == 1e-6  # unchanged by the shared base

    inputs = keras.Input((None, None, 3))
    grid = GridMaxPool2D(2, name="gridmax")(inputs)
    pooled = AttentionPool2D(kernel_initializer="glorot_uniform", name="attn")(grid)
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(pooled))
    path = tmp_path / "poolings.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("gridmax"), GridMaxPool2D) and isinstance(loaded.get_layer("attn"), AttentionPool2D)
    x = np.random.default_rng(7).normal(size=(2, 9, 12, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6)
