"""The twin adapters and the NumPy window reference shared by the trainer suites.

A twin is what a case needs from one framework (torch's ``OptimizerInfo`` pattern): models
from a spec (a float64 linear model from ``(w, b)``, a seeded float32 one, a small classifier),
optimizers whose steps are counted, weights and optimizer slots read back as NumPy, the
framework's own checkpoint format, and the framework's own training step as an independent
reference (Keras ``model.fit`` / a plain torch loop); everything else is the twins' shared
public API (``twin.pkg.Trainer``, ``.L2``, ``.CheckpointManager``). Each framework is imported
only when its twin is built; the ``twin`` fixture (``tests/conftest.py``) runs a case on both,
ids ``tf`` and ``torch``. The NumPy reference spells its windows out by hand (indices, not
``tfreg_core.windows``) and its gradient in closed form.
"""

from __future__ import annotations

import copy
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

    name: str  # "tf" or "torch": the case's id
    pkg: ModuleType  # tfreg or torchref
    dense: Callable[[np.ndarray, np.ndarray | None], Any]  # (kernel (in, out), bias or None)
    seeded_linear: Callable[[int, int], Any]  # (width, seed): float32 (D,) -> (width,), seeded init
    classifier: Callable[[int, bool], Any]  # (seed, dropout): float64 4 -> hidden -> 3 logits
    cross_entropy: Callable[[], Any]  # the framework's class-index cross-entropy on logits
    # (model, lr, kind="sgd" | "adam", **options such as momentum): steps counted, see `steps`
    optimizer: Callable[..., Any]
    kernel: Callable[[Any], np.ndarray]  # (D,) of a linear model
    bias: Callable[[Any], float]
    steps: Callable[[Any], int]  # optimizer steps a trainer took in this process
    weights: Callable[[Any], list[np.ndarray]]  # a model's weights
    clone: Callable[[Any], Any]  # the same model with the same weights
    # (model, loss, x, y, lr): one SGD step of the framework's own loop on (x, y), in place --
    # Keras' model.fit / torch's loss(model(x), y).backward(); optimizer.step(): the reference
    plain_step: Callable[[Any, Any, np.ndarray, np.ndarray, float], None]
    # (model, x, y, loss elements counted in window 0): class indices, 8 examples, the second
    # window of 4 counting no loss element the way the framework's users write it -- Keras: a
    # mask (Embedding(mask_zero=True) feeding a per-timestep loss); torch: labels -100
    uncounted_window: Callable[[], tuple[Any, np.ndarray, np.ndarray, float]]
    state: Callable[[Any], list[np.ndarray]]  # a trainer's weights and optimizer slots
    # save(trainer, directory) -> path, in the framework's own format as its users write it:
    # tfreg's trainer.checkpoint().write, torchref's torch.save(trainer.state_dict());
    # restore(trainer, path) loads it into a fresh trainer (torch.load(weights_only=True)).
    save: Callable[[Any, Any], Any]
    restore: Callable[[Any, Any], None]
    draw_random: Callable[[], None]  # moves the framework's global generator on

    def linear(self, w: np.ndarray, b: float) -> Any:
        """float64 y = x @ w + b, w of shape (D,)."""
        return self.dense(w.reshape(D, 1), np.array([b]))


def tf_twin() -> Twin:
    import keras

    import tfreg

    def dense(kernel: np.ndarray, bias: np.ndarray | None) -> Any:
        (fan_in, units), f64 = kernel.shape, "float64"
        layer = keras.layers.Dense(units, use_bias=bias is not None, dtype=f64)
        model = keras.Sequential([keras.Input((fan_in,), dtype=f64), layer])
        model.set_weights([kernel] + ([] if bias is None else [bias]))
        return model

    def seeded_linear(width: int, seed: int) -> Any:
        init = keras.initializers.GlorotUniform(seed=seed)
        return keras.Sequential(
            [keras.Input((D,)), keras.layers.Dense(width, kernel_initializer=init)]
        )

    def classifier(seed: int, dropout: bool) -> Any:
        f64 = "float64"
        hidden = (
            [keras.layers.Dense(16, dtype=f64), keras.layers.Dropout(0.5, seed=seed, dtype=f64)]
            if dropout
            else [keras.layers.Dense(6, activation="tanh", dtype=f64)]
        )
        model = keras.Sequential(
            [keras.Input((4,), dtype=f64), *hidden, keras.layers.Dense(3, dtype=f64)]
        )
        rng = np.random.default_rng(seed)
        model.set_weights([rng.normal(size=v.shape) * 0.5 for v in model.weights])
        return model

    def optimizer(model: Any, lr: float, kind: str = "sgd", **options: Any) -> Any:
        return {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}[kind](lr, **options)

    def clone(model: Any) -> Any:
        cloned = keras.models.clone_model(model)
        cloned.set_weights(model.get_weights())
        return cloned

    def plain_step(model: Any, loss: Any, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        model.compile(keras.optimizers.SGD(lr), loss)
        model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)

    def uncounted_window() -> tuple[Any, np.ndarray, np.ndarray, float]:
        # float64 needs keras.config's floatx and dtype policy set around the case (the
        # float64_floatx fixture): Keras' reference fit computes its loss in floatx.
        rng = np.random.default_rng(20261201)
        steps, vocab, classes = 4, 6, 3
        model = keras.Sequential(
            [
                keras.Input((steps,), dtype="int64"),
                keras.layers.Embedding(vocab, 3, mask_zero=True),  # token 0: masked
                keras.layers.Dense(classes),
            ]
        )
        model.set_weights([rng.normal(scale=0.5, size=w.shape) for w in model.get_weights()])
        x = rng.integers(1, vocab, size=(8, steps))
        x[4:] = 0  # the second window (examples 4..7) is all padding
        y = rng.integers(0, classes, size=(8, steps))
        return model, x, y, 4.0 * steps

    def state(trainer: Any) -> list[np.ndarray]:
        trainer.build()  # the optimizer's variables exist once the trainer is built
        slots = [np.array(v.numpy()) for v in trainer.optimizer.variables]
        return trainer.model.get_weights() + slots

    def save(trainer: Any, directory: Any) -> Any:
        return trainer.checkpoint().write(str(directory / "ckpt"))

    def restore(trainer: Any, path: Any) -> None:
        trainer.checkpoint().read(path).assert_consumed()

    def draw_random() -> None:
        keras.random.uniform((1000,))  # Keras' global SeedGenerator

    return Twin(
        name="tf",
        pkg=tfreg,
        dense=dense,
        seeded_linear=seeded_linear,
        classifier=classifier,
        cross_entropy=lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=optimizer,
        kernel=lambda model: model.get_weights()[0][:, 0],
        bias=lambda model: float(model.get_weights()[1][0]),
        steps=lambda t: int(t.optimizer.iterations.numpy()),
        weights=lambda model: model.get_weights(),
        clone=clone,
        plain_step=plain_step,
        uncounted_window=uncounted_window,
        state=state,
        save=save,
        restore=restore,
        draw_random=draw_random,
    )


def torch_twin() -> Twin:
    import torch

    import torchref

    def dense(kernel: np.ndarray, bias: np.ndarray | None) -> Any:
        model = torch.nn.Linear(*kernel.shape, bias=bias is not None).double()
        with torch.no_grad():
            model.weight.copy_(torch.tensor(kernel.T))
            if bias is not None:
                model.bias.copy_(torch.tensor(bias))
        return model

    def seeded_linear(width: int, seed: int) -> Any:
        torch.manual_seed(seed)
        return torch.nn.Linear(D, width)

    def classifier(seed: int, dropout: bool) -> Any:
        # The seed also resets the global generator Dropout draws from: a model built anew
        # draws the same masks.
        torch.manual_seed(seed)
        nn = torch.nn
        hidden = [nn.Linear(4, 16), nn.Dropout(0.5)] if dropout else [nn.Linear(4, 6), nn.Tanh()]
        return nn.Sequential(*hidden, nn.Linear(hidden[0].out_features, 3)).double()

    steps: dict[int, int] = {}

    def optimizer(model: Any, lr: float, kind: str = "sgd", **options: Any) -> Any:
        kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
        opt = kinds[kind](model.parameters(), lr=lr, **options)
        # torch's optimizers keep no step count of their own (SGD): count optimizer.step()
        # calls with torch's public hook.
        steps[id(opt)] = 0

        def counted(o: Any, args: Any, kwargs: Any) -> None:
            steps[id(o)] += 1

        opt.register_step_post_hook(counted)
        return opt

    def draw_random() -> None:
        torch.rand(1000)  # torch's global generator

    def weights(model: Any) -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in model.parameters()]

    def save(trainer: Any, directory: Any) -> Any:
        path = directory / "state.pt"
        torch.save(trainer.state_dict(), path)
        return path

    def restore(trainer: Any, path: Any) -> None:
        trainer.load_state_dict(torch.load(path, weights_only=True))

    def plain_step(model: Any, loss: Any, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        loss(model(torch.as_tensor(x)), torch.as_tensor(y)).backward()
        opt.step()

    def uncounted_window() -> tuple[Any, np.ndarray, np.ndarray, float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
        ).double()
        x = np.random.default_rng(2).normal(size=(8, 4))
        y = np.array([0, 1, 2, 1, -100, -100, -100, -100])  # window 1: every label ignored
        return model, x, y, 4.0

    def state(trainer: Any) -> list[np.ndarray]:
        slots = [
            v.detach().numpy().copy()
            for s in trainer.optimizer.state.values()
            for v in s.values()
            if hasattr(v, "detach")
        ]
        return weights(trainer.model) + slots

    return Twin(
        name="torch",
        pkg=torchref,
        dense=dense,
        seeded_linear=seeded_linear,
        classifier=classifier,
        cross_entropy=torch.nn.CrossEntropyLoss,
        optimizer=optimizer,
        kernel=lambda model: model.weight.detach().numpy()[0].copy(),
        bias=lambda model: float(model.bias.detach()[0]),
        steps=lambda t: steps[id(t.optimizer)],
        weights=weights,
        clone=copy.deepcopy,
        plain_step=plain_step,
        uncounted_window=uncounted_window,
        state=state,
        save=save,
        restore=restore,
        draw_random=draw_random,
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
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    prox_l1: float = 0.0,
) -> tuple[np.ndarray, float]:
    w, b = w.copy(), float(b)
    for _ in range(epochs):
        for idx in windows:
            r = (x[idx] @ w + b - y[idx, 0]) * sw[idx]
            gw = 2 * x[idx].T @ r / len(idx) + 2 * l2 * w
            gb = 2 * r.sum() / len(idx)
            if clipnorm is not None:  # each variable on its own
                gw = gw * clipnorm / max(np.sqrt(gw @ gw), clipnorm)
                gb = gb * clipnorm / max(abs(gb), clipnorm)
            if global_clipnorm is not None:
                scale = global_clipnorm / max(np.sqrt(gw @ gw + gb * gb), global_clipnorm)
                gw, gb = gw * scale, gb * scale
            w, b = w - LR * gw, b - LR * gb
            w = np.sign(w) * np.maximum(np.abs(w) - LR * prox_l1, 0.0)  # kernel only
    return w, b
