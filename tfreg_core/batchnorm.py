"""BatchNorm moving statistics once per window: the framework-free arithmetic behind
``batchnorm="per_window"`` of ``tfreg.Trainer`` / ``tfreg.AccumulatingModel`` /
``torchref.Trainer`` (adapters: :mod:`tfreg.batchnorm`, :mod:`torchref.batchnorm`).

Each micro-batch ``i`` of a window contributes, per channel, its element count ``n_i``, mean
``mu_i`` and sum of squared deviations ``M2_i = sum (x - mu_i)^2`` (masked elements weigh 0).
They are pooled by Chan et al.'s parallel formula (no cancellation of ``sum x^2 - N mu^2``)::

    N = n_a + n_b,  d = mu_b - mu_a,  mu = mu_a + d * n_b / N,  M2 = M2_a + M2_b + d^2 n_a n_b / N

into the window's moments -- the concatenated window's mean and ``M2`` -- and the moving
statistics are updated once, as one training-mode forward pass on the concatenated window
updates them:

- Keras (momentum ``m``, biased variance): ``moving = moving * m + pooled * (1 - m)``, with
  ``pooled_var = M2 / N``;
- torch (momentum ``f = 1 - m``, or ``1 / num_batches_tracked`` for ``momentum=None``,
  unbiased variance): ``running = running * (1 - f) + pooled * f``, with
  ``pooled_var = M2 / (N - 1)``, ``num_batches_tracked += 1``.

Gradients are not affected: each micro-batch is still normalised with its own statistics.
The functions take the framework's tensors and use only ``+ - * /`` on them (``divide`` is the
adapter's division returning 0 where the denominator is 0: an empty micro-batch adds nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tfreg_core.validation import InvalidArgumentError

__all__ = ["MODES", "check_mode", "keras_update", "merge", "torch_update"]

MODES = ("per_micro_batch", "per_window")


def check_mode(batchnorm: Any) -> str:
    """``batchnorm`` if it is one of :data:`MODES`, else :class:`InvalidArgumentError`."""
    if batchnorm not in MODES:
        raise InvalidArgumentError(
            f"batchnorm must be one of {list(MODES)}. Received: batchnorm={batchnorm!r}"
        )
    return str(batchnorm)


def merge(
    a: tuple[Any, Any, Any], b: tuple[Any, Any, Any], divide: Callable[[Any, Any], Any]
) -> tuple[Any, Any, Any]:
    """Chan's pooling of ``(count, mean, M2)`` ``a`` and ``b`` (``count`` a scalar, ``mean``
    and ``M2`` per channel): the moments of both sets together."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * divide(n_b, n)
    m2 = m2_a + m2_b + delta * delta * divide(n_a * n_b, n)
    return n, mean, m2


def keras_update(
    moving_mean: Any, moving_variance: Any, pooled: tuple[Any, Any, Any], momentum: float
) -> tuple[Any, Any]:
    """Keras' ``BatchNormalization`` update from the window's pooled moments (biased
    variance ``M2 / N``): ``moving * momentum + pooled * (1 - momentum)``."""
    n, mean, m2 = pooled
    variance = m2 / n
    return (
        moving_mean * momentum + mean * (1.0 - momentum),
        moving_variance * momentum + variance * (1.0 - momentum),
    )


def torch_update(
    running_mean: Any, running_var: Any, pooled: tuple[Any, Any, Any], factor: float
) -> tuple[Any, Any]:
    """torch's ``_BatchNorm`` update from the window's pooled moments (unbiased variance
    ``M2 / (N - 1)``, as torch keeps): ``running * (1 - factor) + pooled * factor``, with
    ``factor`` the module's ``momentum`` (``1 / num_batches_tracked`` for ``None``)."""
    n, mean, m2 = pooled
    variance = m2 / (n - 1)
    return (
        running_mean * (1.0 - factor) + mean * factor,
        running_var * (1.0 - factor) + variance * factor,
    )
