"""Sparsity reports and the proximal-L1 (soft-threshold) arithmetic, framework-free.

``tfreg.sparsity`` and ``torchref.sparsity`` only pick the parameters (the same scope rule as
``penalty()``: kernels, i.e. trainable tensors of rank >= 2, unless ``include_bias=True``) and copy
them to NumPy; everything counted or summed here runs on those copies, so identical weights give
identical counts in both frameworks, and norms equal up to float64 summation order (the layouts
differ: a Dense kernel ``(in, out)`` is torch's ``Linear.weight (out, in)``).

What is counted, per parameter ``w``:

- ``zeros``: entries exactly ``0`` (``-0.0`` included) -- what an L1 *proximal* step produces and
  a (sub)gradient step essentially never does;
- ``near_zeros``: entries with ``w == 0`` or ``|w| < threshold``, where
  ``threshold = max(rel * max|w|, atol)``. ``rel=5e-4, atol=0`` is the seed notebook's
  ``abs(w) < 0.0005 * abs(w).max()``; ``rel=0, atol=1e-6`` is a purely absolute rule. Exact zeros
  always count (the notebook's strict ``<`` would count none of an all-zero tensor, whose
  threshold is 0), so ``zeros <= near_zeros``;
- ``nonzeros = size - zeros`` and ``density = nonzeros / size`` (exact zeros only);
- ``l1 = sum|w|`` and ``l2 = sqrt(sum w^2)`` in float64, whatever the parameter's dtype.

Totals add the counts and L1 norms; the total L2 is the norm of all entries together
(``sqrt(sum l2_p^2)``); the total near-zero count is the sum of the per-parameter counts, each
against its own parameter's largest entry (as the notebook's ``check_weight``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tfreg_core import validation

__all__ = [
    "ParameterSparsity",
    "ProximalL1Spec",
    "SparsityReport",
    "include_bias_flag",
    "parameter_sparsity",
    "proximal_threshold",
    "soft_threshold",
    "sparsity_report",
]

DEFAULT_REL = 5e-4
_COLUMNS = ("parameter", "shape", "size", "zeros", "near0", "density", "L1", "L2", "max|w|")


@dataclass(frozen=True)
class ParameterSparsity:
    """The sparsity of one parameter (see the module docstring for each field's definition)."""

    name: str
    shape: tuple[int, ...]
    size: int
    zeros: int
    near_zeros: int
    threshold: float
    l1: float
    l2: float
    max_abs: float

    @property
    def nonzeros(self) -> int:
        return self.size - self.zeros

    @property
    def density(self) -> float:
        """``nonzeros / size``; 0.0 for an empty parameter (it holds nothing non-zero)."""
        return self.nonzeros / self.size if self.size else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "shape": list(self.shape),
            "nonzeros": self.nonzeros,
            "density": self.density,
        }


@dataclass(frozen=True)
class SparsityReport:
    """Per-parameter and total sparsity of a model's penalised parameters, with the thresholds
    used. Produced identically by ``tfreg.sparsity_report`` and ``torchref.sparsity_report``.

    ``str(report)`` / ``report.to_table()`` print a table; ``as_dict()`` is JSON-ready;
    ``scalars(prefix)`` gives the flat totals a Keras ``History`` or a logger records.
    """

    parameters: tuple[ParameterSparsity, ...]
    rel: float
    atol: float

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parameters)

    @property
    def zeros(self) -> int:
        return sum(p.zeros for p in self.parameters)

    @property
    def near_zeros(self) -> int:
        return sum(p.near_zeros for p in self.parameters)

    @property
    def nonzeros(self) -> int:
        return self.size - self.zeros

    @property
    def density(self) -> float:
        return self.nonzeros / self.size if self.size else 0.0

    @property
    def l1(self) -> float:
        return math.fsum(p.l1 for p in self.parameters)

    @property
    def l2(self) -> float:
        return math.sqrt(math.fsum(p.l2 * p.l2 for p in self.parameters))

    @property
    def max_abs(self) -> float:
        return max((p.max_abs for p in self.parameters), default=0.0)

    def totals(self) -> dict[str, float | int]:
        return {
            "size": self.size,
            "zeros": self.zeros,
            "near_zeros": self.near_zeros,
            "nonzeros": self.nonzeros,
            "density": self.density,
            "l1": self.l1,
            "l2": self.l2,
            "max_abs": self.max_abs,
        }

    def scalars(self, prefix: str = "sparsity/") -> dict[str, float]:
        """The totals as floats keyed ``prefix + name`` (``sparsity/zeros``, ...)."""
        return {f"{prefix}{k}": float(v) for k, v in self.totals().items()}

    def as_dict(self) -> dict[str, Any]:
        return {
            "rel": self.rel,
            "atol": self.atol,
            "total": self.totals(),
            "parameters": [p.as_dict() for p in self.parameters],
        }

    def to_table(self) -> str:
        rows = [_row(p.name, str(p.shape), p) for p in self.parameters]
        rows.append(_row("total", "", self))
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([first, *rest])

        rule = "-" * len(line(_COLUMNS))
        legend = (
            f"near0: w == 0 or |w| < max(rel * max|w|, atol), rel={self.rel:g}, atol={self.atol:g}"
        )
        return "\n".join(
            [line(_COLUMNS), rule, *map(line, rows[:-1]), rule, line(rows[-1]), legend]
        )

    def __str__(self) -> str:
        return self.to_table()


def _row(name: str, shape: str, s: ParameterSparsity | SparsityReport) -> list[str]:
    return [
        name,
        shape,
        str(s.size),
        str(s.zeros),
        str(s.near_zeros),
        f"{s.density:.4f}",
        f"{s.l1:.6g}",
        f"{s.l2:.6g}",
        f"{s.max_abs:.3g}",
    ]


def _check_thresholds(rel: Any, atol: Any) -> tuple[float, float]:
    return validation.non_negative_float(rel, "rel"), validation.non_negative_float(atol, "atol")


def parameter_sparsity(
    name: str, values: Any, *, rel: float = DEFAULT_REL, atol: float = 0.0
) -> ParameterSparsity:
    """The :class:`ParameterSparsity` of one array (any real dtype; norms in float64)."""
    rel, atol = _check_thresholds(rel, atol)
    w = np.asarray(values)
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise validation.InvalidArgumentError(
            f"A sparsity report needs real numbers. Received: {name} with dtype={w.dtype}"
        )
    magnitude = np.abs(w.astype(np.float64, copy=False))
    max_abs = float(magnitude.max(initial=0.0))
    threshold = max(rel * max_abs, atol)
    return ParameterSparsity(
        name=name,
        shape=tuple(int(d) for d in w.shape),
        size=int(w.size),
        zeros=int(np.count_nonzero(magnitude == 0)),
        near_zeros=int(np.count_nonzero((magnitude == 0) | (magnitude < threshold))),
        threshold=threshold,
        l1=float(magnitude.sum()),
        l2=float(np.sqrt(np.square(magnitude).sum())),
        max_abs=max_abs,
    )


def sparsity_report(
    named_values: Iterable[tuple[str, Any]], *, rel: float = DEFAULT_REL, atol: float = 0.0
) -> SparsityReport:
    """A :class:`SparsityReport` of ``(name, array)`` pairs, in the order given."""
    rel, atol = _check_thresholds(rel, atol)
    parameters = tuple(parameter_sparsity(n, v, rel=rel, atol=atol) for n, v in named_values)
    return SparsityReport(parameters=parameters, rel=rel, atol=atol)


# --- proximal L1 ------------------------------------------------------------------------


def soft_threshold(x: Any, threshold: float) -> np.ndarray:
    """NumPy ``sign(x) * max(|x| - threshold, 0)``: the proximal operator of
    ``threshold * ||x||_1``. The reference the framework versions are tested against."""
    threshold = validation.non_negative_float(threshold, "threshold")
    x = np.asarray(x)
    return np.sign(x) * np.maximum(np.abs(x) - threshold, 0)


def proximal_threshold(learning_rate: Any, l1: float) -> float:
    """``learning_rate * l1``: how far one proximal step moves every entry towards zero.

    Computed once in float64 (then rounded to the weights' dtype by the caller) in both
    frameworks, so the threshold, like the step, is identical given identical inputs.
    """
    return validation.non_negative_float(learning_rate, "learning_rate") * l1


def include_bias_flag(value: Any) -> bool:
    """``include_bias`` must be a real bool: a truthy string or 1 would silently widen the scope."""
    if not isinstance(value, bool):
        raise validation.InvalidArgumentError(
            f"include_bias must be a bool. Received: include_bias={value!r}"
        )
    return value


class ProximalL1Spec:
    """Hyperparameters of ``ProximalL1``: ``l1`` (the L1 strength lambda, used exactly -- not
    rounded through float32, this is not a Keras class) and the scope ``include_bias``."""

    def __init__(self, *, l1: float, include_bias: bool = False) -> None:
        self.l1 = validation.non_negative_float(l1, "l1")
        self.include_bias = include_bias_flag(include_bias)

    def threshold(self, learning_rate: float) -> float:
        """``learning_rate * l1`` for a Python learning rate (see :func:`proximal_threshold`)."""
        return proximal_threshold(learning_rate, self.l1)

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "include_bias": self.include_bias}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(l1={self.l1!r}, include_bias={self.include_bias!r})"
