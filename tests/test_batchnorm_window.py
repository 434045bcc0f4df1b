"""``batchnorm="per_window"``: BatchNorm moving statistics updated once per window with the
window's pooled moments, equal (float64, <= 1e-12: Chan's pooling reassociates the big
batch's sums, a few ulps) to one plain training-mode pass on the concatenated window -- a
plain Keras ``fit`` step / a plain torch train-mode forward -- over several windows; the
default mode (per micro-batch) unchanged; a mid-window resume bitwise; refusals."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

SIZES = (5, 3, 4)  # one window of three uneven micro-batches
WINDOWS = 3
TOL = 1e-12  # float64: pooled vs direct moments, a few ulps of the moving statistics


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 2.0, (n, 3))
    return x, rng.normal(size=(n, 1))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------- torch


def _torch_model(momentum: float | None = 0.1) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=momentum), torch.nn.Linear(4, 1)
    ).double()


def _torch_stats(model: Any) -> list[np.ndarray]:
    bn = model[1]
    return [bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()]


def _torch_trained(batchnorm: str, momentum: float | None = 0.1) -> Any:
    import torch

    import torchref

    model = _torch_model(momentum)
    trainer = torchref.Trainer(
        model,
        torch.nn.MSELoss(),
        torch.optim.SGD(model.parameters(), lr=0.0),  # lr 0: the stats' inputs stay fixed
        accumulation_steps=len(SIZES),
        batchnorm=batchnorm,
    )
    x, y = _data(sum(SIZES) * WINDOWS)
    micro = [b for _ in range(WINDOWS) for b in SIZES]
    bounds = np.cumsum([0, *micro])
    batches = [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]
    trainer.fit(batches, verbose=0)
    return model


def _torch_reference(per_window: bool, momentum: float | None = 0.1) -> Any:
    import torch

    model = _torch_model(momentum)
    model.train()
    x, _ = _data(sum(SIZES) * WINDOWS)
    window = sum(SIZES)
    with torch.no_grad():
        for w in range(WINDOWS):
            xs = x[w * window : (w + 1) * window]
            if per_window:
                model(torch.as_tensor(xs))
            else:
                bounds = np.cumsum([0, *SIZES])
                for a, b in itertools.pairwise(bounds):
                    model(torch.as_tensor(xs[a:b]))
    return model


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_per_window_equals_big_batch(momentum: float | None) -> None:
    model = _torch_trained("per_window", momentum)
    ref = _torch_reference(True, momentum)
    for got, want in zip(_torch_stats(model), _torch_stats(ref), strict=True):
        assert _rel(got, want) <= TOL
    assert int(model[1].num_batches_tracked) == WINDOWS
    # The per-micro-batch statistics are measurably elsewhere (what the mode fixes).
    micro = _torch_reference(False, momentum)
    assert _rel(_torch_stats(micro)[1], _torch_stats(ref)[1]) > 1e-3


def test_torch_default_mode_unchanged() -> None:
    with pytest.warns(UserWarning, match="per_window"):
        model = _torch_trained("per_micro_batch")
    ref = _torch_reference(False)
    for got, want in zip(_torch_stats(model), _torch_stats(ref), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(model[1].num_batches_tracked) == WINDOWS * len(SIZES)
