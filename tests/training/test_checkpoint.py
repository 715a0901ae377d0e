import keras
import numpy as np
import pytest

from retina_scale.models.convnet import build_model
from retina_scale.training.checkpoint import model_weights_from_checkpoint, restore_checkpoint, save_checkpoint


def _trained(seed):
    model = build_model("tiny", width=0.125, seed=seed, dropout=0.0)
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(seed).uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    model.fit(x, np.arange(8, dtype="float32") % 5, epochs=1, batch_size=4, verbose=0)
    return model, optimizer


def test_checkpoint_restores_weights_and_optimizer_state_across_optimizer_names(tmp_path):
    model, optimizer = _trained(0)
    save_checkpoint(model, optimizer, tmp_path / "last.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["last.npz"]
    # A fresh process numbers its optimizers anew ("sgd" vs "sgd_1"): the checkpoint must not care.
    other, other_opt = _trained(1)
    assert {v.path.split("/")[0] for v in other_opt.variables} != {v.path.split("/")[0] for v in optimizer.variables}
    restore_checkpoint(other, other_opt, tmp_path / "last.npz")
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    momenta = [v for v in optimizer.variables if "momentum" in v.path]
    assert momenta and any(np.abs(np.asarray(v)).sum() > 0 for v in momenta)
    for a, b in zip(optimizer.variables, other_opt.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(other_opt.iterations) == 2


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, optimizer = _trained(0)
    save_checkpoint(model, optimizer, tmp_path / "last.npz")
    small = build_model("small", width=0.125)
    with pytest.raises(ValueError, match="does not fit the model: model/block4_conv1/0 missing"):
        restore_checkpoint(small, None, tmp_path / "last.npz")


def test_model_weights_feed_transfer(tmp_path):
    model, _ = _trained(0)
    save_checkpoint(model, None, tmp_path / "best.npz")
    weights = model_weights_from_checkpoint(tmp_path / "best.npz")
    np.testing.assert_array_equal(weights["head_grade"][0], np.asarray(model.get_layer("head_grade").kernel))
    assert len(weights["block1_conv1"]) == 2


def test_checkpoint_carries_the_dropout_random_state(tmp_path):
    """A run resumed from its last checkpoint draws the same dropout masks as one never stopped (issue 15)."""
    def model():
        return keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5, name="drop", seed=3)])

    x = np.ones((4, 64), "float32")
    running = model()
    running(x, training=True)  # advance the generator: the saved state is not the initial one
    save_checkpoint(running, None, tmp_path / "c.npz")
    uninterrupted = [np.asarray(running(x, training=True)) for _ in range(2)]
    resumed = model()  # a fresh process's model: its generator starts from the beginning again
    fresh = np.asarray(model()(x, training=True))
    restore_checkpoint(resumed, None, tmp_path / "c.npz")
    after = [np.asarray(resumed(x, training=True)) for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted, after))
    assert not np.array_equal(fresh, uninterrupted[0])  # without the state, the masks would differ
