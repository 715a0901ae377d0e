"""Test-time augmentation: one view is the plain prediction exactly; more views are the hand-made average of
flipped and rotated copies; the augmented views are fixed, the same for every photo; bad counts are refused."""

import numpy as np
import pytest
import tensorflow as tf

from retina_scale.data.tta import SYMMETRIES, check_draws, tta_scores, tta_view, view_names, view_options
from retina_scale.utils.errors import UserError

SIZE = 24


def _images(n=3, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


# A score that sees where things are (a ramp across rows and columns, weighted by channel): every view changes it.
_WEIGHTS = (np.arange(SIZE)[:, None, None] * 1.0 + 3.0 * np.arange(SIZE)[None, :, None]
            + 7.0 * np.arange(3)[None, None, :]).astype(np.float32)


def _score(images):
    return tf.reduce_mean(tf.convert_to_tensor(images) * _WEIGHTS, axis=[1, 2, 3])


def _score_np(images):
    return (images.astype(np.float64) * _WEIGHTS).mean(axis=(1, 2, 3))


def test_one_view_is_the_plain_prediction_itself():
    images = _images()
    plain = np.asarray([0.25, 1.5, 3.75], np.float32)
    got = tta_scores(lambda x: plain, images, 1)
    assert got is plain  # not recomputed, not averaged: the same array
    np.testing.assert_array_equal(np.asarray(tta_scores(_score, images, 1)), _score(images).numpy())


def test_six_views_are_the_hand_averaged_flips_and_rotations():
    images = _images()
    by_hand = [images, images[:, :, ::-1], images[:, ::-1, :], np.rot90(images, 1, axes=(1, 2)),
               np.rot90(images, 2, axes=(1, 2)), np.rot90(images, 3, axes=(1, 2))]
    want = np.mean([_score_np(v) for v in by_hand], axis=0)
    got = tta_scores(_score, images, 6).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.ptp([_score_np(v)[0] for v in by_hand]) > 1.0  # the views do differ: the average is not one of them


def test_eight_views_are_the_symmetries_of_the_square():
    images = _images(1)
    views = [tta_view(images, k).numpy()[0] for k in range(8)]
    by_hand = [np.rot90(m, k) for m in (images[0], images[0].transpose(1, 0, 2)) for k in range(4)]
    for view in views:  # each view is one of the eight, exactly, and no two views are the same
        assert sum(np.array_equal(view, h) for h in by_hand) == 1
    assert len({v.tobytes() for v in views}) == 8
    assert view_names(8) == list(SYMMETRIES) and view_names(8)[0] == "identity"


def test_augmented_views_are_fixed_and_the_same_for_every_photo():
    images = _images(3, seed=1)
    first, again = tta_view(images, 8).numpy(), tta_view(images, 8).numpy()
    np.testing.assert_array_equal(first, again)
    alone = tta_view(images[2:], 8).numpy()  # one photo alone gets the transform it gets in a batch
    np.testing.assert_allclose(alone[0], first[2], atol=1e-3)
    assert np.abs(first - images).mean() > 5 and np.abs(tta_view(images, 9).numpy() - first).mean() > 5
    assert first.min() >= 0 and first.max() <= 255
    # Graham-normalised images: the corners brought in from outside the square are grey (128), as in training.
    flat = np.full((1, SIZE, SIZE, 3), 128.0, np.float32)
    grey = tta_view(flat, 8, **view_options("graham")).numpy()
    np.testing.assert_allclose(grey, 128.0, atol=1e-3)
    assert tta_view(flat, 8, **view_options("none")).numpy().min() == 0.0  # black corners otherwise
    # Ten views: the mean over the eight symmetries and the two augmented views, each as tta_view makes it.
    want = np.mean([_score_np(tta_view(images, k).numpy()) for k in range(10)], axis=0)
    np.testing.assert_allclose(tta_scores(_score, images, 10).numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("draws", [0, -1, True, 1.5, "2", 10_000])
def test_bad_view_counts_are_one_line_errors(draws):
    with pytest.raises(UserError) as caught:
        check_draws(draws, "--tta")
    message = str(caught.value)
    assert message.startswith("--tta must be") and "\n" not in message and repr(draws) in message
