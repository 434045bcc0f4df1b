"""Exact gradient accumulation for PyTorch: ``init`` / ``add`` / ``result`` / ``reset``, the twin
of :mod:`tfreg.accumulation` (read its docstring for why summing per-micro-batch loss *sums* and
dividing once by the window's total count is exact, and averaging means is not).

The state holds plain tensors (updated in place, under ``torch.no_grad``) and round-trips through
``state_dict()`` / ``load_state_dict()``, so a run checkpointed mid-window resumes bit-identically.
Sums are kept in each parameter's dtype, never below float32 (mixed precision).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tfreg_core.accumulation import check_add, reject_count, reject_gradient
from tfreg_core.update import data_gradient
from tfreg_core.validation import InvalidArgumentError
from torchref._compat import torch
from torchref._ops import TorchOps

__all__ = ["AccumulatorState", "add", "init", "reset", "result"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class AccumulatorState:
    """``sums[i]`` (one per parameter, of shape ``shapes[i]``), ``count`` (float64 tensor) and
    ``micro_batches``."""

    def __init__(self, sums: list[torch.Tensor]) -> None:
        self.sums = sums
        self.shapes = [tuple(s.shape) for s in sums]  # checked by every add(), computed once
        self.count = torch.zeros((), dtype=torch.float64, device=sums[0].device)
        self.micro_batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": [s.clone() for s in self.sums],
            "count": self.count.clone(),
            "micro_batches": self.micro_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; the whole state is checked first (one sum per parameter of
        its shape and dtype, a finite float64 0-d ``count`` >= 0, an int ``micro_batches``
        >= 0): a rejected state changes nothing."""
        if not isinstance(state, dict) or set(state) != {"sums", "count", "micro_batches"}:
            raise InvalidArgumentError(
                "load_state_dict() needs a dict of exactly sums, count and micro_batches. "
                f"Received: {state!r:.200}"
            )
        sums, count, micro_batches = state["sums"], state["count"], state["micro_batches"]
        if not isinstance(sums, list) or len(sums) != len(self.sums):
            raise InvalidArgumentError(
                f"load_state_dict() needs {len(self.sums)} sums. Received: sums={sums!r:.200}"
            )
        for i, (mine, saved) in enumerate(zip(self.sums, sums, strict=True)):
            if not isinstance(saved, torch.Tensor) or (saved.shape, saved.dtype) != (
                mine.shape,
                mine.dtype,
            ):
                raise InvalidArgumentError(
                    f"load_state_dict() needs sums[{i}] of shape {tuple(mine.shape)} and dtype "
                    f"{mine.dtype}. Received: sums[{i}]={saved!r:.200}"
                )
        if not (
            isinstance(count, torch.Tensor)
            and count.ndim == 0
            and count.dtype == torch.float64
            and bool(count.isfinite() & (count >= 0))
        ):
            raise InvalidArgumentError(
                "load_state_dict() needs a finite float64 0-d count >= 0. "
                f"Received: count={count!r}"
            )
        if (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, int)
            or micro_batches < 0
        ):
            raise InvalidArgumentError(
                "load_state_dict() needs an int micro_batches >= 0. Received: "
                f"micro_batches={micro_batches!r}"
            )
        with torch.no_grad():
            for mine, saved in zip(self.sums, sums, strict=True):
                mine.copy_(saved)
            self.count.copy_(count)
        self.micro_batches = micro_batches


def init(
    parameters: Iterable[torch.Tensor], *, dtype: torch.dtype | None = None
) -> AccumulatorState:
    """Zeroed state for ``parameters`` (their shapes; dtype per module docstring unless given)."""
    params = list(parameters)
    if not params:
        raise ValueError("init() needs at least one parameter. Received: parameters=[]")

    def sum_dtype(p: torch.Tensor) -> torch.dtype:
        if dtype is not None:
            return dtype
        return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype

    return AccumulatorState([torch.zeros_like(p, dtype=sum_dtype(p)) for p in params])


def add(
    state: AccumulatorState, grads: Sequence[torch.Tensor | None], count: Any
) -> AccumulatorState:
    """Add one micro-batch: ``grads`` of its loss *sum*, and its loss-element ``count``.
    ``None`` gradients (parameters the loss does not reach) add nothing. Shapes, the gradient
    count and a finite ``count >= 0`` (a real number or a 0-d real tensor) are checked before
    anything is added (nothing half-applied)."""
    grads = list(grads)
    for i, g in enumerate(grads):
        if g is not None and not (isinstance(g, torch.Tensor) and g.is_floating_point()):
            reject_gradient(i, g, "a floating torch.Tensor")
    is_tensor = isinstance(count, torch.Tensor)
    check_add(
        [None if g is None else tuple(g.shape) for g in grads],
        state.shapes,
        count,
        unit="parameters",
        count_tensor=(
            (tuple(count.shape), not (count.dtype == torch.bool or count.is_complex()))
            if is_tensor
            else None
        ),
    )
    # One host sync, only for tensor counts (the Trainer passes a Python int).
    if is_tensor and not bool(((count >= 0) & count.isfinite()).all()):
        reject_count(count)
    with torch.no_grad():
        for acc, grad in zip(state.sums, grads, strict=True):
            if grad is not None:
                acc.add_(grad.to(acc.dtype))
        # A Python number is added as a float64 scalar: no tensor built per micro-batch.
        state.count.add_(count if isinstance(count, torch.Tensor) else float(count))
    state.micro_batches += 1
    return state


def result(state: AccumulatorState) -> list[torch.Tensor]:
    """Each sum divided by the total count, by the trainers' rule
    (:func:`tfreg_core.update.data_gradient`, one term): a
    window whose micro-batches counted no element gives its (zero) sums; one without any
    micro-batch gives NaN (0/0) on purpose, so that a finiteness check catches it instead of a
    silent zero-gradient step."""
    grads = data_gradient([state.sums], [state.count], [False], TorchOps())  # a fresh cast cache
    if state.micro_batches == 0:
        return [torch.full_like(g, float("nan")) for g in grads]
    return grads


def reset(state: AccumulatorState) -> AccumulatorState:
    """Zero the sums and counters (after the update that consumed them)."""
    with torch.no_grad():
        for acc in state.sums:
            acc.zero_()
        state.count.zero_()
    state.micro_batches = 0
    return state
