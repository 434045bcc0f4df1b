"""Argument checks of ``accumulation.add``, shared by :mod:`tfreg.accumulation` and
:mod:`torchref.accumulation` so both reject the same inputs with the same message.

Everything is checked before the first in-place add: a rejected call leaves the state untouched.
Shapes are tuples; ``None`` stands for a dimension unknown until run time (a ``tf.function``
trace), which is compatible with any size.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from tfreg_core.validation import InvalidArgumentError

__all__ = ["COUNT_MESSAGE", "check_add", "reject_count"]

COUNT_MESSAGE = "add() needs a finite count >= 0 (loss elements in the micro-batch)."


def _compatible(grad_shape: tuple[Any, ...], sum_shape: tuple[Any, ...]) -> bool:
    if len(grad_shape) != len(sum_shape):
        return False
    return all(g is None or s is None or g == s for g, s in zip(grad_shape, sum_shape, strict=True))


def check_add(
    grad_shapes: Sequence[tuple[Any, ...] | None],
    sum_shapes: Sequence[tuple[Any, ...]],
    count: Any,
    *,
    unit: str,
) -> None:
    """Raise :class:`InvalidArgumentError` unless there is one gradient per sum (``None`` for a
    gradient that adds nothing), each of its sum's shape (no broadcasting: a broadcast gradient
    is always a caller bug), and ``count`` -- when it is a number; tensors are checked by the
    caller -- is finite and >= 0. ``unit`` names the accumulated things ("variables"...)."""
    if len(grad_shapes) != len(sum_shapes):
        raise InvalidArgumentError(
            f"add() got {len(grad_shapes)} gradients for an accumulator of {len(sum_shapes)} "
            f"{unit}. Received: len(grads)={len(grad_shapes)}"
        )
    for i, (grad_shape, sum_shape) in enumerate(zip(grad_shapes, sum_shapes, strict=True)):
        if grad_shape is not None and not _compatible(tuple(grad_shape), tuple(sum_shape)):
            raise InvalidArgumentError(
                f"add() got grads[{i}] of shape {tuple(grad_shape)} for an accumulator sum of "
                f"shape {tuple(sum_shape)}; gradients are never broadcast. "
                f"Received: grads[{i}].shape={tuple(grad_shape)}"
            )
    if isinstance(count, numbers.Number) and (
        isinstance(count, bool)
        or not isinstance(count, numbers.Real)
        or not math.isfinite(float(count))
        or float(count) < 0
    ):
        reject_count(count)


def reject_count(count: Any) -> None:
    """Raise the bad-``count`` error (also for tensor counts a framework found negative)."""
    raise InvalidArgumentError(f"{COUNT_MESSAGE} Received: count={count!r}")
