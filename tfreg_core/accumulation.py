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

import numpy as np

from tfreg_core.validation import InvalidArgumentError

__all__ = ["COUNT_MESSAGE", "check_add", "reject_count", "reject_gradient"]

COUNT_MESSAGE = (
    "add() needs a finite count >= 0 (loss elements in the micro-batch): a real number or a "
    "0-d tensor of a real dtype."
)


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
    count_tensor: tuple[Any, bool] | None = None,
) -> None:
    """Raise :class:`InvalidArgumentError` unless there is one gradient per sum (``None`` for a
    gradient that adds nothing), each of its sum's shape (no broadcasting: a broadcast gradient
    is always a caller bug), and ``count`` is a finite real number >= 0 (not a bool, a string,
    ``None`` or a list) or, ``count_tensor=(shape, real_dtype)`` given, a 0-d tensor of a real
    dtype, whose value the caller checks. ``unit`` names the accumulated things."""
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
    if isinstance(count, np.ndarray) and count.ndim == 0 and count.dtype.kind in "iuf":
        count = count.item()  # a NumPy 0-d array: checked as the number it holds
    if count_tensor is not None:
        shape, real = count_tensor
        if tuple(shape) != () or not real:
            reject_count(count)
    elif (
        isinstance(count, bool)
        or not isinstance(count, numbers.Real)
        or not math.isfinite(float(count))
        or float(count) < 0
    ):
        reject_count(count)


def reject_count(count: Any) -> None:
    """Raise the bad-``count`` error (also for tensor counts a framework found negative)."""
    raise InvalidArgumentError(f"{COUNT_MESSAGE} Received: count={count!r}")


def reject_gradient(index: int, grad: Any, expected: str) -> None:
    """Raise the bad-gradient error: ``grads[index]`` is not ``expected``."""
    raise InvalidArgumentError(
        f"add() needs each gradient to be None or {expected}. Received: grads[{index}]="
        f"{type(grad).__name__} {grad!r:.80}"
    )
