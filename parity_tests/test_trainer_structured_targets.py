"""``tfreg.Trainer.fit`` with structured targets: a dict loss with ``loss_weights`` on a two-output
model, and per-timestep ``(N, T)`` sample weights -- each equal to one plain Keras ``fit`` step on
the concatenated batch (the base trainer rejected both: one target array, ``(N,)`` weights).

Tolerance: float64, 1e-12 relative to the largest weight change (accumulation only reorders the
float sums of the window's gradient; measured ~1e-16). ``floatx`` is float64 so that Keras' own
data adapter does not round ``x`` and the weights to float32 on the reference side.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfreg
from tfreg_harness import assert_close

RTOL = 1e-12


@pytest.fixture(autouse=True)
def _float64():
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(previous)


def _two_outputs() -> keras.Model:
    keras.utils.set_random_seed(1)
    inp = keras.Input((4,), dtype="float64")
    h = keras.layers.Dense(5, dtype="float64")(inp)
    a = keras.layers.Dense(2, name="a", dtype="float64")(h)
    b = keras.layers.Dense(1, name="b", dtype="float64")(h)
    return keras.Model(inp, {"a": a, "b": b})


def _sequence() -> keras.Model:
    keras.utils.set_random_seed(1)
    inp = keras.Input((5, 3), dtype="float64")
    seq = keras.layers.SimpleRNN(4, return_sequences=True, dtype="float64")(inp)
    return keras.Model(inp, keras.layers.Dense(2, dtype="float64")(seq))


def _check(make, loss, x, y, w, **trainer_kwargs) -> None:
    reference = make()
    start = [v.copy() for v in reference.get_weights()]
    reference.compile(keras.optimizers.SGD(0.125), loss=loss, **trainer_kwargs)
    reference.fit(x, y, sample_weight=w, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    model = make()
    trainer = tfreg.Trainer(
        model, loss, keras.optimizers.SGD(0.125), accumulation_steps=3, **trainer_kwargs
    )
    history = trainer.fit(x, y, sample_weight=w, batch_size=3, epochs=1, shuffle=False, verbose=0)
    assert len(history) == 1  # 3 + 3 + rest: one window, one update
    for i, (expected, actual, before) in enumerate(
        zip(reference.get_weights(), model.get_weights(), start, strict=True)
    ):
        assert_close(f"weight change {i}", actual - before, expected - before, rtol=RTOL)


def test_dict_loss_with_loss_weights_equals_one_keras_step() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4))
    y = {"a": rng.normal(size=(8, 2)), "b": rng.normal(size=(8, 1))}
    w = rng.uniform(size=(8,))
    _check(_two_outputs, {"a": "mse", "b": "mae"}, x, y, w, loss_weights={"a": 1.0, "b": 0.5})


def test_per_timestep_sample_weights_equal_one_keras_step() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5, 3))
    y = rng.integers(0, 2, size=(7, 5))
    w = rng.uniform(size=(7, 5))
    _check(_sequence, keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y, w)
