"""Refused before anything changes (issue 18): a proximal operator that cannot apply to the
model, a learning rate a schedule drives negative or NaN under a proximal step, a regularizer
whose own error TF would wrap while tracing."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import tfreg
import torchref
from tfreg_core import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

X = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
Y = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32)


def torch_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def tf_model() -> keras.Model:
    init = keras.initializers.GlorotUniform(seed=0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer=init)])


def test_torch_group_lasso_axis_out_of_range_is_refused_at_construction() -> None:
    # Before: raised in fit after optimizer.step() (weights and Adam state stepped).
    model = torch_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match=r"axis.*weight.*\(2, 3\)"):
        torchref.Trainer(
            model, "mse", optimizer, proximal=torchref.ProximalGroupLasso(strength=0.1, axis=5)
        )


class _Schedule:
    """Steps a torch LR scheduler after each update (the documented place)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def on_update_end(self, trainer: Any, record: Any) -> None:
        self.scheduler.step()


@pytest.mark.parametrize("second", [-0.05, math.nan], ids=["negative", "nan"])
def test_torch_scheduler_rate_negative_or_nan_is_refused_before_the_window(second: float) -> None:
    # Before: raised after optimizer.step(): weights and Adam state stepped, window not reset.
    def make() -> tuple[torchref.Trainer, Any]:
        model = torch_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        rates = [1.0, second / 0.1]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rates[min(step, 1)])
        proximal = torchref.ProximalL1(l1=0.01)
        trainer = torchref.Trainer(model, "mse", optimizer, accumulation_steps=2, proximal=proximal)
        return trainer, _Schedule(scheduler)

    reference, _ = make()  # the first update alone
    reference.fit(X[:4], Y[:4], batch_size=2, epochs=1, shuffle=False, verbose=0)
    refused, schedule = make()
    with pytest.raises(InvalidArgumentError, match=r"param_groups\[0\]\['lr'\]=(-0.05|nan)"):
        refused.fit(X, Y, batch_size=2, epochs=1, shuffle=False, callbacks=[schedule], verbose=0)
    assert refused.accumulator.micro_batches == 0  # nothing of the refused window held
    for a, b in zip(refused.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(a, b)  # exactly the first update: the refused one never stepped
    assert int(refused.optimizer.state[refused.model.weight]["step"]) == 1


class _Falls(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, second: float) -> None:
        self.second = second

    def __call__(self, step: Any) -> Any:
        return tf.where(step < 1, 0.1, self.second)

    def get_config(self) -> dict[str, Any]:
        return {"second": self.second}


@pytest.mark.parametrize("second", [-0.05, math.nan], ids=["negative", "nan"])
def test_tf_proximal_schedule_negative_or_nan_is_refused_before_the_window(second: float) -> None:
    # Before: a negative threshold pushed weights away from zero silently; NaN weights were
    # recorded skipped=False.
    def make() -> tfreg.Trainer:
        optimizer = keras.optimizers.SGD(_Falls(second))
        return tfreg.Trainer(
            tf_model(), "mse", optimizer, accumulation_steps=2, proximal=tfreg.ProximalL1(l1=0.01)
        )

    reference = make()
    reference.fit(X[:4], Y[:4], batch_size=2, epochs=1, shuffle=False, verbose=0)
    refused = make()
    with pytest.raises(InvalidArgumentError, match=r"schedule at step 1=(-0.05|nan)"):
        refused.fit(X, Y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert int(refused.optimizer.iterations) == 1
    assert int(refused.accumulator.micro_batches) == 0
    for a, b in zip(refused.model.weights, reference.model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"regularizer": tfreg.GroupLasso(0.01, axis=5)},
        {"proximal": tfreg.ProximalGroupLasso(strength=0.01, axis=5)},
    ],
    ids=["regularizer", "proximal"],
)
def test_tf_invalid_axis_reaches_the_user_as_the_library_error(kwargs: dict[str, Any]) -> None:
    # Before: the library's ValueError wrapped in TF's StagingError (`except ValueError` missed
    # it), raised while tracing the step.
    trainer = tfreg.Trainer(tf_model(), "mse", keras.optimizers.SGD(0.1), **kwargs)
    with pytest.raises(ValueError, match="axis") as raised:
        trainer.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    assert isinstance(raised.value, InvalidArgumentError)


@pytest.mark.parametrize(
    "validation_data",
    [(X[:, :2], Y), (X, Y[:, :1, None])],
    ids=["input-shape", "target-shape"],
)
def test_tf_malformed_validation_data_fails_before_the_first_update(validation_data) -> None:
    # Before: epoch 1 trained, then the validation pass raised (README: checked before).
    trainer = tfreg.Trainer(tf_model(), "mse", keras.optimizers.SGD(0.1))
    trainer.build((None, 3))
    before = [v.numpy().copy() for v in trainer.model.weights]
    with pytest.raises(ValueError):
        trainer.fit(X, Y, batch_size=4, epochs=1, validation_data=validation_data, verbose=0)
    assert int(trainer.optimizer.iterations) == 0
    for v, b in zip(trainer.model.weights, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)


def _labels(bad: int) -> np.ndarray:
    labels = np.arange(8) % 2
    labels[6] = bad  # in the second window (batch 2 x 2 micro-batches)
    return labels


@pytest.mark.parametrize("bad", [7, -1], ids=["7-of-2", "minus-1"])
def test_tf_label_out_of_range_is_refused_before_any_update(bad: int) -> None:
    # Before: TF's own error at the bad micro-batch, after the first window was applied.
    trainer = tfreg.Trainer(
        tf_model(),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.optimizers.SGD(0.1),
        accumulation_steps=2,
    )
    with pytest.raises(InvalidArgumentError, match=rf"\[0, 2\).*Received: y\[6\]={bad}"):
        trainer.fit(X, _labels(bad), batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert int(trainer.optimizer.iterations) == 0


@pytest.mark.parametrize("bad", [7, -1], ids=["7-of-2", "minus-1"])
def test_torch_label_out_of_range_is_refused_before_any_update(bad: int) -> None:
    # Before: IndexError from F.cross_entropy at the bad micro-batch, after window 1 applied.
    model = torch_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = torchref.Trainer(model, "cross_entropy", optimizer, accumulation_steps=2)
    with pytest.raises(InvalidArgumentError, match=rf"\[0, 2\) or -100.*Received: y\[6\]={bad}"):
        trainer.fit(X, _labels(bad), batch_size=2, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)


def test_torch_stream_label_out_of_range_fails_before_its_window_naming_the_batch() -> None:
    model = torch_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = torchref.Trainer(model, "cross_entropy", optimizer, accumulation_steps=2)
    labels = torch.as_tensor(_labels(7))
    stream = [(torch.as_tensor(X[i : i + 2]), labels[i : i + 2]) for i in range(0, 8, 2)]
    updates = []

    class Count:
        def on_update_end(self, trainer: Any, record: Any) -> None:
            updates.append(record)

    with pytest.raises(InvalidArgumentError, match=r"micro-batch 3 of epoch 0: y\[0\]=7"):
        trainer.fit(stream, epochs=1, callbacks=[Count()], verbose=0)
    assert len(updates) == 1  # the first window only; the bad batch's window never applied
