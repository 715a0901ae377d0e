"""o_O's augmentation (see :mod:`retina_scale.data.pipeline`) of a batch of disc-centred squares, in tf ops (on
the accelerator when the input map runs there, never in Python).

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


# Philox, named: "auto_select" may choose another algorithm on another device, and the draws would change.
_ALG = "philox"


N_UNIFORM, N_NORMAL = 7, 3
"""What one element draws: uniforms for rotation, zoom x/y, shift x/y, flip x/y; normals for the colour noise."""


def draw(seed, n_uniform: int = N_UNIFORM, n_normal: int = N_NORMAL):
    """One element's ``n_uniform`` uniform [0, 1) and ``n_normal`` standard normal numbers (float32), drawn by
    ``tf.random.stateless_uniform`` / ``stateless_normal`` from two independent seeds split from the element's
    own int64 ``seed`` ``[2]``: a pure function of that seed. The input calls it per element, before batching."""
    import tensorflow as tf

    keys = tf.random.split(tf.cast(seed, tf.int64), 2, alg=_ALG)
    return (tf.random.stateless_uniform([n_uniform], seed=keys[0], alg=_ALG),
            tf.random.stateless_normal([n_normal], seed=keys[1], alg=_ALG))


def element_draws(seeds, n_uniform: int = N_UNIFORM, n_normal: int = N_NORMAL):
    """:func:`draw` of every element of int64 seeds ``[B, 2]``: float32 ``[B, n_uniform]`` and ``[B, n_normal]``,
    each row a pure function of its seed, whatever the batch around it."""
    import tensorflow as tf

    return tf.map_fn(lambda seed: draw(seed, n_uniform, n_normal), tf.cast(seeds, tf.int64),
                     fn_output_signature=(tf.float32, tf.float32))


def element_uniforms(seeds, n: int):
    """``n`` uniform [0, 1) numbers per element from int64 seeds ``[B, 2]``: a pure function of each seed."""
    return element_draws(seeds, n, 0)[0]


def _transforms(u, size, rotation: bool, flip: bool, log_zoom, shift):
    """Each element's affine map from an output pixel to the input point it samples, as the rows
    ``[a0, a1, a2, b0, b1, b2, 0, 0]`` of ``keras.ops.image.affine_transform``: output ``(x, y)`` samples the
    input at ``(a0 x + a1 y + a2, b0 x + b1 y + b2)`` (x the column, pixel centres at integers). ``u`` holds 7
    uniforms per element: rotation, zoom x and y, shift x and y, flip x and y."""
    import tensorflow as tf

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
    zero = tf.zeros_like(a00)
    return tf.stack([a00, a01, b0, a10, a11, b1, zero, zero], axis=1)


def _bilinear_warp(images, transforms, fill):
    """``keras.ops.image.affine_transform(images, transforms, "bilinear", "constant", fill)``, written out:
    output ``(x, y)`` samples the input at ``(a0 x + a1 y + a2, b0 x + b1 y + b2)`` bilinearly, with ``fill``
    outside. Gathers on a padded copy, which XLA compiles to one fused loop: twice the library's speed in the
    training input (benchmarks/input_pipeline.py ``--augment-only``), whose kernel has no XLA version.
    tests/data/test_augment.py checks that the two agree."""
    import tensorflow as tf

    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    t = [tf.reshape(transforms[:, j], [-1, 1, 1]) for j in range(6)]
    sx = t[0] * xs + t[1] * ys + t[2]
    sy = t[3] * xs + t[4] * ys + t[5]
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


def _augment(images, u, normals, rotation, flip, log_zoom, shift, color_sigma, pca_vectors, pca_std, fill,
             mask_fraction):
    """PCA colour noise inside the disc (the background keeps its value), then the affine warp, then the clip."""
    import tensorflow as tf

    size = tf.cast(tf.shape(images)[1], tf.float32)
    transforms = _transforms(u, size, rotation, flip, log_zoom, shift)
    colors = tf.linalg.matvec(pca_vectors, normals * color_sigma * pca_std[None, :])
    ys, xs = tf.meshgrid(tf.range(size), tf.range(size), indexing="ij")
    ctr = (size - 1) / 2
    radius = size / 2 * mask_fraction
    disc = tf.cast((xs - ctr) ** 2 + (ys - ctr) ** 2 <= radius**2, tf.float32)[None, :, :, None]
    images = images + disc * colors[:, None, None, :]
    return tf.clip_by_value(_bilinear_warp(images, transforms, fill), 0.0, 255.0)


def _augment_fn(rotation: bool, flip: bool, jit: bool):
    """:func:`_augment` as a tf.function, compiled with XLA when ``jit``. The draws come in from outside: XLA's
    stateless floats are other numbers than TensorFlow's kernels', and the result must not depend on ``jit``."""
    import tensorflow as tf

    return tf.function(
        lambda x, u, n, lz, sh, cs, v, sd, f, mf: _augment(x, u, n, rotation, flip, lz, sh, cs, v, sd, f, mf),
        jit_compile=jit, reduce_retracing=True)


_COMPILED = {}


def augment_drawn(images, uniforms, normals, config: AugmentConfig, pca_vectors, pca_std, fill: float = 0.0,
                  mask_fraction: float = 1.0, jit: bool = True):
    """o_O augmentation of a batch of disc-centred squares, in tf ops, from each element's draws.

    Args:
        images: float32 ``[B, S, S, 3]`` in [0, 255].
        uniforms, normals: float32 ``[B, 7]`` and ``[B, 3]``: each element's :func:`draw`.
        config: what to draw and how strongly.
        pca_vectors, pca_std: the data's RGB principal axes (columns) and their standard deviations.
        fill: value of pixels that come from outside the square (0, or 128 for Graham-normalised caches).
        mask_fraction: colour noise is added inside this fraction of the radius only.
        jit: compile with XLA (the same numbers either way).
    """
    import tensorflow as tf

    key = (jit, config.rotation, config.flip)
    if key not in _COMPILED:
        _COMPILED[key] = _augment_fn(config.rotation, config.flip, jit)
    return _COMPILED[key](
        images, uniforms, normals, tf.constant(math.log(config.zoom) * config.strength, tf.float32),
        tf.constant(config.translation * config.strength, tf.float32),
        tf.constant(config.color_sigma * config.strength, tf.float32), tf.constant(pca_vectors, tf.float32),
        tf.constant(pca_std, tf.float32), tf.constant(fill, tf.float32), tf.constant(mask_fraction, tf.float32))


def augment_batch(images, seeds, config: AugmentConfig, pca_vectors, pca_std, fill: float = 0.0,
                  mask_fraction: float = 1.0, jit: bool = True):
    """:func:`augment_drawn` with the draws of int64 ``seeds`` ``[B, 2]`` (:func:`element_draws`): each
    element's transform and colour shift are a pure function of its seed."""
    uniforms, normals = element_draws(seeds)
    return augment_drawn(images, uniforms, normals, config, pca_vectors, pca_std, fill, mask_fraction, jit)
