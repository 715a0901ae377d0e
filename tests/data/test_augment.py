"""The o_O augmentation in tf ops: per-element stateless draws, geometry that keeps the disc, XLA = plain TF."""

from __future__ import annotations

import cv2
import numpy as np

from fundus_fixtures import draw_fundus
from retina_scale.config import AugmentConfig
from retina_scale.data.augment import augment_batch, element_uniforms


def test_rotation_and_flips_preserve_the_disc():
    import tensorflow as tf

    u = element_uniforms(tf.constant([[1, 2], [1, 3], [1, 2]], tf.int64), 1000).numpy()
    assert np.array_equal(u[0], u[2]) and not np.array_equal(u[0], u[1])
    assert abs(u.mean() - 0.5) < 0.02 and u.min() >= 0 and u.max() < 1
    img = cv2.resize(draw_fundus(width=200, height=200, r=100, seed=4), (64, 64), interpolation=cv2.INTER_AREA)
    x = tf.constant(np.repeat(img[None, :, :, ::-1].astype(np.float32), 6, axis=0))
    seeds = tf.constant([[0, i] for i in range(6)], tf.int64)
    geo = AugmentConfig(zoom=1.0, translation=0.0, color_sigma=0.0)
    for jit in (True, False):
        y = augment_batch(x, seeds, geo, np.eye(3), np.zeros(3), jit=jit).numpy()
        # A rotation or flip about the centre keeps the disc where it is: same total brightness, black corners.
        assert np.allclose(y.sum(axis=(1, 2, 3)), x.numpy().sum(axis=(1, 2, 3)), rtol=0.03)
        assert (y[:, :3, :3] == 0).all()
        assert np.abs(y - x.numpy()).mean() > 1  # but the content moved
    y1 = augment_batch(x, seeds, AugmentConfig(), np.eye(3), np.full(3, 30.0), jit=True).numpy()
    y2 = augment_batch(x, seeds, AugmentConfig(), np.eye(3), np.full(3, 30.0), jit=False).numpy()
    assert np.abs(y1 - y2).max() < 0.1  # XLA and plain TF agree


def test_an_elements_draws_do_not_depend_on_its_batch_and_normals_are_standard():
    import tensorflow as tf

    from retina_scale.data.augment import element_draws

    a = tf.constant([[5, 2**31 * 3 + 7]], tf.int64)  # (seed, epoch * 2**31 + position), as the input passes
    others = tf.constant([[5, 1], [6, 2**31 * 3 + 7], [5, 8]], tf.int64)
    u1, n1 = element_draws(tf.concat([a, others], 0), 7, 3)
    u2, n2 = element_draws(tf.concat([others, a], 0), 7, 3)
    assert np.array_equal(u1[0], u2[-1]) and np.array_equal(n1[0], n2[-1])
    assert len({tuple(np.round(r, 6)) for r in u1.numpy()}) == 4  # and different seeds draw differently
    seeds = tf.constant(np.stack([np.full(2000, 3), np.arange(2000)], axis=1), tf.int64)
    u, n = (t.numpy() for t in tf.function(element_draws)(seeds, 7, 3))
    assert abs(n.mean()) < 0.05 and abs(n.std() - 1) < 0.05
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
    # the normals come from their own stream: uncorrelated with the uniforms of the same element
    assert np.abs(np.corrcoef(np.concatenate([u, n], axis=1), rowvar=False)[:7, 7:]).max() < 0.1


def test_the_written_out_warp_is_keras_affine_transform():
    import keras
    import tensorflow as tf

    from retina_scale.data.augment import _bilinear_warp

    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (4, 24, 24, 3)).astype(np.float32))
    lin = rng.normal(0, 0.6, (4, 2, 2)) + np.eye(2)  # rotations, zooms, shears, flips of either sign
    shift = rng.uniform(-6, 6, (4, 2)) + 12 - lin @ np.full(2, 12.0)  # about the centre, some off the image
    rows = np.concatenate([lin[:, 0], shift[:, :1], lin[:, 1], shift[:, 1:], np.zeros((4, 2))], axis=1)
    transforms = tf.constant(rows, tf.float32)
    for fill in (0.0, 128.0):
        ours = _bilinear_warp(images, transforms, tf.constant(fill)).numpy()
        theirs = keras.ops.image.affine_transform(images, transforms, interpolation="bilinear", fill_mode="constant",
                                                  fill_value=fill, data_format="channels_last").numpy()
        assert (theirs == fill).mean() > 0.05  # some of the output comes from outside the image
        assert np.abs(ours - theirs).max() < 1e-2, np.abs(ours - theirs).max()
