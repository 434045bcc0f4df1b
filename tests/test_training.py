"""tfreg.Trainer's and tfreg.AccumulatingModel's TF-only cases against a NumPy least-squares
reference (``_twins.numpy_sgd``: windows spelled out by hand, gradient in closed form): tracing,
XLA, Keras' model checks, mixed precision and ``model.fit``. The window rules both twins share
run in ``test_trainer_cases.py``, their checkpoints in ``test_checkpoint.py``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from _twins import EXACT, LR, WINDOWS, numpy_sgd, tf_twin, window_data

import tfreg
from tfreg_core import InvalidArgumentError
from tfreg_harness import assert_close

linear_model = tf_twin().linear


@pytest.fixture
def data() -> tuple[np.ndarray, ...]:
    return window_data()


def trainer(model: keras.Model, **kwargs) -> tfreg.Trainer:
    return tfreg.Trainer(
        model, "mean_squared_error", keras.optimizers.SGD(LR), accumulation_steps=3, **kwargs
    )


def test_no_retrace_across_updates_and_the_short_window(data) -> None:
    x, y, sw, w = data
    t = trainer(linear_model(w, 0.3))
    t.fit(x, y, batch_size=4, epochs=4, shuffle=True, sample_weight=sw, verbose=0)
    assert t.trace_counts() == {"apply": 1, "micro": 1}


def mlp(seed: int) -> keras.Model:
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(6, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    model.set_weights([rng.normal(size=v.shape) * 0.5 for v in model.weights])
    return model


def test_rejected_setups() -> None:
    with pytest.raises(InvalidArgumentError, match="gradient_accumulation_steps=2"):
        tfreg.Trainer(mlp(0), "mse", keras.optimizers.SGD(gradient_accumulation_steps=2))
    with pytest.raises(InvalidArgumentError, match="reduction='mean_with_sample_weight'"):
        loss = keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
        tfreg.Trainer(mlp(0), loss, "sgd")
    noisy = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(2, activity_regularizer=keras.regularizers.L2())]
    )
    with pytest.raises(InvalidArgumentError, match="activity_regularizer"):
        tfreg.Trainer(noisy, "mse", "sgd")
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    with pytest.raises(InvalidArgumentError, match="on_nonfinite='raise' with a LossScale"):
        tfreg.Trainer(mlp(0), "mse", scaled, on_nonfinite="raise")


def test_mixed_precision_accumulates_in_float32() -> None:
    # Per-layer policy (no global state): bfloat16 compute, float32 variables and accumulator.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="mixed_bfloat16")])
    t = tfreg.Trainer(model, "mse", keras.optimizers.SGD(0.01), accumulation_steps=2)
    rng = np.random.default_rng(0)
    history = t.fit(rng.normal(size=(8, 4)), rng.normal(size=(8, 3)), batch_size=2, verbose=0)
    assert model.layers[0].compute_dtype == "bfloat16"
    assert {s.dtype for s in t.accumulator.sums} == {tf.float32}
    assert len(history) == 2 and np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("drop_remainder", [False, True], ids=["flush", "drop"])
def test_accumulating_model_fit_equals_trainer(data, float64_floatx, drop_remainder) -> None:
    # float64_floatx (conftest): model.fit's data adapter casts float inputs to floatx, and
    # both floatx and the dtype policy are restored after (setting floatx alone left the
    # policy at float64 for later tests: test_penalties' zero then had the wrong dtype).
    x, y, sw, w = data
    model = linear_model(w, 0.3)
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=3, drop_remainder=drop_remainder)
    wrapped.compile(keras.optimizers.SGD(LR), "mean_squared_error")
    wrapped.fit(x, y, batch_size=4, epochs=2, shuffle=False, sample_weight=sw, verbose=0)
    # The leftover micro-batches (4 + 3 examples) form window 2: flushed, or discarded.
    windows = WINDOWS[:1] if drop_remainder else WINDOWS
    expected_w, _ = numpy_sgd(x, y, sw, w, 0.3, epochs=2, windows=windows)
    assert_close("kernel", model.get_weights()[0][:, 0], expected_w, rtol=EXACT.rtol)
    assert int(wrapped.optimizer.iterations.numpy()) == 2 * len(windows)


def test_accumulating_model_rejects_builtin_accumulation() -> None:
    wrapped = tfreg.AccumulatingModel(mlp(0), accumulation_steps=2)
    with pytest.raises(InvalidArgumentError, match="gradient_accumulation_steps=4"):
        wrapped.compile(keras.optimizers.SGD(gradient_accumulation_steps=4), "mse")


def test_jit_compile_gives_the_same_updates(data) -> None:
    x, y, sw, w = data
    model = linear_model(w, 0.3)
    t = trainer(model, jit_compile=True, on_nonfinite="raise")
    t.fit(x, y, batch_size=4, epochs=2, shuffle=False, sample_weight=sw, verbose=0)
    expected_w, _ = numpy_sgd(x, y, sw, w, 0.3, epochs=2)
    assert_close("kernel", model.get_weights()[0][:, 0], expected_w, rtol=EXACT.rtol)
    bad = np.full_like(y, np.nan)
    with pytest.raises(FloatingPointError):  # no graph assert: works under XLA too
        t.fit(x, bad, batch_size=4, epochs=3, shuffle=False, verbose=0)


def test_accumulating_model_validates_after_the_flush(data) -> None:
    x, y, _, w = data
    model = linear_model(w, 0.3)
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=3)
    wrapped.compile(keras.optimizers.SGD(LR), "mean_squared_error")
    history = wrapped.fit(x, y, batch_size=4, epochs=1, validation_data=(x, y), verbose=0)
    # the epoch's short window is applied before validation runs, not after
    assert int(wrapped.optimizer.iterations.numpy()) == 2
    final = float(np.mean((x @ model.get_weights()[0] + model.get_weights()[1] - y) ** 2))
    assert history.history["val_loss"][0] == pytest.approx(final, rel=1e-6)


class _AddsLoss(keras.layers.Layer):
    def build(self, input_shape) -> None:
        self.w = self.add_weight(shape=(1,), initializer="ones", dtype="float64")

    def call(self, x):
        self.add_loss(100.0 * tf.reduce_sum(self.w**2))  # Keras fit would optimise this too
        return x * self.w


def _adds_loss_model() -> keras.Model:
    return keras.Sequential([keras.Input((1,), dtype="float64"), _AddsLoss(name="adds_loss")])


def test_add_loss_is_rejected_not_silently_dropped() -> None:
    x, y = np.ones((4, 1)), np.ones((4, 1))
    model = _adds_loss_model()
    t = trainer(model)
    with pytest.raises(InvalidArgumentError, match=r"add_loss.*layer 'adds_loss' added 1 loss"):
        t.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_array_equal(model.get_weights()[0], [1.0])  # nothing applied
    wrapped = tfreg.AccumulatingModel(_adds_loss_model(), accumulation_steps=2)
    wrapped.compile(keras.optimizers.SGD(0.1), "mean_squared_error")
    with pytest.raises(InvalidArgumentError, match="layer 'adds_loss' added 1 loss"):
        wrapped.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_array_equal(wrapped.model.get_weights()[0], [1.0])
