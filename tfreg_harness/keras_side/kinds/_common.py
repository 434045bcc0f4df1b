"""Helpers shared by the kind families: the registry, Keras' layer namespace, field comparison."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tfreg._compat import keras
from tfreg_harness.keras_side.registry import Weight

L = keras.layers
VECTOR = (Weight("bias", "bias"),)


def same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def first_mismatch(fields: Sequence[tuple[str, Any, Any]]) -> str | None:
    """The first ``(what, keras_value, torch_value)`` whose values differ, as a sentence."""
    for what, keras_value, torch_value in fields:
        if keras_value != torch_value:
            return f"{what}: Keras {keras_value!r} vs torch {torch_value!r}"
    return None


def as_tuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * n
