"""Sparsity that is real, measured: sparsity reports (entries and groups) and a Keras callback.

A report counts exact zeros and near-zeros per penalised variable and, for every kernel and axis,
the exactly-zero groups (slices: input features, neurons, channels, filters) with a histogram of
the group norms (:mod:`tfreg_core.sparsity` defines every number). Exact zeros come from a
*proximal* step -- ``ProximalL1``, ``ProximalGroupLasso`` (:mod:`tfreg.proximal`, re-exported
here) -- never from a penalty in the loss, whose weights only get small.

The torch twin is :mod:`torchref.sparsity` (same names and arithmetic; no callback: call
``torchref.sparsity_report`` in your loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from tfreg._compat import keras
from tfreg.proximal import (
    ProximalGroupLasso,
    ProximalL1,
    apply_proximal_l1,
    named_penalized,
    soft_threshold,
)
from tfreg_core import sparsity as _core
from tfreg_core import validation
from tfreg_core.proximal import include_bias_flag
from tfreg_core.sparsity import GroupSparsity, ParameterSparsity, SparsityReport

__all__ = [
    "GroupSparsity",
    "ParameterSparsity",
    "ProximalGroupLasso",
    "ProximalL1",
    "SparsityCallback",
    "SparsityReport",
    "apply_proximal_l1",
    "soft_threshold",
    "sparsity_report",
]

_Variables: TypeAlias = keras.layers.Layer | Sequence[Any]


def sparsity_report(
    model_or_variables: _Variables,
    *,
    rel: float = _core.DEFAULT_REL,
    atol: float = 0.0,
    include_bias: bool = False,
) -> SparsityReport:
    """The :class:`~tfreg_core.sparsity.SparsityReport` of the variables ``tfreg.penalty`` would
    penalise (kernels unless ``include_bias``), computed on NumPy copies.

    Near-zero means ``w == 0`` or ``|w| < max(rel * max|w|, atol)`` per variable; the default
    ``rel=5e-4`` is the seed notebook's rule. ``report.groups`` holds every kernel's zero groups
    and group-norm histogram per axis (Dense ``(in, out)``: axis 0 = input features, 1 = neurons).
    Equals ``torchref.sparsity_report`` of the
    transferred torch module (counts exactly; norms up to summation order).
    """
    named = named_penalized(model_or_variables, include_bias=include_bias_flag(include_bias))
    values = [(name, keras.ops.convert_to_numpy(v)) for name, v in named]
    return _core.sparsity_report(values, rel=rel, atol=atol)


class SparsityCallback(keras.callbacks.Callback):
    """Adds the model's sparsity totals to each epoch's ``logs`` (hence ``History.history``):
    ``sparsity/zeros``, ``sparsity/near_zeros``, ``sparsity/nonzeros``, ``sparsity/density``,
    ``sparsity/l1``, ``sparsity/l2``, ``sparsity/max_abs``, ``sparsity/size``, and the exactly
    zero groups of each kernel along each axis, ``sparsity/zero_groups/<variable path>/axis<a>``.

    The full per-variable :class:`SparsityReport` of every epoch (group norms and histograms
    included) is kept in ``self.reports``. Thresholds and scope as :func:`sparsity_report`.
    Keras-only: with torch, log ``report.scalars() | report.group_scalars()`` of
    ``torchref.sparsity_report(model)`` in the loop.
    """

    def __init__(
        self,
        *,
        rel: float = _core.DEFAULT_REL,
        atol: float = 0.0,
        include_bias: bool = False,
        prefix: str = "sparsity/",
    ) -> None:
        super().__init__()
        self.rel = validation.non_negative_float(rel, "rel")
        self.atol = validation.non_negative_float(atol, "atol")
        self.include_bias = include_bias_flag(include_bias)
        if not isinstance(prefix, str):
            raise validation.InvalidArgumentError(
                f"prefix must be a str. Received: prefix={prefix!r}"
            )
        self.prefix = prefix
        self.reports: list[SparsityReport] = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.reports = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        report = sparsity_report(
            self.model, rel=self.rel, atol=self.atol, include_bias=self.include_bias
        )
        self.reports.append(report)
        if logs is not None:
            logs.update(report.scalars(self.prefix))
            logs.update(report.group_scalars(self.prefix))
