"""``torchref.Trainer.fit(validation_data=...)``, as Keras' ``fit``: evaluated on each epoch's
final weights in eval mode, ``val_loss`` / ``val_data_loss`` / ``val_<metric>`` in
``history.epochs``, early stopping as a callback, bad validation data refused before any
update. The reference is plain torch on the same weights: ``model.eval()``, ``no_grad``, the
loss module's mean over the whole validation set plus the penalty. No TensorFlow imported here.

Tolerance: float64, ``tolerance("accumulation", "float64")`` (1e-12 rel): the batched sums and
the one-batch mean differ only in summation order.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchref
from tfreg_core import InvalidArgumentError
from tfreg_harness import assert_close, tolerance

EXACT = tolerance("accumulation", "float64")
D, C = 4, 3

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, C)).double()


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, size=n)
    y[rng.choice(n, size=n // 4, replace=False)] = -100
    return rng.normal(size=(n, D)), y


def trainer(m: nn.Module) -> torchref.Trainer:
    return torchref.Trainer(
        m,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(m.parameters(), lr=0.2),
        accumulation_steps=2,
        regularizer=torchref.L2(0.01),
        metrics=["sparse_categorical_accuracy"],
    )


class Reference:
    """Plain torch on the epoch's final weights (``on_epoch_end`` comes after validation)."""

    def __init__(self, xv: np.ndarray, yv: np.ndarray) -> None:
        self.xv, self.yv = xv, yv
        self.logs: list[dict[str, float]] = []

    def on_epoch_end(self, trainer: torchref.Trainer, epoch: int, history: Any) -> None:
        m = copy.deepcopy(trainer.model).eval()
        with torch.no_grad():
            logits = m(torch.as_tensor(self.xv))
            labels = torch.as_tensor(self.yv)
            data_loss = nn.CrossEntropyLoss()(logits, labels).item()
            penalty = torchref.penalty(m, torchref.L2(0.01)).item()
            accuracy = (logits.argmax(-1) == labels).double().mean().item()
        self.logs.append(
            {
                "val_loss": data_loss + penalty,
                "val_data_loss": data_loss,
                "val_sparse_categorical_accuracy": accuracy,
            }
        )


@pytest.mark.parametrize("form", ["arrays", "tensor_dataset", "data_loader"])
def test_validation_values_equal_plain_torch_on_the_epochs_weights(form) -> None:
    # Before: fit(validation_data=...) raised TypeError (an unexpected keyword).
    x, y = data(20, 0)
    xv, yv = data(13, 1)  # 13: batches of 4, 4, 4, 1; a fifth of the labels ignored
    validation: Any = {
        "arrays": (xv, yv),
        "tensor_dataset": TensorDataset(torch.as_tensor(xv), torch.as_tensor(yv)),
        "data_loader": DataLoader(TensorDataset(torch.as_tensor(xv), torch.as_tensor(yv)), 4),
    }[form]
    reference = Reference(xv, yv)
    history = trainer(model()).fit(
        x, y, batch_size=4, epochs=3, validation_data=validation, callbacks=[reference], verbose=0
    )
    assert len(history.epochs) == 3
    for logs, expected in zip(history.epochs, reference.logs, strict=True):
        for key, value in expected.items():
            assert_close(key, logs[key], value, rtol=EXACT.rtol)


@pytest.mark.parametrize("form", ["arrays", "data_loader", "shuffled_data_loader"])
def test_validation_changes_nothing_in_training(form) -> None:
    # Eval mode for validation (Dropout off, no RNG drawn), training mode restored after:
    # the trained weights are bitwise those of a fit without validation. Before: iterating a
    # validation DataLoader (the check before training, then each epoch's pass) drew its base
    # seed (and, shuffled, its permutation) from torch's global generator, which the training
    # DataLoader's shuffle and Dropout draw from: 0.038 off on a Dropout MLP after 2 epochs.
    x, y = data(20, 0)
    xv, yv = (torch.as_tensor(v) for v in data(8, 1))
    validation: Any = {
        "arrays": (xv, yv),
        "data_loader": DataLoader(TensorDataset(xv, yv), 4),
        "shuffled_data_loader": DataLoader(TensorDataset(xv, yv), 4, shuffle=True),
    }[form]
    loader = DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), 4, shuffle=True)
    with_val, without = model(), model()
    torch.manual_seed(3)
    trainer(with_val).fit(loader, epochs=2, validation_data=validation, verbose=0)
    torch.manual_seed(3)
    trainer(without).fit(loader, epochs=2, verbose=0)
    for a, b in zip(with_val.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)
    assert with_val.training


class EarlyStopping:
    """Keras' EarlyStopping(monitor="val_loss", patience) as a project callback."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.wait = patience, float("inf"), 0

    def on_epoch_end(self, trainer: torchref.Trainer, epoch: int, history: Any) -> None:
        current = history.epochs[-1]["val_loss"]
        if current < self.best:
            self.best, self.wait = current, 0
            return
        self.wait += 1
        if self.wait > self.patience:
            trainer.stop_training = True


def test_early_stopping_is_a_callback_on_val_loss() -> None:
    x, y = data(20, 0)
    m = model()
    t = torchref.Trainer(m, "cross_entropy", torch.optim.SGD(m.parameters(), lr=5.0))
    xv, yv = data(12, 1)
    history = t.fit(
        x,
        y,
        batch_size=4,
        epochs=30,
        validation_data=(xv, yv),
        callbacks=[EarlyStopping(patience=1)],
        verbose=0,
    )
    losses = [e["val_loss"] for e in history.epochs]
    assert len(losses) < 30  # lr=5 overfits: val_loss stops improving
    assert min(losses[:-2]) <= min(losses[-2:])  # stopped after 2 epochs without improvement


@pytest.mark.parametrize(
    "validation, match",
    [
        ((np.zeros((5, D)), np.zeros(4, dtype=np.int64)), "same first dimension"),
        ((np.zeros((5, D)),), "tuple"),
        (42, "iterable"),
        ((np.zeros((5, D)), np.full(5, 0.5)), r"y\.dtype=torch\.float64"),  # CE targets
        ((np.zeros((5, D)), np.zeros((5, 2), dtype=np.int64)), r"y\.shape=\(4, 2\)"),
        (iter([(torch.zeros(2, D), torch.zeros(2, dtype=torch.int64))]), "one pass"),
        ([], "no batch"),
    ],
    ids=["lengths", "no_targets", "not_data", "float_labels", "shape", "iterator", "empty"],
)
def test_bad_validation_data_is_refused_before_any_update(validation, match) -> None:
    x, y = data(20, 0)
    m = model()
    before = copy.deepcopy(m.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=0.2)
    with pytest.raises(InvalidArgumentError, match=match):
        torchref.Trainer(m, "cross_entropy", opt).fit(
            x, y, batch_size=4, epochs=2, validation_data=validation, verbose=0
        )
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not opt.state


def test_an_iterator_serves_the_one_validation_of_a_single_epoch() -> None:
    x, y = data(20, 0)
    xv, yv = data(8, 1)
    batches = iter(
        [
            (torch.as_tensor(xv[:4]), torch.as_tensor(yv[:4])),
            (torch.as_tensor(xv[4:]), torch.as_tensor(yv[4:])),
        ]
    )
    reference = Reference(xv, yv)
    history = trainer(model()).fit(
        x, y, batch_size=4, epochs=1, validation_data=batches, callbacks=[reference], verbose=0
    )
    assert_close(
        "val_loss", history.epochs[0]["val_loss"], reference.logs[0]["val_loss"], rtol=EXACT.rtol
    )
