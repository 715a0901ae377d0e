"""Tests of retina_scale.models.complexity: weights, multiply-adds and activations against the paper."""

import pytest

from retina_scale.models.complexity import PAPER_FIG4, count_complexity, family_complexity
from retina_scale.models.convnet import build_model


@pytest.fixture(scope="module")
def records():
    return {r["stage"]: r for r in family_complexity()}


@pytest.mark.parametrize("stage,weights", [("tiny", 1.557e6), ("small", 3.557e6), ("median", 8.145e6), ("large", 24.400e6)])
def test_weights_within_2_percent_of_exact_design(records, stage, weights):
    assert abs(records[stage]["weights"] / weights - 1) < 0.02


@pytest.mark.parametrize("stage", ["tiny", "small", "median", "large"])
def test_macs_within_10_percent_of_paper(records, stage):
    assert abs(records[stage]["macs"] / PAPER_FIG4[stage]["macs"] - 1) < 0.10


def test_macs_counted_from_layers_by_hand_for_one_conv():
    import keras

    inputs = keras.Input((20, 16, 3))
    x = keras.layers.Conv2D(4, 5, strides=2, padding="same", name="c")(inputs)
    x = keras.layers.MaxPooling2D(3, 2, padding="same")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2)(x)
    counts = count_complexity(keras.Model(inputs, out), (20, 16))
    # conv: 10x8 outputs x 4 filters x 5x5x3; pool out 5x4x4 = 80 values; dense 80 -> 2.
    assert counts.macs == 10 * 8 * 4 * 75 + 80 * 2
    assert counts.activations == 10 * 8 * 4 + 5 * 4 * 4 + 2
    assert counts.weights == 4 * 75 + 4 + 80 * 2 + 2


def test_compute_grows_about_fourfold_per_stage(records):
    macs = [records[s]["macs"] for s in ("tiny", "small", "median", "large")]
    assert all(3.5 < b / a < 5.5 for a, b in zip(macs, macs[1:]))


def test_counts_at_other_input_sizes_scale_with_area():
    model = build_model("tiny", width=0.25, kernel_initializer="zeros")
    at_112 = count_complexity(model, 112)
    at_224 = count_complexity(model, 224)
    head = sum(layer.macs for layer in at_112.layers if layer.kind == "Dense")
    assert at_224.macs - head == pytest.approx(4 * (at_112.macs - head), rel=1e-9)
    assert at_224.weights == at_112.weights


def test_an_aux_head_and_the_attention_pooling_are_counted():
    plain = count_complexity(build_model("tiny", width=0.125, kernel_initializer="zeros"), 112)
    aux = count_complexity(build_model("tiny", width=0.125, aux="classification", kernel_initializer="zeros"), 112)
    # head_aux: 64 maxout features (512 x 1/8) -> 5 logits.
    assert (aux.weights - plain.weights, aux.macs - plain.macs) == (64 * 5 + 5, 64 * 5)
    assert aux.activations - plain.activations == 5
    att = count_complexity(build_model("tiny", width=0.125, head_pooling="attention", kernel_initializer="zeros"), 112)
    rows = {r.name: r for r in att.layers}
    # The scoring kernel is a 1x1 convolution of the 7x7x16 map; head_dense1 then takes 16 features, not 2x2x16.
    assert (rows["head_attnpool"].macs, rows["head_attnpool"].weights) == (7 * 7 * 16, 16)
    assert rows["head_dense1"].macs == 16 * 128 and rows["head_attnpool"].output_shape == (16,)
