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

Groups (the structured view), per parameter of rank >= 2 and per axis ``a``: the groups are the
slices ``w[..., i, ...]`` along ``a`` (their norms run over every other axis) -- on a Dense kernel
``(in, out)`` axis 0 gives input features and axis 1 neurons; on a Conv2D kernel
``(kh, kw, in, out)`` axis 2 gives input channels and axis 3 filters (torch's ``(out, in, ...)``
layouts number them differently: the counts match the *same* slices). Reported: ``groups``,
``zero_groups`` (every entry exactly 0, what ``ProximalGroupLasso`` produces), the smallest
non-zero and the largest group norm, and a histogram of ``norm / max norm`` over the decades of
:data:`HISTOGRAM_EDGES` (first bin: exactly zero).

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
    "HISTOGRAM_EDGES",
    "GroupSparsity",
    "ParameterSparsity",
    "SparsityReport",
    "group_sparsity",
    "parameter_sparsity",
    "sparsity_report",
]

DEFAULT_REL = 5e-4
_COLUMNS = ("parameter", "shape", "size", "zeros", "near0", "density", "L1", "L2", "max|w|")
# Upper edges of the group-norm histogram's bins, relative to the largest group norm; bin 0 holds
# the exactly-zero groups, bin k >= 1 the norms in (edge[k-2], edge[k-1]] (edge[-1] = 0).
HISTOGRAM_EDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_GROUP_COLUMNS = (
    "parameter",
    "axis",
    "groups",
    "zero",
    "min|g|>0",
    "max|g|",
    *(f"<=1e{round(math.log10(e))}" if e < 1 else "<=1" for e in HISTOGRAM_EDGES),
)


@dataclass(frozen=True)
class GroupSparsity:
    """Zero groups of one parameter along one axis (see the module docstring)."""

    name: str
    axis: int
    groups: int
    zero_groups: int
    min_norm: float
    max_norm: float
    histogram: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "histogram": list(self.histogram)}


def group_sparsity(name: str, values: Any, axis: int) -> GroupSparsity:
    """The :class:`GroupSparsity` of the slices of ``values`` along ``axis`` (norms in float64)."""
    w = np.abs(np.asarray(values).astype(np.float64, copy=False))
    axis = validation.normalized_axes((axis,), w.ndim, "axis")[0]
    others = tuple(a for a in range(w.ndim) if a != axis)
    norms = np.sqrt(np.square(w).sum(axis=others)) if others else w
    max_norm = float(norms.max(initial=0.0))
    zero = norms == 0
    relative = norms[~zero] / max_norm if max_norm else norms[~zero]
    # right=True: a norm exactly on an edge belongs to the bin that edge closes.
    counts = np.bincount(np.digitize(relative, HISTOGRAM_EDGES, right=True), minlength=7)
    return GroupSparsity(
        name=name,
        axis=axis,
        groups=int(norms.size),
        zero_groups=int(zero.sum()),
        min_norm=float(norms[~zero].min(initial=np.inf)) if (~zero).any() else 0.0,
        max_norm=max_norm,
        histogram=(int(zero.sum()), *(int(c) for c in counts[: len(HISTOGRAM_EDGES)])),
    )


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
    groups: tuple[GroupSparsity, ...] = ()

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

    def group_scalars(self, prefix: str = "sparsity/") -> dict[str, float]:
        """Zero groups per parameter and axis: ``prefix + "zero_groups/" + name + "/axis" + a``."""
        return {
            f"{prefix}zero_groups/{g.name}/axis{g.axis}": float(g.zero_groups) for g in self.groups
        }

    def zero_groups(self, name: str, axis: int) -> int:
        """How many slices of parameter ``name`` along ``axis`` are exactly zero."""
        for g in self.groups:
            if g.name == name and g.axis == axis:
                return g.zero_groups
        known = sorted({g.name for g in self.groups})
        raise validation.InvalidArgumentError(
            f"No group view of parameter {name!r} along axis {axis} (parameters of rank >= 2: "
            f"{known}). Received: name={name!r}, axis={axis!r}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rel": self.rel,
            "atol": self.atol,
            "total": self.totals(),
            "parameters": [p.as_dict() for p in self.parameters],
            "groups": [g.as_dict() for g in self.groups],
        }

    def to_table(self) -> str:
        rows = [_row(p.name, str(p.shape), p) for p in self.parameters]
        rows.append(_row("total", "", self))
        line = _liner(_COLUMNS, rows)
        rule = "-" * len(line(_COLUMNS))
        legend = (
            f"near0: w == 0 or |w| < max(rel * max|w|, atol), rel={self.rel:g}, atol={self.atol:g}"
        )
        table = [line(_COLUMNS), rule, *map(line, rows[:-1]), rule, line(rows[-1]), legend]
        if self.groups:
            group_rows = [_group_row(g) for g in self.groups]
            group_line = _liner(_GROUP_COLUMNS, group_rows)
            table += [
                "",
                group_line(_GROUP_COLUMNS),
                "-" * len(group_line(_GROUP_COLUMNS)),
                *map(group_line, group_rows),
                "groups: slices along axis; zero: all entries == 0; <=e: groups with "
                "0 < |g|/max|g| <= e, above the previous edge",
            ]
        return "\n".join(table)

    def __str__(self) -> str:
        return self.to_table()


def _liner(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Any:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    return line


def _group_row(g: GroupSparsity) -> list[str]:
    return [
        g.name,
        str(g.axis),
        str(g.groups),
        str(g.zero_groups),
        f"{g.min_norm:.3g}",
        f"{g.max_norm:.3g}",
        *(str(c) for c in g.histogram[1:]),
    ]


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
    named = [(n, np.asarray(v)) for n, v in named_values]
    parameters = tuple(parameter_sparsity(n, v, rel=rel, atol=atol) for n, v in named)
    groups = tuple(
        group_sparsity(n, v, axis) for n, v in named if v.ndim >= 2 for axis in range(v.ndim)
    )
    return SparsityReport(parameters=parameters, rel=rel, atol=atol, groups=groups)
