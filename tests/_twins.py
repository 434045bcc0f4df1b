"""The twin adapters and the NumPy window reference shared by the trainer suites.

A twin is what a case needs from one framework (torch's ``OptimizerInfo`` pattern): a float64
linear model from ``(w, b)``, an SGD optimizer whose steps are counted, the kernel and bias read
back as NumPy; everything else is the twins' shared public API (``twin.pkg.Trainer``, ``.L2``).
Each framework is imported only when its twin is built. The reference spells its windows out by
hand (indices, not ``tfreg_core.windows``) and its gradient in closed form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from tfreg_harness import tolerance

EXACT = tolerance("accumulation", "float64")  # float64 both sides; summation order only
LR = 0.125  # exact in float32, so Keras' float32 learning-rate variable does not round it
N, D = 19, 3
B0 = 0.3
# batch_size=4, accumulation_steps=3: micro-batches 4,4,4 | 4,3 -> windows of 12 and 7 examples
WINDOWS = [np.arange(0, 12), np.arange(12, 19)]


@dataclass(frozen=True)
class Twin:
    """What a case needs from one framework; everything else is the twins' shared public API."""

    pkg: ModuleType  # tfreg or torchref
    linear: Callable[[np.ndarray, float], Any]  # float64 y = x @ w + b
    sgd: Callable[[Any, float], Any]  # optimizer over the model's parameters
    kernel: Callable[[Any], np.ndarray]  # (D,)
    bias: Callable[[Any], float]
    steps: Callable[[Any], int]  # optimizer steps taken, read from the trainer


def tf_twin() -> Twin:
    import keras

    import tfreg

    def linear(w: np.ndarray, b: float) -> Any:
        model = keras.Sequential(
            [keras.Input((D,), dtype="float64"), keras.layers.Dense(1, dtype="float64")]
        )
        model.set_weights([w.reshape(D, 1), np.array([b])])
        return model

    return Twin(
        pkg=tfreg,
        linear=linear,
        sgd=lambda model, lr: keras.optimizers.SGD(lr),
        kernel=lambda model: model.get_weights()[0][:, 0],
        bias=lambda model: float(model.get_weights()[1][0]),
        steps=lambda t: int(t.optimizer.iterations.numpy()),
    )


def torch_twin() -> Twin:
    import torch

    import torchref

    def linear(w: np.ndarray, b: float) -> Any:
        model = torch.nn.Linear(D, 1).double()
        with torch.no_grad():
            model.weight.copy_(torch.tensor(w).reshape(1, D))
            model.bias.fill_(b)
        return model

    steps: dict[int, int] = {}

    def sgd(model: Any, lr: float) -> Any:
        # torch's SGD keeps no step count: count optimizer.step() calls with torch's public hook.
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        steps[id(optimizer)] = 0

        def counted(opt: Any, args: Any, kwargs: Any) -> None:
            steps[id(opt)] += 1

        optimizer.register_step_post_hook(counted)
        return optimizer

    return Twin(
        pkg=torchref,
        linear=linear,
        sgd=sgd,
        kernel=lambda model: model.weight.detach().numpy()[0].copy(),
        bias=lambda model: float(model.bias.detach()[0]),
        steps=lambda t: steps[id(t.optimizer)],
    )


TWINS: dict[str, Callable[[], Twin]] = {"tf": tf_twin, "torch": torch_twin}


def window_data() -> tuple[np.ndarray, ...]:
    """x (N, D), y (N, 1), sample weights, initial kernel w (D,)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D))
    y = rng.normal(size=(N, 1))
    sw = rng.uniform(0.5, 2.0, size=N)
    w = rng.normal(size=D)
    return x, y, sw, w


def numpy_sgd(
    x: np.ndarray,
    y: np.ndarray,
    sw: np.ndarray,
    w: np.ndarray,
    b: float,
    *,
    epochs: int,
    windows: list[np.ndarray] = WINDOWS,
    l2: float = 0.0,
    global_clipnorm: float | None = None,
    prox_l1: float = 0.0,
) -> tuple[np.ndarray, float]:
    w, b = w.copy(), float(b)
    for _ in range(epochs):
        for idx in windows:
            r = (x[idx] @ w + b - y[idx, 0]) * sw[idx]
            gw = 2 * x[idx].T @ r / len(idx) + 2 * l2 * w
            gb = 2 * r.sum() / len(idx)
            if global_clipnorm is not None:
                scale = global_clipnorm / max(np.sqrt(gw @ gw + gb * gb), global_clipnorm)
                gw, gb = gw * scale, gb * scale
            w, b = w - LR * gw, b - LR * gb
            w = np.sign(w) * np.maximum(np.abs(w) - LR * prox_l1, 0.0)  # kernel only
    return w, b
