"""Shared stage helpers: the model under the run's precision, and its float32 copy for exports."""

import json

import numpy as np
import pytest

from retina_scale.config import load_train_config


def test_the_model_is_built_under_the_configured_precision_and_the_global_policy_is_left_alone():
    import keras

    from retina_scale.models.convnet import get_stage
    from retina_scale.training.stage import build_stage_model

    config = load_train_config("quick", ["model.width=0.125", "precision=mixed_bfloat16"])
    model = build_stage_model(config, get_stage("tiny"))
    assert keras.config.dtype_policy().name == "float32"
    assert model.get_layer("block1_conv1").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("block1_conv1").kernel.dtype == "float32"  # weights stay float32
    assert model.get_layer("head_grade").compute_dtype == "float32"  # so does the grade
    out = model(np.zeros((1, 112, 112, 3), "float32"))
    assert out.dtype == "float32"
    plain = build_stage_model(load_train_config("quick", ["model.width=0.125"]), get_stage("tiny"))
    assert plain.get_layer("block1_conv1").dtype_policy.name == "float32"
    keras.backend.clear_session()


@pytest.mark.slow
def test_a_bf16_trained_model_exports_float32_signatures(tmp_path):
    import keras
    import tensorflow as tf

    from retina_scale.models.convnet import get_stage
    from retina_scale.serving.export import export_saved_model
    from retina_scale.training.distribute import DistributedTrainer
    from retina_scale.training.stage import build_stage_model, float32_model

    config = load_train_config("quick", ["model.width=0.125", "precision=mixed_bfloat16"])
    model = build_stage_model(config, get_stage("tiny"))
    trainer = DistributedTrainer(model, keras.optimizers.Adam(1e-3), tf.distribute.get_strategy(), 8)
    images = np.random.default_rng(1).uniform(0, 255, (16, 112, 112, 3)).astype("float32")
    labels = (np.arange(16) % 5).astype("float32")
    assert np.isfinite(trainer.train_steps(
        trainer.distribute_training(lambda: tf.data.Dataset.from_tensor_slices((images, labels))), 2))

    copy = float32_model(model)
    assert copy is not model and copy.get_layer("block1_conv1").dtype_policy.name == "float32"
    for a, b in zip(model.weights, copy.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float32_model(copy) is copy
    # The bf16 model and its float32 copy grade alike (bf16 keeps 3 significant digits).
    np.testing.assert_allclose(np.asarray(model(images[:4])), np.asarray(copy(images[:4])), atol=0.05)

    path = export_saved_model(copy, tmp_path, "retina", metadata={"preprocessing": "none"})
    loaded = tf.saved_model.load(str(path))
    for name in ("serving_default", "predict_images"):
        signature = loaded.signatures[name]
        outputs = signature.structured_outputs
        assert outputs["grade_continuous"].dtype == tf.float32, name
    spec = loaded.signatures["serving_default"].structured_input_signature[1]["images"]
    assert spec.dtype == tf.float32
    grades = loaded.signatures["serving_default"](images=tf.constant(images[:4]))["grade_continuous"]
    np.testing.assert_allclose(grades.numpy(), np.asarray(copy(images[:4])).reshape(-1), rtol=1e-4, atol=1e-4)
    assert json.loads((path / "metadata.json").read_text())["stage"] == "tiny"
    keras.backend.clear_session()


def test_validation_row_scores_fixed_and_optimised_cut_offs():
    from retina_scale.training.stage import validation_row

    labels = np.array([0, 0, 1, 1, 2, 2], dtype=np.float32)
    scores = np.array([0.2, 0.3, 0.35, 0.4, 0.45, 0.48], dtype=np.float32)  # ranked right, all below 0.5
    row = validation_row(labels, scores)
    assert row["val_kappa"] == 0.0  # every score is grade 0 at the fixed cut-offs: kappa undefined -> 0
    assert row["val_kappa_optimized"] == pytest.approx(1.0)  # cut-offs between the groups separate them exactly
    assert row["val_loss"] == pytest.approx(float(np.mean((scores - labels) ** 2)))


def test_is_better_follows_the_selection():
    from retina_scale.training.stage import is_better

    row = {"val_kappa_optimized": 0.6, "val_kappa": 0.2, "val_loss": 0.9}
    assert is_better(row, None, "val_kappa_optimized")
    assert is_better(row, 0.5, "val_kappa_optimized") and not is_better(row, 0.6, "val_kappa_optimized")
    assert is_better(row, 1.0, "val_loss") and not is_better(row, 0.8, "val_loss")
    assert not is_better(row, 0.3, "val_kappa")


def test_the_initial_weights_follow_the_run_seed_unless_model_seed_is_set():
    from retina_scale.models.convnet import get_stage
    from retina_scale.training.stage import build_stage_model

    def first_kernel(*overrides):
        config = load_train_config("quick", ["model.width=0.125", *overrides])
        return build_stage_model(config, get_stage("tiny")).get_layer("block1_conv1").kernel.numpy()

    assert not np.array_equal(first_kernel("seed=1"), first_kernel("seed=2"))  # seed=1,2,3: three networks
    assert np.array_equal(first_kernel("seed=1"), first_kernel("seed=1"))
    assert np.array_equal(first_kernel("seed=1", "model.seed=7"), first_kernel("seed=2", "model.seed=7"))
    assert np.array_equal(first_kernel("seed=7"), first_kernel("seed=3", "model.seed=7"))
