"""Weights, forward multiply-adds and activations of a model, counted from its built Keras layers.

The counts follow the conventions of the paper's Fig. 4 (as far as its numbers let us infer them):

- weights: every trainable and non-trainable parameter (``model.count_params()``);
- multiply-adds: convolutions (``out_h * out_w * out_c * k_h * k_w * in_c``) and dense layers
  (``in * out``), per image, and the attention pooling's scoring (a 1x1 convolution to one channel:
  ``h * w * c``); biases, activations and pooling are not counted;
- activations: the output values, per image, of every layer that computes a new tensor
  (convolutions, pooling, dense, maxout). Element-wise layers that run in place (leaky ReLU, dropout,
  the input rescaling) and views (flatten) are not counted again.
"""

from __future__ import annotations

import dataclasses
import math

import keras

from retina_scale.models.layers import AttentionPool2D, GridMaxPool2D, GridRMSPool2D, Maxout, RMSPool2D
from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import atomic_path
from retina_scale.utils.tables import number, text_table

# Paper's Fig. 4, read off the figure: weights, forward multiply-adds, activations ("output memory").
PAPER_FIG4 = {
    "tiny": {"weights": 1.55e6, "macs": 75e6, "activations": 0.25e6},
    "small": {"weights": 3.55e6, "macs": 360e6, "activations": 1.05e6},
    "median": {"weights": 8e6, "macs": 1778e6, "activations": 4e6},
    "large": {"weights": 24e6, "macs": 7200e6, "activations": 17e6},
}

_COUNTED_OUTPUTS = (
    keras.layers.Conv2D,
    keras.layers.Dense,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    RMSPool2D,
    GridRMSPool2D,
    GridMaxPool2D,
    AttentionPool2D,
    Maxout,
)


@dataclasses.dataclass
class LayerComplexity:
    name: str
    kind: str
    output_shape: tuple
    weights: int
    macs: int
    activations: int


@dataclasses.dataclass
class ModelComplexity:
    """Totals and per-layer counts for one model at one input size."""

    model_name: str
    input_size: int
    layers: list[LayerComplexity]

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def activations(self) -> int:
        return sum(layer.activations for layer in self.layers)


def _chain(model: keras.Model) -> list[tuple[keras.layers.Layer, int]]:
    """The model's layers in order, each with the index (-1: the model's input) of the earlier layer whose output
    it takes, checking that it is a chain (as every stage is), or a chain with a branch off one of its layers
    (an auxiliary head beside the grade's)."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    sources = [model.inputs[0]]
    out = []
    for layer in layers:
        found = [i for i, tensor in enumerate(sources) if layer.input is tensor]
        if not found or (found[0] != len(sources) - 1 and layer is not layers[-1]):
            raise UserError(
                f"count_complexity handles chains of layers only (and a last layer branching off one of them); "
                f"layer {layer.name!r} does not take the previous layer's output"
            )
        out.append((layer, found[0] - 1))
        sources.append(layer.output)
    return out


def count_complexity(model: keras.Model, input_size: int | tuple[int, int]) -> ModelComplexity:
    """Counts weights, multiply-adds and activations of ``model`` for one image of ``input_size``.

    Shapes are propagated through the built layers with ``compute_output_shape``; nothing is run.

    Args:
        model: a chain-shaped functional model, such as ``build_model(...)`` returns (its last layer may
            branch off an earlier one, as the auxiliary head ``head_aux`` does).
        input_size: the image's side in pixels, or ``(height, width)``.
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    shapes = []  # the output shape of each layer so far
    rows = []
    for layer, source in _chain(model):
        shape = shapes[source] if source >= 0 else (1, height, width, model.inputs[0].shape[-1])
        out_shape = tuple(layer.compute_output_shape(shape))
        shapes.append(out_shape)
        macs = 0
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, in_c, out_c = layer.kernel.shape
            macs = math.prod(out_shape[1:3]) * out_c * kh * kw * in_c
        elif isinstance(layer, keras.layers.Dense):
            macs = shape[-1] * out_shape[-1]
        elif isinstance(layer, AttentionPool2D):  # its scoring is a 1x1 convolution to one channel
            macs = math.prod(shape[1:])
        rows.append(
            LayerComplexity(
                name=layer.name,
                kind=type(layer).__name__,
                output_shape=out_shape[1:],
                weights=int(layer.count_params()),
                macs=int(macs),
                activations=math.prod(out_shape[1:]) if isinstance(layer, _COUNTED_OUTPUTS) else 0,
            )
        )
    return ModelComplexity(model.name, height, rows)


def family_complexity(stages=("tiny", "small", "median", "large"), width: float = 1.0) -> list[dict]:
    """One record per stage at its own input size, with the paper's Fig. 4 figures beside ours.

    Returns plain dicts: ``stage``, ``input_size``, ``width``, ``weights``, ``macs``,
    ``activations``, and, for the paper's four stages, ``paper_*`` and ``*_ratio`` (ours / paper).
    """
    from retina_scale.models.convnet import build_model, get_stage

    records = []
    for stage in stages:
        spec = get_stage(stage)
        model = build_model(spec, width=width, kernel_initializer="zeros")
        counts = count_complexity(model, spec.input_size)
        record = {
            "stage": spec.name,
            "input_size": spec.input_size,
            "width": width,
            "weights": counts.weights,
            "macs": counts.macs,
            "activations": counts.activations,
        }
        paper = PAPER_FIG4.get(spec.name) if width == 1.0 else None
        for key in ("weights", "macs", "activations"):
            record[f"paper_{key}"] = paper[key] if paper else None
            record[f"{key}_ratio"] = round(record[key] / paper[key], 4) if paper else None
        records.append(record)
        keras.backend.clear_session()
    return records


def _millions(value) -> str:
    return number(None if value is None else value / 1e6, ",.3f") + ("" if value is None else " M")


def format_table(records: list[dict]) -> str:
    """A fixed-width table of ``family_complexity`` records for people."""
    header = ("stage", "input", "weights", "paper", "ratio", "mult-adds", "paper", "ratio",
              "activations", "paper", "ratio")
    rows = []
    for r in records:
        rows.append((
            r["stage"], str(r["input_size"]),
            _millions(r["weights"]), _millions(r["paper_weights"]), _ratio(r["weights_ratio"]),
            _millions(r["macs"]), _millions(r["paper_macs"]), _ratio(r["macs_ratio"]),
            _millions(r["activations"]), _millions(r["paper_activations"]), _ratio(r["activations_ratio"]),
        ))
    return text_table(header, rows, right=range(1, len(header)))


def _ratio(value) -> str:
    return number(value, ".3f")


def plot_complexity(records: list[dict], path) -> None:
    """Draws the paper's Fig. 4 analogue (log scale), ours as bars and the paper's as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = (("weights", "weights"), ("macs", "multiply-adds / image"), ("activations", "activations / image"))
    x = np.arange(len(records))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    bar = 0.26
    for i, (key, label) in enumerate(keys):
        ours = [r[key] for r in records]
        bars = ax.bar(x + (i - 1) * bar, ours, bar, label=f"{label} (ours)")
        paper = [r.get(f"paper_{key}") for r in records]
        pts = [(xi + (i - 1) * bar, p) for xi, p in zip(x, paper) if p]
        if pts:
            ax.scatter(*zip(*pts), marker="_", s=300, color="black", zorder=3,
                       label="paper's Fig. 4" if i == 0 else None)
        for rect, value in zip(bars, ours):
            ax.annotate(f"{value / 1e9:.2f}G" if value >= 1e9 else f"{value / 1e6:.3g}M", (rect.get_x() + rect.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{r['stage']}\n{r['input_size']} px" for r in records])
    ax.set_ylabel("count (log scale)")
    ax.set_title("Complexity of the network family per stage")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
