"""The optimiser of a stage and its learning rate: linear batch-size scaling, o_O's step schedule and
what a non-finite training loss does to the rate (the NaN policy)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal


def make_optimizer(optim, lr: float | None = None, weight_decay: float | None = None,
                   momentum: float | None = None):
    """The optimizer of ``optim`` (an ``OptimConfig``), with optional overrides (a search trial's values)."""
    import keras

    kwargs = {"learning_rate": optim.lr if lr is None else lr}
    if optim.clipnorm:
        kwargs["clipnorm"] = optim.clipnorm
    wd = optim.weight_decay if weight_decay is None else weight_decay
    if optim.name == "sgd":
        return keras.optimizers.SGD(momentum=optim.momentum if momentum is None else momentum,
                                    nesterov=optim.nesterov, weight_decay=wd or None, **kwargs)
    if optim.name == "adam":
        return keras.optimizers.Adam(weight_decay=wd or None, **kwargs)
    return keras.optimizers.AdamW(weight_decay=wd or 0.004, **kwargs)


def scaled_learning_rate(base_lr: float, global_batch_size: int, reference_batch_size: int | None) -> float:
    """Linear learning-rate scaling: ``base_lr * global / reference`` (no scaling if reference is None)."""
    if reference_batch_size in (None, 0):
        return base_lr
    return base_lr * global_batch_size / reference_batch_size


def stage_learning_rate(config, stage_cfg) -> float:
    """The learning rate a stage trains with unless a search picks one: the stage's own ``lr`` (else
    ``optim.lr``), scaled linearly to the global batch size when ``optim.reference_batch_size`` is set."""
    base = stage_cfg.lr if stage_cfg.lr is not None else config.optim.lr
    return scaled_learning_rate(base, config.global_batch_size, config.optim.reference_batch_size)


def lr_at(optim, base_lr: float, lr_scale: float, epoch: int, epochs: int) -> float:
    """The learning rate of 0-based ``epoch`` of a stage of ``epochs``: ``base_lr * lr_scale`` (the NaN
    policy's cuts), times ``optim.lr_drop_factor`` from ``ceil(optim.lr_drop_at * epochs)`` on (o_O's step
    schedule; a one-epoch stage never drops).

    Example (drop at 0.8 of 10 epochs, by 0.1):
        >>> from retina_scale.config import OptimConfig
        >>> optim = OptimConfig(lr_drop_at=0.8, lr_drop_factor=0.1)
        >>> [round(lr_at(optim, 3e-3, 1.0, e, 10), 6) for e in (0, 7, 8, 9)]
        [0.003, 0.003, 0.0003, 0.0003]
    """
    drop = optim.lr_drop_factor if epochs > 1 and epoch >= math.ceil(optim.lr_drop_at * epochs) else 1.0
    return float(base_lr * lr_scale * drop)


@dataclasses.dataclass(frozen=True)
class NanDecision:
    """What to do after an epoch whose training loss was not finite (see :func:`after_nan_loss`).

    ``action`` is ``"reload"`` (restore the last good checkpoint, go on with the learning rate times
    ``lr_scale``) or ``"fail"`` (the policy's events are spent: stop with a ``TrainingError``);
    ``nan_events`` counts this event too.
    """

    action: Literal["reload", "fail"]
    nan_events: int
    lr_scale: float


def after_nan_loss(nan_events: int, lr_scale: float, policy) -> NanDecision:
    """The NaN policy: the stage's ``nan_events`` so far and its ``lr_scale``, and a ``NanPolicy``
    (``max_events``, ``lr_factor``) decide what a new non-finite loss does.

    Up to ``max_events`` events, each one reloads and multiplies ``lr_scale`` by ``lr_factor``; the
    next one fails (``lr_scale`` unchanged).

        >>> from retina_scale.config import NanPolicy
        >>> after_nan_loss(0, 1.0, NanPolicy(max_events=3, lr_factor=0.5))
        NanDecision(action='reload', nan_events=1, lr_scale=0.5)
        >>> after_nan_loss(3, 0.125, NanPolicy(max_events=3, lr_factor=0.5))
        NanDecision(action='fail', nan_events=4, lr_scale=0.125)
    """
    events = nan_events + 1
    if events > policy.max_events:
        return NanDecision("fail", events, lr_scale)
    return NanDecision("reload", events, lr_scale * policy.lr_factor)
