"""Keras' global settings, set for a block and restored after it (the TensorFlow suites' helper)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def keras_setting(
    get: Callable[[], Any], set_: Callable[[Any], None], value: Any
) -> Iterator[None]:
    """``set_(value)`` for the block, the previous ``get()`` restored after it."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)
