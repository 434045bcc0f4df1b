"""Sparsity reports and proximal L1 (soft-thresholding) for PyTorch -- the twin of
:mod:`tfreg.sparsity`, same names and arithmetic.

Proximal L1 after each ``optimizer.step()``: ``w <- sign(w) * max(|w| - lr_t * l1, 0)``, in place
under ``torch.no_grad()``. Same objective as adding ``l1 * w.abs().sum()`` to the loss, but the
non-smooth part is handled exactly, so weights become exactly 0 -- do not also add the L1 term to
the loss. ``lr_t`` is read per parameter from its ``optimizer.param_groups`` entry, i.e. the rate
of the step just taken *provided* you call it before ``scheduler.step()`` (torch schedulers
overwrite ``param_groups[i]["lr"]`` with the next rate; Keras evaluates its schedule at
``iterations - 1`` instead, so both read the step just taken). With momentum or Adam it is not
a true proximal method (the threshold ignores Adam's per-coordinate ``1 / (sqrt(v) + eps)``
scaling; momentum re-inflates zeroed weights), see :mod:`tfreg.sparsity`.

Differences from tfreg: torch has no Keras-style callbacks, so there is no ``SparsityCallback``;
log ``sparsity_report(model).scalars()`` in your loop (same keys). Learning rates are Python
floats here; Keras' are float32 variables (see tfreg's docs on float64 parity).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tfreg_core import sparsity as _core
from tfreg_core import validation
from tfreg_core.sparsity import ParameterSparsity, SparsityReport
from torchref._compat import torch
from torchref.penalties import penalized_parameters

__all__ = [
    "ParameterSparsity",
    "ProximalL1",
    "SparsityReport",
    "apply_proximal_l1",
    "soft_threshold",
    "sparsity_report",
]

_Parameters = torch.nn.Module | Iterable[torch.Tensor]


def _named(module_or_tensors: _Parameters, include_bias: bool) -> list[tuple[str, torch.Tensor]]:
    tensors = penalized_parameters(module_or_tensors, include_bias=include_bias)
    names: dict[int, str] = {}
    if isinstance(module_or_tensors, torch.nn.Module):
        names = {id(p): n for n, p in module_or_tensors.named_parameters()}
    return [(names.get(id(t), f"p{i}"), t) for i, t in enumerate(tensors)]


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
    named = _named(module_or_tensors, _core.include_bias_flag(include_bias))
    return _core.sparsity_report(
        [(n, t.detach().cpu().numpy()) for n, t in named], rel=rel, atol=atol
    )


def soft_threshold(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """``sign(x) * max(|x| - threshold, 0)`` (a new tensor). ``threshold``: a non-negative number
    (checked) or a scalar tensor, rounded once to ``x``'s dtype."""
    if not isinstance(threshold, torch.Tensor):
        threshold = validation.non_negative_float(threshold, "threshold")
    t = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
    return torch.sign(x) * torch.clamp_min(x.abs() - t, 0)


def _learning_rates(tensors: list[tuple[str, torch.Tensor]], learning_rate: Any) -> list[float]:
    if not isinstance(learning_rate, torch.optim.Optimizer):
        return [validation.non_negative_float(_as_float(learning_rate), "learning_rate")] * len(
            tensors
        )
    group_lr = {
        id(p): float(group["lr"]) for group in learning_rate.param_groups for p in group["params"]
    }
    missing = [n for n, t in tensors if id(t) not in group_lr]
    if missing:
        raise validation.InvalidArgumentError(
            "Every thresholded parameter must belong to the optimizer, whose param_groups give "
            f"its learning rate. Received parameters not in the optimizer: {missing}"
        )
    return [group_lr[id(t)] for _, t in tensors]


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def apply_proximal_l1(
    module_or_tensors: _Parameters,
    *,
    l1: float,
    learning_rate: float | torch.optim.Optimizer,
    include_bias: bool = False,
) -> None:
    """Soft-threshold the penalised parameters in place by ``lr * l1`` (under ``no_grad``).

    Call it right after ``optimizer.step()`` and before ``scheduler.step()``. ``learning_rate``
    is a number or the optimizer (each parameter uses its param group's ``lr``). Scope is
    ``torchref.penalty``'s. Everything is validated before any parameter changes.
    """
    ProximalL1(l1=l1, include_bias=include_bias).apply(module_or_tensors, learning_rate)


class ProximalL1(_core.ProximalL1Spec):
    """Proximal L1 (ISTA): after each update, ``w <- sign(w) * max(|w| - lr_t * l1, 0)``.

    The twin of ``tfreg.ProximalL1`` (same threshold ``lr * l1`` computed in float64, then
    rounded to the parameter's dtype). Torch has no built-in L1; this replaces
    ``loss + l1 * w.abs().sum()`` by a step that yields exact zeros. A training loop holding
    ``proximal=ProximalL1(l1=...)`` calls ``proximal.apply(model, optimizer)`` once per update,
    right after ``optimizer.step()`` and before ``scheduler.step()``.
    """

    def apply(self, module_or_tensors: _Parameters, learning_rate: Any) -> None:
        """Soft-threshold the penalised parameters by ``learning_rate * l1`` in place."""
        tensors = _named(module_or_tensors, self.include_bias)
        for name, t in tensors:
            if not t.is_floating_point():
                raise validation.InvalidArgumentError(
                    f"apply_proximal_l1 updates floating-point tensors. Received: {name}={t!r}"
                )
        thresholds = [self.threshold(lr) for lr in _learning_rates(tensors, learning_rate)]
        with torch.no_grad():
            for (_, t), threshold in zip(tensors, thresholds, strict=True):
                t.copy_(soft_threshold(t, threshold))
