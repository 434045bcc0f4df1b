"""Proximal steps for PyTorch -- the twin of :mod:`tfreg.proximal`, same names and arithmetic
(:mod:`tfreg_core.proximal` holds the formulas and the shared code).

After each ``optimizer.step()`` (and before ``scheduler.step()``), in place under ``no_grad``:

    ProximalL1:          w <- sign(w) * max(|w| - s * l1, 0)
    ProximalGroupLasso:  w_g <- w_g * max(0, 1 - t * lambda * c_g / ||w_g||)      (scalar t)
                         or the exact diagonal-preconditioned block prox (Adam/RMSprop steps s)

Same objective as adding the penalty to the loss, but the non-smooth part is handled exactly, so
weights and groups become exactly 0 -- do not also add the penalty to the loss. The scalar step
``lr_t`` is read per parameter from its ``optimizer.param_groups`` entry, i.e. the rate of the
step just taken *provided* you call it before ``scheduler.step()`` (torch schedulers overwrite
``param_groups[i]["lr"]`` with the next rate; Keras evaluates its schedule at ``iterations - 1``
instead, so both read the step just taken).

``threshold="preconditioned"`` (the default ``"auto"`` for these optimizers) uses the step the
optimizer took on each coordinate, read from ``optimizer.state[p]``:

    torch Adam/AdamW    s = lr / (sqrt(exp_avg_sq) / sqrt(1 - b2^step) + eps)
    torch RMSprop       s = lr / (sqrt(square_avg) + eps)
    torchref.KerasAdamW s = lr * sqrt(1 - b2^step) / (sqrt(v) + eps)    (Keras' placement)

Keras' Adam adds eps to ``sqrt(v)`` before the bias correction and Keras' RMSprop inside the root
(``tfreg.step_sizes``): for cross-framework identity use ``torchref.KerasAdamW``. Layouts differ:
``Linear.weight (out, in)`` groups input features with ``axis=0`` (Keras Dense: ``axis=1``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tfreg_core import proximal as _core
from tfreg_core import validation
from tfreg_core.specs import float32_rounded
from torchref._compat import torch
from torchref.optimizers import KerasAdamW
from torchref.penalties import penalized_parameters

__all__ = [
    "PROXIMAL_CLASSES",
    "Proximal",
    "ProximalChain",
    "ProximalGroupLasso",
    "ProximalL1",
    "apply_proximal_l1",
    "block_soft_threshold",
    "named_penalized",
    "soft_threshold",
    "step_sizes",
]

_Parameters = torch.nn.Module | Iterable[torch.Tensor]


class _TorchOps:
    """:class:`tfreg_core.proximal.ArrayOps` on torch tensors."""

    sqrt = staticmethod(torch.sqrt)
    zeros_like = staticmethod(torch.zeros_like)
    ones_like = staticmethod(torch.ones_like)

    @staticmethod
    def where(condition: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        # Spelled out: torch.where is overloaded (one overload takes the condition alone).
        return torch.where(condition, x, y)

    @staticmethod
    def sum_keep(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        return torch.sum(x, dim=axes, keepdim=True)

    @staticmethod
    def max_keep(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        return torch.amax(x, dim=axes, keepdim=True)

    @staticmethod
    def maximum(x: torch.Tensor, floor: float) -> torch.Tensor:
        return torch.clamp_min(x, floor)

    @staticmethod
    def tiny(x: torch.Tensor) -> float:
        return float(torch.finfo(x.dtype).tiny)

    @staticmethod
    def transpose(x: torch.Tensor, permutation: tuple[int, ...]) -> torch.Tensor:
        return torch.permute(x, permutation)

    @staticmethod
    def reshape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.reshape(x, shape)

    @staticmethod
    def pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width))

    @staticmethod
    def concat_rows(xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(xs), dim=0)

    @staticmethod
    def constant(values: Any, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values, dtype=like.dtype, device=like.device)

    @staticmethod
    def kind(x: torch.Tensor) -> Any:
        return (x.dtype, x.device)


_OPS = _TorchOps()


def named_penalized(
    module_or_tensors: _Parameters, *, include_bias: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` for each parameter ``torchref.penalty`` would penalise: the
    module's parameter names, ``p<i>`` for a sequence of tensors."""
    tensors = penalized_parameters(module_or_tensors, include_bias=include_bias)
    names: dict[int, str] = {}
    if isinstance(module_or_tensors, torch.nn.Module):
        names = {id(p): n for n, p in module_or_tensors.named_parameters()}
    return [(names.get(id(t), f"p{i}"), t) for i, t in enumerate(tensors)]


def soft_threshold(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """``sign(x) * max(|x| - threshold, 0)`` (a new tensor). ``threshold``: a non-negative number
    (checked) or a tensor (scalar or per-entry), rounded once to ``x``'s dtype."""
    if not isinstance(threshold, torch.Tensor):
        threshold = validation.non_negative_float(threshold, "threshold")
    t = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
    return torch.sign(x) * torch.clamp_min(x.abs() - t, 0)


def block_soft_threshold(
    x: torch.Tensor, threshold: float | torch.Tensor, *, axis: int | Sequence[int]
) -> torch.Tensor:
    """``x_g * max(0, 1 - threshold / ||x_g||)`` per group, the norm over ``axis``
    (``GroupLasso``'s convention): the prox of ``threshold * sum_g ||x_g||``; exact zero groups."""
    if not isinstance(threshold, torch.Tensor):
        threshold = validation.non_negative_float(threshold, "threshold")
    axes = validation.normalized_axes(validation.axes(axis, "axis"), x.dim(), "axis")
    t = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
    return _core.block_soft_threshold(x, t, axes, _OPS)


def _learning_rates(tensors: list[tuple[str, torch.Tensor]], learning_rate: Any) -> list[float]:
    if not isinstance(learning_rate, torch.optim.Optimizer):
        return [validation.non_negative_float(_as_float(learning_rate), "learning_rate")] * len(
            tensors
        )
    groups = _param_groups(tensors, learning_rate)
    return [float(group["lr"]) for group in groups]


def _param_groups(
    tensors: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer
) -> list[dict[str, Any]]:
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, t in tensors if id(t) not in group_of]
    if missing:
        raise validation.InvalidArgumentError(
            "Every thresholded parameter must belong to the optimizer, whose param_groups give "
            f"its learning rate. Received parameters not in the optimizer: {missing}"
        )
    return [group_of[id(t)] for _, t in tensors]


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value


# --- the optimizer's per-coordinate step (threshold="preconditioned") ------------------------


_ADAPTIVE_TYPES: tuple[type, ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    KerasAdamW,
)


def _kind(learning_rate: Any) -> str:
    if not isinstance(learning_rate, torch.optim.Optimizer):
        return "number"
    # Exact types: a subclass may override step(), and then its step is not this formula.
    if type(learning_rate) in _ADAPTIVE_TYPES:
        return "adaptive"
    return "sgd" if type(learning_rate) is torch.optim.SGD else "other"


def _check_adaptive(optimizer: torch.optim.Optimizer) -> None:
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        unsupported = {
            "amsgrad": group.get("amsgrad", False),
            "centered": group.get("centered", False),
            "momentum": group.get("momentum", 0.0) if name == "RMSprop" else 0.0,
        }
        for option, value in unsupported.items():
            if value:
                raise validation.InvalidArgumentError(
                    f"threshold='preconditioned' supports {name} without {option} (its step is "
                    f"then not a per-coordinate scaling of one gradient). Received: "
                    f"{option}={value!r}"
                )
        if not group["eps"] > 0:
            raise validation.InvalidArgumentError(
                "threshold='preconditioned' needs eps > 0 (with 0 a coordinate whose second "
                f"moment is 0 has an infinite step). Received: eps={group['eps']!r}"
            )


def step_sizes(
    optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The per-coordinate step ``s`` the Adam/AdamW/RMSprop/KerasAdamW ``optimizer`` just took on
    each of ``parameters`` (its update was ``p <- p - s * m_hat``, resp. ``- s * g``), with the
    optimizer's own epsilon placement (module docstring). Call after ``optimizer.step()``."""
    if _kind(optimizer) != "adaptive":
        _core.effective_mode("preconditioned", _kind(optimizer), optimizer)
    _check_adaptive(optimizer)
    named = [(f"p{i}", p) for i, p in enumerate(parameters)]
    steps = []
    for (name, p), group in zip(named, _param_groups(named, optimizer), strict=True):
        state = optimizer.state.get(p, {})
        if "step" not in state:
            raise validation.InvalidArgumentError(
                f"threshold='preconditioned' reads the optimizer's state of each thresholded "
                f"parameter; {name} (shape {tuple(p.shape)}) has none yet: call it after "
                f"optimizer.step() on a gradient of that parameter. Received: "
                f"optimizer={type(optimizer).__name__}"
            )
        t = float(state["step"])
        b2 = group.get("betas", (0.0, 0.0))[1]
        if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
            # torch's arithmetic: denom = sqrt(v) / sqrt(1 - b2^t) + eps (Python float powers).
            bias_correction2_sqrt = (1 - b2**t) ** 0.5
            v = state["exp_avg_sq"]
            steps.append(float(group["lr"]) / (v.sqrt() / bias_correction2_sqrt + group["eps"]))
        elif type(optimizer) is torch.optim.RMSprop:
            steps.append(float(group["lr"]) / (state["square_avg"].sqrt() + group["eps"]))
        else:  # KerasAdamW: Keras' placement and its float32 rounding of lr and b2 (in b2^t)
            rounded = float32_rounded if group["float32_hyperparameters"] else float
            scale = rounded(group["lr"]) * (1 - rounded(b2) ** t) ** 0.5
            steps.append(scale / (state["v"].sqrt() + group["eps"]))
    return steps


# --- operators -----------------------------------------------------------------------------


def _floating(tensors: list[tuple[str, torch.Tensor]]) -> None:
    for name, t in tensors:
        if not t.is_floating_point():
            raise validation.InvalidArgumentError(
                f"A proximal step updates floating-point tensors. Received: {name}={t!r}"
            )


class _Operator:
    """Shared by the operators: which threshold applies, checked before anything changes."""

    threshold_mode: str

    def check(self, optimizer: Any) -> None:
        """Refuse now an optimizer this operator's ``threshold`` cannot serve (trainers call
        this at construction, before any step)."""
        if _core.effective_mode(self.threshold_mode, _kind(optimizer), optimizer) == (
            "preconditioned"
        ):
            _check_adaptive(optimizer)

    def check_model(self, module: Any) -> None:
        """Refuse now what ``apply`` would refuse on ``module``'s parameters -- a non-floating
        parameter, an ``axis`` out of range for a kernel -- so that a trainer fails before the
        first update, not after an ``optimizer.step()``."""
        include_bias = getattr(self, "include_bias", False)
        tensors = named_penalized(module, include_bias=include_bias)
        _floating(tensors)
        axes_for = getattr(self, "axes_for", None)
        if axes_for is not None:  # the group operators; L1 has no axis to check
            for name, t in tensors:
                axes_for(tuple(t.shape), name)

    def check_rates(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse now a param group's ``lr`` (a scheduler's) that is negative or non-finite:
        trainers call this before a window's first micro-batch and before the step."""
        for i, group in enumerate(optimizer.param_groups):
            _core.check_rate(_as_float(group["lr"]), f"optimizer.param_groups[{i}]['lr']")

    def _steps(
        self, tensors: list[tuple[str, torch.Tensor]], learning_rate: Any
    ) -> list[torch.Tensor] | None:
        """Per-parameter step tensors (preconditioned), or None (scalar)."""
        self.check(learning_rate)
        mode = _core.effective_mode(self.threshold_mode, _kind(learning_rate), learning_rate)
        if mode == "scalar":
            return None
        return step_sizes(learning_rate, [t for _, t in tensors])


def apply_proximal_l1(
    module_or_tensors: _Parameters,
    *,
    l1: float,
    learning_rate: float | torch.optim.Optimizer,
    include_bias: bool = False,
    threshold: str = "auto",
) -> None:
    """Soft-threshold the penalised parameters in place by ``s * l1`` (under ``no_grad``).

    Call it right after ``optimizer.step()`` and before ``scheduler.step()``. ``learning_rate``
    is a number or the optimizer (each parameter uses its param group's ``lr``, or with
    Adam/AdamW/RMSprop its per-coordinate step, see :func:`step_sizes`). Scope is
    ``torchref.penalty``'s. Everything is validated before any parameter changes.
    """
    ProximalL1(l1=l1, include_bias=include_bias, threshold=threshold).apply(
        module_or_tensors, learning_rate
    )


class ProximalL1(_Operator, _core.ProximalL1Spec):
    """Proximal L1 (ISTA): after each update, ``w <- sign(w) * max(|w| - s * l1, 0)``.

    The twin of ``tfreg.ProximalL1`` (same threshold ``lr * l1`` computed in float64, then
    rounded to the parameter's dtype; or the optimizer's per-coordinate step). Torch has no
    built-in L1; this replaces ``loss + l1 * w.abs().sum()`` by a step that yields exact zeros. A
    training loop holding ``proximal=ProximalL1(l1=...)`` calls ``proximal.apply(model,
    optimizer)`` once per update, right after ``optimizer.step()`` and before ``scheduler.step()``.
    """

    def apply(self, module_or_tensors: _Parameters, learning_rate: Any) -> None:
        """Soft-threshold the penalised parameters by ``s * l1`` in place."""
        tensors = named_penalized(module_or_tensors, include_bias=self.include_bias)
        _floating(tensors)
        steps = self._steps(tensors, learning_rate)
        if steps is None:
            thresholds: list[Any] = [
                self.threshold(lr) for lr in _learning_rates(tensors, learning_rate)
            ]
        else:
            thresholds = [s * self.l1 for s in steps]
        with torch.no_grad():
            for (_, t), threshold in zip(tensors, thresholds, strict=True):
                t.copy_(soft_threshold(t, threshold))


class ProximalGroupLasso(_Operator, _core.ProximalGroupLassoSpec):
    """Proximal group lasso, the twin of ``tfreg.ProximalGroupLasso``: after each update each
    kernel's groups (the norm over ``axis``, as ``torchref.GroupLasso``) get the prox of
    ``strength * sum_g c_g * ||w_g||`` -- the block soft-threshold with ``t = lr`` (scalar), or
    the exact diagonal-preconditioned block prox with Adam's/RMSprop's steps. Exact zero groups.
    ``Linear.weight (out, in)``: ``axis=0`` groups input features, ``axis=1`` neurons;
    ``Conv2d.weight (out, in, kh, kw)``: ``axis=(1, 2, 3)`` groups output filters."""

    def apply(self, module_or_tensors: _Parameters, learning_rate: Any) -> None:
        """Apply the group prox to the kernels (``ndim >= 2``) in place."""
        tensors = named_penalized(module_or_tensors)
        _floating(tensors)
        plans = []
        for name, t in tensors:
            axes = self.axes_for(tuple(t.shape), name)
            plans.append((t, axes, self.tau(tuple(t.shape), axes)))
        steps = self._steps(tensors, learning_rate)
        rates = [] if steps is not None else _learning_rates(tensors, learning_rate)
        if self.strength == 0:
            return  # the prox of a zero penalty is the identity
        with torch.no_grad():
            if steps is not None:
                taus, group_axes = [tau for _, _, tau in plans], [a for _, a, _ in plans]
                zs = [t for t, _, _ in plans]
                for t, x in zip(
                    zs,
                    _core.preconditioned_block_proxes(zs, steps, taus, group_axes, _OPS),
                    strict=True,
                ):
                    t.copy_(x)
                return
            for i, (t, axes, tau) in enumerate(plans):
                threshold = torch.as_tensor(rates[i] * tau, dtype=t.dtype, device=t.device)
                t.copy_(_core.block_soft_threshold(t, threshold, axes, _OPS))


class ProximalChain(_core.ProximalChainSpec):
    """The proximal operators in ``operators`` applied in order after each update: the twin of
    ``tfreg.ProximalChain`` (``[ProximalL1, ProximalGroupLasso]`` = sparse group lasso)."""

    def __init__(self, operators: Sequence[Any]) -> None:
        super().__init__(operators, PROXIMAL_CLASSES)


PROXIMAL_CLASSES: tuple[type, ...] = (ProximalL1, ProximalGroupLasso, ProximalChain)
# What a trainer's ``proximal=`` holds once resolved.
Proximal = ProximalL1 | ProximalGroupLasso | ProximalChain
