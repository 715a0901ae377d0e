"""The both-eye fusion network's inputs and its start (retina_scale.models.fusion)."""

import numpy as np

from retina_scale.models.fusion import build_fusion_net, pair_features, view_features


def _extract(images):
    """Features: per-channel means of the top-left quarter (they move with a flip); grade: their sum."""
    x = np.asarray(images)
    half = x.shape[1] // 2
    features = x[:, :half, :half, :].mean(axis=(1, 2))
    return features, features.sum(axis=1, keepdims=True)


def test_view_features_are_the_mean_and_spread_over_the_tta_views():
    from retina_scale.data.tta import tta_view

    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    features, scores = view_features(_extract, images, 3)
    per_view = [_extract(np.asarray(tta_view(images, k))) for k in range(3)]
    stacked = np.stack([f for f, _ in per_view])
    assert np.allclose(np.asarray(features), np.concatenate([stacked.mean(0), stacked.std(0)], axis=1), atol=1e-4)
    assert np.allclose(np.asarray(scores), np.mean([g.ravel() for _, g in per_view], axis=0), atol=1e-3)
    assert stacked.std(0).max() > 1  # the views differ: the spread is not trivially zero
    plain, plain_scores = view_features(_extract, images, 1)
    assert np.asarray(plain).shape == (2, 3) and np.allclose(np.asarray(plain_scores), _extract(images)[1].ravel())


def test_an_untrained_fusion_net_grades_as_the_single_eye_model():
    rng = np.random.default_rng(1)
    own, other = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    s_own, s_other = rng.uniform(0, 4, 5), rng.uniform(0, 4, 5)
    inputs = {k: np.asarray(v, np.float32) for k, v in pair_features(own, other, s_own, s_other).items()}
    assert inputs["pair"].shape == (5, 14)
    assert np.allclose(inputs["pair"][:, 8:12], np.abs(own - other), atol=1e-6)
    net = build_fusion_net(inputs["pair"], hidden=4, dropout=0.0, seed=0)
    assert np.allclose(np.asarray(net(inputs)).ravel(), s_own, atol=1e-5)
