import json

import numpy as np
import pytest

from retina_scale.models.convnet import build_model
from retina_scale.models.transfer import (
    CARRIED, DROPPED, MISMATCH, NEW, named_weights, transfer_weights,
)


@pytest.fixture(scope="module")
def tiny_and_small():
    tiny = build_model("tiny", width=0.125, seed=1)
    # Perturb the source so that "carried" cannot pass by both models sharing a seed-derived init.
    for layer in tiny.layers:
        layer.set_weights([w + 0.5 for w in layer.get_weights()])
    small = build_model("small", width=0.125, seed=2)
    return tiny, small, named_weights(small)


def test_carried_layers_are_identical_and_report_lists_the_rest(tiny_and_small):
    tiny, small, small_before = tiny_and_small
    report = transfer_weights(tiny, small)
    trunk = [f"block{b}_conv{c}" for b, n in ((1, 2), (2, 3), (3, 3)) for c in range(1, n + 1)]
    assert report.carried == trunk + ["head_dense2", "head_grade"]
    assert report.new == ["block4_conv1", "block4_conv2", "block4_conv3"]
    assert report.mismatched == ["head_dense1"]
    assert report.dropped == []
    for name in report.carried:
        for src, dst in zip(tiny.get_layer(name).get_weights(), small.get_layer(name).get_weights()):
            np.testing.assert_array_equal(src, dst)
    # New and mismatched layers keep the destination's own initialisation.
    for name in report.new + report.mismatched:
        for before, after in zip(small_before[name], small.get_layer(name).get_weights()):
            np.testing.assert_array_equal(before, after)


def test_head_dense1_mismatch_reports_both_shapes(tiny_and_small):
    tiny, small, _ = tiny_and_small
    entry = {e.layer: e for e in transfer_weights(tiny, small).layers}["head_dense1"]
    # width 1/8: tiny flattens 2x2x16 = 64 features, small 2x2x32 = 128; dense has 2 * 64 units.
    assert entry.status == MISMATCH
    assert entry.src_shapes == [(64, 128), (128,)] and entry.dst_shapes == [(128, 128), (128,)]


def test_report_is_json_and_a_readable_table(tiny_and_small):
    tiny, small, _ = tiny_and_small
    report = transfer_weights(tiny, small)
    data = json.loads(report.to_json())
    statuses = {row["layer"]: row["status"] for row in data["layers"]}
    assert statuses["block4_conv1"] == NEW and statuses["head_grade"] == CARRIED
    summary = data["summary"]
    assert summary["carried_params"] + sum(
        row["params"] for row in data["layers"] if row["status"] in (NEW, MISMATCH)
    ) == summary["dst_params"] == small.count_params()
    table = report.format_table()
    assert "head_dense1" in table and "shape mismatch" in table and "64x128, 128" in table
    assert table.splitlines()[-1].startswith("10 carried, 3 new, 1 re-initialised")


def test_transfer_to_a_smaller_model_reports_dropped_layers():
    small = build_model("small", width=0.125, seed=3)
    tiny = build_model("tiny", width=0.125, seed=4)
    report = transfer_weights(small, tiny)
    assert report.dropped == ["block4_conv1", "block4_conv2", "block4_conv3"]
    assert all(e.status == DROPPED for e in report.layers if e.layer.startswith("block4"))


def test_transfer_does_not_depend_on_layer_order():
    """Keras' .weights.h5 loads by position; transfer must go by name."""
    src = build_model("tiny", width=0.125, seed=5)
    weights = named_weights(src)
    shuffled = dict(reversed(list(weights.items())))
    dst = build_model("tiny", width=0.125, seed=6)
    report = transfer_weights(shuffled, dst)
    assert report.new == [] and report.mismatched == []
    for name, arrays in weights.items():
        for a, b in zip(arrays, dst.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_skip_keeps_fresh_weights():
    src = build_model("tiny", width=0.125, seed=5)
    dst = build_model("tiny", width=0.125, seed=6)
    before = dst.get_layer("head_grade").get_weights()
    report = transfer_weights(src, dst, skip={"head_grade"})
    assert "head_grade" in report.new
    np.testing.assert_array_equal(before[0], dst.get_layer("head_grade").get_weights()[0])


def test_transfer_between_stages_with_min_filters_carries_the_floored_blocks():
    tiny = build_model("tiny", width=0.25, min_filters=16, seed=1)
    for layer in tiny.layers:
        layer.set_weights([w + 0.5 for w in layer.get_weights()])
    small = build_model("small", width=0.25, min_filters=16, seed=2)
    report = transfer_weights(tiny, small)
    assert tiny.get_layer("block1_conv1").filters == 16
    assert {"block1_conv1", "block1_conv2", "block2_conv1", "block3_conv3", "head_grade"} <= set(report.carried)
    assert report.new == ["block4_conv1", "block4_conv2", "block4_conv3"] and report.mismatched == ["head_dense1"]
    for src, dst in zip(tiny.get_layer("block1_conv1").get_weights(), small.get_layer("block1_conv1").get_weights()):
        np.testing.assert_array_equal(src, dst)
    # A floor on one side only changes the first blocks' shapes: they are reported, not carried.
    unfloored = build_model("small", width=0.25, seed=2)
    assert "block1_conv1" in transfer_weights(tiny, unfloored).mismatched


# ------------------------------------------------------------------ issue 14's head options carry over too
def _perturbed(model):
    for layer in model.layers:
        layer.set_weights([w + 0.5 for w in layer.get_weights()])
    return model


def test_max_pooling_transfers_exactly_as_rms_pooling():
    rms = transfer_weights(_perturbed(build_model("tiny", width=0.125, seed=1)), build_model("small", width=0.125, seed=2))
    mx = transfer_weights(_perturbed(build_model("tiny", width=0.125, seed=1, head_pooling="max")),
                          build_model("small", width=0.125, seed=2, head_pooling="max"))
    assert (mx.carried, mx.new, mx.mismatched, mx.dropped) == (rms.carried, rms.new, rms.mismatched, rms.dropped)
    assert mx.summary() == rms.summary()


def test_attention_pooling_starts_afresh_with_head_dense1_and_the_rest_is_carried():
    tiny = _perturbed(build_model("tiny", width=0.125, seed=1, head_pooling="attention"))
    small = build_model("small", width=0.125, seed=2, head_pooling="attention")
    report = transfer_weights(tiny, small)
    entries = {e.layer: e for e in report.layers}
    # The scoring kernel has one weight per channel of the last block: 16 at tiny, 32 at small (width 1/8).
    assert entries["head_attnpool"].src_shapes == [(16, 1)] and entries["head_attnpool"].dst_shapes == [(32, 1)]
    assert report.mismatched == ["head_attnpool", "head_dense1"] and report.dropped == []
    assert report.new == ["block4_conv1", "block4_conv2", "block4_conv3"]
    assert {"block3_conv3", "head_dense2", "head_grade"} <= set(report.carried)
    for src, dst in zip(tiny.get_layer("head_dense2").get_weights(), small.get_layer("head_dense2").get_weights()):
        np.testing.assert_array_equal(src, dst)


def test_the_aux_head_is_carried_between_stages_and_dropped_without_one():
    tiny = _perturbed(build_model("tiny", width=0.125, seed=1, aux="ordinal"))
    report = transfer_weights(tiny, build_model("small", width=0.125, seed=2, aux="ordinal"))
    assert "head_aux" in report.carried and report.mismatched == ["head_dense1"]
    assert transfer_weights(tiny, build_model("small", width=0.125, seed=2)).dropped == ["head_aux"]
    assert transfer_weights(build_model("tiny", width=0.125), build_model("small", width=0.125, aux="ordinal")).new[-1] \
        == "head_aux"
