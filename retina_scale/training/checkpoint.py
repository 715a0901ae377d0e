"""Epoch checkpoints by name: model weights keyed by layer name, optimizer state keyed by variable path,
and the random state of layers that draw (dropout's seed generator), so that a run resumed after ``kill -9``
draws the same dropout masks as one that was never stopped.

One ``.npz`` file per checkpoint, written atomically, so a run killed at any moment (even with
``kill -9``) finds either the previous checkpoint or the new one, never half of one. Restoring
assigns values in the strategy's cross-replica context, which updates every replica's copy.
"""

from __future__ import annotations

import numpy as np

from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import atomic_path


def save_checkpoint(model, optimizer, path) -> None:
    """Writes ``model``'s weights (by layer name), its layers' random states and ``optimizer``'s variables
    (by path)."""
    arrays = {}
    for layer in model.layers:
        for i, weight in enumerate(layer.weights):
            arrays[f"model/{layer.name}/{i}"] = np.asarray(weight)
        for i, state in enumerate(_random_states(layer)):
            arrays[f"rng/{layer.name}/{i}"] = np.asarray(state)
    if optimizer is not None:
        for variable in optimizer.variables:
            arrays[f"optimizer/{_slot_name(variable)}"] = np.asarray(variable)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def restore_checkpoint(model, optimizer, path) -> None:
    """Restores what ``save_checkpoint`` wrote; every model and optimizer variable must be there (a random
    state is restored when the checkpoint holds it).

    Raises:
        ValueError: the checkpoint does not fit this model or optimizer (names the first mismatch).
    """
    with np.load(path) as data:
        stored = {key: data[key] for key in data.files}
    for layer in model.layers:
        for i, weight in enumerate(layer.weights):
            key = f"model/{layer.name}/{i}"
            if key not in stored or stored[key].shape != tuple(weight.shape):
                raise UserError(f"checkpoint {path} does not fit the model: {key} missing or of another shape")
            weight.assign(stored[key])
        for i, state in enumerate(_random_states(layer)):
            key = f"rng/{layer.name}/{i}"
            if key in stored and stored[key].shape == tuple(state.shape):  # older checkpoints have none
                state.assign(stored[key])
    if optimizer is not None:
        for variable in optimizer.variables:
            key = f"optimizer/{_slot_name(variable)}"
            if key not in stored or stored[key].shape != tuple(variable.shape):
                raise UserError(f"checkpoint {path} does not fit the optimizer: {key} missing or of another shape")
            variable.assign(stored[key])


def _random_states(layer) -> list:
    """The state variables of ``layer``'s Keras seed generators (dropout's), which are not among its weights."""
    weights = {id(w) for w in layer.weights}
    return [v for v in layer.variables if id(v) not in weights and "seed_generator" in v.path]


def _slot_name(variable) -> str:
    """The variable's path without the optimizer's own name, which Keras numbers per process
    (``sgd``, ``sgd_1``, ...) and so differs between a run and its resumption."""
    return variable.path.split("/", 1)[-1]


def model_weights_from_checkpoint(path) -> dict[str, list[np.ndarray]]:
    """``{layer name: [arrays]}`` of a checkpoint, as ``transfer_weights`` takes them."""
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    with np.load(path) as data:
        for key in data.files:
            if key.startswith("model/"):
                _, name, index = key.split("/")
                out.setdefault(name, []).append((int(index), data[key]))
    return {name: [a for _, a in sorted(items, key=lambda t: t[0])] for name, items in out.items()}
