"""``batchnorm="per_window"`` for ``tfreg.Trainer``: the moving statistics of Keras
``BatchNormalization`` updated once per window with the window's pooled moments (see
:mod:`tfreg_core.batchnorm` for the formula; :mod:`torchref.batchnorm` is the torch twin).

While a micro-batch step is traced, each BatchNormalization layer's ``call`` is wrapped (an
instance attribute, removed right after the trace): in training mode (``trainable`` layer) it
adds the micro-batch's ``(count, mean, M2)`` per channel (float64) to the window's, runs
Keras' own ``call`` -- so each micro-batch is normalised with its own statistics and the
gradient is the default mode's -- and puts ``moving_mean``/``moving_variance`` back to their
values before the call. ``close()`` (graph code, in the window's update) applies Keras'
update once: ``moving = moving * momentum + pooled * (1 - momentum)``, biased variance, as one
``fit`` step on the concatenated window does. Refused: ``renorm=True`` (its corrections are
per batch) and a mask reaching the layer (the masked moments' counts are not pooled here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tfreg._compat import keras, tf
from tfreg_core import batchnorm as core
from tfreg_core.validation import InvalidArgumentError

__all__ = ["WindowMoments", "batchnorm_layers"]


def batchnorm_layers(model: Any) -> list[Any]:
    """The model's ``keras.layers.BatchNormalization`` layers."""
    return [
        layer
        for layer in model._flatten_layers(include_self=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


class WindowMoments(tf.Module):
    """The open window's pooled moments of each BatchNormalization layer of ``model`` (float64
    variables: tracked by ``Trainer.checkpoint()``, so a mid-window resume is bitwise)."""

    def __init__(self, model: Any) -> None:
        super().__init__(name="batchnorm")
        self.layers = batchnorm_layers(model)
        for layer in self.layers:
            if layer.renorm:
                raise InvalidArgumentError(
                    'batchnorm="per_window" cannot pool batch renormalization (its r/d '
                    f"corrections are per batch). Received: layer {layer.name!r} with "
                    "renorm=True"
                )
        self.counts = [tf.Variable(tf.zeros((), tf.float64), trainable=False) for _ in self.layers]
        self.means = [self._zeros(layer) for layer in self.layers]
        self.m2s = [self._zeros(layer) for layer in self.layers]

    @staticmethod
    def _zeros(layer: Any) -> tf.Variable:
        return tf.Variable(tf.zeros(layer.moving_mean.shape, tf.float64), trainable=False)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Around a micro-batch step's trace: the layers' calls wrapped (see the module)."""
        for i, layer in enumerate(self.layers):
            layer.call = self._wrapped(i, layer)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.call

    def _wrapped(self, i: int, layer: Any) -> Any:
        original = type(layer).call.__get__(layer)

        def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
            if not (training and layer.trainable):
                return original(inputs, training=training, mask=mask)
            if mask is not None:
                raise InvalidArgumentError(
                    'batchnorm="per_window" does not pool masked BatchNormalization moments. '
                    f"Received: a mask reaching layer {layer.name!r}"
                )
            x = tf.cast(tf.stop_gradient(inputs), tf.float64)
            axes = [a for a in range(x.shape.rank) if a != layer.axis % x.shape.rank]
            channels = tf.cast(tf.shape(x)[layer.axis], tf.float64)
            n = tf.cast(tf.size(x), tf.float64) / channels
            mean = tf.reduce_mean(x, axes)
            m2 = tf.reduce_sum(tf.square(x - tf.reduce_mean(x, axes, keepdims=True)), axes)
            window = (self.counts[i], self.means[i], self.m2s[i])
            pooled = core.merge(window, (n, mean, m2), tf.math.divide_no_nan)
            for variable, value in zip(window, pooled, strict=True):
                variable.assign(value)
            saved = [tf.identity(v.value) for v in (layer.moving_mean, layer.moving_variance)]
            out = original(inputs, training=training, mask=mask)
            layer.moving_mean.assign(saved[0])
            layer.moving_variance.assign(saved[1])
            return out

        return call

    def close(self) -> None:
        """The window's update of every layer that saw a micro-batch (graph code); reset."""
        for i, layer in enumerate(self.layers):
            n = self.counts[i]
            pooled = (n, self.means[i], self.m2s[i])
            moving = [layer.moving_mean, layer.moving_variance]
            new = core.keras_update(
                tf.cast(moving[0], tf.float64),
                tf.cast(moving[1], tf.float64),
                pooled,
                layer.momentum,
            )
            for variable, value in zip(moving, new, strict=True):
                # A layer no micro-batch reached in training mode keeps its statistics.
                value = tf.where(n > 0, value, tf.cast(variable, tf.float64))
                variable.assign(tf.cast(value, variable.dtype))
        self.reset()

    def reset(self) -> None:
        for variable in [*self.counts, *self.means, *self.m2s]:
            variable.assign(tf.zeros_like(variable))
