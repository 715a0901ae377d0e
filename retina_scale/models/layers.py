"""The two layers of the paper's head that Keras does not ship: RMS pooling and Maxout; and, ours (issue 14),
the head's other poolings: a grid max pooling and a learned attention pooling.

All are written with ``keras.ops`` only (backend-neutral) and registered serializable, so a model that
uses them saves to ``.keras`` and loads back with ``safe_mode=True``.
"""

from __future__ import annotations

import keras
from keras import ops

from retina_scale.utils.errors import UserError

_PACKAGE = "retina_scale"


def _pair(value, name):
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise UserError(f"{name} must be a positive int or a pair of positive ints; got {value!r}")
    return value


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RMSPool2D(keras.layers.Layer):
    """Root-mean-square pooling: ``sqrt(mean(x**2 over the window) + epsilon)``.

    The pooling of the o_O Kaggle solution and of Li et al.'s head (3x3 window, stride 3, which takes
    the 7x7 feature map of every stage to 2x2). Channels-last input ``(batch, height, width, channels)``.

    Args:
        pool_size: int or pair, the window.
        strides: int or pair; defaults to ``pool_size``.
        padding: ``"valid"`` or ``"same"``, as in ``keras.layers.AveragePooling2D``.
        epsilon: added under the root so its gradient stays finite at zero.

    Example:
    >>> import numpy as np
    >>> tuple(RMSPool2D(3, 3)(np.ones((1, 7, 7, 4))).shape)
    (1, 2, 2, 4)
    """

    def __init__(self, pool_size=3, strides=None, padding="valid", epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "pool_size")
        self.strides = _pair(strides if strides is not None else pool_size, "strides")
        if padding not in ("valid", "same"):
            raise UserError(f"padding must be 'valid' or 'same'; got {padding!r}")
        self.padding = padding
        self.epsilon = float(epsilon)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def call(self, inputs):
        mean_square = ops.average_pool(
            ops.square(inputs), self.pool_size, strides=self.strides, padding=self.padding
        )
        return ops.sqrt(mean_square + self.epsilon)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape

        def out(n, k, s):
            if n is None:
                return None
            return (n - k) // s + 1 if self.padding == "valid" else -(-n // s)

        return (
            batch,
            out(height, self.pool_size[0], self.strides[0]),
            out(width, self.pool_size[1], self.strides[1]),
            channels,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            pool_size=self.pool_size, strides=self.strides, padding=self.padding, epsilon=self.epsilon
        )
        return config


class _GridPool2D(keras.layers.Layer):
    """Pooling onto a fixed ``grid x grid`` output, whatever the input's height and width (the reduction is the
    subclass's ``_reduce`` over axes 2 and 4 of the ``(batch, grid, step_h, grid, step_w, channels)`` blocks).

    Window and stride are both ``floor(n / grid)`` along each axis, computed at run time, and the remainder
    rows/columns at the far edge are dropped, exactly as valid pooling drops them.
    """

    def __init__(self, grid=2, **kwargs):
        super().__init__(**kwargs)
        if int(grid) < 1:
            raise UserError(f"grid must be a positive int; got {grid!r}")
        self.grid = int(grid)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def _reduce(self, blocks):
        raise NotImplementedError

    def call(self, inputs):
        g = self.grid
        shape = ops.shape(inputs)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        step_h = height // g
        step_w = width // g
        cropped = inputs[:, : step_h * g, : step_w * g, :]
        return self._reduce(ops.reshape(cropped, (batch, g, step_h, g, step_w, channels)))

    def compute_output_shape(self, input_shape):
        for n in input_shape[1:3]:
            if n is not None and n < self.grid:
                raise UserError(
                    f"{type(self).__name__}(grid={self.grid}) needs a feature map of at least "
                    f"{self.grid}x{self.grid}; got {input_shape[1]}x{input_shape[2]} "
                    "(the input image is too small for this stage)"
                )
        return (input_shape[0], self.grid, self.grid, input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(grid=self.grid)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GridRMSPool2D(_GridPool2D):
    """RMS pooling onto a fixed ``grid x grid`` output, whatever the input's height and width.

    Window and stride are both ``floor(n / grid)`` along each axis, computed at run time, and the
    remainder rows/columns at the far edge are dropped, exactly as valid pooling drops them. On the
    7x7 feature map that every stage of the paper's family makes at its own input size, with
    ``grid=2``, this is *identical* to ``RMSPool2D(pool_size=3, strides=3)`` (windows ``[0:3]`` and
    ``[3:6]``; row 6 dropped). At any other input size it still gives a 2x2 map, so the dense head
    accepts it: this is what lets every model run on inputs of any size (``Input(shape=(None, None, 3))``).

    Args:
        grid: the output height and width.
        epsilon: added under the root.

    Example:
    >>> import numpy as np
    >>> tuple(GridRMSPool2D(2)(np.ones((1, 14, 14, 4))).shape)
    (1, 2, 2, 4)
    """

    def __init__(self, grid=2, epsilon=1e-12, **kwargs):
        super().__init__(grid, **kwargs)
        self.epsilon = float(epsilon)

    def _reduce(self, blocks):
        return ops.sqrt(ops.mean(ops.square(blocks), axis=(2, 4)) + self.epsilon)

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GridMaxPool2D(_GridPool2D):
    """Max pooling onto a fixed ``grid x grid`` output: the windows of :class:`GridRMSPool2D` (on a 7x7 map
    with ``grid=2``: ``[0:3]`` and ``[3:6]`` of each axis), each reduced by its maximum rather than its root
    mean square. One strong activation in a 3x3 window keeps its value (RMS divides it by 3). Ours, not the
    paper's (issue 14); the output has the same shape as the RMS pooling's, so the head after it is unchanged.

    Example:
    >>> import numpy as np
    >>> x = np.zeros((1, 7, 7, 1)); x[0, 1, 1, 0] = 6.0
    >>> keras.ops.convert_to_numpy(GridMaxPool2D(2)(x))[0, :, :, 0].tolist()
    [[6.0, 0.0], [0.0, 0.0]]
    """

    def _reduce(self, blocks):
        return ops.max(blocks, axis=(2, 4))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AttentionPool2D(keras.layers.Layer):
    """Learned spatial attention pooling: ``(batch, h, w, c) -> (batch, c)``.

    A 1x1 convolution (a kernel of ``c`` weights, no bias: the softmax ignores a constant) scores every
    position, a softmax over the ``h * w`` positions turns the scores into weights summing to 1, and the output
    is the weighted sum of the feature vectors. Ours, not the paper's (issue 14): one small lesion's position
    can take most of the weight, where an average or RMS over a window dilutes it. The default zero kernel
    starts as mean pooling (every position weighted ``1 / (h * w)``); the softmax is computed in float32
    under any dtype policy.

    Args:
        kernel_initializer: of the scoring kernel ``(c, 1)``.
        kernel_regularizer: of the scoring kernel.

    Example:
    >>> import numpy as np
    >>> x = np.arange(2 * 3 * 3 * 2, dtype="float32").reshape(2, 3, 3, 2)
    >>> pool = AttentionPool2D()
    >>> out = keras.ops.convert_to_numpy(pool(x))
    >>> out.shape, bool(np.allclose(out, x.mean(axis=(1, 2))))  # zero kernel: mean pooling
    ((2, 2), True)
    """

    def __init__(self, kernel_initializer="zeros", kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise UserError("AttentionPool2D needs a known number of channels (the last axis)")
        self.kernel = self.add_weight(name="kernel", shape=(int(channels), 1), initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: int(channels)})

    def attention(self, inputs):
        """The weights of each position, ``(batch, h, w)``, float32, summing to 1 over ``h, w``."""
        shape = ops.shape(inputs)
        scores = ops.cast(ops.matmul(inputs, ops.cast(self.kernel, inputs.dtype)), "float32")
        weights = ops.softmax(ops.reshape(scores, (shape[0], shape[1] * shape[2])), axis=-1)
        return ops.reshape(weights, (shape[0], shape[1], shape[2]))

    def call(self, inputs):
        weights = ops.cast(self.attention(inputs), inputs.dtype)
        return ops.sum(inputs * weights[..., None], axis=(1, 2))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer))
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Maxout(keras.layers.Layer):
    """Maxout over groups of consecutive features of the last axis.

    ``Maxout(512)`` on a Dense-1024 output takes the max over the pairs (0, 1), (2, 3), ...: the
    "Dense-1024, Maxout-512" of the paper's head (Lasagne's ``FeaturePoolLayer`` with pool size 2).

    Args:
        units: number of outputs; the input's last dimension must be a multiple of it.

    Example:
    >>> import numpy as np
    >>> keras.ops.convert_to_numpy(Maxout(2)(np.array([[1.0, 5.0, 3.0, 2.0]]))).tolist()  # max(1, 5), max(3, 2)
    [[5.0, 3.0]]
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        if int(units) < 1:
            raise UserError(f"units must be a positive int; got {units!r}")
        self.units = int(units)

    def build(self, input_shape):
        features = input_shape[-1]
        if features is None or features % self.units:
            raise UserError(
                f"Maxout({self.units}) needs a last dimension that is a known multiple of "
                f"{self.units}; got {features}"
            )
        self.pieces = features // self.units
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: features})

    def call(self, inputs):
        shape = ops.shape(inputs)
        grouped = ops.reshape(inputs, tuple(shape[:-1]) + (self.units, self.pieces))
        return ops.max(grouped, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RGBRescale(keras.layers.Layer):
    """Checks that images are RGB and maps pixel values from ``[0, 255]`` to ``[-1, 1]``.

    The first layer of every model of the family: the data pipeline and the serving signatures hand
    the model float RGB images in ``[0, 255]``, and a grey (1-channel) or RGBA/CMYK (4-channel) input
    is refused here with a message that says what is accepted, rather than deep inside a convolution.

    Example:
    >>> import numpy as np
    >>> keras.ops.convert_to_numpy(RGBRescale()(np.array([[[[0.0, 127.5, 255.0]]]]))).tolist()
    [[[[-1.0, 0.0, 1.0]]]]
    """

    channels = 3

    def build(self, input_shape):
        self.check_shape(input_shape)

    @staticmethod
    def check_shape(shape):
        """Raises a ValueError that names what is accepted unless ``shape`` is (batch, h, w, 3)."""
        if shape is None:
            return
        shape = tuple(shape)
        if len(shape) != 4:
            raise UserError(
                "retina_scale models take a batch of images of shape (batch, height, width, 3); "
                f"got a tensor of rank {len(shape)} with shape {tuple(shape)}"
            )
        if shape[-1] is not None and shape[-1] != RGBRescale.channels:
            raise UserError(
                f"retina_scale models take RGB images with 3 channels; got {shape[-1]} channel(s) "
                "(convert grey images to RGB and drop the alpha channel of RGBA images)"
            )

    def call(self, inputs):
        self.check_shape(inputs.shape)
        return ops.cast(inputs, self.compute_dtype) / 127.5 - 1.0

    def compute_output_shape(self, input_shape):
        self.check_shape(input_shape)
        return tuple(input_shape)
