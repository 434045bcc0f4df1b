"""TensorFlow's array functions for the framework-free window core: the
:class:`tfreg_core.update.UpdateOps` that closes a window (:func:`tfreg_core.update.close_window`,
:func:`tfreg_core.update.window_record`) and the :class:`tfreg_core.metrics.MetricOps` of the
window metrics, as graph-safe ops (both run inside the trainers' ``tf.function`` s; the
window rule also serves :func:`tfreg.accumulation.result`, hence here, below both).

A Python number meeting a tensor is converted straight to the tensor's dtype
(``tf.constant(x, dtype)``): ``tf.cast`` of a Python float would make it a float32 tensor first
and round it (a 1.5e-8 relative error on a float64 clip threshold). ``torchref``'s adapter does
the same with torch ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tfreg._compat import tf
from tfreg_core.metrics import MetricOps
from tfreg_core.update import UpdateOps

__all__ = ["METRIC_OPS", "UPDATE_OPS"]


def _like(x: Any, like: Any) -> Any:
    # A Python number straight to `like`'s dtype; a tensor cast (a no-op when they agree).
    if tf.is_tensor(x):
        return x if x.dtype == like.dtype else tf.cast(x, like.dtype)
    return tf.constant(x, like.dtype)


class _TensorOps:
    """:class:`~tfreg_core.update.UpdateOps` on TensorFlow tensors."""

    @staticmethod
    def where(condition: Any, x: Any, y: Any) -> Any:
        if tf.is_tensor(x):
            return tf.where(condition, x, _like(y, x))
        return tf.where(condition, _like(x, y), y)

    @staticmethod
    def cast_like(x: Any, like: Any) -> Any:
        return _like(x, like)

    @staticmethod
    def cast(x: Any, dtype: Any) -> Any:
        return tf.cast(x, dtype)

    @staticmethod
    def sum_squares(x: Any) -> Any:
        return tf.reduce_sum(tf.square(x))

    @staticmethod
    def total(xs: Sequence[Any]) -> Any:
        return tf.reduce_sum(tf.stack(list(xs)))

    @staticmethod
    def sqrt(x: Any) -> Any:
        return tf.sqrt(x)

    @staticmethod
    def minimum(x: Any, y: Any) -> Any:
        return tf.minimum(x, y)

    @staticmethod
    def maximum(x: Any, y: Any) -> Any:
        return tf.maximum(x, y)

    @staticmethod
    def all_finite(xs: Sequence[Any]) -> Any:
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(x)) for x in xs])

    @staticmethod
    def logical_and(x: Any, y: Any) -> Any:
        return tf.logical_and(x, y)


class _TensorMetricOps:
    """:class:`~tfreg_core.metrics.MetricOps` on TensorFlow tensors (float64 values)."""

    @staticmethod
    def argmax_last(x: Any) -> Any:
        return tf.argmax(x, axis=-1)

    @staticmethod
    def labels_like(labels: Any, predicted: Any) -> Any:
        return tf.reshape(tf.cast(labels, tf.int64), tf.shape(predicted))

    @staticmethod
    def equal(a: Any, b: Any) -> Any:
        return tf.cast(tf.equal(a, b), tf.float64)

    @staticmethod
    def above_half(x: Any) -> Any:
        return tf.cast(x > 0.5, tf.float64)

    @staticmethod
    def float64_like(x: Any, like: Any) -> Any:
        return tf.reshape(tf.cast(x, tf.float64), tf.shape(like))

    @staticmethod
    def mean_last(x: Any) -> Any:
        return tf.reduce_mean(x, axis=-1)


UPDATE_OPS: UpdateOps = _TensorOps()
METRIC_OPS: MetricOps = _TensorMetricOps()
