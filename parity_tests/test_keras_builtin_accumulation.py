"""tfreg's exact accumulation vs Keras' built-in ``optimizer(gradient_accumulation_steps=k)``.

Keras' built-in (``keras/src/optimizers/base_optimizer.py``) sums each micro-batch's *mean*
gradient and divides by k: the mean of per-micro-batch means. That equals the exact window
gradient only when all k micro-batches have the same size and the same total sample weight.
It also never flushes: micro-batches left over when ``fit`` ends are accumulated and lost.

Pinned here: agreement where it must hold (claim "accumulation"), and where it must not, that
Keras' result is exactly the mean-of-means prediction and the lost partial window.
"""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf

import tfreg
from tfreg_harness import assert_close, compare, tolerance
from tfreg_harness.keras_side.models import build_mlp

FEATURES, CLASSES = 6, 3


@pytest.fixture
def floatx(dtype: str):
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)  # fit's inputs and Keras' default loss dtype
    yield
    keras.config.set_floatx(previous)


def _setup(rng, dtype, n):
    pair = build_mlp(dtype=dtype, rng=rng, input_dim=FEATURES, hidden=(5,), classes=CLASSES)
    x = rng.normal(size=(n, FEATURES)).astype(dtype)
    y = rng.integers(0, CLASSES, size=n)
    return pair.keras, x, y


def _loss(dtype):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)


def _builtin(model, dtype, x, y, *, steps, batch):
    builtin = keras.models.clone_model(model)
    builtin.set_weights(model.get_weights())
    builtin.compile(keras.optimizers.SGD(1.0, gradient_accumulation_steps=steps), _loss(dtype))
    builtin.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return builtin


def _exact(model, dtype, x, y, *, steps, batch, drop_remainder=False):
    exact = keras.models.clone_model(model)
    exact.set_weights(model.get_weights())
    trainer = tfreg.Trainer(
        exact,
        _loss(dtype),
        keras.optimizers.SGD(1.0),
        accumulation_steps=steps,
        drop_remainder=drop_remainder,
    )
    trainer.fit(x, y, batch_size=batch, shuffle=False, verbose=0)
    return exact, trainer


def test_equal_unweighted_micro_batches_agree(rng, dtype, floatx) -> None:
    tol = tolerance("accumulation", dtype)
    model, x, y = _setup(rng, dtype, 24)  # 2 windows of 3 x 4
    builtin = _builtin(model, dtype, x, y, steps=3, batch=4)
    exact, trainer = _exact(model, dtype, x, y, steps=3, batch=4)
    assert int(builtin.optimizer.iterations.numpy()) == int(trainer.optimizer.iterations.numpy())
    for i, (w0, a, b) in enumerate(
        zip(model.get_weights(), exact.get_weights(), builtin.get_weights(), strict=True)
    ):
        assert_close(f"delta[{i}]", a - w0, b - w0, rtol=tol.rtol)


def test_uneven_micro_batches_bias_the_builtin(rng, dtype, floatx) -> None:
    """13 = 4+4+4+1 in one window of 4: Keras gives the lone 13th example weight 1/4, not 1/13."""
    tol = tolerance("accumulation", dtype)
    model, x, y = _setup(rng, dtype, 13)
    builtin = _builtin(model, dtype, x, y, steps=4, batch=4)
    exact, _ = _exact(model, dtype, x, y, steps=4, batch=4)

    loss = _loss(dtype)
    mean_grads = []
    for start in range(0, 13, 4):
        with tf.GradientTape() as tape:
            value = loss(y[start : start + 4], model(x[start : start + 4]))
        mean_grads.append(tape.gradient(value, model.trainable_variables))
    predicted = [-sum(g[i] for g in mean_grads).numpy() / 4 for i in range(len(mean_grads[0]))]
    with tf.GradientTape() as tape:
        one_batch = loss(y, model(x))
    exact_delta = [-g.numpy() for g in tape.gradient(one_batch, model.trainable_variables)]

    for i, w0 in enumerate(model.get_weights()):
        builtin_delta = builtin.get_weights()[i] - w0
        assert_close(f"builtin = mean of means [{i}]", builtin_delta, predicted[i], rtol=tol.rtol)
        assert_close(
            f"tfreg = one batch [{i}]", exact.get_weights()[i] - w0, exact_delta[i], rtol=tol.rtol
        )
    bias = compare("builtin vs exact", builtin.get_weights()[0], exact.get_weights()[0], rtol=0)
    assert bias.max_rel > 1e3 * tol.rtol, str(bias)


def test_builtin_loses_the_partial_window(rng, dtype, floatx) -> None:
    """20 = 5 micro-batches of 4 with k = 3: Keras applies one update and silently keeps the
    last two micro-batches in its accumulators. tfreg applies them as a second update (default)
    or drops them like Keras when asked."""
    tol = tolerance("accumulation", dtype)
    model, x, y = _setup(rng, dtype, 20)
    builtin = _builtin(model, dtype, x, y, steps=3, batch=4)
    dropped, dropping = _exact(model, dtype, x, y, steps=3, batch=4, drop_remainder=True)
    flushed, flushing = _exact(model, dtype, x, y, steps=3, batch=4)

    assert int(builtin.optimizer.iterations.numpy()) == 1
    assert int(dropping.optimizer.iterations.numpy()) == 1
    assert int(flushing.optimizer.iterations.numpy()) == 2
    for i, w0 in enumerate(model.get_weights()):
        assert_close(
            f"builtin = drop_remainder [{i}]",
            builtin.get_weights()[i] - w0,
            dropped.get_weights()[i] - w0,
            rtol=tol.rtol,
        )
    lost = compare("flushed vs builtin", flushed.get_weights()[0], builtin.get_weights()[0], rtol=0)
    assert lost.max_rel > 1e3 * tol.rtol, str(lost)


@pytest.mark.parametrize("dtype", ["float64"])
def test_builtin_evaluates_a_schedule_at_the_micro_step(rng, dtype, floatx) -> None:
    """Documented difference (measured, Keras 3.15): with ``gradient_accumulation_steps=4``
    Keras evaluates a ``LearningRateSchedule`` at its micro-step counter, so
    ``PiecewiseConstantDecay([2], [1.0, 0.0])`` -- rate 1 for updates 0..2 -- is already 0 when
    the first accumulated update is applied: 8 micro-batches, 2 updates, the weights never move.
    tfreg's optimizer counts updates only: its 2 updates are plain Keras' 2 steps at batch 16."""
    model, x, y = _setup(rng, dtype, 32)
    before = model.get_weights()

    def sgd(**kwargs):
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [1.0, 0.0])
        return keras.optimizers.SGD(schedule, **kwargs)

    builtin = keras.models.clone_model(model)
    builtin.set_weights(before)
    builtin.compile(sgd(gradient_accumulation_steps=4), _loss(dtype))
    builtin.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert int(builtin.optimizer.iterations.numpy()) == 2
    for w, w0 in zip(builtin.get_weights(), before, strict=True):
        assert (w == w0).all()  # no non-zero rate was ever applied

    one_batch = keras.models.clone_model(model)
    one_batch.set_weights(before)
    one_batch.compile(sgd(), _loss(dtype))
    one_batch.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    exact = keras.models.clone_model(model)
    exact.set_weights(before)
    trainer = tfreg.Trainer(exact, _loss(dtype), sgd(), accumulation_steps=4)
    trainer.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert int(trainer.optimizer.iterations.numpy()) == 2
    tol = tolerance("accumulation", dtype)
    for i, (a, b, w0) in enumerate(
        zip(exact.get_weights(), one_batch.get_weights(), before, strict=True)
    ):
        assert_close(f"tfreg = one batch [{i}]", a - w0, b - w0, rtol=tol.rtol)
    assert any((w != w0).any() for w, w0 in zip(exact.get_weights(), before, strict=True))
