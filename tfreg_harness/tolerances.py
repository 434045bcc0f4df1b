"""The tolerance table every parity check cites (DESIGN.md's table, as data).

Each entry says why the number is what it is, so a failing comparison can print its own reason.
``rtol`` is relative to the largest magnitude of the expected tensor (see
``tfreg_harness.compare``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from tfreg_core.validation import InvalidArgumentError


@dataclass(frozen=True)
class Tolerance:
    """One entry of the tolerance table: the norm-wise relative bound ``rtol`` and ``why`` it is
    that number (printed with every failing comparison)."""

    rtol: float
    why: str


_EXACT = "the same TensorFlow ops in the same order: results must be bit-identical"
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("penalty_vs_keras", "float64"): Tolerance(0.0, _EXACT),
    ("penalty_vs_keras", "float32"): Tolerance(0.0, _EXACT),
    ("penalty_cross", "float64"): Tolerance(
        1e-12, "different reduction orders in TF and torch; ~n*eps for float64 sums"
    ),
    ("penalty_cross", "float32"): Tolerance(
        1e-6, "float32 summation-order differences across frameworks"
    ),
    ("model_cross", "float64"): Tolerance(
        1e-10, "forward/backward through several layers; conv algorithms differ in summation order"
    ),
    ("model_cross", "float32"): Tolerance(
        1e-5, "float32 matmul/conv reassociation across frameworks"
    ),
    ("accumulation", "float64"): Tolerance(
        1e-12, "sum of per-example losses split differently: only reassociation error"
    ),
    ("accumulation", "float32"): Tolerance(1e-6, "float32 reassociation of the same sum"),
    ("trajectory", "float64"): Tolerance(
        1e-9, "100 updates amplify per-step round-off of ~1e-15 by the problem's conditioning"
    ),
    ("trajectory", "float32"): Tolerance(
        1e-3, "reported only: float32 round-off compounds over 100 updates"
    ),
    ("sparsity_norms", "float64"): Tolerance(1e-12, "norms of identical weights; summation order"),
    ("sparsity_norms", "float32"): Tolerance(1e-6, "float32 summation order"),
}
"""``(claim, dtype) -> Tolerance``: the bound every parity check cites (DESIGN.md's table, as data).
Look entries up with :func:`tolerance`, which honours :func:`tolerance_overrides`."""


GRADIENT_SCALE_RULE = """A parameter's gradient is compared relative to the largest gradient entry
of its layer (the Keras variables sharing its parent path: a Dense's kernel and bias, a GRU's three
tensors), not to its own largest entry: ``max|torch - keras| <= rtol * max(|g_p|, |g_layer|)``.
Why: round-off in a gradient entry is proportional to the terms summed into it, not to the
result. A bias gradient sums the per-example output deltas, which can cancel to a small result:
a softmax head with near-uniform probabilities and balanced labels has an output-bias gradient
of ~1e-4 made of terms of ~0.25, whose float32 round-off (a few 1e-9, ~0.1 ulp of the terms) is
1e-4..1e-5 of the result -- a correct float32 pair failed 12 seeds in 20 at rtol 1e-5 on its own
scale. The layer's kernel gradient sums the same deltas times the layer's inputs, so its size
bounds the terms' size; measured on correct float32 pairs (MLP with cancelling output bias,
Embedding+GRU+gelu/leaky_relu/silu, Conv+BatchNorm in train mode, LSTM; 20 seeds each:
parity_tests/test_false_verdicts.py) the worst comparison then sits at 0.1 of the bound, and
every broken pair there still fails at >= 2.6e4 times it. The same rule serves float64 (its
rtol has the same room). Gradients that are analytically zero use ``zero_gradient_atol``."""


def gradient_scales(gradients: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per gradient (keyed by Keras variable path), the scale its error is measured against
    (``GRADIENT_SCALE_RULE``): the largest ``|entry|`` among the gradients of its layer."""
    by_layer: dict[str, float] = {}
    for path, grad in gradients.items():
        layer = path.rpartition("/")[0]
        by_layer[layer] = max(by_layer.get(layer, 0.0), float(np.max(np.abs(grad), initial=0.0)))
    return {path: by_layer[path.rpartition("/")[0]] for path in gradients}


def resolve_rtol(claim: str, dtype: str, rtol: float | None) -> float:
    """``rtol`` when given, else the table's for ``claim`` at ``dtype``."""
    return tolerance(claim, dtype).rtol if rtol is None else rtol


def tolerance(claim: str, dtype: str) -> Tolerance:
    """Look up the tolerance for ``claim`` at ``dtype`` ('float32' or 'float64').

    An unknown pair raises ``InvalidArgumentError`` (a ``ValueError``), naming both and listing
    the known claims, like every other bad argument in the project."""
    try:
        return _OVERRIDES.get().get((claim, dtype)) or TOLERANCES[(claim, dtype)]
    except (KeyError, TypeError):
        claims = sorted({c for c, _ in TOLERANCES})
        raise InvalidArgumentError(
            f"No tolerance for claim={claim!r}, dtype={dtype!r}. Known claims: {claims}; "
            "dtypes: 'float32', 'float64'"
        ) from None


ZERO_GRADIENT_ULPS = 64
"""Round-off budget, in units of the dtype's epsilon times the model's largest gradient entry, of
a gradient that is exactly zero analytically (a bias feeding a train-mode BatchNorm: the batch
mean removes it). Such a gradient is a sum of O(batch) terms cancelling to round-off; measured
6.9e-18 against a largest entry of ~0.3 in float64 (~0.1 ulp), so 64 ulps leave room for larger
batches without hiding a real gradient, which is O(largest entry)."""


def zero_gradient_atol(dtype: str, scale: float) -> float:
    """Absolute bound for a gradient whose true value is 0: ``ZERO_GRADIENT_ULPS * eps(dtype) *
    scale`` (``scale``: the model's largest gradient entry). A relative comparison is meaningless
    there: both frameworks return round-off, so ``rel`` would be O(1)."""
    if dtype not in ("float32", "float64"):
        raise InvalidArgumentError(
            f"No zero-gradient bound for dtype={dtype!r}; dtypes: 'float32', 'float64'"
        )
    return ZERO_GRADIENT_ULPS * float(np.finfo(dtype).eps) * float(scale)


def zero_atol(dtype: str, arrays: Iterable[Any]) -> float:
    """:func:`zero_gradient_atol` at the largest ``|entry|`` of ``arrays`` (a model's gradients,
    or its weights for the steps after them; 0 when there are none): the one bound below which
    an expected value is compared as an exact zero (``compare_floored``)."""
    return zero_gradient_atol(
        dtype, max((float(np.max(np.abs(a), initial=0.0)) for a in arrays), default=0.0)
    )


# Overrides in force (innermost ``tolerance_overrides`` block); a ContextVar, so threads and
# asyncio tasks each see their own.
_OVERRIDES: ContextVar[Mapping[tuple[str, str], Tolerance]] = ContextVar(
    "tfreg_tolerance_overrides", default=MappingProxyType({})
)


def parse_overrides(rtol: Mapping[str, float], *, why: str) -> dict[tuple[str, str], Tolerance]:
    """``{"claim": rtol}`` (both dtypes) or ``{"claim/dtype": rtol}`` as table entries.

    An unknown claim or dtype, or an rtol that is not a finite number >= 0, raises
    ``InvalidArgumentError`` naming the key and value."""
    claims = sorted({c for c, _ in TOLERANCES})
    out: dict[tuple[str, str], Tolerance] = {}
    for key, value in rtol.items():
        claim, _, dtype = str(key).partition("/")
        dtypes = [dtype] if dtype else ["float32", "float64"]
        if claim not in claims or any((claim, d) not in TOLERANCES for d in dtypes):
            raise InvalidArgumentError(
                f"No tolerance to override for {key!r}: keys are 'claim' or 'claim/dtype' with "
                f"claim one of {claims} and dtype 'float32' or 'float64'"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 0)
        ):
            raise InvalidArgumentError(
                f"A tolerance override must be a finite number >= 0. Received: {key}={value!r}"
            )
        for d in dtypes:
            out[(claim, d)] = Tolerance(float(value), why)
    return out


@contextmanager
def tolerance_overrides(rtol: Mapping[str, float], *, why: str) -> Iterator[None]:
    """Within the block, :func:`tolerance` returns ``rtol``'s values for the claims it names
    (keys as :func:`parse_overrides` reads them), with ``why`` as the reason; blocks nest, the
    inner winning. For a team's CI whose models need their own bound (see the pytest plugin's
    ``parity_rtol``); the table's own numbers stay what the project's tests cite."""
    token = _OVERRIDES.set({**_OVERRIDES.get(), **parse_overrides(rtol, why=why)})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)
