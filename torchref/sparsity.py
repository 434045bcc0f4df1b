"""Sparsity reports for PyTorch (entries and groups) -- the twin of :mod:`tfreg.sparsity`, same
names and arithmetic (:mod:`tfreg_core.sparsity`). The proximal operators that make exact zeros,
``ProximalL1`` and ``ProximalGroupLasso``, live in :mod:`torchref.proximal` (re-exported here).

Differences from tfreg: torch has no Keras-style callbacks, so there is no ``SparsityCallback``;
log ``report.scalars() | report.group_scalars()`` of ``sparsity_report(model)`` in your loop
(same keys). Group axes follow torch's layouts: on ``Linear.weight (out, in)`` axis 0 is the
neurons and axis 1 the input features (Keras' Dense kernel ``(in, out)``: the other way round).
"""

from __future__ import annotations

from collections.abc import Iterable

from tfreg_core import sparsity as _core
from tfreg_core.proximal import include_bias_flag
from tfreg_core.sparsity import GroupSparsity, ParameterSparsity, SparsityReport
from torchref._compat import torch
from torchref.proximal import (
    ProximalGroupLasso,
    ProximalL1,
    apply_proximal_l1,
    named_penalized,
    soft_threshold,
)

__all__ = [
    "GroupSparsity",
    "ParameterSparsity",
    "ProximalGroupLasso",
    "ProximalL1",
    "SparsityReport",
    "apply_proximal_l1",
    "soft_threshold",
    "sparsity_report",
]

_Parameters = torch.nn.Module | Iterable[torch.Tensor]


def sparsity_report(
    module_or_tensors: _Parameters,
    *,
    rel: float = _core.DEFAULT_REL,
    atol: float = 0.0,
    include_bias: bool = False,
) -> SparsityReport:
    """The :class:`~tfreg_core.sparsity.SparsityReport` of the parameters ``torchref.penalty`` would
    penalise (``ndim >= 2`` unless ``include_bias``), computed on NumPy copies. Equals
    ``tfreg.sparsity_report`` of the transferred Keras model (counts exactly; norms up to
    summation order)."""
    named = named_penalized(module_or_tensors, include_bias=include_bias_flag(include_bias))
    return _core.sparsity_report(
        [(n, t.detach().cpu().numpy()) for n, t in named], rel=rel, atol=atol
    )
