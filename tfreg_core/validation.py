"""Argument checks shared by every public class in both frameworks.

Messages for the Keras-compatible arguments reproduce Keras 3's ``validate_float_arg`` text
verbatim (including its missing space after the full stop), so code that matches on Keras' error
strings keeps working. Where we are stricter than Keras (booleans) or more lenient (NumPy scalars),
the difference is deliberate and documented at the call site.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any


class InvalidArgumentError(ValueError, TypeError):
    """Bad hyperparameter. A ``ValueError`` (as Keras raises) that is also a ``TypeError``.

    Keras raises ``ValueError`` even for a non-number (``L1("a")``); Python convention says
    ``TypeError``. Inheriting from both lets either ``except`` clause catch it.
    """


def _keras_message(name: str, value: Any) -> str:
    return (
        f"Invalid value for argument {name}: expected a non-negative float.Received: {name}={value}"
    )


def non_negative_float(value: Any, name: str) -> float:
    """Return ``value`` as a Python float, or raise naming ``name`` and the value.

    Accepted: finite, non-negative real numbers, NumPy scalars included (Keras rejects
    ``np.float32``; we accept it since it is a number). Rejected: booleans (Keras silently turns
    ``True`` into ``1.0``, which is never what a user meant), strings, NaN, infinities, negatives.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(_keras_message(name, value))
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float64's range (> 1.8e308)
        raise InvalidArgumentError(_keras_message(name, value)) from None
    if math.isnan(as_float) or math.isinf(as_float) or as_float < 0:
        raise InvalidArgumentError(_keras_message(name, value))
    return as_float


def factor_fits(value: float, name: str, dtype_max: float, dtype: str) -> float:
    """``value`` (a validated factor) if it is finite in the weights' ``dtype`` (whose largest
    finite value is ``dtype_max``); a larger one would make the penalty ``inf`` silently."""
    if value > dtype_max:
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: it exceeds the largest finite {dtype} "
            f"({dtype_max:.7g}); the penalty of {dtype} weights would be inf. "
            f"Received: {name}={value!r}"
        )
    return value


# Largest finite float32. Keras converts its regularizer factors to float32 tensors, which fails
# (L1, OrthogonalRegularizer: at construction; L2, L1L2: at the first call) for larger values.
_FLOAT32_MAX = 3.4028234663852886e38


def non_negative_float32(value: Any, name: str) -> float:
    """``non_negative_float`` that also fits in float32, the precision Keras keeps factors in.

    Rejected at construction, with the argument named, where Keras fails later or with a
    conversion message that names neither the argument nor the value.
    """
    as_float = non_negative_float(value, name)
    if as_float > _FLOAT32_MAX:
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: expected a non-negative float that fits in "
            f"float32 (at most {_FLOAT32_MAX}), the precision Keras applies factors in. "
            f"Received: {name}={value}"
        )
    return as_float


def finite_float_at_least(value: Any, name: str, minimum: float) -> float:
    """A finite real number ``>= minimum`` (used for the norm order ``p``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: expected a finite number >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float64's range
        as_float = math.inf
    if not math.isfinite(as_float) or as_float < minimum:
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: expected a finite number >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    return as_float


def strict_bool(value: Any, name: str) -> bool:
    """A real ``bool``: ``1``, ``"yes"`` or ``np.bool_`` would silently mean something else."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a bool. Received: {name}={value!r}")
    return value


def positive_int(value: Any, name: str) -> int:
    """A positive Python/NumPy integer (not a bool, not a float such as ``2.0``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: expected a positive integer. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def choice(value: Any, name: str, options: Iterable[str]) -> str:
    """One of ``options``; the message format is Keras' (``OrthogonalRegularizer(mode=...)``)."""
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        listed = ", ".join(f'"{o}"' for o in options)
        raise InvalidArgumentError(
            f"Invalid value for argument `{name}`. Expected one of {{{listed}}}. "
            f"Received: {name}={value}"
        )
    return value


def axes(value: Any, name: str) -> tuple[int, ...]:
    """An int or a non-empty sequence of distinct ints, returned as a tuple (rank not yet known)."""
    items: Sequence[Any] = (value,) if isinstance(value, numbers.Integral) else value
    if (
        isinstance(value, (bool, str))
        or not isinstance(items, Sequence)
        or len(items) == 0
        or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in items)
        or len({int(a) for a in items}) != len(items)
    ):
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: expected an int or a non-empty sequence of "
            f"distinct ints. Received: {name}={value!r}"
        )
    return tuple(int(a) for a in items)


def normalized_axes(axes_: tuple[int, ...], rank: int, name: str) -> tuple[int, ...]:
    """Resolve negative axes against ``rank``; raise naming the axis and the shape's rank."""
    resolved = []
    for a in axes_:
        if not -rank <= a < rank:
            raise InvalidArgumentError(
                f"Invalid value for argument {name}: axis {a} is out of range for a tensor of "
                f"rank {rank}. Received: {name}={axes_!r}"
            )
        resolved.append(a % rank)
    if len(set(resolved)) != len(resolved):
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: axes repeat after resolving negatives for "
            f"rank {rank}. Received: {name}={axes_!r}"
        )
    return tuple(sorted(resolved))


def rank_two(shape: Sequence[Any]) -> None:
    """OrthogonalRegularizer's rank check, with Keras' message."""
    if len(shape) != 2:
        raise InvalidArgumentError(
            f"Inputs to OrthogonalRegularizer must have rank 2. Received: inputs.shape={shape}"
        )
