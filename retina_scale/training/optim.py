"""The optimiser of a stage and its learning rate: linear batch-size scaling and o_O's step schedule."""

from __future__ import annotations

import math


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


def lr_at(optim, base_lr: float, lr_scale: float, epoch: int, epochs: int) -> float:
    """The learning rate of 0-based ``epoch`` of a stage of ``epochs``: ``base_lr * lr_scale`` (the NaN
    policy's cuts), times ``optim.lr_drop_factor`` from ``ceil(optim.lr_drop_at * epochs)`` on (o_O's step
    schedule; a one-epoch stage never drops)."""
    drop = optim.lr_drop_factor if epochs > 1 and epoch >= math.ceil(optim.lr_drop_at * epochs) else 1.0
    return float(base_lr * lr_scale * drop)
