"""Weight transfer between stages of the ladder, keyed by layer name (never by position).

Algorithm 1 of the paper initialises stage ``i`` from stage ``i - 1``. Every layer of the new model
whose name exists in the old model with the same weight shapes is copied ("carried"); layers that
only the new stage has keep their fresh initialisation ("new"); layers present in both whose shapes
differ are reported with both shapes and keep their fresh initialisation ("shape mismatch").

The paper does not say what happens to the head's first dense layer, ``head_dense1``, whose input
grows with each stage (2x2 x 128 features at tiny, 2x2 x 256 at small, ...). We re-initialise it.
Its input at the new stage is the RMS-pooled output of the *new* block, whose channels have no
counterpart in the old model: copying the old kernel into a slice of the new one would wire
weights learned for block-3 features to unrelated block-4 features, and tiling or zero-padding it
would pretend to preserve a function that the new block has already changed. A fresh orthogonal
kernel is the honest start; everything after it (maxout, ``head_dense2``, ``head_grade``) and the
whole shared trunk are carried, so only one layer of the network starts from scratch. The Kaggle
o_O solution, the paper's baseline, transferred by name where shapes matched: the same rule.

Keras 3 loads ``.weights.h5`` files by position, not by name, which silently scrambles weights
between models of different depth; :func:`transfer_weights` also takes a ``{layer name: [arrays]}``
mapping, as ``retina_scale.training.checkpoint.model_weights_from_checkpoint`` reads it from an
epoch checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np

from retina_scale.utils.tables import text_table

CARRIED = "carried"
NEW = "new"
MISMATCH = "shape mismatch"
DROPPED = "not in destination"


@dataclasses.dataclass
class LayerTransfer:
    """What happened to one layer's weights."""

    layer: str
    status: str
    src_shapes: list[tuple[int, ...]] | None
    dst_shapes: list[tuple[int, ...]] | None
    params: int


@dataclasses.dataclass
class TransferReport:
    """Per-layer outcome of ``transfer_weights``, readable as a table and as JSON."""

    src_name: str
    dst_name: str
    layers: list[LayerTransfer]

    def by_status(self, status: str) -> list[str]:
        return [entry.layer for entry in self.layers if entry.status == status]

    @property
    def carried(self) -> list[str]:
        return self.by_status(CARRIED)

    @property
    def new(self) -> list[str]:
        return self.by_status(NEW)

    @property
    def mismatched(self) -> list[str]:
        return self.by_status(MISMATCH)

    @property
    def dropped(self) -> list[str]:
        return self.by_status(DROPPED)

    def summary(self) -> dict:
        dst = [e for e in self.layers if e.status != DROPPED]
        carried = sum(e.params for e in dst if e.status == CARRIED)
        total = sum(e.params for e in dst)
        return {
            "carried_layers": len(self.carried),
            "new_layers": len(self.new),
            "mismatched_layers": len(self.mismatched),
            "dropped_layers": len(self.dropped),
            "carried_params": carried,
            "dst_params": total,
            "carried_fraction": round(carried / total, 6) if total else 0.0,
        }

    def to_dict(self) -> dict:
        return {
            "src": self.src_name,
            "dst": self.dst_name,
            "summary": self.summary(),
            "layers": [
                {
                    "layer": e.layer,
                    "status": e.status,
                    "src_shapes": [list(s) for s in e.src_shapes] if e.src_shapes is not None else None,
                    "dst_shapes": [list(s) for s in e.dst_shapes] if e.dst_shapes is not None else None,
                    "params": e.params,
                }
                for e in self.layers
            ],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def format_table(self) -> str:
        def shapes(value):
            return "-" if value is None else ", ".join("x".join(map(str, s)) for s in value)

        rows = [(e.layer, e.status, shapes(e.src_shapes), shapes(e.dst_shapes), f"{e.params:,}")
                for e in self.layers]
        lines = [text_table(("layer", "status", "from", "to", "params"), rows, right=(4,),
                            title=f"Weight transfer {self.src_name} -> {self.dst_name}")]
        s = self.summary()
        lines.append(
            f"{s['carried_layers']} carried, {s['new_layers']} new, {s['mismatched_layers']} re-initialised "
            f"(shape mismatch), {s['dropped_layers']} not in destination; "
            f"{s['carried_params']:,} of {s['dst_params']:,} weights carried ({100 * s['carried_fraction']:.1f} %)"
        )
        return "\n".join(lines)


def named_weights(model) -> dict[str, list[np.ndarray]]:
    """``{layer name: [arrays]}`` for every layer of ``model`` that has weights."""
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


def transfer_weights(src, dst, *, skip=()) -> TransferReport:
    """Copies weights from ``src`` into ``dst`` wherever layer name and weight shapes match.

    Args:
        src: the previous stage's model, or a ``{layer name: [arrays]}`` mapping (as returned by
            ``named_weights`` or read from a checkpoint).
        dst: the new stage's model (built; its own initialisation stays where nothing is carried).
        skip: layer names never to copy (reported as new).

    Returns:
        A ``TransferReport`` listing every weighted layer of ``dst`` (carried, new or shape
        mismatch, with both shapes) and every weighted layer of ``src`` that ``dst`` lacks.
    """
    if isinstance(src, Mapping):
        source, src_name = dict(src), "saved weights"
    else:
        source, src_name = named_weights(src), src.name
    skip = set(skip)
    entries = []
    dst_names = set()
    for layer in dst.layers:
        if not layer.weights:
            continue
        dst_names.add(layer.name)
        dst_shapes = [tuple(w.shape) for w in layer.weights]
        params = int(sum(np.prod(s) for s in dst_shapes))
        if layer.name not in source or layer.name in skip:
            entries.append(LayerTransfer(layer.name, NEW, None, dst_shapes, params))
            continue
        arrays = source[layer.name]
        src_shapes = [tuple(a.shape) for a in arrays]
        if src_shapes != dst_shapes:
            entries.append(LayerTransfer(layer.name, MISMATCH, src_shapes, dst_shapes, params))
            continue
        layer.set_weights(arrays)
        entries.append(LayerTransfer(layer.name, CARRIED, src_shapes, dst_shapes, params))
    for name, arrays in source.items():
        if name not in dst_names and arrays:
            shapes = [tuple(a.shape) for a in arrays]
            entries.append(LayerTransfer(name, DROPPED, shapes, None, int(sum(np.prod(s) for s in shapes))))
    return TransferReport(src_name, dst.name, entries)
