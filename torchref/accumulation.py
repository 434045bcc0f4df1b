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

from tfreg_core.accumulation import check_add, reject_count
from torchref._compat import torch

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
        if len(state["sums"]) != len(self.sums):
            raise ValueError(
                f"load_state_dict() got {len(state['sums'])} sums for an accumulator of "
                f"{len(self.sums)} parameters"
            )
        with torch.no_grad():
            for mine, saved in zip(self.sums, state["sums"], strict=True):
                mine.copy_(saved)
            self.count.copy_(state["count"])
        self.micro_batches = int(state["micro_batches"])


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
    count and ``count >= 0`` are checked before anything is added (nothing half-applied)."""
    grads = list(grads)
    check_add(
        [None if g is None else tuple(g.shape) for g in grads],
        state.shapes,
        count,
        unit="parameters",
    )
    # One host sync, only for tensor counts (the Trainer passes a Python int).
    if isinstance(count, torch.Tensor) and not bool(((count >= 0) & count.isfinite()).all()):
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
    """Each sum divided by the total count; an empty window gives NaN (0/0) on purpose, so that
    a finiteness check catches it instead of a silent zero-gradient step."""
    return [acc / state.count.to(acc.dtype) for acc in state.sums]


def reset(state: AccumulatorState) -> AccumulatorState:
    """Zero the sums and counters (after the update that consumed them)."""
    with torch.no_grad():
        for acc in state.sums:
            acc.zero_()
        state.count.zero_()
    state.micro_batches = 0
    return state
