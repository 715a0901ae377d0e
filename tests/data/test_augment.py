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
