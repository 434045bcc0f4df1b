"""How data reaches tfreg's trainers: tf.data / iterables of micro-batches, nested inputs,
validation on the epoch's final weights, Keras callbacks, saving and resuming.

References are the closed-form least-squares SGD of ``test_training`` (windows spelled out by
hand) or an uninterrupted run (bitwise), never the code under test.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfreg
from tfreg_core import InvalidArgumentError
from tfreg_harness import assert_close, tolerance

# float64 throughout: <= 1e-12 rel (the accumulation row of the tolerance table).
EXACT = tolerance("accumulation", "float64")
LR = 0.125  # exact in float32 (Keras' learning-rate variable)
N, D = 19, 3
# batch 4, accumulation_steps=3: micro-batches 4,4,4 | 4,3 -> windows of 12 and 7 examples
WINDOWS = [np.arange(0, 12), np.arange(12, 19)]


@pytest.fixture
def data() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    return rng.normal(size=(N, D)), rng.normal(size=(N, 1)), rng.uniform(0.5, 2.0, size=N)


def numpy_sgd(x, y, sw, w, b, *, epochs, windows=WINDOWS):
    w, b = w.copy(), float(b)
    for _ in range(epochs):
        for idx in windows:
            r = (x[idx] @ w + b - y[idx, 0]) * sw[idx]
            w, b = w - LR * 2 * x[idx].T @ r / len(idx), b - LR * 2 * r.sum() / len(idx)
    return w, b


W0 = np.array([0.5, -1.0, 0.25])


def linear_model() -> keras.Model:
    model = keras.Sequential(
        [keras.Input((D,), dtype="float64"), keras.layers.Dense(1, dtype="float64")]
    )
    model.set_weights([W0.reshape(D, 1), np.array([0.3])])
    return model


def trainer(model: keras.Model, **kwargs) -> tfreg.Trainer:
    return tfreg.Trainer(model, "mse", keras.optimizers.SGD(LR), accumulation_steps=3, **kwargs)


def unknown_cardinality(x, y, sw=None, batch=4) -> tf.data.Dataset:
    parts = (x, y) if sw is None else (x, y, sw)
    ds = tf.data.Dataset.from_tensor_slices(parts).batch(batch).filter(lambda *_: True)
    assert int(ds.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    return ds


def mse(model: keras.Model, x, y) -> float:
    kernel, bias = model.get_weights()
    return float(np.mean((x @ kernel + bias - y) ** 2))


def test_trainer_on_tf_data_of_unknown_cardinality_with_validation(data) -> None:
    x, y, sw = data
    model = linear_model()
    t = trainer(model)
    validation = unknown_cardinality(x, y, batch=5)  # a stream too: 5,5,5,4 examples
    history = t.fit(unknown_cardinality(x, y, sw), epochs=2, validation_data=validation, verbose=0)
    expected_w, expected_b = numpy_sgd(x, y, sw, W0, 0.3, epochs=2)
    assert_close("kernel", model.get_weights()[0][:, 0], expected_w, rtol=EXACT.rtol)
    assert_close("bias", model.get_weights()[1], [expected_b], rtol=EXACT.rtol)
    assert [r["examples"] for r in history.records] == [12, 7, 12, 7]
    # validated on the epoch's final weights (the short window applied first)
    assert history.epochs[-1]["val_loss"] == pytest.approx(mse(model, x, y), rel=1e-12)
    assert t.trace_counts() == {"apply": 1, "micro": 1}  # None batch dim: 4s and the 3 share


def test_accumulating_model_validates_unknown_cardinality_on_final_weights(data) -> None:
    # Before the fix Keras validated before the partial window was applied (weights differing
    # by 6.5e-2 from the epoch's end weights).
    x, y, _ = data
    model = linear_model()
    wrapped = tfreg.AccumulatingModel(model, accumulation_steps=3)
    wrapped.compile(keras.optimizers.SGD(LR), "mean_squared_error")
    seen = []

    class AtValidation(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            seen.append([v.copy() for v in model.get_weights()])

    history = wrapped.fit(
        unknown_cardinality(x, y), epochs=2, validation_data=(x, y), verbose=0,
        callbacks=[AtValidation()],
    )  # fmt: skip
    assert int(wrapped.optimizer.iterations.numpy()) == 4
    for a, b in zip(seen[-1], model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    expected_w, _ = numpy_sgd(x, y, np.ones(N), W0, 0.3, epochs=2)
    assert_close("kernel", model.get_weights()[0][:, 0], expected_w, rtol=EXACT.rtol)
    assert history.history["val_loss"][-1] == pytest.approx(mse(model, x, y), rel=1e-6)


def two_input_model(structure: str) -> keras.Model:
    a = keras.Input((2,), name="a", dtype="float64")
    b = keras.Input((1,), name="b", dtype="float64")
    joined = keras.layers.Concatenate(dtype="float64")([a, b])
    out = keras.layers.Dense(1, dtype="float64")(joined)
    model = keras.Model({"a": a, "b": b} if structure == "dict" else [a, b], out)
    model.set_weights([W0.reshape(D, 1), np.array([0.3])])
    return model


@pytest.mark.parametrize("feed", ["dict-arrays", "dict-dataset", "tuple-arrays"])
def test_multi_input_structures(data, feed) -> None:
    x, y, sw = data
    model = two_input_model("list" if feed == "tuple-arrays" else "dict")
    t = trainer(model)
    if feed == "tuple-arrays":
        t.fit((x[:, :2], x[:, 2:]), y, batch_size=4, shuffle=False, sample_weight=sw, verbose=0)
    elif feed == "dict-arrays":
        inputs = {"a": x[:, :2], "b": x[:, 2:]}
        t.fit(inputs, y, batch_size=4, shuffle=False, sample_weight=sw, verbose=0)
    else:
        inputs = {"a": x[:, :2], "b": x[:, 2:]}
        t.fit(tf.data.Dataset.from_tensor_slices((inputs, y, sw)).batch(4), verbose=0)
    expected_w, _ = numpy_sgd(x, y, sw, W0, 0.3, epochs=1)
    assert_close("kernel", model.get_weights()[0][:, 0], expected_w, rtol=EXACT.rtol)
    assert t.trace_counts()["micro"] == 1  # nested TensorSpecs, None batch dimension


def test_generator_stream_drop_remainder_and_steps_per_epoch(data) -> None:
    x, y, sw = data
    batches = [(x[i : i + 4], y[i : i + 4], sw[i : i + 4]) for i in range(0, N, 4)]
    # drop_remainder on a stream drops a window of fewer than accumulation_steps micro-batches
    model = linear_model()
    history = trainer(model, drop_remainder=True).fit(batches, epochs=2, verbose=0)
    assert [r["examples"] for r in history.records] == [12, 12]
    expected_w, _ = numpy_sgd(x, y, sw, W0, 0.3, epochs=2, windows=WINDOWS[:1])
    assert_close("kernel", model.get_weights()[0][:, 0], expected_w, rtol=EXACT.rtol)

    def forever():
        while True:
            yield from batches

    # 5 micro-batches per epoch read on from one infinite stream: each epoch = the 2 windows
    model = linear_model()
    trainer(model).fit(forever(), epochs=2, steps_per_epoch=5, verbose=0)
    expected_w, _ = numpy_sgd(x, y, sw, W0, 0.3, epochs=2)
    assert_close("kernel", model.get_weights()[0][:, 0], expected_w, rtol=EXACT.rtol)


def test_stream_resumes_mid_window_bit_identically(data, tmp_path) -> None:
    x, y, sw = data
    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(4)
    reference = trainer(linear_model())
    reference.fit(ds, epochs=2, verbose=0)

    class StopMidWindow:
        def on_micro_batch_end(self, trainer, epoch, micro_batch):
            if (epoch, micro_batch) == (1, 3):  # window 1 holds one micro-batch
                trainer.stop_training = True

    first = trainer(linear_model())
    first.fit(ds, epochs=2, callbacks=[StopMidWindow()], verbose=0)
    path = first.checkpoint().write(str(tmp_path / "ckpt"))
    resumed = trainer(linear_model())
    resumed.build()
    resumed.checkpoint().read(path).assert_consumed()
    with pytest.raises(InvalidArgumentError, match=r"an iterable of micro-batches\. Received: num"):
        resumed.fit(x, y, batch_size=4, epochs=2, verbose=0)  # arrays: another plan
    history = resumed.fit(ds, epochs=2, verbose=0)  # skips the 4 consumed micro-batches
    assert [(r["examples"], r["micro_batches"]) for r in history.records] == [(7, 2)]
    for a, b in zip(resumed.model.get_weights(), reference.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_with_other_metrics_is_refused_at_load(tmp_path) -> None:
    x = np.zeros((4, 3))
    t = trainer(linear_model(), metrics=["binary_accuracy"])
    t.fit(x, np.zeros((4, 1)), batch_size=4, verbose=0)
    path = t.checkpoint().write(str(tmp_path / "ckpt"))
    other = trainer(linear_model(), metrics=["categorical_accuracy"])
    with pytest.raises(InvalidArgumentError, match=r"metrics=\['binary_accuracy'\].*Received: "
                       r"metrics=\['categorical_accuracy'\]"):  # fmt: skip
        other.checkpoint().read(path)
    np.testing.assert_array_equal(other.model.get_weights()[0][:, 0], W0)  # nothing restored


def test_checkpoint_with_only_a_replica_count_is_refused_clearly(tmp_path) -> None:
    # A distributed checkpoint written before the replica layout was recorded holds the count
    # alone ("2"); reading it raised an unpacking ValueError instead of the refusal.
    from tfreg.training.checkpoint import Text as _Text

    t = trainer(linear_model())
    saved = tf.train.Checkpoint(model=t.model, replicas=tf.Module())
    saved.replicas.count = _Text("2")
    path = saved.write(str(tmp_path / "ckpt"))
    with pytest.raises(InvalidArgumentError, match=r"on 2 replica\(s\), replicas per worker not "
                       r"recorded.*Received: 1 replica\(s\)"):  # fmt: skip
        t.checkpoint().read(path)


class Recorder(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def set_model(self, model):
        super().set_model(model)
        self.calls.append(("set_model", model))

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin", self.params["steps"]))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch, sorted(logs)))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, sorted(logs)))


def test_keras_callbacks_get_keras_hooks_and_can_stop(data, tmp_path) -> None:
    x, y, _ = data
    model = linear_model()
    recorder = Recorder()
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9)
    saver = keras.callbacks.ModelCheckpoint(str(tmp_path / "ck.keras"))
    t = trainer(model)
    t.fit(x, y, batch_size=4, epochs=5, validation_data=(x, y), verbose=0,
          callbacks=[recorder, stopper, saver])  # fmt: skip
    keys = ["data_loss", "loss", "penalty", "val_data_loss", "val_loss"]
    # The callbacks' model: the trained model's attributes, with the trainer's optimizer.
    seen = recorder.calls[0][1]
    assert seen.optimizer is t.optimizer and seen.weights == model.weights
    assert recorder.calls[1:] == [
        ("train_begin", 2),
        ("epoch_begin", 0),
        ("batch_end", 0, ["data_loss", "loss", "penalty"]),
        ("batch_end", 1, ["data_loss", "loss", "penalty"]),
        ("epoch_end", 0, keys),
        ("epoch_begin", 1),
        ("batch_end", 0, ["data_loss", "loss", "penalty"]),
        ("batch_end", 1, ["data_loss", "loss", "penalty"]),
        ("epoch_end", 1, keys),
    ]  # EarlyStopping (min_delta no epoch can meet) stopped after epoch 2
    assert int(t.optimizer.iterations.numpy()) == 4
    saved = keras.models.load_model(tmp_path / "ck.keras")
    for a, b in zip(saved.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_invalid_callbacks_are_rejected_before_training(data) -> None:
    x, y, _ = data
    model = linear_model()
    t = trainer(model)

    class KerasStyleButPlain:  # Keras' signature on an object that is no keras Callback
        def on_epoch_end(self, epoch, logs=None):
            pass

    with pytest.raises(InvalidArgumentError, match=r"on_epoch_end must accept \(trainer, epoch, "):
        t.fit(x, y, batch_size=4, callbacks=[KerasStyleButPlain()], verbose=0)
    with pytest.raises(InvalidArgumentError, match="A callback must define one of"):
        t.fit(x, y, batch_size=4, callbacks=[object()], verbose=0)
    np.testing.assert_array_equal(model.get_weights()[0][:, 0], W0)
    assert int(t.optimizer.iterations.numpy()) == 0


def test_stream_arguments_are_checked_before_training(data) -> None:
    x, y, _ = data
    t = trainer(linear_model())
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with pytest.raises(InvalidArgumentError, match="batch_size=4"):
        t.fit(ds, batch_size=4, verbose=0)
    with pytest.raises(InvalidArgumentError, match="yields one pass only, but 2 epochs"):
        t.fit((b for b in ds), epochs=2, verbose=0)
    with pytest.raises(InvalidArgumentError, match="tuple \\(x, y\\) or \\(x, y, sample_weight"):
        t.fit([x[:4]], verbose=0)
    with pytest.raises(InvalidArgumentError, match="steps_per_epoch=3"):
        t.fit(x, y, batch_size=4, steps_per_epoch=3, verbose=0)
    assert int(t.optimizer.iterations.numpy()) == 0


def accumulating(drop_remainder: bool = False) -> tfreg.AccumulatingModel:
    rng = np.random.default_rng(1)
    model = keras.Sequential(
        [keras.Input((D,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    model.set_weights([rng.normal(size=v.shape).astype("float32") for v in model.weights])
    wrapped = tfreg.AccumulatingModel(
        model,
        accumulation_steps=3,
        drop_remainder=drop_remainder,
        regularizer=tfreg.L2(0.01),
        proximal=tfreg.ProximalL1(l1=0.001),
    )
    wrapped.compile(keras.optimizers.Adam(0.01), "mse")
    return wrapped


def test_accumulating_model_save_load_continue_equals_uninterrupted(data, tmp_path) -> None:
    # Before: NotImplementedError (no get_config) at the end of epoch 1.
    x, y, _ = data
    x, y = x.astype("float32"), y.astype("float32")
    reference = accumulating()
    reference.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    first = accumulating()
    path = str(tmp_path / "ck.keras")
    first.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(path)])  # fmt: skip
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, tfreg.AccumulatingModel)
    settings = {k: v for k, v in first.get_config().items() if k != "model"}
    assert {k: v for k, v in loaded.get_config().items() if k != "model"} == settings
    assert settings["regularizer"]["config"] == {"l2": 0.01}
    assert loaded.spec.accumulation_steps == 3 and loaded.proximal.l1 == 0.001
    assert int(loaded.optimizer.iterations.numpy()) == 4
    loaded.fit(x, y, batch_size=4, epochs=3, initial_epoch=2, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
