"""The open window of ``torchref.Trainer`` and closing it into one update: the torch side of
:mod:`tfreg_core.update` (the arithmetic, written once for both twins) and
:mod:`tfreg_core.metrics`.

:class:`Window` holds what a window has gathered -- per parameter the gradient sum
(:mod:`torchref.accumulation`) and whether a gradient reached it (``touched``), the loss-element
count, the loss sum, the examples and the metric sums (:class:`Totals`) -- and
:meth:`Window.close` turns it into the update's gradients, its finiteness and its logged record
with :func:`tfreg_core.update.close_window` and :func:`~tfreg_core.update.window_record`.

Where a parameter and its sum share a dtype, the sum *is* the parameter's ``.grad`` during
``fit``: the tensor ``backward()`` creates at the parameter's first gradient in the window becomes
its sum, and later micro-batches add into it in place, as in a hand-written accumulation loop
(on a process group the sums are fixed buffers, exposed as ``.grad`` at the window's start, for
DDP to reduce). ``.grad`` is set once per window (:meth:`Window.micro`; again only where
something else changed it between micro-batches), and is None until a gradient reaches the
parameter, so that backward tells which parameters it reaches; a parameter no gradient reached
passes ``None`` to the core, keeps ``.grad = None`` at the step and is skipped by the optimizer,
as in a plain loop (a zero gradient would still move it by momentum or decoupled decay).
Closing consumes the window's sums; :meth:`Window.reset` empties the window for the next one.

Per micro-batch the window costs no host synchronisation: a count the loss read on the host (a
Python number) is summed on the host and joins the device count once per window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tfreg_core.metrics import METRIC_FUNCTIONS
from tfreg_core.update import Term, close_window, window_record
from torchref import accumulation
from torchref._compat import torch
from torchref._ops import TORCH_OPS, TorchOps

__all__ = ["Totals", "Window"]


_TERM = (Term(),)  # torchref trains one loss term


class Totals:
    """What a window or a validation pass sums besides gradients, float64 on ``device``: the loss
    sum, the loss-element count (``count``, a device tensor, plus the host numbers added since
    :meth:`take_count`), the sample-weight sum and the metric sums, and the examples. ``count``
    may be given (the accumulator's, which checkpoints hold)."""

    def __init__(
        self, metrics: Sequence[str], device: torch.device, count: torch.Tensor | None = None
    ) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.metrics = tuple(metrics)
        self.count = zero.clone() if count is None else count
        self.host_count = 0.0
        self.loss_sum = zero.clone()
        self.weight_sum = zero.clone()
        self.metric_sums = [zero.clone() for _ in self.metrics]
        # On a process group: this rank's examples, all-reduced with the stats so that History's
        # `examples` is the global window's for a DataLoader shard too.
        self.examples = zero.clone()

    def add(self, loss_sum: torch.Tensor, count: Any) -> None:
        """One micro-batch's loss sum (detached) and count: a Python number on the host, a
        tensor on the device (count >= 0 is guaranteed by the loss: element counts or sums of
        weights validated >= 0)."""
        self.loss_sum.add_(loss_sum.detach())
        if isinstance(count, torch.Tensor):
            self.count.add_(count)
        else:
            self.host_count += count

    @torch.no_grad()
    def add_metrics(self, y_pred: Any, y_true: Any, weight: torch.Tensor) -> None:
        """``sum(metric(y_true, y_pred) * w)`` per metric and ``sum(w)``, with ``w`` the
        per-example ``weight`` broadcast over each example's metric values (per timestep for
        ``(N, T)`` labels), as tfreg and Keras' metrics weight them."""
        if not self.metrics:
            return
        values = [METRIC_FUNCTIONS[name](y_true, y_pred, TORCH_OPS) for name in self.metrics]
        shape = values[0].shape
        w = torch.broadcast_to(weight.reshape(-1, *[1] * (len(shape) - 1)), shape)
        self.weight_sum.add_(w.sum())
        for total, value in zip(self.metric_sums, values, strict=True):
            total.add_(torch.sum(value * w))

    def take_count(self) -> torch.Tensor:
        """The count as one tensor: the host numbers join the device count (in place)."""
        if self.host_count:
            self.count.add_(self.host_count)
            self.host_count = 0.0
        return self.count

    def stats(self) -> list[torch.Tensor]:
        """The float64 scalars a process group sums over ranks: the count first (a new tensor,
        which outlives :meth:`reset`), then the sums."""
        count = self.count + self.host_count
        return [count, self.loss_sum, self.weight_sum, self.examples, *self.metric_sums]

    def record(self, count: torch.Tensor, penalty: torch.Tensor) -> dict[str, Any]:
        """:func:`tfreg_core.update.window_record` of these sums (``count``: a tensor that
        outlives :meth:`reset`)."""
        return window_record(
            _TERM,
            [self.loss_sum],
            [count],
            penalty,
            TorchOps(),
            metrics=dict(zip(self.metrics, self.metric_sums, strict=True)),
            weight_sum=self.weight_sum,
        )

    def reset(self) -> None:
        sums = [self.count, self.loss_sum, self.weight_sum, self.examples, *self.metric_sums]
        torch._foreach_zero_(sums)
        self.host_count = 0.0


class Window:
    """The open window over ``params`` (see the module docstring). ``takes_all``: on a process
    group every parameter trainable in the window takes part (DDP reduces each one's ``.grad``;
    the ranks must agree on the set)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        metrics: Sequence[str],
        *,
        takes_all: bool = False,
    ) -> None:
        self.params = list(params)
        self.acc = accumulation.init(self.params)
        self.in_grad = all(
            s.dtype == p.dtype for s, p in zip(self.acc.sums, self.params, strict=True)
        )
        self.takes_all = takes_all
        self.totals = Totals(metrics, self.params[0].device, count=self.acc.count)
        # Per parameter: whether the open window gave it a gradient (host flags, no sync).
        self.touched = [False] * len(self.params)
        # What each .grad is during fit (its sum once touched, else None): checked against the
        # parameters around each backward, set only where something else changed it.
        self._exposed: list[torch.Tensor | None] = [None] * len(self.params)

    @property
    def micro_batches(self) -> int:
        return self.acc.micro_batches

    def micro(self, scaled: torch.Tensor) -> None:
        """Back-propagate one micro-batch's (scaled) loss sum into the window's sums. Its loss
        sum, count and metrics go to :attr:`totals` (the caller adds them)."""
        if not self.in_grad:
            grads = self.gradients(scaled)
            accumulation.add(self.acc, grads, 0)  # the count goes to `totals`
            self.touched = [t or g is not None for t, g in zip(self.touched, grads, strict=True)]
            return
        if self.acc.micro_batches == 0 and self.takes_all:
            params, sums = self.params, self.acc.sums
            self.touched = [t or p.requires_grad for t, p in zip(self.touched, params, strict=True)]
            self._exposed = [s if t else None for s, t in zip(sums, self.touched, strict=True)]
        exposed = self._exposed
        for p, grad in zip(self.params, exposed, strict=True):
            if p.grad is not grad:  # the window's start, or .grad changed between micro-batches
                p.grad = grad
        scaled.backward()
        for i, (p, grad) in enumerate(zip(self.params, exposed, strict=True)):
            new = p.grad
            if new is grad or new is None:
                continue
            if grad is None and not self.takes_all:
                # The parameter's first gradient in the window: the tensor backward created for
                # it (a plain loop's .grad) becomes its sum, no copy; a sparse one (Embedding
                # with sparse=True) densified, for later micro-batches to add into in place.
                if new.is_sparse:
                    new = p.grad = new.to_dense()
                self.acc.sums[i] = exposed[i] = new
            else:
                # Torch (DDP's bucket views) replaced .grad by the accumulated value: into the
                # sum (which DDP's reduction at the close expects to be .grad).
                self.acc.sums[i].copy_(new)
                p.grad = exposed[i] = self.acc.sums[i]
            self.touched[i] = True
        self.acc.micro_batches += 1

    def gradients(self, value: torch.Tensor) -> list[torch.Tensor | None]:
        """``d value / d p`` for each parameter trainable now; None where it is frozen or not
        reached (zeros for every trainable one when ``takes_all``)."""
        trainable = [p for p in self.params if p.requires_grad]
        found = iter(
            torch.autograd.grad(value, trainable, allow_unused=True) if value.requires_grad else ()
        )
        grads = [next(found, None) if p.requires_grad else None for p in self.params]
        if self.takes_all:
            grads = [
                torch.zeros_like(p) if g is None and p.requires_grad else g
                for g, p in zip(grads, self.params, strict=True)
            ]
        return grads

    @torch.no_grad()
    def close(
        self,
        *,
        penalty: torch.Tensor,
        penalty_grads: Sequence[torch.Tensor | None] | None,
        clipnorm: float | None,
        global_clipnorm: float | None,
        unscale: float | None = None,
        reduce: Callable[[list[torch.Tensor], list[torch.Tensor]], None] | None = None,
    ) -> tuple[list[torch.Tensor | None], bool, dict[str, Any]]:
        """The update's gradients (None for a parameter neither the data nor the penalty
        reached), whether to apply them, and the record; ``reduce(sums, stats)`` first (a
        process group: the global window, before the division). The sums are consumed: call
        :meth:`reset` after the step."""
        stats = self.totals.stats()
        if reduce is not None:
            reduce(self.acc.sums, stats)
        count = stats[0]  # a new tensor: the record's outlives reset()
        sums = [s if t else None for s, t in zip(self.acc.sums, self.touched, strict=True)]
        grads, finite = close_window(
            [sums],
            [count],
            TorchOps(),
            summed=[False],
            micro_batches=self.acc.micro_batches,
            penalty_grads=penalty_grads,
            dtypes=None if self.in_grad else [p.dtype for p in self.params],
            clipnorm=clipnorm,
            global_clipnorm=global_clipnorm,
            unscale=unscale,
        )
        return grads, bool(finite), self.totals.record(count, penalty)

    def settle(self) -> accumulation.AccumulatorState:
        """The accumulator as :mod:`torchref.accumulation` describes it: the host count joined
        to ``count``, and zero sums for the parameters the window has not reached (which hold
        the previous window's consumed gradients while it is open, see :meth:`reset`)."""
        self.totals.take_count()
        with torch.no_grad():
            for total, touched in zip(self.acc.sums, self.touched, strict=True):
                if not touched:
                    total.zero_()
        return self.acc

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Copies of the accumulator's state and of the window's sums (``state_dict()``)."""
        totals = self.totals
        accumulator = self.acc.state_dict()
        accumulator["count"] += totals.host_count
        accumulator["sums"] = [
            s if touched else torch.zeros_like(s)
            for s, touched in zip(accumulator["sums"], self.touched, strict=True)
        ]
        return accumulator, {
            "loss_sum": totals.loss_sum.clone(),
            "weight_sum": totals.weight_sum.clone(),
            "examples": totals.examples.clone(),
            "metric_sums": [m.clone() for m in totals.metric_sums],
            "touched": list(self.touched),
        }

    def load(self, accumulator: dict[str, Any], window: dict[str, Any]) -> None:
        """Restore :meth:`state` (checked by the caller first). ``touched``: which parameters the
        open window reached; a state written before it was saved: the trainable ones, when the
        window holds micro-batches."""
        self.acc.load_state_dict(accumulator)
        totals = self.totals
        totals.host_count = 0.0
        if self.acc.count.device.type == "cpu":  # later host counts add to it in order
            totals.host_count = float(self.acc.count)
            self.acc.count.zero_()
        totals.loss_sum = window["loss_sum"].clone()
        totals.weight_sum = window["weight_sum"].clone()
        totals.examples = window["examples"].clone()  # this rank's, in the open window
        totals.metric_sums = [m.clone() for m in window["metric_sums"]]
        open_window = self.acc.micro_batches > 0
        self.touched = [bool(t) for t in window.get("touched", [])] or [
            open_window and p.requires_grad for p in self.params
        ]
        self._exposed = [s if t else None for s, t in zip(self.acc.sums, self.touched, strict=True)]

    def reset(self) -> None:
        """Empty the window (after the update that consumed it, or to discard it). Sums that
        backward's tensors became (:meth:`micro`) are not zeroed: the next window replaces each
        at its parameter's first gradient; the others are zeroed for the next window's
        ``backward()`` or ``add()`` to add into."""
        if self.in_grad and not self.takes_all:
            self.acc.micro_batches = 0
        else:
            accumulation.reset(self.acc)
        self.totals.reset()  # the count with it
        self.touched = [False] * len(self.params)
        self._exposed = [None] * len(self.params)

    def release(self) -> None:
        """Every parameter's ``.grad`` back to None (after ``fit``)."""
        for p in self.params:
            p.grad = None
