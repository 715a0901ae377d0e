"""The stage's learning rate without training: o_O's step schedule, linear scaling, the NaN policy."""

import pytest

from retina_scale.config import NanPolicy, OptimConfig, load_train_config
from retina_scale.training.optim import NanDecision, after_nan_loss, lr_at, scaled_learning_rate, stage_learning_rate


def test_step_schedule_drops_at_the_ceiling_of_lr_drop_at_times_epochs():
    optim = OptimConfig(lr=3e-3, lr_drop_at=0.8, lr_drop_factor=0.1)
    # 10 epochs: ceil(8.0) = 8, so 0-based epochs 8 and 9 drop.
    assert [lr_at(optim, 3e-3, 1.0, e, 10) for e in range(10)] == pytest.approx([3e-3] * 8 + [3e-4] * 2)
    # 5 epochs at 0.5: ceil(2.5) = 3, so epochs 3 and 4 drop.
    half = OptimConfig(lr_drop_at=0.5, lr_drop_factor=0.1)
    assert [lr_at(half, 1e-2, 1.0, e, 5) for e in range(5)] == pytest.approx([1e-2] * 3 + [1e-3] * 2)
    # 3 epochs at 0.8: ceil(2.4) = 3, past the last epoch: no drop at all.
    assert [lr_at(optim, 3e-3, 1.0, e, 3) for e in range(3)] == pytest.approx([3e-3] * 3)


def test_a_one_epoch_stage_never_drops():
    at_start = OptimConfig(lr_drop_at=0.0, lr_drop_factor=0.1)
    assert lr_at(at_start, 3e-3, 1.0, 0, 1) == pytest.approx(3e-3)
    assert lr_at(at_start, 3e-3, 1.0, 0, 2) == pytest.approx(3e-4)  # two epochs: ceil(0) = 0 drops at once


def test_lr_scale_multiplies_before_and_after_the_drop():
    optim = OptimConfig(lr_drop_at=0.8, lr_drop_factor=0.1)
    assert lr_at(optim, 0.01, 0.25, 0, 10) == pytest.approx(0.0025)
    assert lr_at(optim, 0.01, 0.25, 9, 10) == pytest.approx(0.00025)


def test_linear_learning_rate_scaling():
    assert scaled_learning_rate(3e-3, 256, 128) == pytest.approx(6e-3)
    assert scaled_learning_rate(3e-3, 256, None) == 3e-3


def test_stage_learning_rate_is_the_stage_lr_else_optim_lr_scaled_to_the_batch():
    config = load_train_config("quick", ["stages=[{stage: tiny, lr: 0.001}, {stage: small}]", "optim.lr=0.004",
                                         "global_batch_size=128", "optim.reference_batch_size=64"])
    assert stage_learning_rate(config, config.stages[0]) == pytest.approx(0.002)
    assert stage_learning_rate(config, config.stages[1]) == pytest.approx(0.008)


def test_nan_policy_reloads_with_a_lower_rate_until_its_events_are_spent():
    policy = NanPolicy(max_events=3, lr_factor=0.5)
    assert after_nan_loss(0, 1.0, policy) == NanDecision("reload", 1, 0.5)
    assert after_nan_loss(1, 0.5, policy) == NanDecision("reload", 2, 0.25)
    assert after_nan_loss(2, 0.25, policy) == NanDecision("reload", 3, 0.125)
    assert after_nan_loss(3, 0.125, policy) == NanDecision("fail", 4, 0.125)


def test_nan_policy_without_events_fails_at_once():
    assert after_nan_loss(0, 1.0, NanPolicy(max_events=0, lr_factor=0.5)) == NanDecision("fail", 1, 1.0)
    once = after_nan_loss(0, 0.8, NanPolicy(max_events=1, lr_factor=0.1))
    assert (once.action, once.nan_events, once.lr_scale) == ("reload", 1, pytest.approx(0.08))
