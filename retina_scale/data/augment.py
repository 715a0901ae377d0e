"""o_O's augmentation of a batch of disc-centred squares, in tf ops (on the accelerator when the input map runs
there, never in Python); o_O is the team whose Kaggle 2015 DR solution this project follows.

Each element is rotated 0-360 degrees, flipped horizontally and vertically, zoomed by 1/1.15-1.15 on each axis,
translated (40 px at 512, i.e. 7.8 % of the side) and shifted in colour along the data's own RGB principal axes
(PCA noise; ``prepare`` measures the axes). ``AugmentConfig.strength`` scales zoom, translation and colour noise
per stage; rotations and flips are symmetries of a fundus and stay whole. Every element's draw is a pure function
of its seed (the input passes ``(seed, epoch, position)``), so a resumed run and a sharded one draw exactly what
an uninterrupted one on one replica would.
"""

from __future__ import annotations

import math

from retina_scale.config import AugmentConfig


_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix(z):
    """SplitMix64 finaliser on uint64 tensors: a counter-based hash, vectorised and XLA-friendly."""
    import tensorflow as tf

    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(30, tf.uint64))) * tf.constant(0xBF58476D1CE4E5B9, tf.uint64)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(27, tf.uint64))) * tf.constant(0x94D049BB133111EB, tf.uint64)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


def element_uniforms(seeds, n: int):
    """``n`` uniform [0, 1) numbers per element from int64 seeds ``[B, 2]``: a pure function of each seed."""
    import tensorflow as tf

    s = tf.bitcast(tf.cast(seeds, tf.int64), tf.uint64)
    golden = tf.constant(_GOLDEN, tf.uint64)
    key = _splitmix(tf.bitwise.bitwise_xor(_splitmix(s[:, 0] + golden), s[:, 1]))
    cols = [tf.bitwise.right_shift(_splitmix(key + golden * tf.constant(j + 1, tf.uint64)), tf.constant(40, tf.uint64))
            for j in range(n)]
    return tf.cast(tf.stack(cols, axis=1), tf.float32) / float(1 << 24)


def _bilinear_warp(images, a00, a01, b0, a10, a11, b1, fill: float):
    """Sample ``images`` at ``(a00*x + a01*y + b0, a10*x + a11*y + b1)`` for each output pixel, bilinearly,
    with ``fill`` outside (gathers on a padded copy: XLA compiles this to one fused loop)."""
    import tensorflow as tf

    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    col = lambda v: v[:, None, None]  # noqa: E731
    sx = col(a00) * xs + col(a01) * ys + col(b0)
    sy = col(a10) * xs + col(a11) * ys + col(b1)
    x0, y0 = tf.floor(sx), tf.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    hp, wp = h + 2, w + 2
    x0 = tf.clip_by_value(tf.cast(x0, tf.int32) + 1, 0, wp - 2)
    y0 = tf.clip_by_value(tf.cast(y0, tf.int32) + 1, 0, hp - 2)
    flat = tf.reshape(tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=fill), [-1, 3])
    base = tf.range(n)[:, None, None] * hp * wp + y0 * wp + x0
    p00, p01 = tf.gather(flat, base), tf.gather(flat, base + 1)
    p10, p11 = tf.gather(flat, base + wp), tf.gather(flat, base + wp + 1)
    top = p00 + (p01 - p00) * fx
    bottom = p10 + (p11 - p10) * fx
    out = top + (bottom - top) * fy
    # Far outside the photo the clipped indices land on the padding; make it exact.
    inside = (sx > -1) & (sx < tf.cast(w, tf.float32)) & (sy > -1) & (sy < tf.cast(h, tf.float32))
    return tf.where(inside[..., None], out, fill)


def _augment(images, seeds, rotation, flip, log_zoom, shift, color_sigma, pca_vectors, pca_std, fill, mask_fraction):
    import tensorflow as tf

    size = tf.cast(tf.shape(images)[1], tf.float32)
    u = element_uniforms(seeds, 10)
    theta = u[:, 0] * (2 * math.pi) if rotation else tf.zeros_like(u[:, 0])
    zx = tf.exp((2 * u[:, 1] - 1) * log_zoom)
    zy = tf.exp((2 * u[:, 2] - 1) * log_zoom)
    tx = (2 * u[:, 3] - 1) * shift * size
    ty = (2 * u[:, 4] - 1) * shift * size
    fx = tf.where(u[:, 5] < 0.5, -1.0, 1.0) if flip else tf.ones_like(u[:, 5])
    fy = tf.where(u[:, 6] < 0.5, -1.0, 1.0) if flip else tf.ones_like(u[:, 6])
    c, s = tf.cos(theta), tf.sin(theta)
    # Forward: out = ctr + t + R S F (in - ctr); inverse: in = A (out - ctr - t) + ctr with A = F S^-1 R^T.
    a00, a01 = fx * c / zx, fx * s / zx
    a10, a11 = -fy * s / zy, fy * c / zy
    ctr = (size - 1) / 2
    ox, oy = ctr + tx, ctr + ty
    b0 = ctr - (a00 * ox + a01 * oy)
    b1 = ctr - (a10 * ox + a11 * oy)
    # PCA colour noise (Box-Muller normals), added inside the disc only so the background keeps its value.
    r = tf.sqrt(-2.0 * tf.math.log(tf.maximum(u[:, 7:10], 1e-7)))
    normals = r * tf.cos(2 * math.pi * tf.roll(u[:, 7:10], 1, axis=1))
    colors = tf.linalg.matvec(pca_vectors, normals * color_sigma * pca_std[None, :])
    ys, xs = tf.meshgrid(tf.range(size), tf.range(size), indexing="ij")
    radius = size / 2 * mask_fraction
    disc = tf.cast((xs - ctr) ** 2 + (ys - ctr) ** 2 <= radius**2, tf.float32)[None, :, :, None]
    images = images + disc * colors[:, None, None, :]
    out = _bilinear_warp(images, a00, a01, b0, a10, a11, b1, fill)
    return tf.clip_by_value(out, 0.0, 255.0)


_COMPILED = {}


def augment_batch(images, seeds, config: AugmentConfig, pca_vectors, pca_std, fill: float = 0.0,
                  mask_fraction: float = 1.0, jit: bool = True):
    """o_O augmentation of a batch of disc-centred squares, in tf ops, one stateless draw per element.

    Args:
        images: float32 ``[B, S, S, 3]`` in [0, 255].
        seeds: int64 ``[B, 2]``; each element's transform and colour shift are a pure function of its seed.
        config: what to draw and how strongly.
        pca_vectors, pca_std: the data's RGB principal axes (columns) and their standard deviations.
        fill: value of pixels that come from outside the square (0, or 128 for Graham-normalised caches).
        mask_fraction: colour noise is added inside this fraction of the radius only.
        jit: compile with XLA.
    """
    import tensorflow as tf

    key = (jit, config.rotation, config.flip)
    if key not in _COMPILED:
        _COMPILED[key] = tf.function(
            lambda x, s, lz, sh, cs, v, sd, f, mf: _augment(x, s, config.rotation, config.flip, lz, sh, cs, v, sd, f, mf),
            jit_compile=jit, reduce_retracing=True)
    return _COMPILED[key](
        images, seeds, tf.constant(math.log(config.zoom) * config.strength, tf.float32),
        tf.constant(config.translation * config.strength, tf.float32),
        tf.constant(config.color_sigma * config.strength, tf.float32), tf.constant(pca_vectors, tf.float32),
        tf.constant(pca_std, tf.float32), tf.constant(fill, tf.float32), tf.constant(mask_fraction, tf.float32))
