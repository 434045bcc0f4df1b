"""``batchnorm="per_window"`` for ``torchref.Trainer``: the running statistics of
``torch.nn.BatchNorm1d/2d/3d`` updated once per window with the window's pooled moments (see
:mod:`tfreg_core.batchnorm` for the formula; :mod:`tfreg.batchnorm` is the Keras twin).

A forward pre-hook on each module in training mode (with running statistics) adds the
micro-batch's ``(count, mean, M2)`` per channel to the window's (float64) and saves the
running buffers; a forward hook puts them back, so the micro-batches leave
``running_mean``/``running_var``/``num_batches_tracked`` untouched. ``close()`` (the window's
update) applies torch's update once: ``num_batches_tracked += 1``, ``factor = momentum`` (or
``1 / num_batches_tracked`` for ``momentum=None``, the cumulative average), unbiased pooled
variance. The forward pass itself is torch's: each micro-batch is normalised with its own
statistics, so gradients are those of the default mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tfreg_core import batchnorm as core
from tfreg_core.validation import InvalidArgumentError
from torchref._compat import torch

__all__ = ["WindowMoments", "batchnorm_modules"]

_KINDS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_modules(model: Any) -> list[tuple[str, Any]]:
    """The model's BatchNorm modules (``SyncBatchNorm`` and lazy ones included) by name."""
    nn = torch.nn
    kinds = (*_KINDS, nn.SyncBatchNorm, nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, 1.0, b))


class WindowMoments:
    """The open window's pooled moments of each BatchNorm module of ``model`` and the hooks
    that collect them (``attached()``). Refuses, at construction, modules it cannot
    update exactly: ``SyncBatchNorm`` / other subclasses, and ``momentum`` outside [0, 1]."""

    def __init__(self, model: Any) -> None:
        modules = batchnorm_modules(model)
        for name, module in modules:
            if type(module) not in _KINDS:
                raise InvalidArgumentError(
                    'batchnorm="per_window" updates torch.nn.BatchNorm1d/2d/3d. Received: '
                    f"{name or 'model'} of type {type(module).__name__}"
                )
        self.modules = [m for _, m in modules if m.track_running_stats]
        self.names = [n for n, m in modules if m.track_running_stats]
        self.moments = [self._zero(m) for m in self.modules]
        self._saved: dict[int, list[torch.Tensor]] = {}

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The hooks, for the duration of one ``fit`` (a forward pass of the model outside
        the trainer updates the running statistics as torch does)."""
        handles = [
            h
            for m in self.modules
            for h in (
                m.register_forward_pre_hook(self._before),
                m.register_forward_hook(self._after),
            )
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _zero(module: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        like = module.running_mean
        assert like is not None  # track_running_stats
        z = torch.zeros(like.shape, dtype=torch.float64, device=like.device)
        return torch.zeros((), dtype=torch.float64, device=like.device), z, z.clone()

    def _before(self, module: Any, args: tuple[Any, ...]) -> None:
        if not module.training:
            return
        x = args[0].detach().to(torch.float64)
        axes = [0, *range(2, x.ndim)]
        n = x.numel() / x.shape[1]
        mean = x.mean(dim=axes)
        shape = [1, -1] + [1] * (x.ndim - 2)
        m2 = ((x - mean.reshape(shape)) ** 2).sum(dim=axes)
        i = self.modules.index(module)
        batch = (torch.tensor(float(n), dtype=torch.float64, device=mean.device), mean, m2)
        self.moments[i] = core.merge(self.moments[i], batch, _divide)
        # torch updates (and saves for backward) scratch copies; the buffers are put back
        # by reference after the forward, unmodified (an in-place restore would invalidate
        # what backward saved).
        self._saved[id(module)] = [getattr(module, name) for name in _BUFFERS]
        for name in _BUFFERS:
            setattr(module, name, getattr(module, name).clone())

    def _after(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        saved = self._saved.pop(id(module), None)
        if saved is not None:
            for name, buffer in zip(_BUFFERS, saved, strict=True):
                setattr(module, name, buffer)

    @torch.no_grad()
    def close(self) -> None:
        """The window's update of every module that saw a micro-batch; then reset."""
        for i, module in enumerate(self.modules):
            pooled = self.moments[i]
            if float(pooled[0]) == 0:
                continue  # no training-mode forward in this window (frozen with .eval())
            tracked = module.num_batches_tracked
            assert tracked is not None and module.running_mean is not None
            tracked.add_(1)
            momentum = module.momentum
            factor = 1.0 / float(tracked) if momentum is None else float(momentum)
            mean, var = core.torch_update(
                module.running_mean.to(torch.float64),
                module.running_var.to(torch.float64),
                pooled,
                factor,
            )
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
        self.reset()

    def reset(self) -> None:
        self.moments = [self._zero(m) for m in self.modules]

    def state_dict(self) -> list[list[torch.Tensor]]:
        return [[t.clone() for t in moments] for moments in self.moments]

    def check_state(self, state: Any) -> None:
        """Refuse (before anything is restored) a saved window of other modules/shapes."""
        ok = isinstance(state, list) and len(state) == len(self.moments)
        ok = ok and all(
            isinstance(saved, list)
            and len(saved) == 3
            and all(
                isinstance(s, torch.Tensor) and s.shape == t.shape and s.dtype == t.dtype
                for s, t in zip(saved, mine, strict=True)
            )
            for saved, mine in zip(state, self.moments, strict=False)
        )
        if not ok:
            raise InvalidArgumentError(
                "The state's batchnorm must hold (count, mean, M2) float64 tensors for the "
                f"BatchNorm modules {self.names}. Received: {state!r:.200}"
            )

    def load_state_dict(self, state: list[list[torch.Tensor]]) -> None:
        self.moments = [(n.clone(), mean.clone(), m2.clone()) for n, mean, m2 in state]
