"""Numeric comparison with a report: which tensor, how far apart, where, and against what bound.

A non-finite value (NaN, +-inf) on either side is never a match: a pair whose outputs are NaN in
both frameworks (a diverged run, an uninitialised buffer) must not read as "identical". The report
then points at the first non-finite entry, with ``max_abs = inf``.

Relative error is *norm-wise*: ``max|a - e| / max|e|``. Element-wise relative error is meaningless
for entries that are zero up to round-off (a gradient entry of 1e-17 against 3e-17), which every
real gradient has; norm-wise error is what ``rtol`` bounds in this project. The element-wise
maximum is still reported for diagnosis.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """One comparison of ``actual`` against ``expected`` (see :func:`compare`): the norm-wise
    ``max_rel = max|a - e| / max|e|`` and ``max_abs``, the index of the largest difference with
    both values there, the bounds applied and whether it ``passed``."""

    name: str
    dtype: str
    max_abs: float
    max_rel: float
    index: tuple[int, ...]
    actual_at: float
    expected_at: float
    rtol: float
    atol: float
    passed: bool

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"[{verdict}] {self.name} ({self.dtype}): max abs {self.max_abs:.3e}, "
            f"rel {self.max_rel:.3e} (rtol {self.rtol:.0e}, atol {self.atol:.0e}) at index "
            f"{self.index}: actual {self.actual_at!r} vs expected {self.expected_at!r}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def absolute(self) -> bool:
        """Held to ``atol`` alone (``rtol`` 0: an exact-zero target, see
        :func:`compare_floored`), where a relative error would be round-off over round-off."""
        return self.rtol == 0

    @property
    def relative_error(self) -> float | None:
        """``max_rel`` as a report shows it: ``None`` for an :attr:`absolute` comparison."""
        return None if self.absolute else self.max_rel

    @property
    def bound(self) -> float:
        """The bound a report shows: ``atol`` for an :attr:`absolute` comparison, else ``rtol``."""
        return self.atol if self.absolute else self.rtol


def compare(name: str, actual: Any, expected: Any, *, rtol: float, atol: float = 0.0) -> Comparison:
    """Compare two array-likes (already on the host as NumPy-convertible values).

    Passes when every value on both sides is finite and ``max|a - e| <= atol + rtol * max|e|``.
    NaN/inf anywhere fails, even where both sides hold the same NaN/inf: non-finite results say
    nothing about whether the two computations agree. Shapes must match; a mismatch raises
    ``ValueError`` naming both shapes.
    """
    a = np.asarray(actual)
    e = np.asarray(expected)
    if a.shape != e.shape:
        raise ValueError(f"{name}: shape mismatch, actual {a.shape} vs expected {e.shape}")
    a64 = a.astype(np.float64)
    e64 = e.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(e64)
    all_finite = bool(finite.all())
    with np.errstate(invalid="ignore"):  # inf - inf: masked out below, no warning wanted
        diff = np.where(finite, np.abs(a64 - e64), np.inf)
    scale = float(np.max(np.abs(np.where(finite, e64, 0.0)), initial=0.0))
    # argmax returns the first maximum: the first non-finite entry when there is one.
    flat_idx = int(np.argmax(diff)) if diff.size else 0
    index = tuple(int(i) for i in np.unravel_index(flat_idx, diff.shape)) if diff.size else ()
    max_abs = float(diff.flat[flat_idx]) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    passed = all_finite and max_abs <= atol + rtol * scale
    return Comparison(
        name=name,
        dtype=str(e.dtype),
        max_abs=max_abs,
        max_rel=max_rel,
        index=index,
        actual_at=float(a64.flat[flat_idx]) if a64.size else 0.0,
        expected_at=float(e64.flat[flat_idx]) if e64.size else 0.0,
        rtol=rtol,
        atol=atol,
        passed=passed,
    )


def compare_floored(
    name: str,
    actual: Any,
    expected: Any,
    *,
    rtol: float,
    atol: float,
    scale: float | None = None,
) -> Comparison:
    """``actual`` against ``expected`` at ``rtol`` relative to ``scale`` (default: the expected
    tensor's largest entry; a gradient's layer scale, ``GRADIENT_SCALE_RULE`` in
    :mod:`tfreg_harness.tolerances`). An ``expected`` within ``atol`` of 0 (an analytically
    zero gradient, a weight moved only by one) is compared absolutely against 0 and named
    ``"name == 0"``, as its relative error would be round-off over round-off. Non-finite
    values fail as in :func:`compare`, whatever the scale."""
    own = float(np.max(np.abs(np.asarray(expected)), initial=0.0))
    if own <= atol:
        zeros = np.zeros_like(np.asarray(expected))
        return compare(f"{name} == 0", actual, zeros, rtol=0.0, atol=atol)
    # a larger finite scale only; NaN own/scale (a diverged pair) falls through to compare
    if scale is None or not math.isfinite(own) or not scale > own or not math.isfinite(scale):
        return compare(name, actual, expected, rtol=rtol)
    found = compare(name, actual, expected, rtol=0.0, atol=rtol * scale)
    return replace(found, rtol=rtol, atol=0.0, max_rel=found.max_abs / scale)


def assert_close(
    name: str, actual: Any, expected: Any, *, rtol: float, atol: float = 0.0
) -> Comparison:
    """``compare`` and raise ``AssertionError`` with the full report when it fails."""
    result = compare(name, actual, expected, rtol=rtol, atol=atol)
    if not result.passed:
        raise AssertionError(str(result))
    return result
