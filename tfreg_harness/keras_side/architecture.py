"""The Keras side of the harness' framework-neutral model descriptions.

``build_model(spec, input_shape, dtype=...)`` builds a ``keras.Sequential`` from a
``tfreg_harness.architecture`` description;
``tfreg_harness.torch_side.architecture.build_model`` builds the torch twin from the same
description (without TensorFlow). Images are channels last (NHWC).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tfreg._compat import keras
from tfreg_core.validation import choice
from tfreg_harness import architecture as A

DTYPES: tuple[str, ...] = ("float32", "float64")


def _layer(layer: A.Layer, dtype: str) -> Any:
    layers = keras.layers
    if isinstance(layer, A.Dense):
        return layers.Dense(layer.units, dtype=dtype)
    if isinstance(layer, A.Conv2D):
        return layers.Conv2D(layer.filters, layer.kernel_size, padding="same", dtype=dtype)
    if isinstance(layer, A.MaxPool2D):
        return layers.MaxPooling2D(layer.size, dtype=dtype)
    if isinstance(layer, A.Flatten):
        return layers.Flatten(dtype=dtype)
    if isinstance(layer, A.ReLU):
        return layers.ReLU(dtype=dtype)
    if isinstance(layer, A.BatchNorm):
        return layers.BatchNormalization(
            momentum=layer.momentum, epsilon=layer.epsilon, dtype=dtype
        )
    if isinstance(layer, A.Dropout):
        return layers.Dropout(layer.rate, dtype=dtype)
    raise TypeError(f"No Keras layer for layer description {layer!r}")  # A.shapes() checked it


def build_model(spec: Sequence[A.Layer], input_shape: Sequence[int], *, dtype: str) -> Any:
    """A built ``keras.Sequential`` for ``spec``; every layer and the Input carry ``dtype``.
    Weights are Keras' default initialisation (the harness loads its own)."""
    choice(dtype, "dtype", DTYPES)
    A.shapes(spec, input_shape)  # validates every description before building anything
    return keras.Sequential(
        [keras.Input(tuple(input_shape), dtype=dtype), *(_layer(x, dtype) for x in spec)]
    )


__all__ = ["DTYPES", "build_model"]
