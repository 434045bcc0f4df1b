"""``prune(model)``: the smaller ``nn.Sequential`` without its zero neurons, filters and inputs.

The twin of ``tfreg.pruning``: same rules (:mod:`tfreg_core.pruning`), same result object.
Supported: an ``nn.Sequential`` of ``Linear``, ``Conv1d``, ``Conv2d`` (``groups=1``) with
elementwise activation modules, ``BatchNorm1d/2d`` (running statistics), ``Dropout*``,
max/average/adaptive pooling, ``Flatten()`` and ``Identity`` in between. Kernels are read in
Keras layout (``Linear.weight.T``; ``Conv2d.weight`` ``(out, in, kh, kw)`` as ``(kh, kw, in,
out)``) so both twins share one planner, and written back in torch's.

Differences from Keras: torch flattens NCHW, so a removed filter ``c`` takes rows ``c * S + s``
of the next ``Linear`` (Keras: ``s * C + c``), with ``S = in_features / channels``; a
convolution pads with zeros unless ``padding=0`` or ``padding_mode`` is ``"reflect"``,
``"replicate"`` or ``"circular"`` (which keep a constant image constant); ``AvgPool`` with
``padding > 0`` (``count_include_pad=True``) or ``ceil_mode=True`` averages a constant with
padding, so a non-zero constant unit before it is kept (see ``notes``).

Outputs equal the original's to round-off in eval mode (Dropout the identity, BatchNorm on its
running statistics). Refused, with a ``ValueError`` naming the module: anything but a plain
``nn.Sequential`` (residual or branching models), a module used twice, unknown modules (RNNs,
nested containers, ``Unflatten``, ...), grouped/depthwise convolutions, softmax between layers,
BatchNorm after ``Flatten`` or without running statistics, a ``Linear`` reading a convolution's
output without ``Flatten``.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from typing import Any

import numpy as np

from tfreg_core.pruning import Boundary, LinearLayer, PruneResult, plan_pruning
from tfreg_core.validation import strict_bool
from torchref._compat import torch

__all__ = ["PruneResult", "prune"]

nn = torch.nn
_CONV = (nn.Conv1d, nn.Conv2d)
_LINEAR = (nn.Linear, *_CONV)
_ELEMENTWISE = (
    nn.CELU,
    nn.ELU,
    nn.GELU,
    nn.Hardshrink,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Identity,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.Mish,
    nn.ReLU,
    nn.ReLU6,
    nn.SELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Softplus,
    nn.Softshrink,
    nn.Softsign,
    nn.Tanh,
    nn.Tanhshrink,
)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_POOLING = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_MIXING = (nn.Softmax, nn.LogSoftmax, nn.Softmin)  # fine after the last layer, not between
_REFUSED = (
    (nn.RNNBase, "recurrent layers are not supported"),
    ((nn.Sequential, nn.ModuleList, nn.ModuleDict), "nested containers are not supported"),
)


def _fail(name: str, module: Any, why: str) -> ValueError:
    return ValueError(f"prune: cannot prune module {name!r} ({type(module).__name__}): {why}")


def _modules(model: Any) -> list[tuple[str, Any]]:
    """``model``'s children as (name, module), or a ValueError naming the one it refuses."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune: expected a torch.nn.Sequential, got {type(model).__name__}")
    if type(model) is not nn.Sequential:
        raise ValueError(
            f"prune: expected a plain torch.nn.Sequential (a chain), got {type(model).__name__}: "
            "its forward() may branch or add residuals, which prune cannot see"
        )
    modules = list(model)
    names = [name for name, _ in model.named_children()]  # named_children skips repeats
    if len(names) != len(modules):
        seen: set[int] = set()
        for position, module in enumerate(modules):
            if id(module) in seen:
                raise _fail(str(position), module, "the same module is used twice (shared)")
            seen.add(id(module))
    children = list(zip(names, modules, strict=True))
    linear = [i for i, (_, m) in enumerate(children) if type(m) in _LINEAR]
    for position, (name, module) in enumerate(children):
        _check(name, module, hidden=bool(linear) and linear[0] < position < linear[-1])
    return children


def _check(name: str, module: Any, *, hidden: bool) -> None:
    kind = type(module)
    for types, why in _REFUSED:
        if isinstance(module, types):
            raise _fail(name, module, why)
    if hidden and kind in _MIXING:
        raise _fail(name, module, "it mixes units, so none before it can be removed")
    if kind in _CONV and module.groups != 1:
        raise _fail(name, module, f"grouped/depthwise convolution (groups={module.groups})")
    if kind in _BATCHNORM and not module.track_running_stats:
        raise _fail(name, module, "BatchNorm without running statistics normalises per batch")
    if kind is nn.Flatten and (module.start_dim, module.end_dim) != (1, -1):
        raise _fail(name, module, "only Flatten(start_dim=1, end_dim=-1)")
    known = (*_LINEAR, *_ELEMENTWISE, *_DROPOUT, *_BATCHNORM, *_POOLING, *_MIXING, nn.Flatten)
    if kind not in known:
        raise _fail(name, module, "module type not known to prune")


def _kernel(module: Any) -> np.ndarray:
    """The weight in Keras layout ``(*taps, in, out)``."""
    w = module.weight.detach().cpu().numpy()
    return np.moveaxis(w, (0, 1), (-1, -2)) if w.ndim > 2 else w.T


def _weight(kernel: np.ndarray) -> np.ndarray:
    """Keras layout back to torch's ``(out, in, *taps)``."""
    return np.moveaxis(kernel, (-1, -2), (0, 1)) if kernel.ndim > 2 else kernel.T


def _pads_with_zeros(module: Any) -> bool:
    padding = module.padding
    padded = padding == "same" or (not isinstance(padding, str) and any(p > 0 for p in padding))
    return padded and module.padding_mode == "zeros"


def _boundary(children: list[tuple[str, Any]], start: int, stop: int) -> Boundary:
    """Between the Linear/Conv modules at positions ``start`` and ``stop``."""
    (_, first), (next_name, nxt) = children[start], children[stop]
    between = children[start + 1 : stop]
    channels = first.weight.shape[0]
    flattened = any(type(m) is nn.Flatten for _, m in between)
    if type(first) in _CONV and type(nxt) is nn.Linear and not flattened:
        raise _fail(next_name, nxt, "a Linear reading a convolution's output needs a Flatten")
    if type(nxt) in _CONV and type(first) is not type(nxt):
        raise _fail(next_name, nxt, f"it cannot read the output of a {type(first).__name__}")
    fold_refused = None
    if type(nxt) in _CONV and _pads_with_zeros(nxt):
        fold_refused = (
            f"{next_name!r} pads with zeros (padding={nxt.padding!r}): a constant input is not "
            "constant at its borders"
        )
    for name, module in between:
        if type(module) is nn.Flatten:
            flattened = True
        elif type(module) in _BATCHNORM and flattened:
            raise _fail(name, module, "BatchNorm after Flatten (per position, not per channel)")
        elif type(module) in (nn.AvgPool1d, nn.AvgPool2d) and (
            module.ceil_mode
            or (np.any(np.asarray(module.padding) > 0) and module.count_include_pad)
        ):
            fold_refused = (
                f"{name!r} averages with padding (count_include_pad or ceil_mode): a constant "
                "input is not constant at its borders"
            )
    positions = nxt.in_features // channels if flattened else 1
    if flattened and positions * channels != nxt.in_features:
        raise _fail(next_name, nxt, f"in_features={nxt.in_features} is no multiple of {channels}")
    stages = [m for _, m in between if type(m) in _ELEMENTWISE or type(m) in _BATCHNORM]
    rank = 2 if type(first) is nn.Linear else first.weight.ndim

    def constant(pre: np.ndarray) -> np.ndarray:
        # The model's own modules on a (1, C, 1, ...) tensor of constants: the exact numbers it
        # computes (pooling, Dropout in eval and Flatten leave a constant unchanged).
        like = first.weight
        x = torch.as_tensor(pre, dtype=like.dtype, device=like.device)
        x = x.reshape((1, -1) + (1,) * (rank - 2))
        with torch.no_grad():
            for stage in stages:
                if type(stage) in _BATCHNORM:  # eval-mode arithmetic without switching modes
                    x = nn.functional.batch_norm(
                        x, stage.running_mean, stage.running_var, stage.weight, stage.bias,
                        training=False, eps=stage.eps,
                    )  # fmt: skip
                else:
                    x = stage(x)
        return x.cpu().numpy().reshape(-1)

    return Boundary(positions, False, fold_refused, constant)


def _new_linear(module: Any, kernel: np.ndarray, bias: np.ndarray | None) -> Any:
    like = module.weight
    factory = {"device": like.device, "dtype": like.dtype}
    has_bias = bias is not None
    if type(module) is nn.Linear:
        new = nn.Linear(kernel.shape[-2], kernel.shape[-1], bias=has_bias, **factory)
    else:
        new = type(module)(
            kernel.shape[-2],
            kernel.shape[-1],
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=has_bias,
            padding_mode=module.padding_mode,
            **factory,
        )
    with torch.no_grad():
        new.weight.copy_(torch.as_tensor(np.ascontiguousarray(_weight(kernel))))
        new.weight.requires_grad_(module.weight.requires_grad)
        if has_bias:
            new.bias.copy_(torch.as_tensor(bias))
    return new


def _new_batchnorm(module: Any, channels: np.ndarray) -> Any:
    new = copy.deepcopy(module)
    index = torch.as_tensor(channels, device=module.running_mean.device)
    new.num_features = len(channels)
    for name in ("weight", "bias"):
        if getattr(module, name) is not None:
            setattr(new, name, nn.Parameter(getattr(module, name).detach()[index].clone()))
            getattr(new, name).requires_grad_(getattr(module, name).requires_grad)
    new.running_mean = module.running_mean[index].clone()
    new.running_var = module.running_var[index].clone()
    return new


def _count(model: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() for t in tensors if t.is_floating_point()))


def prune(model: Any, *, inputs: bool = False) -> PruneResult:
    """A new, smaller ``nn.Sequential`` without ``model``'s dead neurons / filters.

    Same rules and result as ``tfreg.pruning.prune`` (units with all-zero outgoing weights;
    units with all-zero incoming weights, their constant ``act(b)`` folded into the next bias
    where exact; with ``inputs=True`` the all-zero input features: feed ``x[:, result.inputs]``).
    ``model`` is untouched; the new one has the same child names, dtype, device and train/eval
    mode. Raises ``ValueError`` naming the module it cannot prune exactly.
    """
    inputs = strict_bool(inputs, "inputs")
    children = _modules(model)
    linear = [i for i, (_, m) in enumerate(children) if type(m) in _LINEAR]
    if not linear:
        raise ValueError("prune: the model has no Linear/Conv module to prune")
    if inputs:
        for name, module in children[: linear[0]]:
            if type(module) in (nn.Flatten, *_POOLING):
                raise _fail(name, module, "inputs=True needs the first layer to see the raw inputs")
    plan = plan_pruning(
        [
            LinearLayer(
                children[i][0],
                _kernel(children[i][1]),
                None if children[i][1].bias is None else children[i][1].bias.detach().cpu().numpy(),
            )
            for i in linear
        ],
        [_boundary(children, a, b) for a, b in itertools.pairwise(linear)],
        inputs=inputs,
    )
    linear_at = {position: j for j, position in enumerate(linear)}
    current = plan.inputs  # kept channels of the tensor the next module reads
    new_children = []
    for position, (name, module) in enumerate(children):
        if position in linear_at:
            j = linear_at[position]
            new = _new_linear(module, plan.kernels[j], plan.biases[j])
            current = plan.kept[j]
        elif type(module) in _BATCHNORM:
            new = _new_batchnorm(module, current)
        else:
            new = copy.deepcopy(module)
        new_children.append((name, new))
    pruned = nn.Sequential(OrderedDict(new_children))
    pruned.train(model.training)
    return PruneResult(
        model=pruned,
        kept={children[p][0]: plan.kept[j] for p, j in linear_at.items()},
        inputs=plan.inputs,
        params_before=_count(model),
        params_after=_count(pruned),
        notes=plan.notes,
    )
