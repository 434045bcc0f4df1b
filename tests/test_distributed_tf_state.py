"""State under MirroredStrategy (2 logical CPUs): tfreg.Trainer checkpoints (a resume
mid-window is bitwise; another replica count is refused) and AccumulatingModel's evaluation
(``val_loss`` equals the one-device value; a ``batch_size`` below the replica count is refused),
and ``fit`` called inside ``strategy.scope()`` (the usual Keras pattern) equal to outside it.

The scenarios run in one subprocess (this file run as a script), because logical devices must
be configured before TensorFlow starts; results come back as JSON. Bitwise means
``np.array_equal``: the resumed run must add the remaining micro-batches to each replica's own
partial sums, in the uninterrupted run's order.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfreg_harness import tolerance

# float64: the same windows summed per replica, then across them (the design table's
# "accumulation" row, 1e-12 relative).
EXACT = tolerance("accumulation", "float64")
TIMEOUT_S = 180
N, BATCH, K = 23, 4, 3  # global micro-batch 4 (2 per replica); windows of 12, 11 examples
STOP_AT = 4  # micro-batch index of epoch 0 after which the first run stops: mid-window 2


def _scenarios(outdir: str) -> dict[str, Any]:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    import tfreg
    from tfreg_core.validation import InvalidArgumentError

    keras.backend.set_floatx("float64")
    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=(N, 3)), rng.integers(0, 3, size=N), rng.uniform(0.5, 2, size=N)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def trainer(scope: Any) -> tfreg.Trainer:
        keras.utils.set_random_seed(1)
        with scope:
            model = keras.Sequential(
                [keras.Input((3,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
            )
            return tfreg.Trainer(
                model,
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                keras.optimizers.Adam(0.125),
                accumulation_steps=K,
                regularizer=tfreg.L2(2.0**-7),
                metrics=["sparse_categorical_accuracy"],
            )

    def fit(t: tfreg.Trainer, **kwargs: Any) -> Any:
        return t.fit(x, y, sample_weight=w, batch_size=BATCH, epochs=2, verbose=0, **kwargs)

    def state(t: tfreg.Trainer) -> list[list[float]]:
        return [v.numpy().ravel().tolist() for v in t.model.trainable_variables]

    class Stop:
        def on_micro_batch_end(self, t: Any, epoch: int, micro_batch: int) -> None:
            if (epoch, micro_batch) == (0, STOP_AT):
                t.stop_training = True

    uninterrupted = trainer(strategy.scope())
    history = fit(uninterrupted)
    # The usual Keras pattern: fit called inside the scope too (the update is traced there in
    # cross-replica context; the optimizer's merge_call and the penalty gradient failed).
    inside = trainer(strategy.scope())
    with strategy.scope():
        fit(inside)
    first = trainer(strategy.scope())
    fit(first, callbacks=[Stop()])
    path = first.checkpoint().write(os.path.join(outdir, "mid_window"))
    resumed = trainer(strategy.scope())
    resumed.checkpoint().read(path)
    resumed_history = fit(resumed)

    def refusal(scope: Any, checkpoint: str) -> str:
        try:
            trainer(scope).checkpoint().read(checkpoint)
        except InvalidArgumentError as error:
            return str(error)
        return ""

    one_device = trainer(contextlib.nullcontext())
    single_path = one_device.checkpoint().write(os.path.join(outdir, "one_device"))
    distributed = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    )
    try:
        trainer(strategy.scope()).fit(distributed, epochs=1, verbose=0)
        distributed_error = ""
    except InvalidArgumentError as error:
        distributed_error = str(error)

    def wrapper(
        scope: Any, k: int, optimizer: Any = keras.optimizers.SGD, **kwargs: Any
    ) -> tfreg.AccumulatingModel:
        keras.utils.set_random_seed(1)
        with scope:
            model = keras.Sequential(
                [keras.Input((3,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
            )
            wrapped = tfreg.AccumulatingModel(model, accumulation_steps=k, **kwargs)
            wrapped.compile(
                optimizer(0.125),  # created inside the scope
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        return wrapped

    def evaluation(scope: Any) -> dict[str, float]:
        # 7 examples in batches of 6: the last is split 1/0 over the replicas.
        model = wrapper(scope, 1)
        return model.evaluate(x[:7], y[:7], batch_size=6, verbose=0, return_dict=True)

    class BatchLosses(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.losses.append(float(logs["loss"]))

    def batch_losses(scope: Any) -> list[float]:
        # AccumulatingModel's per-step logs (what a progress bar or TensorBoard shows), k=2.
        recorder = BatchLosses()
        wrapper(scope, 2).fit(
            x, y, sample_weight=w, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[recorder]
        )
        return recorder.losses

    def wrapper_fit(inside_scope: bool) -> list[list[float]]:
        model = wrapper(strategy.scope(), K, keras.optimizers.Adam, regularizer=tfreg.L2(2.0**-7))
        with strategy.scope() if inside_scope else contextlib.nullcontext():
            model.fit(x, y, sample_weight=w, batch_size=BATCH, epochs=2, verbose=0)
        return [v.numpy().ravel().tolist() for v in model.model.trainable_variables]

    def wrapper_batch_of_one(call: str, **kwargs: Any) -> dict[str, Any]:
        # A global batch of 1 on 2 replicas: Keras fit/evaluate build on the first global batch
        # summed across the replicas, which fails in TensorFlow when a share is empty (a plain
        # model too; in fit's validation only after the epoch's updates).
        model = wrapper(strategy.scope(), K)
        try:
            getattr(model, call)(x, y, verbose=0, **kwargs)
            error = None
        except Exception as caught:  # the class is the finding: ours, not TensorFlow's
            error = caught
        return {
            "class": f"{type(error).__module__}.{type(error).__name__}",
            "message": str(error),
            "iterations": int(model.optimizer.iterations.numpy()),
        }

    return {
        "inside_scope": state(inside),
        "wrapper_outside_scope": wrapper_fit(inside_scope=False),
        "wrapper_inside_scope": wrapper_fit(inside_scope=True),
        "wrapper_batch_of_one": {
            "fit-batch_size": wrapper_batch_of_one("fit", batch_size=1),
            "fit-validation_batch_size": wrapper_batch_of_one(
                "fit", batch_size=BATCH, validation_data=(x, y), validation_batch_size=1
            ),
            "evaluate-batch_size": wrapper_batch_of_one("evaluate", batch_size=1),
        },
        "batch_losses_one_device": batch_losses(contextlib.nullcontext()),
        "batch_losses_mirrored": batch_losses(strategy.scope()),
        "evaluate_one_device": evaluation(contextlib.nullcontext()),
        "evaluate_mirrored": evaluation(strategy.scope()),
        "uninterrupted": state(uninterrupted),
        "resumed": state(resumed),
        "records": [r["loss"] for r in history.records[-2:]],
        "resumed_records": [r["loss"] for r in resumed_history.records[-2:]],
        "two_into_one": refusal(contextlib.nullcontext(), path),
        "one_into_two": refusal(strategy.scope(), single_path),
        "distributed_dataset": distributed_error,
    }


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as outdir:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        done = subprocess.run(
            [sys.executable, __file__, outdir],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads((Path(outdir) / "results.json").read_text())


def test_resume_mid_window_is_bitwise(results: dict[str, Any]) -> None:
    for resumed, uninterrupted in zip(results["resumed"], results["uninterrupted"], strict=True):
        assert np.array_equal(resumed, uninterrupted)
    # The update records after the resume: the same losses, to the bit.
    assert results["resumed_records"] == results["records"]


@pytest.mark.parametrize(
    ("inside", "outside"),
    [("inside_scope", "uninterrupted"), ("wrapper_inside_scope", "wrapper_outside_scope")],
    ids=["trainer", "accumulating-model"],
)
def test_fit_inside_the_scope_equals_fit_outside_it(
    results: dict[str, Any], inside: str, outside: str
) -> None:
    # Bitwise: the update is traced as outside the scope, so the same graph runs.
    for a, b in zip(results[inside], results[outside], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("case", "saved", "now"),
    [("two_into_one", "2 replica", "1 replica"), ("one_into_two", "1 replica", "2 replica")],
    ids=["2-replicas-into-1-device", "1-device-into-2-replicas"],
)
def test_checkpoint_on_another_replica_count_refused(
    results: dict[str, Any], case: str, saved: str, now: str
) -> None:
    message = results[case]
    assert f"saved by a Trainer on {saved}" in message
    assert f"Received: {now}" in message


def test_accumulating_model_evaluate_equals_one_device(results: dict[str, Any]) -> None:
    # float64; 1e-15 relative: the same per-example losses summed in another order (replica
    # shares, then batches). Before the fix Keras returned one replica's partial mean:
    # 1.0158 against 1.0482 on this data, 3e-2 off.
    expected, actual = results["evaluate_one_device"], results["evaluate_mirrored"]
    assert set(actual) == {"loss"}  # no training-only data_loss (it would read 0)
    assert actual["loss"] == pytest.approx(expected["loss"], rel=1e-15)


def test_accumulating_model_step_logs_equal_one_device(results: dict[str, Any]) -> None:
    # float64; 1e-12 relative (the accumulation row: the window's sums reassociated across the
    # replicas). Under the strategy the window closes after Keras' step, which read its logs
    # before: every window-closing step reported the previous window (steps 1, 3, 5 logged
    # 0.0, 2.1392, 2.1835 where one device logs 2.1392, 2.1835, 2.0896).
    expected, actual = results["batch_losses_one_device"], results["batch_losses_mirrored"]
    assert len(actual) == len(expected) == 6  # 23 examples in micro-batches of 4
    assert actual == pytest.approx(expected, rel=EXACT.rtol)


@pytest.mark.parametrize(
    "case", ["fit-batch_size", "fit-validation_batch_size", "evaluate-batch_size"]
)
def test_accumulating_model_batch_smaller_than_replicas_refused(
    results: dict[str, Any], case: str
) -> None:
    refusal = results["wrapper_batch_of_one"][case]
    argument = case.split("-")[1]
    assert refusal["class"] == "tfreg_core.validation.InvalidArgumentError"
    assert f"Received: {argument}=1 on 2 replicas" in refusal["message"]
    assert refusal["iterations"] == 0  # before any update


def test_distributed_dataset_refused(results: dict[str, Any]) -> None:
    assert "Received: x=DistributedDataset" in results["distributed_dataset"]


if __name__ == "__main__":
    out = sys.argv[1]
    Path(out, "results.json").write_text(json.dumps(_scenarios(out)))
