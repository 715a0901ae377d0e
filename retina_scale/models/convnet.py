"""The paper's network family (Li et al., IJCNN 2019, Table I), generated from one builder.

Every stage is the previous stage plus one max-pooling + convolution block, so that the last feature
map is 7x7 at each stage's own input size (112, 224, 448, 896, and 1792 for a fifth stage):

===========  =====  ==================================================================
stage        input  trunk
===========  =====  ==================================================================
tiny         112    C5-32/2, C3-32, MP, C5-64/2, C3-64, C3-64, MP, C3-128 x3
small        224    tiny + MP, C3-256 x3
median       448    small + MP, C3-512 x2
large        896    median + MP, C3-1024 x2
xlarge       1792   large + MP, C3-2048 x2 (our extension: channels keep doubling)
===========  =====  ==================================================================

Head (every stage): RMS pooling to 2x2, flatten, Dense-1024, Maxout-512, Dropout, Dense-1024,
Maxout-512, one linear unit (the grade as a regression).

Options that depart from the paper (ours, issue 14; the defaults are the paper's design):

- ``head_pooling``: ``"rms"`` (the paper's ``GridRMSPool2D(grid=2)``, layer ``head_rmspool``), ``"max"``
  (``GridMaxPool2D(grid=2)``, layer ``head_maxpool``: the same 2x2 grid, so the head's input has the same
  shape, 2x2 x channels, and every head layer has the same weights' shapes as with ``rms``) or
  ``"attention"`` (``AttentionPool2D``, layer ``head_attnpool``: one pooled vector, so ``head_dense1``'s input
  is the channels alone, a quarter of the grid's; the pooling's own scoring kernel has one weight per channel
  of the last block). Between stages the poolings transfer as the head always does: ``head_dense1`` (and
  ``head_attnpool``, whose channels grow with the stage too) start afresh, everything after them is carried.
- ``aux``: ``"none"`` (one output), or an auxiliary output ``head_aux`` beside ``head_grade``, on the same
  features (the second maxout): 4 ordinal logits (``"ordinal"``: ``grade > k`` for k = 0..3) or 5 class
  logits (``"classification"``). The model then returns ``[grade, aux logits]``; :func:`grade_output` picks
  the grade, and :func:`regression_model` gives the same network without ``head_aux`` (what exports,
  evaluation and explanations use). ``head_aux`` has the same shape at every stage, so it is carried.

Layer names are the key for weight transfer between stages (``retina_scale.models.transfer``), so
they are stable: ``block3_conv2`` is the same layer in every stage that has it.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import keras

from retina_scale.config import (  # noqa: F401
    AUX_LOSSES,
    BASE_SIZE,
    HEAD_POOLINGS,
    NUM_GRADES,
    STAGE_NAMES,
    stage_index,
    stage_name,
    stage_size,
)
from retina_scale.models.layers import AttentionPool2D, GridMaxPool2D, GridRMSPool2D, Maxout, RGBRescale
from retina_scale.utils.errors import UserError

FEATURE_MAP_SIZE = 7
"""Height and width of the last feature map at every stage's own input size."""

AUX_UNITS = {"ordinal": NUM_GRADES - 1, "classification": NUM_GRADES}
"""Logits of the auxiliary output ``head_aux``: one per ``grade > k`` (k = 0..3), or one per grade."""


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolution: ``kernel`` x ``kernel``, ``stride``, "same" padding, leaky ReLU."""

    kernel: int
    stride: int


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """A block of convolutions with the same number of filters."""

    index: int
    filters: int
    convs: tuple[ConvSpec, ...]


_C5S2 = ConvSpec(5, 2)
_C3 = ConvSpec(3, 1)
# Table I of the paper, block by block. Blocks after the sixth are our extension (see block_spec).
_TABLE_I_BLOCKS = (
    (32, (_C5S2, _C3)),
    (64, (_C5S2, _C3, _C3)),
    (128, (_C3, _C3, _C3)),
    (256, (_C3, _C3, _C3)),
    (512, (_C3, _C3)),
    (1024, (_C3, _C3)),
)


def block_spec(index: int) -> BlockSpec:
    """The ``index``-th block (1-based) of the family.

    Blocks 1-6 are the paper's; block ``k > 6`` doubles the filters of block ``k - 1`` and has two
    3x3 convolutions, as blocks 5 and 6 do.
    """
    if index < 1:
        raise UserError(f"block index must be >= 1; got {index}")
    if index <= len(_TABLE_I_BLOCKS):
        filters, convs = _TABLE_I_BLOCKS[index - 1]
    else:
        filters = _TABLE_I_BLOCKS[-1][0] * 2 ** (index - len(_TABLE_I_BLOCKS))
        convs = (_C3, _C3)
    return BlockSpec(index, filters, convs)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """A stage of the ladder: its name, the input size it is designed for, and its depth.

    Stage ``i`` (1-based) has ``i + 2`` blocks and is designed for ``112 * 2**(i - 1)`` pixels.
    """

    index: int

    @property
    def name(self) -> str:
        return stage_name(self.index)

    @property
    def input_size(self) -> int:
        return stage_size(self.index)

    @property
    def num_blocks(self) -> int:
        return self.index + 2

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        return tuple(block_spec(i) for i in range(1, self.num_blocks + 1))


def get_stage(stage) -> StageSpec:
    """Resolves a stage given by name (``"tiny"``), input size (``448``) or ``StageSpec``.

    Raises:
        ValueError: naming the accepted names and sizes.
    """
    if isinstance(stage, StageSpec):
        return stage
    return StageSpec(stage_index(stage))


def scaled(units: int, width: float) -> int:
    """``units`` scaled by the width multiplier, at least 1."""
    return max(1, int(round(units * width)))


def _initializer(kind, seed, layer_name, gain=1.0):
    if kind != "orthogonal":
        return keras.initializers.get(kind)
    # One seed per layer, derived from the layer's name: the same stage built twice with the same
    # seed is identical, and a layer gets the same initial weights in every stage that has it.
    layer_seed = None if seed is None else (seed * 1_000_003 + zlib.crc32(layer_name.encode())) % 2**31
    return keras.initializers.Orthogonal(gain=gain, seed=layer_seed)


def build_model(stage="tiny", width: float = 1.0, **kwargs) -> "RetinaConvNet":
    """Builds one stage of the family; the same as ``RetinaConvNet(stage, width, **kwargs)``.

    Example:
    >>> import numpy as np
    >>> model = build_model("tiny", width=0.25, seed=0)
    >>> tuple(model(np.zeros((2, 112, 112, 3))).shape)
    (2, 1)
    """
    return RetinaConvNet(stage, width, **kwargs)


@keras.saving.register_keras_serializable(package="retina_scale")
class RetinaConvNet(keras.Model):
    """One stage of the family: a Keras functional model on ``Input((None, None, 3))``.

    The model takes float RGB images with values in ``[0, 255]`` of any height and width (at least
    the stage's input size divided by 16, so that the last feature map is 2x2 or larger) and returns
    one continuous grade per image, shape ``(batch, 1)`` (with an auxiliary head, ``[grade, aux logits]``).
    At the stage's own input size it is exactly the paper's design (with the default ``head_pooling`` and
    ``aux``); at other sizes the head's grid pooling adapts its window (see ``GridRMSPool2D``). Its config
    is its constructor's arguments (as keras-hub models do), so a ``.keras`` file records which stage and
    width it is.

    Args:
        stage: ``"tiny"``, ``"small"``, ``"median"``, ``"large"``, ``"xlarge"``, ``"stageN"``, an
            input size (112, 224, ...) or a ``StageSpec``.
        width: width multiplier for every convolution and dense layer (1.0 = the paper's widths);
            thin nets (e.g. 0.25) are for tests and CPU demos.
        dropout: dropout rate between the two maxout layers of the head.
        leaky_slope: negative slope of the leaky ReLUs (0.01, as in the Kaggle o_O solution).
        l2: L2 penalty on every kernel (the paper's 5e-4; 0 disables it).
        head_units: maxout units of each head layer (the paper's 512, before ``width``); each dense
            layer has twice as many.
        kernel_initializer: ``"orthogonal"`` (the paper's Algorithm 1, with the leaky-ReLU gain in
            the convolutions) or any Keras initializer name (e.g. ``"zeros"`` for a quick
            shape-only build).
        seed: seed of the orthogonal initialisation (per layer, derived from the layer name).
        min_filters: a floor on every convolution block's filters after ``width`` (0: none), e.g. 16 so
            that a thin net's first blocks feed the CPU's vector units; layer names stay the same, so
            stages built with the same floor transfer weights as before.
        head_pooling: ``"rms"`` (the paper's), ``"max"`` or ``"attention"`` (ours; see the module docstring).
        aux: ``"none"`` (the paper's one output), ``"ordinal"`` or ``"classification"``: an auxiliary
            output ``head_aux``, and the model returns ``[grade, aux logits]`` (see the module docstring).
        name: the model's name; defaults to ``retina_<stage>``.

    Example:
    >>> import numpy as np
    >>> model = RetinaConvNet("small", width=0.25, seed=0)
    >>> model.input_size, tuple(model(np.zeros((1, 300, 200, 3))).shape)
    (224, (1, 1))
    """

    def __init__(
        self,
        stage="tiny",
        width: float = 1.0,
        *,
        dropout: float = 0.5,
        leaky_slope: float = 0.01,
        l2: float = 0.0,
        head_units: int = 512,
        kernel_initializer="orthogonal",
        seed: int | None = None,
        min_filters: int = 0,
        head_pooling: str = "rms",
        aux: str = "none",
        name: str | None = None,
        **kwargs,
    ):
        spec = get_stage(stage)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise UserError(f"width must be a positive number (1.0 = the paper's widths); got {width!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1); got {dropout!r}")
        if leaky_slope < 0:
            raise UserError(f"leaky_slope must be >= 0; got {leaky_slope!r}")
        if l2 < 0:
            raise UserError(f"l2 must be >= 0; got {l2!r}")
        if isinstance(min_filters, bool) or not isinstance(min_filters, int) or min_filters < 0:
            raise UserError(f"min_filters must be a whole number >= 0 (0: no floor); got {min_filters!r}")
        if head_pooling not in HEAD_POOLINGS:
            raise UserError(f"head_pooling must be one of {', '.join(HEAD_POOLINGS)}; got {head_pooling!r}")
        if aux not in AUX_LOSSES:
            raise UserError(f"aux must be one of {', '.join(AUX_LOSSES)}; got {aux!r}")
        inputs, outputs = _build_graph(spec, width, dropout, leaky_slope, l2, head_units,
                                       kernel_initializer, seed, min_filters, head_pooling, aux)
        super().__init__(inputs, outputs, name=name or f"retina_{spec.name}", **kwargs)
        self.stage = spec
        self.width = float(width)
        self.head_pooling = head_pooling
        self.aux = aux
        self._args = dict(
            stage=spec.name, width=float(width), dropout=dropout, leaky_slope=leaky_slope, l2=l2,
            head_units=head_units, seed=seed,
            kernel_initializer=kernel_initializer if isinstance(kernel_initializer, str) else "orthogonal",
        )
        if min_filters:  # absent when off, so configs (and .keras files) of earlier models stay as they were
            self._args["min_filters"] = int(min_filters)
        if head_pooling != "rms":  # the same: absent at the paper's design
            self._args["head_pooling"] = head_pooling
        if aux != "none":
            self._args["aux"] = aux

    @property
    def input_size(self) -> int:
        """The input size this stage is designed for."""
        return self.stage.input_size

    def __call__(self, inputs, *args, **kwargs):
        RGBRescale.check_shape(getattr(inputs, "shape", None))
        return super().__call__(inputs, *args, **kwargs)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, **self._args}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def grade_output(outputs):
    """The grade ``(batch, 1)`` among a model's outputs: the outputs themselves for a one-output model, the first
    of ``[grade, aux logits]`` for a model with an auxiliary head."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def regression_model(model):
    """``model`` itself unless it has an auxiliary head; else the same network without ``head_aux``: a
    ``RetinaConvNet`` of the same configuration (``aux="none"``, built under Keras's current dtype policy)
    holding ``model``'s weights layer by layer, whose one output is the grade.

    Example:
    >>> import numpy as np
    >>> both = build_model("tiny", width=0.125, seed=0, aux="ordinal")
    >>> grade = regression_model(both)
    >>> x = np.zeros((1, 112, 112, 3))
    >>> len(both(x)), bool(np.array_equal(np.asarray(grade(x)), np.asarray(both(x)[0])))
    (2, True)
    """
    if getattr(model, "aux", "none") == "none":
        return model
    config = {k: v for k, v in model.get_config().items() if k != "aux"}
    copy = RetinaConvNet.from_config(config)
    for layer in copy.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return copy


_POOLINGS = {"rms": (GridRMSPool2D, "head_rmspool"), "max": (GridMaxPool2D, "head_maxpool"),
             "attention": (AttentionPool2D, "head_attnpool")}


def _head_pooling(x, head_pooling, kernel_initializer, regularizer):
    """The head's pooling layer (its name says which pooling, so transfer by name never mixes two kinds)."""
    layer, name = _POOLINGS[head_pooling]
    if head_pooling != "attention":
        return layer(grid=2, name=name)(x)
    # A zero scoring kernel starts as mean pooling; a shape-only build keeps its own initializer.
    init = "zeros" if kernel_initializer == "orthogonal" else kernel_initializer
    return layer(kernel_initializer=init, kernel_regularizer=regularizer, name=name)(x)


def _build_graph(spec, width, dropout, leaky_slope, l2, head_units, kernel_initializer, seed, min_filters=0,
                 head_pooling="rms", aux="none"):
    regularizer = keras.regularizers.L2(l2) if l2 > 0 else None
    conv_gain = math.sqrt(2.0 / (1.0 + leaky_slope**2))

    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = RGBRescale(name="input_rescale")(inputs)
    for block in spec.blocks:
        if block.index > 1:
            x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"block{block.index - 1}_pool")(x)
        for j, conv in enumerate(block.convs, start=1):
            layer_name = f"block{block.index}_conv{j}"
            x = keras.layers.Conv2D(
                max(scaled(block.filters, width), min_filters),
                conv.kernel,
                strides=conv.stride,
                padding="same",
                kernel_initializer=_initializer(kernel_initializer, seed, layer_name, conv_gain),
                kernel_regularizer=regularizer,
                name=layer_name,
            )(x)
            x = keras.layers.LeakyReLU(negative_slope=leaky_slope, name=f"{layer_name}_lrelu")(x)

    units = scaled(head_units, width)
    x = _head_pooling(x, head_pooling, kernel_initializer, regularizer)
    x = keras.layers.Flatten(name="head_flatten")(x)
    for k in (1, 2):
        layer_name = f"head_dense{k}"
        x = keras.layers.Dense(
            2 * units,
            kernel_initializer=_initializer(kernel_initializer, seed, layer_name),
            kernel_regularizer=regularizer,
            name=layer_name,
        )(x)
        x = Maxout(units, name=f"head_maxout{k}")(x)
        if k == 1:
            x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    # The grade in float32 under any dtype policy: a mixed-precision model's loss, metrics and exports
    # see float32 (bf16 keeps 3 significant digits), as Keras's mixed-precision guide advises.
    outputs = keras.layers.Dense(
        1,
        kernel_initializer=_initializer(kernel_initializer, seed, "head_grade"),
        kernel_regularizer=regularizer,
        name="head_grade",
        dtype="float32",
    )(x)
    if aux == "none":
        return inputs, outputs
    aux_logits = keras.layers.Dense(
        AUX_UNITS[aux],
        kernel_initializer=_initializer(kernel_initializer, seed, "head_aux"),
        kernel_regularizer=regularizer,
        name="head_aux",
        dtype="float32",
    )(x)
    return inputs, [outputs, aux_logits]
