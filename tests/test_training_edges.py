"""What Keras users really hand the trainers (issue 17, TF side): custom steps, "sum"/"none"
loss reductions, EMA, non-finite epochs, saving, callbacks reading ``model.optimizer``, dict
losses in evaluation, recompiling after unfreezing, ragged data, and the pinned differences.

References are plain Keras: ``fit`` on the concatenated window (float64, floatx float64 so the
data adapter keeps the inputs) or a hand ``GradientTape`` step. ``EXACT`` is the accumulation
tolerance (float64, <= 1e-12 rel: the window's sum is reassociated, nothing else differs).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from _keras_config import keras_setting

import tfreg
from tfreg_core import InvalidArgumentError
from tfreg_harness import tolerance
from tfreg_harness.differences import note

EXACT = tolerance("accumulation", "float64")
LR = 0.0625  # exact in float32 (Keras keeps the rate as a float32 variable)
CLASSES = 3


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261207)


def _classifier(seed: int = 0, hidden: int = 5) -> keras.Model:
    inputs = keras.Input((4,), dtype="float64")
    h = keras.layers.Dense(hidden, activation="tanh", dtype="float64", name="hidden")(inputs)
    out = keras.layers.Dense(CLASSES, dtype="float64", name="out")(h)
    model = keras.Model(inputs, out)
    weights = np.random.default_rng(seed)
    model.set_weights([weights.normal(size=w.shape) * 0.5 for w in model.get_weights()])
    return model


def _class_data(rng: np.random.Generator, n: int = 10) -> tuple[np.ndarray, ...]:
    x = rng.normal(size=(n, 4))
    y = rng.integers(0, CLASSES, size=(n,))
    y[[1, 6]] = -1  # ignore_class: these examples do not count
    # float32-exact weights: Keras' data adapter would round float64 weights otherwise
    sw = rng.uniform(0.5, 2.0, size=n).astype(np.float32).astype(np.float64)
    return x, y, sw


def _rel(ours: list[np.ndarray], ref: list[np.ndarray], start: list[np.ndarray]) -> float:
    """max |dw - dw_ref| / max |dw_ref| over all weights (the issue's measure)."""
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref, strict=True))
    scale = max(float(np.abs(b - s).max()) for b, s in zip(ref, start, strict=True))
    return diff / scale


def _clone(model: keras.Model) -> keras.Model:
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


# --- custom train_step / compute_loss / compute_metrics ------------------------------------


class _CustomStep(keras.Model):
    def train_step(self, data: Any) -> Any:  # pragma: no cover - never called
        return super().train_step(data)


class _CustomLoss(keras.Model):
    def compute_loss(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        return 2.0 * super().compute_loss(*args, **kwargs)


class _CustomMetrics(keras.Model):
    def compute_metrics(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        return super().compute_metrics(*args, **kwargs)


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (_CustomStep, "train_step"),
        (_CustomLoss, "compute_loss"),
        (_CustomMetrics, "compute_metrics"),
    ],
)
@pytest.mark.parametrize("front_end", ["trainer", "model"])
def test_overridden_keras_steps_are_refused_by_name(cls, method, front_end) -> None:
    inputs = keras.Input((4,))
    model = cls(inputs, keras.layers.Dense(2)(inputs))
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(InvalidArgumentError, match=rf"{cls.__name__}\.{method}"):
        if front_end == "trainer":
            tfreg.Trainer(model, "mse", "sgd", accumulation_steps=2)
        else:
            tfreg.AccumulatingModel(model, accumulation_steps=2)
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_accumulating_model_subclass_overriding_compute_loss_is_refused() -> None:
    class Mine(tfreg.AccumulatingModel):
        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
            return super().compute_loss(*args, **kwargs)

    with pytest.raises(InvalidArgumentError, match="compute_loss"):
        Mine(_classifier(), accumulation_steps=2)


# --- reduction "sum" / "none" / None ------------------------------------------------------


def _sum_loss(reduction: str | None) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1, reduction=reduction, dtype="float64"
    )


@pytest.mark.parametrize("reduction", ["sum", "none", None])
@pytest.mark.parametrize("front_end", ["trainer", "model"])
def test_sum_and_none_reductions_train_the_window_sum_like_keras_fit(
    rng, float64_floatx, reduction, front_end
) -> None:
    # Keras fit trains the weighted *sum* for these reductions ("none": the gradient of the
    # tensor of weighted values). 10 examples as micro-batches 4, 4, 2 = one window.
    x, y, sw = _class_data(rng)
    model = _classifier()
    start = model.get_weights()
    reference = _clone(model)
    reference.compile(keras.optimizers.SGD(LR), _sum_loss(reduction))
    logs = reference.fit(x, y, sample_weight=sw, batch_size=10, shuffle=False, verbose=0)
    if front_end == "trainer":
        loss = _sum_loss(reduction)
        t = tfreg.Trainer(model, loss, keras.optimizers.SGD(LR), accumulation_steps=3)
        ours = t.fit(x, y, sample_weight=sw, batch_size=4, shuffle=False, verbose=0).epochs[-1]
    else:
        wrapped = tfreg.AccumulatingModel(model, accumulation_steps=3)
        wrapped.compile(keras.optimizers.SGD(LR), _sum_loss(reduction))
        ours = wrapped.fit(x, y, sample_weight=sw, batch_size=4, shuffle=False, verbose=0)
        ours = {k: v[-1] for k, v in ours.history.items()}
    assert _rel(model.get_weights(), reference.get_weights(), start) <= EXACT.rtol
    # Keras logs the batch sum for "sum", the mean of the weighted values for "none" (no mask
    # here beyond ignore_class, whose zeros Keras' mean counts: compare "sum" only).
    if reduction == "sum":
        assert ours["loss"] == pytest.approx(logs.history["loss"][-1], rel=1e-12)


def test_sum_reduction_val_loss_averages_batch_sums_like_keras(rng, float64_floatx) -> None:
    x, y, _ = _class_data(rng)
    model = _classifier()
    reference = _clone(model)
    reference.compile(keras.optimizers.SGD(LR), _sum_loss("sum"))
    t = tfreg.Trainer(model, _sum_loss("sum"), keras.optimizers.SGD(LR), accumulation_steps=3)
    history = t.fit(x, y, batch_size=4, shuffle=False, verbose=0, validation_data=(x, y))
    reference.fit(x, y, batch_size=10, shuffle=False, verbose=0)
    expected = reference.evaluate(x, y, batch_size=4, verbose=0)  # batches 4, 4, 2
    assert history.epochs[-1]["val_loss"] == pytest.approx(expected, rel=1e-12)


def test_mean_with_sample_weight_reduction_is_refused() -> None:
    loss = keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
    with pytest.raises(InvalidArgumentError, match="mean_with_sample_weight"):
        tfreg.Trainer(_classifier(), loss, "sgd")


# --- Trainer: EMA finalised, Keras callbacks that read model.optimizer ----------------------


def _regression(rng: np.random.Generator, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, 4)), rng.normal(size=(n, 2))


def _dense(seed: int = 0) -> keras.Model:
    model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(2)])
    model.set_weights([np.random.default_rng(seed).normal(size=w.shape) for w in model.weights])
    return model


def test_trainer_swaps_in_the_ema_weights_at_the_end_like_fit(rng, float64_floatx) -> None:
    x, y = _regression(rng)

    def optimizer() -> keras.optimizers.Optimizer:
        return keras.optimizers.SGD(LR, use_ema=True, ema_momentum=0.5)

    model = _dense()
    start = model.get_weights()
    reference = _clone(model)
    reference.compile(optimizer(), "mse")
    reference.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    t = tfreg.Trainer(model, "mse", optimizer(), accumulation_steps=2)
    t.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
    assert _rel(model.get_weights(), reference.get_weights(), start) <= EXACT.rtol


class _Iterations(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.iterations: list[int] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.iterations.append(int(self.model.optimizer.iterations.numpy()))


def test_trainer_runs_callbacks_that_read_model_optimizer(rng, float64_floatx) -> None:
    # LearningRateScheduler (at each epoch's start) and ReduceLROnPlateau (at each epoch's end;
    # min_delta so large that every epoch after the first "plateaus"): the rates they set
    # take effect at the next update, as in Keras fit on the concatenated windows.
    x, y = _regression(rng)

    def callbacks() -> list[keras.callbacks.Callback]:
        return [
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.25 if epoch == 0 else lr),
            keras.callbacks.ReduceLROnPlateau(
                monitor="loss", factor=0.5, patience=0, min_delta=1e9
            ),
        ]

    model = _dense()
    start = model.get_weights()
    reference = _clone(model)
    reference.compile(keras.optimizers.SGD(LR), "mse")
    expected = reference.fit(
        x, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=callbacks()
    )
    t = tfreg.Trainer(model, "mse", keras.optimizers.SGD(LR), accumulation_steps=2)
    seen = _Iterations()  # reads model.optimizer.iterations as TensorBoard's step
    history = t.fit(
        x, y, batch_size=2, epochs=3, shuffle=False, verbose=0, callbacks=[*callbacks(), seen]
    )
    assert expected.history["learning_rate"] == [0.25, 0.25, 0.125]  # the epochs' rates
    assert float(t.optimizer.learning_rate.numpy()) == 0.0625  # the reference's too:
    assert float(reference.optimizer.learning_rate.numpy()) == 0.0625  # halved after epoch 3
    assert _rel(model.get_weights(), reference.get_weights(), start) <= EXACT.rtol
    assert len(history.epochs) == 3 and seen.iterations == [3, 6, 9]  # updates, as in fit
    assert not hasattr(model, "optimizer") or model.optimizer is None  # the user's model untouched


def test_trainer_runs_tensorboard(rng, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    x, y = _regression(rng)
    t = tfreg.Trainer(_dense(), "mse", keras.optimizers.SGD(LR), accumulation_steps=2)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
    t.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[board])
    assert any((tmp_path / "train").iterdir())


# --- an epoch of skipped windows -------------------------------------------------------------


@pytest.mark.parametrize("front_end", ["trainer", "model"])
def test_an_all_skipped_epoch_logs_nan_like_keras_and_warns(rng, float64_floatx, front_end) -> None:
    x, y = _regression(rng, n=8)
    y[[0, 5]] = np.nan  # poisons both windows of 4
    model = _dense()
    before = model.get_weights()
    reference = _clone(model)
    reference.compile(keras.optimizers.SGD(LR), "mse")
    assert np.isnan(reference.fit(x, y, batch_size=4, verbose=0).history["loss"][0])
    with pytest.warns(RuntimeWarning, match="every update was skipped"):
        if front_end == "trainer":
            t = tfreg.Trainer(model, "mse", keras.optimizers.SGD(LR), accumulation_steps=2)
            loss = t.fit(x, y, batch_size=2, shuffle=False, verbose=0).epochs[-1]["loss"]
        else:
            wrapped = tfreg.AccumulatingModel(model, accumulation_steps=2)
            wrapped.compile(keras.optimizers.SGD(LR), "mse")
            logs = wrapped.fit(x, y, batch_size=2, shuffle=False, verbose=0).history
            loss = logs["loss"][-1]
            assert np.isnan(logs["data_loss"][-1]) and wrapped.skipped_updates == 2
    assert np.isnan(loss)
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


# --- AccumulatingModel is built: saving, loading, export, saving callbacks -------------------


def _wrapped(seed: int = 0) -> tfreg.AccumulatingModel:
    wrapped = tfreg.AccumulatingModel(_dense(seed), accumulation_steps=2)
    wrapped.compile(keras.optimizers.Adam(LR), "mse")
    return wrapped


def test_accumulating_model_saves_loads_and_exports_after_fit(rng, float64_floatx, tmp_path):
    x, y = _regression(rng)
    wrapped = _wrapped()
    path = str(tmp_path / "ck.weights.h5")
    saver = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
    wrapped.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0, callbacks=[saver])
    assert wrapped.built
    wrapped.save_weights(tmp_path / "w.weights.h5")
    for source in (path, tmp_path / "w.weights.h5"):
        fresh = tfreg.AccumulatingModel(_dense(seed=1), accumulation_steps=2)
        fresh.load_weights(source)
        for a, b in zip(fresh.model.get_weights(), wrapped.model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    wrapped.export(tmp_path / "exported")
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_array_equal(loaded.serve(x).numpy(), wrapped.model(x).numpy())


class _StopAt(keras.callbacks.Callback):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt  # a preempted job


def test_accumulating_model_backup_and_restore_is_bitwise(rng, float64_floatx, tmp_path):
    # 12 examples, micro-batches of 5 -> 5, 5 | 2 per epoch: a full and a short window.
    x, y = _regression(rng)
    uninterrupted = _wrapped()
    uninterrupted.fit(x, y, batch_size=5, epochs=3, shuffle=False, verbose=0)
    backup = str(tmp_path / "backup")
    interrupted = _wrapped()
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(
            x, y, batch_size=5, epochs=3, shuffle=False, verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), _StopAt(2)],
        )  # fmt: skip
    resumed = _wrapped(seed=1)  # other initial weights: the backup must replace them
    resumed.fit(
        x, y, batch_size=5, epochs=3, shuffle=False, verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup)],
    )  # fmt: skip
    assert int(resumed.optimizer.iterations.numpy()) == 6
    for a, b in zip(resumed.model.get_weights(), uninterrupted.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(resumed.optimizer.variables, uninterrupted.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- two outputs, dict loss: evaluate and validation ----------------------------------------


@pytest.mark.parametrize("targets", ["dict", "list"])
def test_dict_loss_evaluate_and_validation_equal_keras(rng, float64_floatx, targets) -> None:
    x = rng.normal(size=(12, 4))
    ya, yb = rng.normal(size=(12, 2)), rng.normal(size=(12, 1))
    y = {"a": ya, "b": yb} if targets == "dict" else [ya, yb]
    inputs = keras.Input((4,))
    model = keras.Model(
        inputs, [keras.layers.Dense(2, name="a")(inputs), keras.layers.Dense(1, name="b")(inputs)]
    )
    start = model.get_weights()
    loss, weights = {"a": "mse", "b": "mae"}, {"a": 1.0, "b": 0.5}
    reference = _clone(model)
    reference.compile(keras.optimizers.SGD(LR), loss=loss, loss_weights=weights)
    expected = reference.fit(
        x, y, batch_size=4, shuffle=False, verbose=0, validation_data=(x, y)
    ).history
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=2)
    wrapped.compile(keras.optimizers.SGD(LR), loss=loss, loss_weights=weights)
    logs = wrapped.fit(x, y, batch_size=2, shuffle=False, verbose=0, validation_data=(x, y))
    assert _rel(model.get_weights(), reference.get_weights(), start) <= EXACT.rtol
    evaluated = wrapped.evaluate(x, y, verbose=0, return_dict=True)
    assert evaluated == pytest.approx(
        reference.evaluate(x, y, verbose=0, return_dict=True), rel=1e-12
    )
    for key in ("val_loss", "val_a_loss", "val_b_loss"):
        assert logs.history[key][-1] == pytest.approx(expected[key][-1], rel=1e-12)


# --- unfreeze + recompile (fine-tuning) ------------------------------------------------------


def _fine_tuning_model() -> keras.Model:
    model = _classifier(hidden=3)
    model.get_layer("hidden").trainable = False
    return model


def _fine_tune(model: keras.Model, fit: Any, compile_: Any) -> None:
    compile_(keras.optimizers.Adam(LR))
    fit()
    model.get_layer("hidden").trainable = True  # unfreeze, then recompile (Keras' recipe)
    compile_(keras.optimizers.SGD(LR / 2))
    fit()


def test_unfreeze_and_recompile_follows_keras_fine_tuning(rng, float64_floatx) -> None:
    x, y, sw = _class_data(rng, n=8)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    model = _fine_tuning_model()
    start = model.get_weights()
    reference = _clone(model)
    reference.get_layer("hidden").trainable = False
    _fine_tune(
        reference,
        lambda: reference.fit(x, y, sample_weight=sw, batch_size=8, shuffle=False, verbose=0),
        lambda opt: reference.compile(opt, loss),
    )
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=2)
    _fine_tune(
        model,
        lambda: wrapped.fit(x, y, sample_weight=sw, batch_size=4, shuffle=False, verbose=0),
        lambda opt: wrapped.compile(opt, loss),
    )
    assert _rel(model.get_weights(), reference.get_weights(), start) <= EXACT.rtol
    # the hidden layer moved in the second phase only, as in Keras
    assert not np.array_equal(model.get_weights()[0], start[0])


def test_recompile_refuses_a_half_filled_window_and_a_stale_optimizer(rng, float64_floatx):
    x, y, _ = _class_data(rng, n=8)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    model = _fine_tuning_model()
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=2)
    optimizer = keras.optimizers.SGD(LR)
    wrapped.compile(optimizer, loss)
    wrapped.fit(x, y, batch_size=4, verbose=0)
    model.get_layer("hidden").trainable = True
    with pytest.raises(InvalidArgumentError, match="compile with a new optimizer"):
        wrapped.compile(optimizer, loss)
    wrapped.compile(keras.optimizers.SGD(LR), loss)
    wrapped.train_step((tf.constant(x[:4]), tf.constant(y[:4])))  # one micro-batch of two
    with pytest.raises(InvalidArgumentError, match="half-filled"):
        wrapped.compile(keras.optimizers.SGD(LR), loss)


# --- ragged tf.data into Trainer -------------------------------------------------------------


class RaggedBag(keras.Model):
    """Mean of the token embeddings of ragged rows, then a Dense."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = keras.layers.Embedding(10, 3, dtype="float64")
        self.dense = keras.layers.Dense(1, dtype="float64")

    def call(self, tokens: Any) -> Any:
        return self.dense(tf.reduce_mean(tf.ragged.map_flat_values(self.embed, tokens), axis=1))


def test_ragged_dataset_into_trainer_equals_keras_fit(rng, float64_floatx) -> None:
    # 9 rows of 1..5 tokens; micro-batches 2,2 | 2,2 | 1 against Keras batches 4, 4, 1.
    rows = [rng.integers(1, 10, size=n) for n in (3, 1, 4, 2, 5, 2, 1, 3, 2)]
    x = tf.ragged.constant(rows, dtype=tf.int64)
    y = rng.normal(size=(9, 1))
    data = tf.data.Dataset.from_tensor_slices((x, y))
    model = RaggedBag()
    model(x[:1])
    start = model.get_weights()
    reference = RaggedBag()
    reference(x[:1])
    reference.set_weights(start)
    reference.compile(keras.optimizers.SGD(LR), "mse")
    reference.fit(data.batch(4), epochs=2, shuffle=False, verbose=0)
    t = tfreg.Trainer(model, "mse", keras.optimizers.SGD(LR), accumulation_steps=2)
    t.fit(data.batch(2), epochs=2, verbose=0)
    assert _rel(model.get_weights(), reference.get_weights(), start) <= EXACT.rtol
    assert t.trace_counts() == {"apply": 1, "micro": 1}  # one trace for every row length


# --- pinned difference: Embedding + Adam-family, Keras' sparse update -------------------------


def _embedding_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int64"),
            keras.layers.Embedding(6, 2),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.set_weights([np.random.default_rng(0).normal(size=w.shape) for w in model.weights])
    return model


REPEATED = np.array([[1, 2, 1], [2, 3, 1], [4, 1, 5], [0, 2, 2]])  # token 1 four times, 2 four
DISTINCT = np.array([[0, 1, 2], [3, 4, 5]])  # every token once


@pytest.mark.parametrize(
    ("make", "keras_gap"),
    [
        (lambda: keras.optimizers.Adam(LR), 0.5459647),
        (lambda: keras.optimizers.RMSprop(LR), 0.5459625),
        (lambda: keras.optimizers.Adam(LR, clipnorm=0.5), 0.5459663),
    ],
    ids=["adam", "rmsprop", "adam-clipnorm"],
)
def test_embedding_adam_is_adam_on_the_summed_gradient_not_keras_sparse_path(
    float64_floatx, make, keras_gap
) -> None:
    """tfreg accumulates the embedding's IndexedSlices into a dense sum and steps on it (what
    torch's Adam does with a dense embedding gradient). Keras 3.15's Adam/RMSprop update_step
    receives the IndexedSlices and scatter-adds m and v slice by slice without deduplicating,
    so a token seen n times in the batch gets n separate moment contributions: 0.55 of the
    update off on REPEATED, all in the embedding table, even at k = 1. Without repeated tokens
    the two agree to round-off. The harness's differences table quotes the number."""
    assert "0.55 of the update" in note("embedding_sparse_adam")
    for x, gap in ((REPEATED, keras_gap), (DISTINCT, 0.0)):
        y = np.random.default_rng(1).normal(size=(len(x), 1))
        model = _embedding_model()
        start = model.get_weights()
        wrapped = tfreg.AccumulatingModel(model, accumulation_steps=1)
        wrapped.compile(make(), "mse")
        wrapped.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
        # Reference 1: a hand GradientTape step, the dense (summed) gradient into Keras' Adam.
        dense = _embedding_model()
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.mean_squared_error(y, dense(x)))
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, dense.trainable_variables)]
        make().apply(grads, dense.trainable_variables)
        assert _rel(model.get_weights(), dense.get_weights(), start) <= EXACT.rtol
        # Reference 2: Keras fit, which takes the sparse path.
        fitted = _embedding_model()
        fitted.compile(make(), "mse")
        fitted.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
        measured = _rel(model.get_weights(), fitted.get_weights(), start)
        assert measured == pytest.approx(gap, rel=1e-6, abs=EXACT.rtol)  # measured, pinned
        # the Dense layer agrees exactly: the whole difference is in the embedding table
        pairs = zip(model.get_weights()[1:], fitted.get_weights()[1:], start[1:], strict=True)
        for ours, keras_fit, first in pairs:
            assert np.abs(ours - keras_fit).max() <= EXACT.rtol * np.abs(ours - first).max()


# --- pinned difference: float16 loss scaling overflows at a k times smaller scale -------------


def test_float16_micro_batches_overflow_at_half_the_scale_keras_batch_does(rng) -> None:
    """Cause: each micro-batch is differentiated as Keras' scaled *batch mean*,
    ``scale * S / N_micro`` (the float16 range Keras' own step uses), so its backward pass
    carries values ``N_window / N_micro = k`` times larger than the big batch's
    ``scale * S / N_window``. Here (k = 2) a scale of 2**17 overflows float16 in a micro-batch
    but not in Keras' batch of 8: tfreg skips that window and halves the scale to 2**16 while
    Keras applies it and keeps 2**17. A scale twice as large (2**18) overflows in both. Under
    sustained overflow pressure the dynamic scale therefore settles log2(k) halvings lower (one
    more skipped window per halving); the applied updates are unaffected (unscaled in
    float32)."""
    assert "2**16 where Keras keeps 2**17" in note("float16_loss_scale")
    with keras_setting(keras.config.dtype_policy, keras.config.set_dtype_policy, "mixed_float16"):
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
        )
        weights = np.random.default_rng(20261201)
        model.set_weights([weights.normal(scale=0.5, size=w.shape) for w in model.weights])
        x = weights.normal(size=(8, 6)).astype("float32")
        y = weights.integers(0, CLASSES, size=8)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        for exponent, keras_skips in ((17, False), (18, True)):

            def optimizer(e: int = exponent) -> keras.optimizers.Optimizer:
                return keras.optimizers.LossScaleOptimizer(
                    keras.optimizers.SGD(0.5), initial_scale=2.0**e
                )

            reference = _clone(model)
            reference.compile(optimizer(), loss)
            reference.fit(x, y, batch_size=8, shuffle=False, verbose=0)
            t = tfreg.Trainer(_clone(model), loss, optimizer(), accumulation_steps=2)
            with pytest.warns(RuntimeWarning, match="every update was skipped"):
                history = t.fit(x, y, batch_size=4, shuffle=False, verbose=0)
            assert history.records[0]["skipped"]  # tfreg: the window overflowed
            assert float(t.optimizer.dynamic_scale.numpy()) == 2.0 ** (exponent - 1)
            keras_scale = 2.0 ** (exponent - 1) if keras_skips else 2.0**exponent
            assert (int(reference.optimizer.iterations.numpy()) == 0) == keras_skips
            assert float(reference.optimizer.dynamic_scale.numpy()) == keras_scale


# --- BatchNormalization under accumulation: said, not hidden ------------------------------------


@pytest.mark.parametrize("front_end", ["trainer", "model"])
def test_batchnorm_under_accumulation_warns_at_construction(front_end) -> None:
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1)]
    )
    with pytest.warns(UserWarning, match=r"BatchNormalization layers \['bn'\].*per micro-batch"):
        if front_end == "trainer":
            tfreg.Trainer(model, "mse", "sgd", accumulation_steps=2)
        else:
            tfreg.AccumulatingModel(model, accumulation_steps=2)


def test_accumulating_model_computes_each_logged_tracker_once_per_step(float64_floatx) -> None:
    """Keras lists the loss tracker twice (``_loss_tracker`` and a tracked attribute): each
    result is a few graph ops on every step, so ``metrics`` holds each tracker once."""
    wrapped = _wrapped()
    assert [m.name for m in wrapped.metrics] == ["loss", "data_loss"]
    wrapped._evaluating = True  # evaluation leaves data_loss out (see `metrics`)
    assert [m.name for m in wrapped.metrics] == ["loss"]
