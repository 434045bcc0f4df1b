"""Test data for parity checks, drawn with NumPy only (no scikit-learn: no extra declares it).

The checks need inputs of the size and value range of the 8x8 digits the seed notebooks used,
not the digits themselves: parity compares two frameworks on the *same* inputs, whatever they are.
"""

from __future__ import annotations

import numpy as np

__all__ = ["digit_like_images"]


def digit_like_images(
    n: int, *, dtype: str, seed: int = 0, classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of shape (8, 8) with values k/16 (k = 0..16, like scikit-learn's digits
    scaled to [0, 1]) and integer labels in ``[0, classes)``, from
    ``numpy.random.default_rng(seed)``.

    Values k/16 are exact in float32 and float64, so both dtypes see the same inputs.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int. Received: n={n!r}")
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 17, size=(n, 8, 8)) / 16.0
    y = rng.integers(0, classes, size=n)
    return x.astype(dtype), y
