"""Loss cases both trainers share, written once and run against both twins (``tf``, ``torch``).

Each twin says how its users make a loss element not count -- Keras: a mask (``Embedding(
mask_zero=True)`` feeding a per-timestep loss); torch: ``ignore_index`` labels (-100) -- and
supplies its own independent reference: plain Keras ``model.fit`` / a plain torch
``loss(model(X), Y).backward(); SGD.step()`` on the concatenated window. Everything else is the
twins' shared public API. Each framework is imported only when its twin's case runs.

Keras-only (masked denominators, ``AccumulatingModel``, schedules, clipping against Keras'
optimizer, mixed precision) and torch-only (loss modules as torch users build them) cases stay in
``test_training_losses.py`` / ``test_training_torch_losses.py``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tfreg_harness import assert_close, tolerance

EXACT = tolerance("accumulation", "float64")  # float64 both sides; summation order only
LR = 0.125  # exact in float32 (Keras' learning-rate variable)


@dataclass(frozen=True)
class LossTwin:
    """A class-index loss, 8 examples, the second window of 4 with no counted element."""

    pkg: ModuleType  # tfreg or torchref
    model: Any
    loss: Callable[[], Any]
    x: np.ndarray
    y: np.ndarray
    counted_first: float  # loss elements counted in window 0
    sgd: Callable[[Any], Any]
    clone: Callable[[Any], Any]  # the same model with the same weights
    one_step: Callable[[Any, np.ndarray, np.ndarray], None]  # the plain framework step, in place
    weights: Callable[[Any], list[np.ndarray]]


@contextlib.contextmanager
def _tf_twin() -> Iterator[LossTwin]:
    import keras

    import tfreg

    previous = keras.config.floatx(), keras.config.dtype_policy()
    # fit's data adapter casts float inputs, and Keras losses compute, in floatx; layers take
    # the global dtype policy: set both, or a float64 case run after a float32 one is float32.
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
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

        def loss() -> Any:
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def clone(m: Any) -> Any:
            c = keras.models.clone_model(m)
            c.set_weights(m.get_weights())
            return c

        def one_step(m: Any, xs: np.ndarray, ys: np.ndarray) -> None:
            m.compile(keras.optimizers.SGD(LR), loss())
            m.fit(xs, ys, batch_size=len(xs), shuffle=False, verbose=0)

        yield LossTwin(
            pkg=tfreg,
            model=model,
            loss=loss,
            x=x,
            y=y,
            counted_first=4.0 * steps,
            sgd=lambda m: keras.optimizers.SGD(LR),
            clone=clone,
            one_step=one_step,
            weights=lambda m: m.get_weights(),
        )
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])


@contextlib.contextmanager
def _torch_twin() -> Iterator[LossTwin]:
    import torch
    from torch import nn

    import torchref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = np.random.default_rng(2).normal(size=(8, 4))
    y = np.array([0, 1, 2, 1, -100, -100, -100, -100])  # window 1: every label ignored

    def one_step(m: Any, xs: np.ndarray, ys: np.ndarray) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        nn.CrossEntropyLoss()(m(torch.as_tensor(xs)), torch.as_tensor(ys)).backward()
        opt.step()

    yield LossTwin(
        pkg=torchref,
        model=model,
        loss=nn.CrossEntropyLoss,
        x=x,
        y=y,
        counted_first=4.0,
        sgd=lambda m: torch.optim.SGD(m.parameters(), lr=LR),
        clone=copy.deepcopy,
        one_step=one_step,
        weights=lambda m: [p.detach().numpy().copy() for p in m.parameters()],
    )


@pytest.fixture(params=["tf", "torch"])
def twin(request: pytest.FixtureRequest) -> Iterator[LossTwin]:
    if request.param == "torch":
        request.getfixturevalue("single_torch_thread")
    with {"tf": _tf_twin, "torch": _torch_twin}[request.param]() as built:
        yield built


def test_window_that_counts_nothing_is_a_zero_data_gradient_and_reported(twin) -> None:
    # The framework's own mean is 0/0 = NaN there; the trainer applies a zero data gradient
    # (SGD: no change) and reports the window with elements 0, not skipped.
    expected = twin.clone(twin.model)
    twin.one_step(expected, twin.x[:4], twin.y[:4])  # window 0 alone
    trained = twin.clone(twin.model)
    after_first: list[list[np.ndarray]] = []

    class AfterFirstUpdate:
        def on_update_end(self, trainer: Any, record: dict[str, Any]) -> None:
            if record["update"] == 0:
                after_first.append(twin.weights(trainer.model))

    t = twin.pkg.Trainer(trained, twin.loss(), twin.sgd(trained), accumulation_steps=2)
    history = t.fit(
        twin.x, twin.y, batch_size=2, shuffle=False, callbacks=[AfterFirstUpdate()], verbose=0
    )
    first, second = history.records
    assert first["elements"] == twin.counted_first
    assert (second["elements"], second["loss"], second["data_loss"], second["skipped"]) == (
        0.0,
        0.0,
        0.0,
        False,
    )
    for ours, ref, mid in zip(
        twin.weights(trained), twin.weights(expected), after_first[0], strict=True
    ):
        assert_close("weights", ours, ref, rtol=EXACT.rtol)
        np.testing.assert_array_equal(ours, mid)  # the empty window moved nothing
