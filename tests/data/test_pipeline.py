"""The tf.data input: resampling schedule, determinism across resumes, sharding, augmentation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_fixtures import draw_fundus, write_csv, write_jpeg
from retina_scale.data.cache import prepare_cache, read_config
from retina_scale.config import O_O_R, O_O_W0, O_O_WF, AugmentConfig, ResampleConfig
from retina_scale.data.pipeline import CacheInput, class_weights, draw_epoch, element_plan
from retina_scale.data.sources import read_dataset

SIZE = 32
N_PATIENTS = 12


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("eyepacs")
    rows = []
    for p in range(N_PATIENTS):
        for eye in ("left", "right"):
            name = f"{p}_{eye}"
            write_jpeg(root / f"{name}.jpeg", draw_fundus(width=160, height=120, seed=2 * p + (eye == "right")))
            rows.append([name, [0, 0, 0, 1, 2, 3, 4][(p + (eye == "left")) % 7]])
    write_csv(root / "trainLabels.csv", ["image", "level"], rows)
    out = tmp_path_factory.mktemp("cache")
    # Lossless, so that the tests can compare what the pipeline yields with the files, pixel for pixel.
    prepare_cache(read_dataset(root), out, sizes=(SIZE,), workers=1, progress=False, image_format="png")
    return out


def _batches(ds):
    return [tuple(t.numpy() for t in b) for b in ds]


def test_class_weights_follow_o_o_schedule():
    assert np.allclose(class_weights(0), O_O_W0)
    t = 10
    assert np.allclose(class_weights(t), [O_O_R**t * a + (1 - O_O_R**t) * b for a, b in zip(O_O_W0, O_O_WF)])
    assert np.allclose(class_weights(2000), O_O_WF)
    bal = class_weights(0, ResampleConfig(w0="balanced"), labels=[0, 0, 0, 1])
    assert np.allclose(bal[:2], [4 / 3, 4.0]) and bal[2:].sum() == 0
    with pytest.raises(ValueError, match="5 non-negative weights"):
        ResampleConfig(wf=(1, 2))


def test_grade1_boost_multiplies_grade_1s_expected_draw_share_as_computed_by_hand():
    labels = np.repeat(np.arange(5), [7348, 696, 1507, 248, 201])  # EyePACS-like shares
    counts = [7348, 696, 1507, 248, 201]
    boost = 3.0
    # Epoch 0: o_O's w0 per image. Grade 1's share of the draw is n1 * b * w1 / (sum_g n_g w_g + (b - 1) n1 w1).
    mass = [n * w for n, w in zip(counts, O_O_W0)]
    plain_share = mass[1] / sum(mass)
    boosted_share = boost * mass[1] / (sum(mass) + (boost - 1) * mass[1])
    assert (round(plain_share, 3), round(boosted_share, 3)) == (0.201, 0.43)  # ~ balanced; boosted: 3 x 0.2 of 1.4
    boosted = ResampleConfig(grade1_boost=boost)
    drawn = np.concatenate([labels[draw_epoch(labels, e, 0, boosted)] for e in range(4)])  # 4 x 9999 draws
    plain = np.concatenate([labels[draw_epoch(labels, e, 0, ResampleConfig())] for e in range(4)])
    # Binomial standard deviation of a share over 40k draws: about 0.0025; the tolerance is 4 of them.
    assert np.mean(drawn == 1) == pytest.approx(boosted_share, abs=0.01)
    assert np.mean(plain == 1) == pytest.approx(plain_share, abs=0.01)
    # The other grades keep their proportions to one another.
    others = np.bincount(drawn[drawn != 1], minlength=5)[[0, 2, 3, 4]]
    expected = np.array([mass[0], mass[2], mass[3], mass[4]]) / (sum(mass) - mass[1])
    np.testing.assert_allclose(others / others.sum(), expected, atol=0.01)
    # At a later epoch too (the weights have drifted towards wf): the boost applies at every epoch.
    w = [O_O_R**100 * a + (1 - O_O_R**100) * b for a, b in zip(O_O_W0, O_O_WF)]
    late_mass = [n * x for n, x in zip(counts, w)]
    late_share = boost * late_mass[1] / (sum(late_mass) + (boost - 1) * late_mass[1])
    late = np.concatenate([labels[draw_epoch(labels, 100 + e, 0, boosted)] for e in range(4)])
    assert np.mean(late == 1) == pytest.approx(late_share, abs=0.01)


def test_grade1_boost_of_one_draws_exactly_as_before():
    labels = np.repeat(np.arange(5), [50, 10, 20, 5, 5])
    for epoch in (0, 3):
        np.testing.assert_array_equal(draw_epoch(labels, epoch, 2, ResampleConfig(grade1_boost=1.0)),
                                      draw_epoch(labels, epoch, 2, ResampleConfig()))
    np.testing.assert_array_equal(class_weights(5, ResampleConfig(grade1_boost=2.5)) / class_weights(5),
                                  [1.0, 2.5, 1.0, 1.0, 1.0])


def test_resampling_draw_is_deterministic_and_rebalances():
    # EyePACS-like class shares.
    labels = np.repeat(np.arange(5), [7348, 696, 1507, 248, 201])
    a = draw_epoch(labels, 7, seed=1, resample=ResampleConfig())
    assert np.array_equal(a, draw_epoch(labels, 7, seed=1, resample=ResampleConfig()))
    assert not np.array_equal(a, draw_epoch(labels, 8, seed=1, resample=ResampleConfig()))
    assert not np.array_equal(a, draw_epoch(labels, 7, seed=2, resample=ResampleConfig()))
    counts = np.bincount(labels, minlength=5)
    for epoch in (0, 150):
        drawn = np.bincount(labels[draw_epoch(labels, epoch, 0, ResampleConfig())], minlength=5) / len(labels)
        w = class_weights(epoch) * counts
        assert np.allclose(drawn, w / w.sum(), atol=0.015), (epoch, drawn, w / w.sum())
    # Epoch 0 is close to balanced, far from the data's 73 % of grade 0.
    first = np.bincount(labels[draw_epoch(labels, 0, 0, ResampleConfig())], minlength=5) / len(labels)
    assert first.max() < 0.25
    plain = draw_epoch(labels, 3, 0, None)
    assert sorted(plain) == list(range(len(labels)))


def _draw(epoch):
    """A stand-in for CacheInput.epoch_indices: 10 images, a different order each epoch."""
    return np.random.default_rng(epoch).permutation(10)


def test_element_plan_of_training_cuts_epochs_to_whole_batches_and_seeds_each_position():
    index, seeds = element_plan(10, 4, seed=7, draw=_draw, start_epoch=3, epochs=2)
    assert index.dtype == np.int64 and seeds.dtype == np.int64 and seeds.shape == (16, 2)
    # 2 batches of 4 per epoch; the last 2 images of each epoch's draw are left out
    assert list(index) == list(_draw(3)[:8]) + list(_draw(4)[:8])
    assert (seeds[:, 0] == 7).all()
    assert list(seeds[:, 1]) == [3 * 2**31 + p for p in range(8)] + [4 * 2**31 + p for p in range(8)]
    assert len({tuple(s) for s in seeds}) == 16  # every element its own seed
    # a resumed plan is the tail of the uninterrupted one, seeds included
    later, later_seeds = element_plan(10, 4, seed=7, draw=_draw, start_epoch=4, epochs=1)
    assert np.array_equal(later, index[8:]) and np.array_equal(later_seeds, seeds[8:])


def test_element_plan_shards_positions_over_pipelines():
    whole, whole_seeds = element_plan(10, 4, seed=1, draw=_draw, epochs=2)
    parts = [element_plan(10, 4, seed=1, draw=_draw, epochs=2, pipelines=2, pipeline_id=i) for i in range(2)]
    assert np.array_equal(parts[0][0], whole[0::2]) and np.array_equal(parts[1][0], whole[1::2])
    assert np.array_equal(parts[1][1], whole_seeds[1::2])  # an element's seed does not depend on the sharding
    with pytest.raises(ValueError, match="multiple of the 3 input pipelines"):
        element_plan(10, 4, seed=1, draw=_draw, pipelines=3)
    # evaluation: every image once, in order, whatever the batch; sharded by position too
    index, seeds = element_plan(10, 4, seed=1)
    assert list(index) == list(range(10)) and list(seeds[:, 1]) == list(range(10))
    assert list(element_plan(10, 4, seed=1, pipelines=3, pipeline_id=2)[0]) == [2, 5, 8]


def test_a_resumed_run_draws_exactly_what_an_uninterrupted_one_would(cache):
    inp = CacheInput(cache, SIZE, seed=5)
    steps = inp.steps_per_epoch(4)
    whole = _batches(inp.dataset(4, start_epoch=0, epochs=3, include_ids=True))
    resumed = _batches(CacheInput(cache, SIZE, seed=5).dataset(4, start_epoch=2, epochs=1, include_ids=True))
    assert len(whole) == 3 * steps and len(resumed) == steps
    for (x1, y1, i1), (x2, y2, i2) in zip(whole[2 * steps :], resumed):
        assert np.array_equal(i1, i2) and np.array_equal(y1, y2)
        assert np.array_equal(x1, x2)  # augmentation too
    ids = np.concatenate([b[2] for b in resumed]).astype(str)
    assert list(ids) == list(inp.image_ids[inp.epoch_indices(2)[: steps * 4]])
    x, y, _ = whole[0]
    assert x.dtype == np.float32 and x.shape == (4, SIZE, SIZE, 3) and y.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 255 and x.max() > 100


@pytest.mark.parametrize("resample", [None, ResampleConfig()])
def test_two_workers_cover_the_epoch_without_overlap(cache, resample):
    import tensorflow as tf

    inp = CacheInput(cache, SIZE, resample=resample, augment=None, seed=3)
    per_worker = []
    for i in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i, num_replicas_in_sync=2)
        batches = _batches(inp.dataset(8, input_context=ctx, start_epoch=4, include_ids=True))
        assert all(len(b[2]) == 4 for b in batches)  # per-replica batch
        per_worker.append([s.decode() for b in batches for s in b[2]])
    draw = list(inp.image_ids[inp.epoch_indices(4)[: inp.steps_per_epoch(8) * 8]])
    assert Counter(per_worker[0]) + Counter(per_worker[1]) == Counter(draw)
    # Worker i holds exactly the draw's positions i, i+2, ...: no position is read twice.
    assert per_worker[0] == draw[0::2] and per_worker[1] == draw[1::2]
    if resample is None:
        assert not set(per_worker[0]) & set(per_worker[1])
        assert len(per_worker[0]) + len(per_worker[1]) == len(draw) == 24


def test_evaluation_yields_every_image_once_unaugmented(cache):
    inp = CacheInput(cache, SIZE)
    xs, ys, ids = zip(*_batches(inp.dataset(5, training=False, include_ids=True)))
    ids = [s.decode() for b in ids for s in b]
    assert ids == list(inp.image_ids) and len(ids) == 24
    x = np.concatenate(xs)
    first = cv2.imread(str(Path(cache) / str(SIZE) / f"{ids[0]}.png"))[:, :, ::-1]
    assert np.array_equal(x[0], first.astype(np.float32))
    assert np.array_equal(np.concatenate(ys), inp.labels)


def test_augmentation_identity_and_effect(cache):
    inp0 = CacheInput(cache, SIZE, augment=AugmentConfig(strength=0, rotation=False, flip=False), resample=None)
    x, _, ids = next(iter(inp0.dataset(4, include_ids=True)))
    ref = np.stack([cv2.imread(str(Path(cache) / str(SIZE) / f"{i.decode()}.png"))[:, :, ::-1] for i in ids.numpy()])
    assert np.abs(x.numpy() - ref).max() < 1e-3, "an identity transform must not move pixels"
    inp = CacheInput(cache, SIZE, augment=AugmentConfig(), resample=None)
    xa, _, ida = next(iter(inp.dataset(4, include_ids=True)))
    assert list(ida.numpy()) == list(ids.numpy())
    diff = np.abs(xa.numpy() - ref).mean(axis=(1, 2, 3))
    assert (diff > 1).all(), diff
    assert xa.numpy()[:, 0, 0].max() == 0  # corners stay black (fill 0, outside the disc)


def test_the_input_augments_each_element_as_augment_batch_does_with_its_seed(cache):
    import tensorflow as tf

    inp = CacheInput(cache, SIZE, resample=None, seed=4)
    plain = CacheInput(cache, SIZE, resample=None, seed=4, augment=None)
    x, _, ids = next(iter(inp.dataset(8, start_epoch=2, include_ids=True)))
    raw, _, raw_ids = next(iter(plain.dataset(8, start_epoch=2, include_ids=True)))
    assert list(ids.numpy()) == list(raw_ids.numpy())
    _, seeds = element_plan(len(inp), 8, 4, draw=inp.epoch_indices, start_epoch=2)
    expected = inp.augment_batch(raw, tf.constant(seeds[:8])).numpy()
    assert np.abs(x.numpy() - expected).max() < 1e-3  # drawn per element in the input, in a batch here
    assert np.abs(x.numpy() - raw.numpy()).mean() > 1  # and augmented


@pytest.mark.slow  # a subprocess that imports TensorFlow: about 7 s
def test_distributed_over_two_replicas_in_a_mirrored_strategy(cache):
    code = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from retina_scale.data.pipeline import CacheInput
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        inp = CacheInput({str(cache)!r}, {SIZE}, seed=1)
        dist = inp.distribute(strategy, 8, include_ids=True)
        ids = []
        for x, y, i in dist:
            parts = strategy.experimental_local_results(i)
            assert len(parts) == 2 and all(p.shape[0] == 4 for p in parts), [p.shape for p in parts]
            ids += [s.decode() for p in parts for s in p.numpy()]
        want = list(inp.image_ids[inp.epoch_indices(0)[: inp.steps_per_epoch(8) * 8]])
        assert sorted(ids) == sorted(want), (ids, want)
        print("OK", len(ids))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TF_CPP_MIN_LOG_LEVEL": "2"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK 24" in res.stdout


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_in_memory_and_file_reading_give_the_same_batches(cache, tmp_path, fmt):
    if fmt == "jpeg":
        data = read_dataset(Path(read_config(cache)["data"]["root"]))
        cache = tmp_path / "jpeg-cache"
        prepare_cache(data, cache, sizes=(SIZE,), workers=1, progress=False, image_format="jpeg")
        assert len(list((cache / str(SIZE)).glob("*.jpg"))) == 24
    a = _batches(CacheInput(cache, SIZE, seed=2, in_memory=True).dataset(8, include_ids=True))
    b = _batches(CacheInput(cache, SIZE, seed=2, in_memory=False).dataset(8, include_ids=True))
    assert len(a) == len(b) == 3
    for (x1, y1, i1), (x2, y2, i2) in zip(a, b):
        assert np.array_equal(i1, i2) and np.array_equal(y1, y2) and np.array_equal(x1, x2)
