"""Which parameters a penalty applies to, summed once: ``penalty(module, regularizer)``.

Same scope rule as ``tfreg.penalty``: a module's kernels are its trainable parameters
(``requires_grad``) with ``ndim >= 2`` -- what PyTorch users write as ``if p.ndim > 1``. Biases and
normalization weights (1-D) are exempt unless ``include_bias=True``. Buffers (BatchNorm running
statistics) are never penalised. An explicit sequence of tensors is taken as given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tfreg_core import validation
from torchref._compat import torch
from torchref.regularizers import get

__all__ = ["penalized_parameters", "penalized_variables", "penalty"]


def penalized_parameters(
    module_or_tensors: torch.nn.Module | Iterable[torch.Tensor], *, include_bias: bool = False
) -> list[torch.Tensor]:
    """The tensors :func:`penalty` sums over, in ``module.parameters()`` order."""
    include_bias = validation.strict_bool(include_bias, "include_bias")
    if isinstance(module_or_tensors, torch.nn.Module):
        trainable: list[torch.Tensor] = [
            p for p in module_or_tensors.parameters() if p.requires_grad
        ]
        return trainable if include_bias else [p for p in trainable if p.ndim >= 2]
    if isinstance(module_or_tensors, (str, bytes, torch.Tensor)) or not isinstance(
        module_or_tensors, Iterable
    ):
        raise TypeError(
            "penalty() expects a torch.nn.Module or a sequence of tensors. "
            f"Received: module_or_tensors={module_or_tensors!r}"
        )
    return list(module_or_tensors)


penalized_variables = penalized_parameters
"""tfreg's name for :func:`penalized_parameters`, so code written against either twin runs on
both."""


def penalty(
    module_or_tensors: torch.nn.Module | Iterable[torch.Tensor],
    regularizer: Callable[[torch.Tensor], torch.Tensor] | str | dict[str, Any],
    *,
    include_bias: bool = False,
) -> torch.Tensor:
    """Total ``sum_p regularizer(p)`` over the penalised parameters.

    ``regularizer=None`` is rejected, as in ``tfreg.penalty``. When nothing is penalised the
    result is 0.0 with the dtype and device of the module's first parameter (else first buffer),
    or torch's default dtype on the CPU for an empty sequence or a module without tensors.
    """
    tensors = penalized_parameters(module_or_tensors, include_bias=include_bias)
    reg = get(regularizer)  # None only for None
    if reg is None:
        raise validation.InvalidArgumentError(
            "penalty() needs a regularizer (a callable, a config or a key such as 'l2'). "
            f"Received: regularizer={regularizer!r}"
        )
    if not tensors:
        return _zero_like_module(module_or_tensors)
    return torch.stack([reg(t) for t in tensors]).sum()


def _zero_like_module(module_or_tensors: Any) -> torch.Tensor:
    if isinstance(module_or_tensors, torch.nn.Module):
        for tensor in (*module_or_tensors.parameters(), *module_or_tensors.buffers()):
            if tensor.is_floating_point():
                return torch.zeros((), dtype=tensor.dtype, device=tensor.device)
    return torch.zeros(())
