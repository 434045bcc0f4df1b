"""Array layout conversions between Keras and torch (NumPy in, NumPy out; no framework needed).

Each function applies one row of :data:`tfreg_harness.differences.FRAMEWORK_DIFFERENCES`; the
maps are linear, so a gradient converts exactly like the tensor it belongs to. The harness keeps
data in Keras' layout (channels last); :func:`to_channels_first` / :func:`to_channels_last` move a
feature map's channel axis for torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tfreg_core.validation import InvalidArgumentError, positive_int
from tfreg_harness.differences import FRAMEWORK_DIFFERENCES

_LAYOUTS = FRAMEWORK_DIFFERENCES.layouts


def _array(value: Any, name: str, rank: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != rank:
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: expected a rank-{rank} array. "
            f"Received: {name}.shape={array.shape}"
        )
    return array


def flatten_permutation(flatten_from: Sequence[int]) -> np.ndarray:
    """Index map between the two Flatten orders of one channels-last feature map.

    ``flatten_from`` is the shape (without batch) the Keras Flatten consumed, channels last:
    ``(H, W, C)`` -- or ``(H * W, C)``, since only the channel count and the total matter.
    Returns ``perm`` with ``torch_flat[..., j] == keras_flat[..., perm[j]]``.
    """
    dims = tuple(positive_int(d, "flatten_from") for d in flatten_from)
    if len(dims) < 2:
        raise InvalidArgumentError(
            f"Invalid value for argument flatten_from: expected a channels-last shape such as "
            f"(H, W, C). Received: flatten_from={tuple(flatten_from)!r}"
        )
    channels, spatial = dims[-1], math.prod(dims[:-1])
    order: np.ndarray = np.arange(spatial * channels).reshape(spatial, channels).T.reshape(-1)
    return order


def _check_flatten_rows(rows: int, flatten_from: Sequence[int], name: str) -> np.ndarray:
    perm = flatten_permutation(flatten_from)
    if perm.size != rows:
        raise InvalidArgumentError(
            f"Invalid value for argument flatten_from: {tuple(flatten_from)} flattens to "
            f"{perm.size} features but {name} has {rows}."
        )
    return perm


def dense_kernel_to_torch(kernel: Any, *, flatten_from: Sequence[int] | None = None) -> np.ndarray:
    """Keras Dense kernel ``(in, out)`` -> torch Linear weight ``(out, in)``.

    ``flatten_from``: for the first Dense after a Flatten of a channels-last map, that map's
    shape ``(H, W, C)``; the kernel's rows are reordered from (H, W, C) to (C, H, W) order so the
    Linear sees torch's NCHW flatten order.
    """
    kernel = _array(kernel, "kernel", 2)
    if flatten_from is not None:
        kernel = kernel[_check_flatten_rows(kernel.shape[0], flatten_from, "kernel")]
    return np.ascontiguousarray(kernel.transpose(_LAYOUTS["dense"].to_torch))


def dense_kernel_to_keras(weight: Any, *, flatten_from: Sequence[int] | None = None) -> np.ndarray:
    """torch Linear weight ``(out, in)`` -> Keras Dense kernel ``(in, out)``; inverse of
    :func:`dense_kernel_to_torch` (same ``flatten_from``)."""
    weight = _array(weight, "weight", 2)
    kernel = weight.transpose(_LAYOUTS["dense"].to_keras)
    if flatten_from is not None:
        perm = _check_flatten_rows(kernel.shape[0], flatten_from, "weight")
        kernel = kernel[np.argsort(perm)]
    return np.ascontiguousarray(kernel)


def _conv_transpose(array: Any, name: str, direction: str) -> np.ndarray:
    array = np.asarray(array)
    layout = {3: "conv1d", 4: "conv2d", 5: "conv3d"}.get(array.ndim)
    if layout is None:
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: expected a 1-D, 2-D or 3-D (rank 3 to 5) "
            f"convolution {name}. Received: {name}.shape={array.shape}"
        )
    return np.ascontiguousarray(array.transpose(getattr(_LAYOUTS[layout], direction)))


def conv_kernel_to_torch(kernel: Any) -> np.ndarray:
    """Keras ConvND kernel ``(*k, in/groups, out)`` -> torch weight ``(out, in/groups, *k)``."""
    return _conv_transpose(kernel, "kernel", "to_torch")


def conv_kernel_to_keras(weight: Any) -> np.ndarray:
    """torch ConvNd weight ``(out, in/groups, *k)`` -> Keras kernel ``(*k, in/groups, out)``."""
    return _conv_transpose(weight, "weight", "to_keras")


def conv2d_kernel_to_torch(kernel: Any) -> np.ndarray:
    """Keras Conv2D kernel ``(kh, kw, in, out)`` -> torch Conv2d weight ``(out, in, kh, kw)``."""
    return conv_kernel_to_torch(_array(kernel, "kernel", 4))


def conv2d_kernel_to_keras(weight: Any) -> np.ndarray:
    """torch Conv2d weight ``(out, in, kh, kw)`` -> Keras Conv2D kernel ``(kh, kw, in, out)``."""
    return conv_kernel_to_keras(_array(weight, "weight", 4))


def _transpose_kernel_axes(ndim: int) -> tuple[int, ...]:
    return (ndim - 1, ndim - 2, *range(ndim - 2))


def conv_transpose_kernel_to_torch(kernel: Any) -> np.ndarray:
    """Keras Conv1D/2D/3DTranspose kernel ``(*k, out, in)`` -> torch ConvTranspose weight
    ``(in, out, *k)`` (groups 1; neither framework flips the kernel)."""
    array = np.asarray(kernel)
    return np.ascontiguousarray(array.transpose(_transpose_kernel_axes(array.ndim)))


def conv_transpose_kernel_to_keras(weight: Any) -> np.ndarray:
    """Inverse of :func:`conv_transpose_kernel_to_torch`."""
    array = np.asarray(weight)
    return np.ascontiguousarray(array.transpose(np.argsort(_transpose_kernel_axes(array.ndim))))


def depthwise_kernel_to_torch(kernel: Any) -> np.ndarray:
    """Keras DepthwiseConv2D kernel ``(kh, kw, in, m)`` -> torch ``Conv2d(in, in*m, groups=in)``
    weight ``(in*m, 1, kh, kw)``; both number output channel ``c*m + j``."""
    kernel = _array(kernel, "kernel", 4)
    kh, kw, cin, mult = kernel.shape
    return conv_kernel_to_torch(kernel.reshape(kh, kw, 1, cin * mult))


def depthwise_kernel_to_keras(weight: Any, *, multiplier: int) -> np.ndarray:
    """Inverse of :func:`depthwise_kernel_to_torch` for ``multiplier`` outputs per channel."""
    kernel = conv_kernel_to_keras(_array(weight, "weight", 4))
    kh, kw, _, out = kernel.shape
    return np.ascontiguousarray(kernel.reshape(kh, kw, out // multiplier, multiplier))


def gate_permutation(units: int, keras_order: str, torch_order: str) -> np.ndarray:
    """Row index ``perm`` with ``torch_rows = keras_rows[perm]`` for stacked gate blocks.

    ``keras_order``/``torch_order`` name the gates in stacking order, one letter each, with the
    same letters for the same gate: LSTM ``"ifco"`` / ``"ifco"``; GRU ``"zrh"`` / ``"rzh"``.
    """
    if sorted(keras_order) != sorted(torch_order):
        raise InvalidArgumentError(
            f"Invalid gate orders: {keras_order!r} and {torch_order!r} must name the same gates."
        )
    n = positive_int(units, "units")
    blocks = [keras_order.index(g) for g in torch_order]
    return np.concatenate([np.arange(b * n, (b + 1) * n) for b in blocks])


def recurrent_kernel_to_torch(kernel: Any, perm: np.ndarray) -> np.ndarray:
    """Keras (recurrent) kernel ``(in, G*u)`` -> torch ``weight_ih/hh`` ``(G*u, in)`` with the
    gate blocks reordered by ``perm`` (see :func:`gate_permutation`)."""
    return np.ascontiguousarray(_array(kernel, "kernel", 2).T[perm])


def recurrent_kernel_to_keras(weight: Any, perm: np.ndarray) -> np.ndarray:
    """Inverse of :func:`recurrent_kernel_to_torch`."""
    return np.ascontiguousarray(_array(weight, "weight", 2)[np.argsort(perm)].T)


def attention_projection_to_torch(kernel: Any) -> np.ndarray:
    """Keras MultiHeadAttention query/key/value kernel ``(d, heads, head_dim)`` -> torch's
    ``(heads * head_dim, d)`` rows of ``in_proj_weight`` (heads consecutive, as torch splits)."""
    array = _array(kernel, "kernel", 3)
    return np.ascontiguousarray(array.reshape(array.shape[0], -1).T)


def attention_projection_to_keras(weight: Any, *, heads: int) -> np.ndarray:
    """Inverse of :func:`attention_projection_to_torch`."""
    array = _array(weight, "weight", 2)
    return np.ascontiguousarray(array.T.reshape(array.shape[1], heads, -1))


def attention_output_to_torch(kernel: Any) -> np.ndarray:
    """Keras MultiHeadAttention output kernel ``(heads, head_dim, d)`` -> torch
    ``out_proj.weight`` ``(d, heads * head_dim)``."""
    array = _array(kernel, "kernel", 3)
    return np.ascontiguousarray(array.reshape(-1, array.shape[2]).T)


def attention_output_to_keras(weight: Any, *, heads: int) -> np.ndarray:
    """Inverse of :func:`attention_output_to_torch`."""
    array = _array(weight, "weight", 2)
    return np.ascontiguousarray(array.T.reshape(heads, -1, array.shape[0]))


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """``(before, after)`` zeros TensorFlow's ``padding="same"`` adds along one axis of length
    ``size``: ``total = max((ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 -
    size, 0)``, ``before = total // 2``. Example: size 8, kernel 3, stride 2 -> (0, 1)."""
    size, kernel = positive_int(size, "size"), positive_int(kernel, "kernel")
    stride, dilation = positive_int(stride, "stride"), positive_int(dilation, "dilation")
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def to_channels_first(x: Any) -> np.ndarray:
    """A channels-last batch ``(N, ..., C)`` as torch's ``(N, C, ...)``; rank <= 2 unchanged."""
    array = np.asarray(x)
    if array.ndim <= 2:
        return array
    return np.ascontiguousarray(np.moveaxis(array, -1, 1))


def to_channels_last(y: Any) -> np.ndarray:
    """Inverse of :func:`to_channels_first`."""
    array = np.asarray(y)
    if array.ndim <= 2:
        return array
    return np.ascontiguousarray(np.moveaxis(array, 1, -1))


def to_torch_input(x: Any) -> np.ndarray:
    """A harness image batch (NHWC) as torch expects it (NCHW); other ranks as they are."""
    x = np.asarray(x)
    return to_channels_first(x) if x.ndim == 4 else x


def to_keras_output(y: Any) -> np.ndarray:
    """A torch image activation (NCHW) in the harness' layout (NHWC); other ranks as they are."""
    y = np.asarray(y)
    return to_channels_last(y) if y.ndim == 4 else y


__all__ = [
    "attention_output_to_keras",
    "attention_output_to_torch",
    "attention_projection_to_keras",
    "attention_projection_to_torch",
    "conv2d_kernel_to_keras",
    "conv2d_kernel_to_torch",
    "conv_kernel_to_keras",
    "conv_kernel_to_torch",
    "conv_transpose_kernel_to_keras",
    "conv_transpose_kernel_to_torch",
    "dense_kernel_to_keras",
    "dense_kernel_to_torch",
    "depthwise_kernel_to_keras",
    "depthwise_kernel_to_torch",
    "flatten_permutation",
    "gate_permutation",
    "recurrent_kernel_to_keras",
    "recurrent_kernel_to_torch",
    "same_padding",
    "to_channels_first",
    "to_channels_last",
    "to_keras_output",
    "to_torch_input",
]
