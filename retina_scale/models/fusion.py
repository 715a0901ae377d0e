"""The both-eye fusion network and what feeds it (issue 17), shared by the trainer
(``retina_scale.training.fusion``) and the export's ``predict_patient`` signature.

An eye's features are a stage's penultimate activations (:data:`FEATURE_LAYER`); with test-time augmentation,
their mean and standard deviation over the views. The network's input for one eye is
``[own features, fellow features, |difference|, own grade, fellow grade]`` (:func:`pair_features`); it predicts
the eye's grade as its single-eye grade plus a correction (:func:`build_fusion_net`).

Example:
    >>> import numpy as np
    >>> inputs = pair_features(np.ones((2, 3)), np.zeros((2, 3)), np.array([1.0, 2.0]), np.array([0.0, 4.0]))
    >>> tuple(inputs["pair"].shape), np.asarray(inputs["own"]).ravel().tolist()
    ((2, 11), [1.0, 2.0])
"""

from __future__ import annotations

import numpy as np

FEATURE_LAYER = "head_maxout2"
"""A stage's penultimate layer: its activations are an eye's features."""


def feature_model(model):
    """``model`` (a stage's ``RetinaConvNet``) with two outputs: its penultimate activations and its grade."""
    import keras

    from retina_scale.models.convnet import grade_output

    return keras.Model(model.inputs, [model.get_layer(FEATURE_LAYER).output, grade_output(model.outputs)])


def view_features(extract, images, draws: int, fill: float = 0.0, mask_fraction: float = 1.0):
    """``(features, scores)`` of a batch: ``extract(images) -> (features, grades)`` on each of the first ``draws``
    TTA views (:mod:`retina_scale.data.tta`); features are the views' mean then standard deviation side by side
    (the plain features with one view), scores the mean grade, float32 ``(batch,)``."""
    import keras

    from retina_scale.data.tta import tta_view

    def run(view):
        features, grades = extract(view)
        return keras.ops.cast(features, "float32"), keras.ops.reshape(keras.ops.cast(grades, "float32"), (-1,))

    if draws == 1:
        return run(images)
    views = [run(tta_view(images, k, fill, mask_fraction)) for k in range(draws)]
    features = keras.ops.stack([f for f, _ in views])
    scores = keras.ops.mean(keras.ops.stack([g for _, g in views]), axis=0)
    return keras.ops.concatenate([keras.ops.mean(features, axis=0), keras.ops.std(features, axis=0)], axis=1), scores


def pair_features(f_own, f_other, s_own, s_other):
    """The fusion network's inputs for eyes paired row by row (arrays or tensors): ``pair``, i.e.
    ``[own features, fellow features, |difference|, own grade, fellow grade]``, and ``own`` grade ``(n, 1)``."""
    import keras

    s_own, s_other = keras.ops.reshape(s_own, (-1, 1)), keras.ops.reshape(s_other, (-1, 1))
    pair = keras.ops.concatenate([f_own, f_other, keras.ops.abs(f_own - f_other), s_own, s_other], axis=1)
    return {"pair": pair, "own": s_own}


# ------------------------------------------------------------------------------------------ network
def build_fusion_net(train_pairs: np.ndarray, hidden: int, dropout: float, seed: int):
    """The fusion network: inputs ``pair`` (standardised by the training pairs' mean and variance, kept as
    weights) and ``own`` (the single-eye grade); output the grade ``own + correction``, the correction's layer
    starting at zero."""
    import keras

    pair = keras.Input((train_pairs.shape[1],), name="pair")
    own = keras.Input((1,), name="own")
    norm = keras.layers.Normalization(name="fusion_standardise")
    norm.adapt(train_pairs)
    x = keras.layers.Dense(hidden, activation="relu", name="fusion_hidden",
                           kernel_initializer=keras.initializers.GlorotUniform(seed))(norm(pair))
    x = keras.layers.Dropout(dropout, seed=seed, name="fusion_dropout")(x)
    correction = keras.layers.Dense(1, kernel_initializer="zeros", name="fusion_correction")(x)
    grade = keras.layers.Add(name="fusion_grade")([own, correction])
    return keras.Model({"pair": pair, "own": own}, grade, name="fusion")


