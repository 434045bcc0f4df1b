"""Torch optimizers with Keras' arithmetic: ``KerasAdamW``, Keras 3's Adam/AdamW in torch.

Its own module so that :mod:`torchref.proximal` (which reads ``KerasAdamW``'s per-coordinate
step) and :mod:`torchref.training` (which imports ``torchref.proximal``) do not import each
other. TensorFlow needs no twin: Keras' own ``Adam``/``AdamW`` are the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tfreg_core.specs import float32_rounded
from tfreg_core.validation import InvalidArgumentError, non_negative_float, strict_bool
from torchref._compat import torch

__all__ = ["KerasAdamW"]


class KerasAdamW(torch.optim.Optimizer):
    """Adam/AdamW with Keras 3's arithmetic, for exact cross-framework trajectories.

    Keras (``keras/src/optimizers/adam.py`` and ``base_optimizer._apply_weight_decay``)::

        w <- w - w * wd * lr                                   (decoupled decay, AdamW)
        m <- m + (g - m)(1 - b1);  v <- v + (g^2 - v)(1 - b2)
        w <- w - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    ``torch.optim.AdamW`` divides by ``sqrt(v) / sqrt(1 - b2^t) + eps`` instead: the two agree
    only with torch's epsilon equal to ``eps / sqrt(1 - b2^t)``, which changes every step, so no
    constant conversion exists. Keras also rounds some hyperparameters through float32 even for
    float64 variables: ``lr`` (a float32 variable), and every value passed through
    ``ops.cast`` -- ``wd`` and the ``b1``/``b2`` inside ``b^t`` -- while ``1 - b1``, ``1 - b2``
    and ``eps`` stay exact. ``float32_hyperparameters=True`` (default) reproduces that rounding.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.001,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        float32_hyperparameters: bool = True,
    ) -> None:
        as_float32 = strict_bool(float32_hyperparameters, "float32_hyperparameters")
        defaults = {
            "lr": non_negative_float(lr, "lr"),
            "betas": _betas(betas, as_float32),
            "eps": non_negative_float(eps, "eps"),
            "weight_decay": non_negative_float(weight_decay, "weight_decay"),
            "float32_hyperparameters": as_float32,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            rounded = float32_rounded if group["float32_hyperparameters"] else float
            lr, wd = rounded(group["lr"]), rounded(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                if wd:
                    p.sub_(p * wd * lr)
                alpha = lr * math.sqrt(1 - rounded(b2) ** t) / (1 - rounded(b1) ** t)
                state["m"].add_((p.grad - state["m"]) * (1 - b1))
                state["v"].add_((p.grad.square() - state["v"]) * (1 - b2))
                p.sub_(state["m"] * alpha / (state["v"].sqrt() + group["eps"]))
        return loss


def _betas(betas: Any, as_float32: bool) -> tuple[float, float]:
    # beta = 1 (or a beta that float32 rounds to 1) divides by 1 - beta^t = 0 at step 1.
    message = (
        "betas must be a pair (b1, b2) of floats in [0, 1)"
        + (", also after float32 rounding" if as_float32 else "")
        + f". Received: betas={betas!r}"
    )
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise InvalidArgumentError(message)
    checked = []
    for beta in betas:
        try:
            value = non_negative_float(beta, "betas")
        except InvalidArgumentError:
            raise InvalidArgumentError(message) from None
        if value >= 1.0 or (as_float32 and float32_rounded(value) >= 1.0):
            raise InvalidArgumentError(message)
        checked.append(value)
    return checked[0], checked[1]
