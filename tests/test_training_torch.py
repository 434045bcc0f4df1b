"""torchref.Trainer's torch-only cases (torch loss/optimizer refusals, Adam's own step count)
and KerasAdamW, against hand-computed references (no TensorFlow imported here). The window
rules both twins share run in ``test_trainer_cases.py``, their checkpoints (``state_dict``
resume with Dropout included) in ``test_checkpoint.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _twins import torch_twin, window_data

import torchref
from tfreg_core import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()


def test_optimizer_steps_count_updates() -> None:
    x, y, _, w = window_data()
    model = torch_twin().linear(w, 0.3)  # float64 parameters, float32 inputs: cast like Keras does
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torchref.Trainer(model, "mse", optimizer, accumulation_steps=3).fit(
        x.astype(np.float32), y, batch_size=4, epochs=2, verbose=0
    )
    assert int(optimizer.state[model.weight]["step"]) == 4


def test_bad_arguments_name_the_value() -> None:
    model = mlp(0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match=r"loss\.reduction='sum'"):
        torchref.Trainer(model, torch.nn.MSELoss(reduction="sum"), sgd)
    with pytest.raises(InvalidArgumentError, match=r"loss\.reduction='mean'"):
        torchref.Trainer(model, torch.nn.CTCLoss(), sgd)  # no element count gives its mean
    with pytest.raises(InvalidArgumentError, match="loss='hinge'"):
        torchref.Trainer(model, "hinge", sgd)
    with pytest.raises(InvalidArgumentError, match="jit_compile=True"):
        torchref.Trainer(model, "mse", sgd, jit_compile=True)
    with pytest.raises(InvalidArgumentError, match="optimizer="):
        torchref.Trainer(model, "mse", "sgd")


def test_keras_adamw_first_step_by_hand() -> None:
    # One step from m = v = 0 with g = 0.5: m = 0.05, v = 0.00025 (b1=0.9, b2=0.999), and
    # Keras' alpha = lr * sqrt(1 - b2) / (1 - b1) with lr and the betas inside b^t rounded to
    # float32, wd too: w = 2 - 2*wd*lr, then w -= alpha * m / (sqrt(v) + eps).
    p = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = torchref.KerasAdamW([p], lr=0.01, weight_decay=0.1, eps=1e-7)
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    lr, wd = f32(0.01), f32(0.1)
    w = 2.0 - 2.0 * wd * lr
    alpha = lr * math.sqrt(1 - f32(0.999)) / (1 - f32(0.9))
    m, v = 0.5 * (1 - 0.9), 0.25 * (1 - 0.999)
    expected = w - m * alpha / (math.sqrt(v) + 1e-7)
    assert p.item() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"betas": (1.0, 0.999)}, r"betas=\(1.0, 0.999\)"),
        ({"betas": (0.9, 0.9999999999)}, "after float32 rounding"),
        ({"betas": 0.9}, "betas=0.9"),
        ({"betas": (0.9,)}, r"betas=\(0.9,\)"),
        ({"betas": (0.9, -0.1)}, r"betas=\(0.9, -0.1\)"),
        ({"betas": "ab"}, "betas='ab'"),
        ({"float32_hyperparameters": 1}, "float32_hyperparameters=1"),
        ({"float32_hyperparameters": "no"}, "float32_hyperparameters='no'"),
    ],
    ids=[
        "beta1-one",
        "beta2-rounds-to-one",
        "scalar",
        "one-beta",
        "negative",
        "str",
        "f32-int",
        "f32-str",
    ],
)
def test_keras_adamw_rejects_bad_hyperparameters(kwargs, match) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        torchref.KerasAdamW([torch.zeros(1, requires_grad=True)], **kwargs)


def test_keras_adamw_exact_betas_may_be_just_below_one() -> None:
    # Without float32 rounding, a beta float32 would round to 1 is a valid float64 beta.
    opt = torchref.KerasAdamW(
        [torch.zeros(1, requires_grad=True)],
        betas=(0.9, 0.9999999999),
        float32_hyperparameters=False,
    )
    assert opt.defaults["betas"] == (0.9, 0.9999999999)
