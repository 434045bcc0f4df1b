"""Framework-neutral descriptions of the harness' seed models (no framework imported).

A model is a tuple of layer descriptions (frozen dataclasses).
``keras_side.architecture.build_model`` builds it in Keras and
``torch_side.architecture.build_model`` in torch -- the torch side needs no TensorFlow, so
``torchref.verify`` and the benchmarks build the same models from the same description. Shapes are
Keras' (channels last, batch omitted); :func:`output_shape` tracks them so both builders can size
their layers, and :func:`initial_weights` draws one set of weights (Keras layout, ``get_weights()``
order) that both load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tfreg_core.validation import InvalidArgumentError, positive_int
from tfreg_harness.differences import FRAMEWORK_DIFFERENCES

_BN = FRAMEWORK_DIFFERENCES.batchnorm


@dataclass(frozen=True)
class Dense:
    """``y = x @ kernel + bias`` (Keras Dense, torch Linear)."""

    units: int


@dataclass(frozen=True)
class Conv2D:
    """``filters`` 2-D convolutions of ``kernel_size`` x ``kernel_size``, stride 1, "same"
    padding (symmetric for an odd kernel, so torch's ``padding="same"`` matches)."""

    filters: int
    kernel_size: int


@dataclass(frozen=True)
class MaxPool2D:
    """Non-overlapping ``size`` x ``size`` max pooling, "valid" padding."""

    size: int


@dataclass(frozen=True)
class Flatten:
    """Flatten to ``(batch, features)`` (Keras in (H, W, C) order, torch (C, H, W))."""


@dataclass(frozen=True)
class ReLU:
    """``max(x, 0)``."""


@dataclass(frozen=True)
class BatchNorm:
    """Batch normalization over the channel (last) axis; ``momentum`` in Keras' convention
    (weight of the old moving value; torch's is ``1 - momentum``)."""

    momentum: float = _BN.keras_momentum_default
    epsilon: float = _BN.keras_epsilon_default


@dataclass(frozen=True)
class Dropout:
    """Inverted dropout: kept units scaled by ``1 / (1 - rate)``."""

    rate: float


Layer = Dense | Conv2D | MaxPool2D | Flatten | ReLU | BatchNorm | Dropout
LAYER_TYPES: tuple[type[Layer], ...] = (Dense, Conv2D, MaxPool2D, Flatten, ReLU, BatchNorm, Dropout)


def _checked(layer: object) -> Layer:
    if not isinstance(layer, LAYER_TYPES):
        names = ", ".join(t.__name__ for t in LAYER_TYPES)
        raise InvalidArgumentError(
            f"Invalid layer description {layer!r}: expected one of {names} "
            "(tfreg_harness.architecture)."
        )
    return layer


def output_shape(layer: Layer, shape: Sequence[int]) -> tuple[int, ...]:
    """The Keras-layout activation shape (batch omitted) after ``layer`` applied to ``shape``."""
    shape = tuple(int(d) for d in shape)
    layer = _checked(layer)
    if isinstance(layer, Dense):
        return (*shape[:-1], layer.units)
    if isinstance(layer, Conv2D):
        return (*shape[:-1], layer.filters)
    if isinstance(layer, MaxPool2D):
        return (shape[0] // layer.size, shape[1] // layer.size, shape[2])
    if isinstance(layer, Flatten):
        return (math.prod(shape),)
    return shape


def shapes(spec: Sequence[Layer], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Input shape of every layer of ``spec``, then the output shape (``len(spec) + 1`` entries)."""
    out = [tuple(positive_int(d, "input_shape") for d in input_shape)]
    for layer in spec:
        out.append(output_shape(layer, out[-1]))
    return out


def mlp_spec(
    *,
    hidden: Sequence[int] = (32, 32),
    classes: int = 10,
    batchnorm: bool = False,
    dropout: float = 0.0,
    bn_momentum: float = _BN.keras_momentum_default,
    bn_epsilon: float = _BN.keras_epsilon_default,
) -> tuple[Layer, ...]:
    """The MLP of the dropout/BatchNorm notebook: per hidden layer Dense -> [BN] -> ReLU ->
    [Dropout], then Dense(classes) logits."""
    if not 0.0 <= dropout < 1.0:
        raise InvalidArgumentError(
            f"Invalid value for argument dropout: expected a rate in [0, 1). "
            f"Received: dropout={dropout!r}"
        )
    spec: list[Layer] = []
    for units in hidden:
        spec.append(Dense(positive_int(units, "hidden")))
        if batchnorm:
            spec.append(BatchNorm(momentum=bn_momentum, epsilon=bn_epsilon))
        spec.append(ReLU())
        if dropout:
            spec.append(Dropout(float(dropout)))
    spec.append(Dense(positive_int(classes, "classes")))
    return tuple(spec)


def cnn_spec(
    *, filters: Sequence[int] = (8, 16), dense: int = 64, classes: int = 10
) -> tuple[Layer, ...]:
    """The seed CNN of the TF accumulation notebook, sized for 8x8 digits: Conv2D(f1, 3x3) ReLU
    -> MaxPool 2 -> Conv2D(f2, 3x3) ReLU -> Flatten -> Dense(dense) ReLU -> Dense(classes).
    "same" padding keeps 8x8 -> 8x8 -> 4x4 -> 4x4 (the notebook's "valid" would shrink 8x8 to
    nothing). Ends in logits, not softmax."""
    if len(filters) != 2:
        raise InvalidArgumentError(
            f"Invalid value for argument filters: expected two filter counts (one per Conv2D). "
            f"Received: filters={filters!r}"
        )
    f1, f2 = (positive_int(f, "filters") for f in filters)
    return (
        Conv2D(f1, 3),
        ReLU(),
        MaxPool2D(2),
        Conv2D(f2, 3),
        ReLU(),
        Flatten(),
        Dense(positive_int(dense, "dense")),
        ReLU(),
        Dense(positive_int(classes, "classes")),
    )


def initial_weights(
    spec: Sequence[Layer], input_shape: Sequence[int], *, rng: np.random.Generator, dtype: str
) -> list[np.ndarray]:
    """Weights for ``spec`` drawn from ``rng``, Keras layout, in ``get_weights()`` order.

    Never the frameworks' own initializers, which differ. Kernels ~ U(±sqrt(3 / fan_in)) (unit
    output variance for unit inputs); biases ~ N(0, 0.1²) (non-zero, so bias paths are
    exercised); BN gamma ~ 1 + N(0, 0.1²), beta ~ N(0, 0.1²), moving mean ~ N(0, 0.1²), moving
    variance ~ U(0.5, 1.5) (non-trivial statistics, so eval mode is a real test).
    """
    out: list[np.ndarray] = []
    for layer, shape in zip(spec, shapes(spec, input_shape), strict=False):
        channels = shape[-1]
        if isinstance(layer, (Dense, Conv2D)):
            size = layer.units if isinstance(layer, Dense) else layer.filters
            kernel: tuple[int, ...] = (channels, size)
            if isinstance(layer, Conv2D):
                kernel = (layer.kernel_size, layer.kernel_size, channels, size)
            bound = math.sqrt(3.0 / math.prod(kernel[:-1]))
            out += [rng.uniform(-bound, bound, size=kernel), 0.1 * rng.standard_normal(size)]
        elif isinstance(layer, BatchNorm):
            out += [
                1.0 + 0.1 * rng.standard_normal(channels),
                0.1 * rng.standard_normal(channels),
                0.1 * rng.standard_normal(channels),
                rng.uniform(0.5, 1.5, size=channels),
            ]
    return [w.astype(dtype) for w in out]


__all__ = [
    "LAYER_TYPES",
    "BatchNorm",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "Layer",
    "MaxPool2D",
    "ReLU",
    "cnn_spec",
    "initial_weights",
    "mlp_spec",
    "output_shape",
    "shapes",
]
