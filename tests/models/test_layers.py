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
