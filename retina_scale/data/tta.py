"""Test-time augmentation (TTA): the continuous grade averaged over ``draws`` fixed views of each photo.

The views are deterministic and the same for every photo (a view is a function of its number only, never of
the batch or the photo), so the evaluation, ``retina-scale predict`` and an export built with ``--tta N``
average exactly the same views:

- views 0-7: the symmetries of the square, exact pixel moves (no interpolation): the identity first, then the
  left-right and up-down flips, the rotations by 90, 180 and 270 degrees, the transpose and the transverse;
- views 8 and on: o_O's training augmentation (:mod:`retina_scale.data.augment`) at strength
  :data:`TTA_STRENGTH` (rotation and flips whole, zoom and shift scaled), its draw seeded by ``(TTA_SEED, view)``.
  Without colour noise: that needs the training data's colour axes, which a served photo has no access to.

With ``draws`` 1 (the default, "off") :func:`tta_scores` is the plain prediction, unchanged.

Example:
    >>> view_names(10)
    ['identity', 'flip_left_right', 'flip_up_down', 'rotate_90', 'rotate_180', 'rotate_270', 'transpose', \
'transverse', 'augment_8', 'augment_9']
    >>> check_draws(0, "--tta")
    Traceback (most recent call last):
    ...
    retina_scale.utils.errors.UserError: --tta must be a whole number >= 1 (1: no test-time augmentation); got 0
"""

from __future__ import annotations

from retina_scale.config import MAX_TTA_DRAWS
from retina_scale.utils.errors import UserError

SYMMETRIES = ("identity", "flip_left_right", "flip_up_down", "rotate_90", "rotate_180", "rotate_270", "transpose",
              "transverse")
"""The first eight views, in order: the dihedral group of the square."""

TTA_STRENGTH = 0.5
"""The training augmentation's strength (zoom range, shift) in views 8 and on: half of o_O's."""

TTA_SEED = 2015
"""The seed of the augmented views' draws: view ``k`` draws from ``(TTA_SEED, k)``."""


def check_draws(draws, name: str = "tta.draws") -> int:
    """``draws`` as an int, or a one-line :class:`UserError` naming ``name`` and the accepted values."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise UserError(f"{name} must be a whole number >= 1 (1: no test-time augmentation); got {draws!r}")
    if draws > MAX_TTA_DRAWS:
        raise UserError(f"{name} must be at most {MAX_TTA_DRAWS} (views per photo); got {draws!r}")
    return int(draws)


def view_names(draws: int) -> list[str]:
    """The names of the first ``draws`` views, in the order they are averaged."""
    return [SYMMETRIES[k] if k < len(SYMMETRIES) else f"augment_{k}" for k in range(check_draws(draws))]


def view_options(normalize: str | None) -> dict:
    """What an augmented view fills its corners with, as the training augmentation does: Graham-normalised
    images have a grey (128) background and colour noise inside 0.9 of the radius, others black."""
    graham = normalize == "graham"
    return {"fill": 128.0 if graham else 0.0, "mask_fraction": 0.9 if graham else 1.0}


def tta_view(images, view: int, fill: float = 0.0, mask_fraction: float = 1.0, strength: float = TTA_STRENGTH):
    """View number ``view`` of a float32 batch ``[B, S, S, 3]`` (square images), as a tf tensor."""
    import numpy as np
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    if view < len(SYMMETRIES):
        name = SYMMETRIES[view]
        if name.startswith("rotate_"):
            return tf.image.rot90(images, k=int(name.split("_")[1]) // 90)
        moves = {"identity": lambda x: x, "flip_left_right": lambda x: tf.reverse(x, [2]),
                 "flip_up_down": lambda x: tf.reverse(x, [1]),
                 "transpose": lambda x: tf.transpose(x, [0, 2, 1, 3]),
                 "transverse": lambda x: tf.reverse(tf.transpose(x, [0, 2, 1, 3]), [1, 2])}
        return moves[name](images)
    from retina_scale.config import AugmentConfig
    from retina_scale.data.augment import N_NORMAL, augment_drawn, draw

    uniforms, _ = draw(tf.constant([TTA_SEED, view], tf.int64))
    batch = tf.shape(images)[0]
    uniforms = tf.tile(uniforms[None, :], [batch, 1])  # the same transform for every photo
    normals = tf.zeros([batch, N_NORMAL], tf.float32)  # no colour noise (module docstring)
    return augment_drawn(images, uniforms, normals, AugmentConfig(strength=strength),
                         np.eye(3, dtype=np.float32), np.zeros(3, np.float32), fill=fill, mask_fraction=mask_fraction, jit=False)


def tta_scores(score_fn, images, draws: int, fill: float = 0.0, mask_fraction: float = 1.0):
    """The mean of ``score_fn`` over the first ``draws`` views of ``images``: float32 ``(batch,)``.

    ``score_fn(images) -> (batch,)`` or ``(batch, 1)`` scores (a tensor or an array). With ``draws`` 1 it is
    called once on ``images`` themselves and its scores come back unchanged.
    """
    import tensorflow as tf

    draws = check_draws(draws)
    if draws == 1:
        return score_fn(images)
    scores = [tf.reshape(tf.cast(score_fn(tta_view(images, k, fill, mask_fraction)), tf.float32), [-1])
              for k in range(draws)]
    return tf.reduce_mean(tf.stack(scores, axis=0), axis=0)
