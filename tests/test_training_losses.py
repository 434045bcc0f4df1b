"""Inside one micro-batch and one update: the masked denominator, empty windows, logged losses,
learning-rate schedules, clipping and mixed precision, for ``Trainer`` and ``AccumulatingModel``.

References are plain Keras: ``model.fit`` on the concatenated window, or Keras' own loss on one
batch. Tolerances are stated per test with their reason.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from _keras_config import keras_setting

import tfreg
from tfreg._losses import loss_terms, micro_batch_gradients
from tfreg_harness import assert_close, tolerance

EXACT = tolerance("accumulation", "float64")
LR = 0.5
T, VOCAB, CLASSES = 4, 6, 3


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261201)


@pytest.fixture
def policy(request):
    with keras_setting(keras.config.dtype_policy, keras.config.set_dtype_policy, request.param):
        yield request.param


def _masked_model(rng: np.random.Generator) -> keras.Model:
    # Embedding's mask passes through Dense: a per-timestep loss with a mask, cheap to trace.
    model = keras.Sequential(
        [
            keras.Input((T,), dtype="int64"),
            keras.layers.Embedding(VOCAB, 3, mask_zero=True),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.set_weights([rng.normal(scale=0.5, size=w.shape) for w in model.get_weights()])
    return model


def _sparse_ce(**kwargs) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **kwargs)


def test_keras_divides_a_masked_loss_by_the_exact_valid_count(rng, float64_floatx) -> None:
    """Keras 3.15 weights valid elements by ``divide_no_nan(total, valid)``: the exact count,
    which is what tfreg uses. Older Keras 3 divided by ``valid + 1e-7``; pinned here is how far
    that would be (``1e-7 / valid`` relative, 1.3e-8 for 8 valid elements), so a Keras upgrade
    that brings the epsilon back fails this test instead of silently shifting the reference."""
    model = _masked_model(rng)
    x = np.array([[1, 2, 0, 0], [3, 4, 5, 1]])  # 6 valid of 8
    y = rng.integers(0, CLASSES, size=(2, T))
    y_pred = model(x)
    values = _sparse_ce().call(y, y_pred).numpy()
    mask = x != 0
    exact = values[mask].sum() / mask.sum()
    keras_value = float(_sparse_ce()(y, y_pred))
    assert keras_value == pytest.approx(exact, rel=1e-15, abs=0)
    with_epsilon = values[mask].sum() / (mask.sum() + 1e-7)
    assert abs(keras_value - with_epsilon) / exact == pytest.approx(1e-7 / 6, rel=1e-3)


def test_accumulating_model_fully_masked_window_is_a_zero_data_gradient_and_reported(
    rng, float64_floatx
) -> None:
    # Trainer's side of this case runs on both twins: test_trainer_loss_cases.py.
    model = _masked_model(rng)
    x = rng.integers(1, VOCAB, size=(8, T))
    x[4:] = 0  # the second window (examples 4..7) is all padding
    y = rng.integers(0, CLASSES, size=(8, T))
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.compile(keras.optimizers.SGD(LR), _sparse_ce())
    reference.fit(x[:4], y[:4], batch_size=4, shuffle=False, verbose=0)  # window 1 only
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=2)
    wrapped.compile(keras.optimizers.SGD(LR), _sparse_ce())
    logs = wrapped.fit(x, y, batch_size=2, shuffle=False, verbose=0).history
    assert wrapped.empty_windows == 1 and wrapped.skipped_updates == 0
    assert np.isfinite(logs["loss"]).all()
    # Window 2 applied a zero gradient (SGD: no change), not NaN: equal to window 1 alone.
    for ours, ref in zip(model.get_weights(), reference.get_weights(), strict=True):
        assert_close("weights", ours, ref, rtol=EXACT.rtol)


def _dense_data(rng, n=12, d=4):
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 2))
    return x, y


def _l2_model(rng) -> keras.Model:
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.1))]
    )
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    return model


def test_accumulating_model_logs_loss_with_penalty_like_keras(rng, float64_floatx) -> None:
    """Before: ``loss`` was the data loss only. Plain Keras logs data loss + penalty per batch,
    averaged over the epoch by batch size; a window is one such batch."""
    x, y = _dense_data(rng, n=14)  # windows of 6, 6, 2
    model = _l2_model(rng)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.compile(keras.optimizers.SGD(0.125), "mse")
    fit = {"epochs": 2, "shuffle": False, "verbose": 0, "validation_data": (x, y)}
    expected = reference.fit(x, y, batch_size=6, **fit).history
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=3)
    wrapped.compile(keras.optimizers.SGD(0.125), "mse")
    logs = wrapped.fit(x, y, batch_size=2, **fit).history
    for key in ("loss", "val_loss"):
        assert_close(key, np.array(logs[key]), np.array(expected[key]), rtol=1e-12)
    assert "val_data_loss" not in logs  # a training-window log; evaluation has no windows
    assert all(d < total for d, total in zip(logs["data_loss"], logs["loss"], strict=True))
    for ours, ref in zip(model.get_weights(), reference.get_weights(), strict=True):
        assert_close("weights", ours, ref, rtol=EXACT.rtol)


def test_skipped_window_does_not_make_the_logged_loss_nan(rng, float64_floatx) -> None:
    x, y = _dense_data(rng)
    bad = y.copy()
    bad[1, 0] = np.nan  # poisons window 0 (examples 0..3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    before = model.get_weights()
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=2)
    wrapped.compile(keras.optimizers.SGD(0.125), "mse")
    logs = wrapped.fit(x, bad, batch_size=2, shuffle=False, verbose=0).history
    assert wrapped.skipped_updates == 1
    # The epoch's loss is the mean over the two applied windows (4 examples each).
    reference = keras.models.clone_model(model)
    reference.set_weights(before)
    reference.compile(keras.optimizers.SGD(0.125), "mse")
    expected = reference.fit(x[4:], y[4:], batch_size=4, shuffle=False, verbose=0).history
    assert logs["loss"][0] == pytest.approx(expected["loss"][0], rel=1e-12)


@pytest.mark.parametrize("front_end", ["trainer", "model"])
def test_learning_rate_schedule_and_iterations_count_updates(
    rng, float64_floatx, front_end
) -> None:
    x, y = _dense_data(rng)  # 3 windows of 2 x 2
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])

    def optimizer():
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.5, 0.125])
        return keras.optimizers.SGD(schedule)

    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.compile(optimizer(), "mse")
    reference.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    if front_end == "trainer":
        t = tfreg.Trainer(model, "mse", optimizer(), accumulation_steps=2)
        t.fit(x, y, batch_size=2, shuffle=False, verbose=0)
        iterations = t.optimizer.iterations
    else:
        wrapped = tfreg.AccumulatingModel(model, accumulation_steps=2)
        wrapped.compile(optimizer(), "mse")
        wrapped.fit(x, y, batch_size=2, shuffle=False, verbose=0)
        iterations = wrapped.optimizer.iterations
    assert int(iterations.numpy()) == 3 == int(reference.optimizer.iterations.numpy())
    for ours, ref in zip(model.get_weights(), reference.get_weights(), strict=True):
        assert_close("weights", ours, ref, rtol=EXACT.rtol)


def test_per_timestep_weights_in_the_micro_batch_function(rng, float64_floatx) -> None:
    """The function both front ends use, on (N, T) weights with a mask: the gradient of the
    weighted sum and the valid count are Keras' batch loss times its count."""
    model = _masked_model(rng)
    x = rng.integers(0, VOCAB, size=(5, T))
    y = rng.integers(0, CLASSES, size=(5, T))
    sw = rng.uniform(0.5, 2.0, size=(5, T))
    terms = loss_terms(_sparse_ce(), None, ["output"])
    variables = model.trainable_variables
    batch = micro_batch_gradients(model, terms, ["output"], variables, x, y, tf.constant(sw))
    valid = float(np.sum(x != 0))
    assert float(batch.counts[0]) == valid
    with tf.GradientTape() as tape:
        keras_loss = _sparse_ce()(y, model(x, training=True), sample_weight=sw) * valid
    expected = tape.gradient(keras_loss, variables)
    assert float(batch.sums[0]) == pytest.approx(float(keras_loss), rel=1e-14)
    for ours, ref in zip(batch.grads[0], expected, strict=True):
        ours = tf.convert_to_tensor(ours)
        assert_close("grad", ours.numpy(), tf.convert_to_tensor(ref).numpy(), rtol=EXACT.rtol)


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
@pytest.mark.parametrize("value", [0.05, 0.0625, 3.3])
def test_clipping_matches_keras_optimizer(rng, float64_floatx, clip, value) -> None:
    """Trainer clips with Keras' ops (``tf.clip_by_norm``; Keras' global formula). Before, the
    bound went through ``tf.cast(c, float64)`` -- rounded through float32 -- and wherever a
    norm was below it (3.3 here: no clipping, ``g * c / c_rounded``) Trainer differed from
    Keras' ``SGD(clipnorm=c)`` by 1.5e-8 rel in float64 (none at 0.0625, a power of two;
    global_clipnorm was already right and is checked alongside). Now the same up to the
    window sum's reassociation (gradient of the sum / N vs of the mean): measured <= 1.6e-14,
    the accumulation tolerance 1e-12."""
    x, y = rng.normal(size=(19, 3)), rng.normal(size=(19, 1))
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    before = model.get_weights()
    reference = keras.models.clone_model(model)
    reference.set_weights(before)
    reference.compile(keras.optimizers.SGD(0.125, **{clip: value}), "mse")
    reference.fit(x, y, batch_size=19, shuffle=False, verbose=0)
    t = tfreg.Trainer(model, "mse", keras.optimizers.SGD(0.125), **{clip: value})
    t.fit(x, y, batch_size=19, shuffle=False, verbose=0)
    for ours, ref, w0 in zip(model.get_weights(), reference.get_weights(), before, strict=True):
        assert_close("delta", ours - w0, ref - w0, rtol=EXACT.rtol)


def _mixed_setup(rng):
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
    )
    model.set_weights([rng.normal(scale=0.5, size=w.shape) for w in model.get_weights()])
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, CLASSES, size=16)
    return model, x, y


def _fit_mixed(front_end, model, optimizer, x, y):
    if front_end == "trainer":
        t = tfreg.Trainer(model, _sparse_ce(), optimizer, accumulation_steps=2)
        history = t.fit(x, y, batch_size=4, shuffle=False, verbose=0)
        return t.optimizer, [r["skipped"] for r in history.records]
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=2)
    wrapped.compile(optimizer, _sparse_ce())
    wrapped.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    return wrapped.optimizer, wrapped.skipped_updates


# float16 compute (10-bit mantissa, eps 9.8e-4) and bfloat16 (7-bit, eps 7.8e-3): the forward
# and backward of a micro-batch round differently from the concatenated batch's. Measured
# 4.5e-4 (float16) and 4.2e-3 (bfloat16) rel on the weight change.
MIXED_RTOL = {"mixed_float16": 5e-3, "mixed_bfloat16": 2e-2}


@pytest.mark.parametrize("front_end", ["trainer", "model"])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision_equals_keras_on_the_concatenated_window(rng, policy, front_end) -> None:
    """mixed_float16 was rejected by both front ends before."""
    model, x, y = _mixed_setup(rng)
    before = model.get_weights()
    reference = keras.models.clone_model(model)
    reference.set_weights(before)
    reference.compile(keras.optimizers.SGD(LR), _sparse_ce())
    reference.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    optimizer, _ = _fit_mixed(front_end, model, keras.optimizers.SGD(LR), x, y)
    assert int(optimizer.iterations.numpy()) == 2
    if policy == "mixed_float16":  # wrapped in a LossScaleOptimizer, as Keras' compile does
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        assert float(optimizer.dynamic_scale.numpy()) == float(
            reference.optimizer.dynamic_scale.numpy()
        )
    for ours, ref, w0 in zip(model.get_weights(), reference.get_weights(), before, strict=True):
        assert_close(policy, ours - w0, ref - w0, rtol=MIXED_RTOL[policy])


@pytest.mark.parametrize("front_end", ["trainer", "model"])
@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_float16_overflow_skips_the_window_and_halves_the_scale(rng, policy, front_end) -> None:
    """A scale of 2**40 overflows float16 in the backward pass: each window is skipped and the
    scale halves once per window, as LossScaleOptimizer does per step without accumulation."""
    model, x, y = _mixed_setup(rng)
    before = model.get_weights()

    def optimizer():
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR), initial_scale=2.0**40)

    reference = keras.models.clone_model(model)
    reference.set_weights(before)
    reference.compile(optimizer(), _sparse_ce())
    reference.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    ours, skipped = _fit_mixed(front_end, model, optimizer(), x, y)
    assert skipped == [True, True] or skipped == 2
    assert float(ours.dynamic_scale.numpy()) == 2.0**38
    assert float(reference.optimizer.dynamic_scale.numpy()) == 2.0**38
    assert int(ours.iterations.numpy()) == 0 == int(reference.optimizer.iterations.numpy())
    for w, w0 in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, w0)


def test_readme_masked_sequence_example_runs() -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "guides" / "accumulation.md"
    blocks = [b.split("```", 1)[0] for b in page.read_text().split("```python")[1:]]
    (code,) = [b for b in blocks if "mask_zero=True" in b and "accumulation_steps=3" in b]
    namespace: dict = {}
    exec(compile(code, str(page), "exec"), namespace)
    logs = namespace["logs"]
    assert len(logs["loss"]) == 2 and np.isfinite(logs["loss"]).all()
    assert int(namespace["wrapped"].optimizer.iterations.numpy()) == 2 * 3  # 7 micro-batches: 3+3+1


def test_trainer_metric_honours_the_mask_like_keras(rng, float64_floatx) -> None:
    """Per-timestep accuracy of a masked model: padded steps weigh 0, as in Keras' metric
    (before: labels were flattened against (N, T) predictions)."""
    model = _masked_model(rng)
    x = rng.integers(0, VOCAB, size=(8, T))
    y = rng.integers(0, CLASSES, size=(8, T))
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.compile(
        keras.optimizers.SGD(LR), _sparse_ce(), metrics=["sparse_categorical_accuracy"]
    )
    expected = reference.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    t = tfreg.Trainer(
        model,
        _sparse_ce(),
        keras.optimizers.SGD(LR),
        accumulation_steps=2,
        metrics=["sparse_categorical_accuracy"],
    )
    (record,) = t.fit(x, y, batch_size=4, shuffle=False, verbose=0).records
    assert record["sparse_categorical_accuracy"] == pytest.approx(
        expected["sparse_categorical_accuracy"][0], rel=1e-12
    )
    assert record["loss"] == pytest.approx(expected["loss"][0], rel=1e-12)


def test_target_checks_follow_what_each_keras_loss_expects() -> None:
    """Class-index losses take integer labels of one rank less; CTC and circle losses take
    targets of another shape by design, so no broadcast check applies to them."""

    def only_term(loss):
        (term,) = loss_terms(loss, None, ["output"])
        return term

    assert only_term(_sparse_ce()).class_index
    assert only_term(keras.losses.CategoricalGeneralizedCrossEntropy()).class_index
    assert not only_term(keras.losses.CTC()).builtin
    assert not only_term(keras.losses.Circle()).builtin
    assert only_term("mse").builtin and not only_term("mse").class_index
    assert not only_term(lambda t, p: (t - p) ** 2).builtin  # user functions: their own rules
