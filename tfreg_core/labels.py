"""Class-index labels checked on the host before any update, shared by both trainers.

A label outside ``[0, num_classes)`` (and not the loss's ignored value) fails deep inside a
framework -- torch's ``IndexError`` on CPU, TF's ``InvalidArgumentError`` on CPU, NaN or garbage
on GPU -- and only when its micro-batch is reached, after earlier windows were applied. Arrays
are checked once per ``fit`` (one vectorised pass), streamed micro-batches before they are
added to their window.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tfreg_core.validation import InvalidArgumentError

__all__ = ["check_class_labels"]


def check_class_labels(
    labels: Any, num_classes: int, *, ignore: int | None = None, where: str = "y"
) -> None:
    """Raise :class:`InvalidArgumentError` naming the first example (``where[i]``) whose label
    is outside ``[0, num_classes)`` and is not ``ignore``. Non-numeric arrays are left to the
    loss (which refuses them itself)."""
    y = np.asarray(labels)
    if y.dtype.kind not in "iuf" or y.size == 0:
        return
    valid = (y >= 0) & (y < num_classes)
    if ignore is not None:
        valid |= y == ignore
    if bool(valid.all()):
        return
    first = np.unravel_index(int(np.flatnonzero(~valid)[0]), y.shape)
    allowed = f"[0, {num_classes})" + ("" if ignore is None else f" or {ignore} (ignored)")
    raise InvalidArgumentError(
        f"Class labels must be in {allowed} for a model with {num_classes} classes; "
        f"checked before any update. Received: {where}[{', '.join(map(str, first))}]="
        f"{y[first].item()!r}"
    )
