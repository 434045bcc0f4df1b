"""torchref's Window (torchref.training.window): what its own design adds to the shared core
(tfreg_core.update, tfreg_core.metrics, pinned in test_update_core.py) -- metrics over per-timestep
labels and the once-per-window ``.grad`` aliasing -- with hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torchref  # noqa: E402

F = torch.nn.functional


class _Scaled(torch.nn.Module):
    """``x * scale`` (scale 1 at the start): the logits are the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_sparse_accuracy_over_timesteps_weights_each_timestep_by_its_example():
    # (N, T, C) = (2, 3, 2) logits, (N, T) labels: argmax row 0 -> [0, 1, 0] vs [0, 1, 1] (2 of
    # 3 right), row 1 -> [1, 1, 0] vs [1, 1, 0] (3 of 3). Weights (1, 3) per example, broadcast
    # over its timesteps (Keras, tfreg): (2*1 + 3*3) / (3*1 + 3*3) = 11/12. Before the core's
    # metrics, the labels were flattened to (N*T,) and the metric raised on the shapes.
    x = np.array(
        [[[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]], np.float64
    )
    y = np.array([[0, 1, 1], [1, 1, 0]], np.int64)
    w = np.array([1.0, 3.0])
    model = _Scaled()
    loss = torchref.per_element(
        lambda z, t: F.cross_entropy(z.transpose(1, 2), t, reduction="none")
    )
    trainer = torchref.Trainer(
        model,
        loss,
        torch.optim.SGD(model.parameters(), lr=0.0),
        metrics=["sparse_categorical_accuracy"],
    )
    history = trainer.fit(
        x,
        y,
        sample_weight=w,
        batch_size=2,
        shuffle=False,
        validation_data=(x, y, w),
        verbose=0,
    )
    assert history.records[0]["sparse_categorical_accuracy"] == 11 / 12  # float64, exact sums
    assert history.epochs[0]["val_sparse_categorical_accuracy"] == 11 / 12


class _ZeroGrad:
    """A callback that releases every ``.grad`` after each micro-batch."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def on_micro_batch_end(self, trainer, epoch, micro_batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def test_a_grad_released_between_micro_batches_keeps_the_window_sum():
    # .grad is set once per window; one changed between micro-batches is set again, so the
    # window still sums both micro-batches. y = w*x, MSE, w0 = 1, window x = (1, 2), y = (0, 0):
    # grad = mean(2 x (w x - y)) = (2*1*1 + 2*2*2) / 2 = 5; SGD lr 0.1 -> w = 1 - 0.5 = 0.5.
    model = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = torchref.Trainer(model, "mse", optimizer, accumulation_steps=2)
    x = np.array([[1.0], [2.0]])
    trainer.fit(
        x,
        np.zeros((2, 1)),
        batch_size=1,
        shuffle=False,
        callbacks=[_ZeroGrad(optimizer)],
        verbose=0,
    )
    assert model.weight.item() == 0.5  # float64: 0.1 * 5 rounds to 0.5, 1 - 0.5 is exact
