"""The window metrics both trainers log, framework-free: per-element values, in Keras'
argument order ``(y_true, y_pred)``, over a :class:`MetricOps` adapter per framework. A window's
metric is ``sum(value * weight) / sum(weight)`` over its micro-batches
(:func:`tfreg_core.update.window_record`), with the loss's sample weights (and, in tfreg, the
output's mask), as Keras' metrics weight them.

- ``sparse_categorical_accuracy``: ``argmax(y_pred, -1) == y_true`` (integer labels of shape
  ``(N,)``, ``(N, 1)`` or ``(N, T)``, reshaped to the predictions' shape as Keras does).
- ``categorical_accuracy``: ``argmax(y_pred, -1) == argmax(y_true, -1)`` (one-hot targets).
- ``binary_accuracy``: ``mean over the last axis of ((y_pred > 0.5) == y_true)``: Keras'
  threshold 0.5 on probabilities (a model emitting logits must apply its sigmoid first); the
  targets reshaped to the predictions' shape (``(N,)`` against ``(N, 1)``), as Keras does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["METRIC_FUNCTIONS", "MetricOps"]


class MetricOps(Protocol):
    """The array functions the metrics need; each framework supplies its own."""

    def argmax_last(self, x: Any) -> Any:
        """Index of the largest entry along the last axis (int64)."""
        ...

    def labels_like(self, labels: Any, predicted: Any) -> Any:
        """Integer ``labels`` as int64, reshaped to ``predicted``'s shape."""
        ...

    def equal(self, a: Any, b: Any) -> Any:
        """``a == b`` as float64 ones and zeros."""
        ...

    def above_half(self, x: Any) -> Any:
        """``x > 0.5`` as float64 ones and zeros."""
        ...

    def float64_like(self, x: Any, like: Any) -> Any:
        """``x`` as float64, reshaped to ``like``'s shape: ``(N,)`` targets against ``(N, 1)``
        predictions, brought to their rank as Keras' metrics do (never broadcast to
        ``(N, N)``)."""
        ...

    def mean_last(self, x: Any) -> Any:
        """The mean over the last axis."""
        ...


def _sparse_categorical_accuracy(y_true: Any, y_pred: Any, ops: MetricOps) -> Any:
    predicted = ops.argmax_last(y_pred)
    return ops.equal(predicted, ops.labels_like(y_true, predicted))


def _categorical_accuracy(y_true: Any, y_pred: Any, ops: MetricOps) -> Any:
    return ops.equal(ops.argmax_last(y_pred), ops.argmax_last(y_true))


def _binary_accuracy(y_true: Any, y_pred: Any, ops: MetricOps) -> Any:
    predicted = ops.above_half(y_pred)
    return ops.mean_last(ops.equal(predicted, ops.float64_like(y_true, predicted)))


# Keyed by the names tfreg_core.training.METRICS validates.
METRIC_FUNCTIONS: dict[str, Callable[[Any, Any, MetricOps], Any]] = {
    "sparse_categorical_accuracy": _sparse_categorical_accuracy,
    "categorical_accuracy": _categorical_accuracy,
    "binary_accuracy": _binary_accuracy,
}
