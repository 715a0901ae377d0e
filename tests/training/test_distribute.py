"""Distribution: one training path gives the same result on 1 device, 2 mirrored replicas and 2 workers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retina_scale.config import STRATEGIES
from retina_scale.training.distribute import choose_strategy

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run(env, out, strategy, cpus, **extra):
    return subprocess.Popen([sys.executable, str(WORKER), str(out), strategy, str(cpus)], env={**env, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def _weights(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def single_device(tmp_path_factory, subprocess_env):
    out = tmp_path_factory.mktemp("one") / "w.npz"
    _finish(_run(subprocess_env, out, "default", 1))
    return out


@pytest.mark.slow
def test_mirrored_two_replicas_equal_one_device(single_device, tmp_path, subprocess_env):
    out = tmp_path / "w.npz"
    _finish(_run(subprocess_env, out, "mirrored", 2))
    one, two = _weights(single_device), _weights(out)
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)
    ev1 = np.load(str(single_device).replace(".npz", ".eval.npz"))
    ev2 = np.load(str(out).replace(".npz", ".eval.npz"))
    assert int(ev2["replicas"]) == 2 and int(ev1["replicas"]) == 1
    # Evaluation pads to whole steps and drops the padding: 61 real examples, each once.
    assert len(ev1["labels"]) == len(ev2["labels"]) == 61
    order1, order2 = np.lexsort((ev1["predictions"], ev1["labels"])), np.lexsort((ev2["predictions"], ev2["labels"]))
    np.testing.assert_array_equal(ev1["labels"][order1], ev2["labels"][order2])
    np.testing.assert_allclose(ev1["predictions"][order1], ev2["predictions"][order2], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_workers_on_localhost_end_with_identical_weights(single_device, tmp_path, subprocess_env, free_ports):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = [
        _run(subprocess_env, tmp_path / f"w{i}.npz", "auto", 1,
             TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        for i in range(2)
    ]
    for proc in procs:
        _finish(proc)
    w0, w1 = _weights(tmp_path / "w0.npz"), _weights(tmp_path / "w1.npz")
    one = _weights(single_device)
    for key in w0:
        np.testing.assert_array_equal(w0[key], w1[key], err_msg=key)
        np.testing.assert_allclose(w0[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)
    e0 = np.load(tmp_path / "w0.eval.npz")
    assert int(e0["replicas"]) == 2 and len(e0["labels"]) == 61


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="accepted: auto, default, one_device, mirrored, multi_worker"):
        choose_strategy("horovod")
    assert STRATEGIES[0] == "auto"


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        choose_strategy("multi_worker")


def test_bad_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        choose_strategy("auto")


def _tiny_run(trainer, images, labels, steps=3):
    import tensorflow as tf

    def examples():
        return tf.data.Dataset.from_tensor_slices((images, labels))

    return trainer.train_steps(trainer.distribute_training(examples), steps=steps)


@pytest.mark.slow
def test_a_reset_trainer_runs_as_a_fresh_one_without_tracing_again():
    import keras

    from retina_scale.models.convnet import build_model
    from retina_scale.training.distribute import DistributedTrainer
    from retina_scale.training.checkpoint import restore_checkpoint, save_checkpoint

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (24, 112, 112, 3)).astype("float32")
    labels = (np.arange(24) % 5).astype("float32")
    strategy = choose_strategy("default")

    def trainer_at_start(path=None):
        model = build_model("tiny", width=0.125, dropout=0.0, seed=1)
        if path is not None:
            restore_checkpoint(model, None, path)
        return DistributedTrainer(model, keras.optimizers.Adam(1e-3), strategy, global_batch_size=8)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        start = f"{tmp}/start.npz"
        reused = trainer_at_start()
        save_checkpoint(reused.model, None, start)
        _tiny_run(reused, images, labels)  # a first run at lr 1e-3 moves weights and moments
        restore_checkpoint(reused.model, None, start)
        reused.reset_optimizer(3e-3)
        assert int(reused.optimizer.iterations.numpy()) == 0
        second = _tiny_run(reused, images, labels)
        fresh = trainer_at_start(start)
        fresh.reset_optimizer(3e-3)
        expected = _tiny_run(fresh, images, labels)
    assert second == pytest.approx(expected, rel=1e-5)
    for a, b in zip(reused.model.weights, fresh.model.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert reused.tracing_counts() == {"train_step": 1, "predict_step": 0}


def test_the_step_trains_a_mixed_bfloat16_model_with_a_float32_loss():
    import keras
    import tensorflow as tf

    from retina_scale.training.distribute import DistributedTrainer
    from retina_scale.training.stage import dtype_policy

    # Every layer in bf16, the output too, with an L2 penalty: the loss, its penalty and the predictions
    # still come out float32 (this raised a TypeError at 'loss += scale_regularization_loss(...)').
    with dtype_policy("mixed_bfloat16"):
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, kernel_regularizer="l2"),
                                  keras.layers.Dense(1, kernel_regularizer="l2")])
    assert model.layers[-1].compute_dtype == "bfloat16" and keras.config.dtype_policy().name == "float32"
    trainer = DistributedTrainer(model, keras.optimizers.Adam(1e-2), choose_strategy("default"), global_batch_size=8)
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    y = (np.arange(16) % 5).astype("float32")
    losses = [trainer.train_steps(trainer.distribute_training(lambda: tf.data.Dataset.from_tensor_slices((x, y))), 2)
              for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    iterator, steps = trainer.distribute_evaluation(lambda: tf.data.Dataset.from_tensor_slices((x, y)), 16)
    labels, predictions = trainer.predict(iterator, steps)
    assert predictions.dtype == np.float32 and len(predictions) == 16


# ------------------------------------------------------------------ the auxiliary loss (issue 14, item 2)
def _bce(logit, target):
    """Sigmoid cross-entropy of one logit, by hand: -t log s(x) - (1 - t) log(1 - s(x))."""
    s = 1 / (1 + np.exp(-logit))
    return -(target * np.log(s) + (1 - target) * np.log(1 - s))


def test_ordinal_aux_loss_is_the_hand_computed_value():
    from retina_scale.training.distribute import per_example_loss

    grade = np.array([[0.5], [1.0], [4.0]], "float32")
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.5, -3.0], [1.0, 1.0, 1.0, 1.0]], "float32")
    labels = np.array([0.0, 2.0, 4.0], "float32")
    # Targets grade > k for k = 0..3: grade 0 -> 0000, grade 2 -> 1100, grade 4 -> 1111.
    targets = [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    term = [np.mean([_bce(x, t) for x, t in zip(row, trow)]) for row, trow in zip(logits, targets)]
    assert term[0] == pytest.approx(np.log(2))  # four logits 0: log 2 each
    expected = [(0.5 - 0) ** 2 + 0.3 * term[0], (1.0 - 2) ** 2 + 0.3 * term[1], 0.0 + 0.3 * term[2]]
    got = np.asarray(per_example_loss([grade, logits], labels, "ordinal", 0.3))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_classification_aux_loss_is_the_hand_computed_value():
    from retina_scale.training.distribute import per_example_loss

    grade = np.array([[1.0], [3.5]], "float32")
    logits = np.array([[0.0, 2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 3.0]], "float32")
    labels = np.array([1.0, 3.0], "float32")
    # Cross-entropy -log softmax(logits)[grade]: grade 1 -> log(4 + e^2) - 2; grade 3 -> log(e + 3 + e^3) - 0.
    term = [np.log(4 + np.exp(2.0)) - 2.0, np.log(np.e + 3 + np.exp(3.0))]
    got = np.asarray(per_example_loss([grade, logits], labels, "classification", 2.0))
    np.testing.assert_allclose(got, [0.0 + 2.0 * term[0], 0.25 + 2.0 * term[1]], rtol=1e-6)


@pytest.mark.parametrize("aux", ["ordinal", "classification"])
def test_aux_weight_zero_gives_the_squared_error_exactly(aux):
    from retina_scale.training.distribute import per_example_loss

    rng = np.random.default_rng(1)
    grade = rng.normal(2, 1, (16, 1)).astype("float32")
    logits = rng.normal(0, 3, (16, 4 if aux == "ordinal" else 5)).astype("float32")
    labels = (np.arange(16) % 5).astype("float32")
    plain = np.asarray(per_example_loss(grade, labels))
    np.testing.assert_array_equal(plain, (grade[:, 0] - labels) ** 2)
    np.testing.assert_array_equal(np.asarray(per_example_loss([grade, logits], labels, aux, 0.0)), plain)
    assert (np.asarray(per_example_loss([grade, logits], labels, aux, 1.0)) > plain).all()


def _aux_trainer(aux, weight, seed=2, head_pooling="rms"):
    import keras

    from retina_scale.config import LossConfig
    from retina_scale.models.convnet import build_model
    from retina_scale.training.distribute import DistributedTrainer

    model = build_model("tiny", width=0.125, dropout=0.0, l2=0.0, seed=seed, aux=aux, head_pooling=head_pooling)
    return DistributedTrainer(model, keras.optimizers.Adam(1e-3), choose_strategy("default"), global_batch_size=8,
                              loss=LossConfig(aux=aux, aux_weight=weight))


def test_a_training_step_of_an_aux_model_reports_mse_plus_the_weighted_aux_loss_and_predicts_the_grade():
    import tensorflow as tf

    images = np.random.default_rng(3).uniform(0, 255, (8, 112, 112, 3)).astype("float32")
    labels = (np.arange(8) % 5).astype("float32")
    trainer = _aux_trainer("ordinal", 0.7)
    grade, logits = (np.asarray(t, np.float64) for t in trainer.model(images, training=False))  # no dropout: same
    targets = labels[:, None] > np.arange(4)[None, :]
    term = np.mean(_bce(logits, targets), axis=1)
    expected = np.mean((grade[:, 0] - labels) ** 2 + 0.7 * term)  # the batch is the global batch
    examples = lambda: tf.data.Dataset.from_tensor_slices((images, labels))  # noqa: E731
    loss = trainer.train_steps(trainer.distribute_training(examples), steps=1)
    assert loss == pytest.approx(expected, rel=1e-5)
    # Evaluation reads the regression output alone: one number per image, the model's grade.
    iterator, steps = trainer.distribute_evaluation(examples, 8)
    got_labels, predictions = trainer.predict(iterator, steps)
    assert predictions.shape == (8,)
    np.testing.assert_allclose(predictions, np.asarray(trainer.model(images)[0])[:, 0], rtol=1e-5, atol=1e-5)


def test_aux_weight_zero_trains_the_shared_network_as_the_plain_mse_does():
    import tensorflow as tf

    images = np.random.default_rng(4).uniform(0, 255, (16, 112, 112, 3)).astype("float32")
    labels = (np.arange(16) % 5).astype("float32")
    examples = lambda: tf.data.Dataset.from_tensor_slices((images, labels))  # noqa: E731
    plain, aux = _aux_trainer("none", 1.0), _aux_trainer("classification", 0.0)
    head = [np.asarray(w) for w in aux.model.get_layer("head_aux").weights]
    losses = [(plain.train_steps(plain.distribute_training(examples), steps=1),
               aux.train_steps(aux.distribute_training(examples), steps=1)) for _ in range(3)]
    assert losses[0][0] == losses[0][1]  # the first step: the same network, the same loss, exactly
    np.testing.assert_allclose([a for _, a in losses], [p for p, _ in losses], rtol=1e-5)
    for layer in plain.model.layers:
        for a, b in zip(layer.get_weights(), aux.model.get_layer(layer.name).get_weights()):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=layer.name)
    for before, after in zip(head, aux.model.get_layer("head_aux").weights):  # no gradient reached it
        np.testing.assert_array_equal(before, np.asarray(after))


def test_a_model_and_a_loss_config_that_disagree_are_refused():
    import keras

    from retina_scale.config import LossConfig
    from retina_scale.models.convnet import build_model
    from retina_scale.training.distribute import DistributedTrainer

    model = build_model("tiny", width=0.125, aux="ordinal")
    with pytest.raises(ValueError, match="the model's auxiliary head is 'ordinal' but loss.aux is 'none'"):
        DistributedTrainer(model, keras.optimizers.Adam(1e-3), choose_strategy("default"), 8)
    with pytest.raises(ValueError, match="loss.aux is 'classification'"):
        DistributedTrainer(model, keras.optimizers.Adam(1e-3), choose_strategy("default"), 8,
                           loss=LossConfig(aux="classification"))


def test_a_mixed_bfloat16_model_with_attention_pooling_and_an_aux_head_trains_with_a_float32_loss():
    import tensorflow as tf

    from retina_scale.training.stage import dtype_policy

    with dtype_policy("mixed_bfloat16"):
        trainer = _aux_trainer("ordinal", 1.0, head_pooling="attention")
    model = trainer.model
    assert model.get_layer("head_attnpool").compute_dtype == "bfloat16"
    assert [o.dtype for o in model.outputs] == ["float32", "float32"]
    images = np.random.default_rng(6).uniform(0, 255, (8, 112, 112, 3)).astype("float32")
    labels = (np.arange(8) % 5).astype("float32")
    losses = [trainer.train_steps(trainer.distribute_training(
        lambda: tf.data.Dataset.from_tensor_slices((images, labels))), 1) for _ in range(3)]
    assert all(np.isfinite(losses))
