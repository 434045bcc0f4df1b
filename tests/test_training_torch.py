"""torchref.Trainer and KerasAdamW against NumPy references (no TensorFlow imported here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import torchref
from tfreg_core import InvalidArgumentError
from tfreg_harness import assert_close, tolerance

EXACT = tolerance("accumulation", "float64")
LR = 0.125
N, D = 19, 3
WINDOWS = [np.arange(0, 12), np.arange(12, 19)]  # batch 4 x 3 steps: 4,4,4 | 4,3


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def linear_model(w: np.ndarray, b: float) -> torch.nn.Module:
    model = torch.nn.Linear(D, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w).reshape(1, D))
        model.bias.fill_(b)
    return model


@pytest.fixture
def data() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    return (
        rng.normal(size=(N, D)),
        rng.normal(size=(N, 1)),
        rng.uniform(0.5, 2.0, size=N),
        rng.normal(size=D),
    )


def numpy_sgd(x, y, sw, w, b, *, epochs, windows=WINDOWS, l2=0.0, prox_l1=0.0):
    w, b = w.copy(), float(b)
    for _ in range(epochs):
        for idx in windows:
            r = (x[idx] @ w + b - y[idx, 0]) * sw[idx]
            w, b = (
                w - LR * (2 * x[idx].T @ r / len(idx) + 2 * l2 * w),
                b - LR * 2 * r.sum() / len(idx),
            )
            w = np.sign(w) * np.maximum(np.abs(w) - LR * prox_l1, 0.0)
    return w, b


def trainer(model: torch.nn.Module, **kwargs) -> torchref.Trainer:
    return torchref.Trainer(
        model, "mse", torch.optim.SGD(model.parameters(), lr=LR), accumulation_steps=3, **kwargs
    )


@pytest.mark.parametrize("drop_remainder", [False, True], ids=["flush", "drop"])
def test_windows_penalty_and_short_window_match_numpy(data, drop_remainder) -> None:
    x, y, sw, w = data
    model = linear_model(w, 0.3)
    t = trainer(model, regularizer=torchref.L2(0.25), drop_remainder=drop_remainder)
    history = t.fit(x, y, batch_size=4, epochs=2, shuffle=False, sample_weight=sw, verbose=0)
    windows = WINDOWS[:1] if drop_remainder else WINDOWS
    expected_w, expected_b = numpy_sgd(x, y, sw, w, 0.3, epochs=2, windows=windows, l2=0.25)
    assert_close("weight", model.weight.detach()[0], expected_w, rtol=EXACT.rtol)
    assert_close("bias", model.bias.detach(), [expected_b], rtol=EXACT.rtol)
    assert [r["examples"] for r in history.records] == [len(i) for i in windows] * 2


def test_proximal_l1_once_per_update(data) -> None:
    x, y, sw, w = data
    model = linear_model(w, 0.3)
    trainer(model, proximal=torchref.ProximalL1(l1=0.3)).fit(
        x, y, batch_size=4, epochs=2, shuffle=False, sample_weight=sw, verbose=0
    )
    expected_w, _ = numpy_sgd(x, y, sw, w, 0.3, epochs=2, prox_l1=0.3)
    assert_close("weight", model.weight.detach()[0], expected_w, rtol=EXACT.rtol)
    np.testing.assert_array_equal(model.weight.detach()[0].numpy() == 0.0, expected_w == 0.0)
    assert np.count_nonzero(expected_w == 0.0) >= 1


def test_nonfinite_skip_and_raise(data) -> None:
    x, y, _, w = data
    y = y.copy()
    y[14] = np.nan
    model = linear_model(w, 0.3)
    history = trainer(model).fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    expected_w, _ = numpy_sgd(x, y, np.ones(N), w, 0.3, epochs=1, windows=WINDOWS[:1])
    assert_close("weight", model.weight.detach()[0], expected_w, rtol=EXACT.rtol)
    assert history.skipped_updates == 1

    model = linear_model(w, 0.3)
    with pytest.raises(FloatingPointError, match="untouched"):
        trainer(model, on_nonfinite="raise").fit(x, y, batch_size=4, shuffle=False, verbose=0)
    # window 0 is finite and applied; window 1 raises before touching anything
    assert_close("weight", model.weight.detach()[0], expected_w, rtol=EXACT.rtol)


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()


def dropout_mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
    ).double()


@pytest.mark.parametrize("build", [mlp, dropout_mlp], ids=["mlp", "dropout"])
def test_state_dict_mid_window_resumes_bit_identically(build) -> None:
    # With Dropout, the checkpoint's RNG state makes the resumed masks the uninterrupted ones
    # (without it the weights differed by ~2e-2).
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(23, 4)), rng.integers(0, 3, size=23)

    def make() -> torchref.Trainer:
        model = build(5)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        return torchref.Trainer(model, "cross_entropy", optimizer, accumulation_steps=3, seed=9)

    reference = make()
    reference.fit(x, y, batch_size=4, epochs=3, verbose=0)

    class StopMidWindow:
        def on_micro_batch_end(self, trainer, epoch, micro_batch):
            if (epoch, micro_batch) == (1, 4):
                trainer.stop_training = True

    first = make()
    first.fit(x, y, batch_size=4, epochs=3, callbacks=[StopMidWindow()], verbose=0)
    assert first.accumulator.micro_batches == 2
    saved = first.state_dict()
    torch.rand(1000)  # whatever runs between saving and resuming moves the generator on
    resumed = make()
    resumed.load_state_dict(saved)
    with pytest.raises(InvalidArgumentError, match=r"num_examples=23.*Received: num_examples=22"):
        resumed.fit(x[:22], y[:22], batch_size=4, epochs=3, verbose=0)
    resumed.fit(x, y, batch_size=4, epochs=3, verbose=0)
    for a, b in zip(resumed.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_steps_count_updates(data) -> None:
    x, y, _, w = data
    model = linear_model(w, 0.3)  # float64 parameters, float32 inputs: cast like Keras does
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
    with pytest.raises(InvalidArgumentError, match="accumulation_steps=-1"):
        torchref.Trainer(model, "mse", sgd, accumulation_steps=-1)
    with pytest.raises(InvalidArgumentError, match="optimizer="):
        torchref.Trainer(model, "mse", "sgd")


def test_get_config_round_trips() -> None:
    model = mlp(0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    t = torchref.Trainer(
        model,
        "mse",
        sgd,
        accumulation_steps=2,
        regularizer=torchref.L1(0.5),
        proximal=torchref.ProximalL1(l1=0.01),
    )
    config = t.get_config()
    assert config["regularizer"] == {"class_name": "L1", "config": {"l1": 0.5}}
    assert torchref.Trainer(model, "mse", sgd, **config).get_config() == config


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


def test_nonfinite_raise_consumes_the_window_and_a_later_fit_continues(data) -> None:
    # Twin of tests/test_training.py's test of the same name: one rule in both frameworks.
    x, y, _, w = data
    bad = y.copy()
    bad[3] = np.nan  # poisons window 0 only
    model = linear_model(w, 0.3)
    t = trainer(model, on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="window is consumed"):
        t.fit(x, bad, batch_size=4, epochs=1, shuffle=False, verbose=0)
    history = t.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    # Only window 1 runs, from the untouched weights: nothing of the NaN window is carried over.
    expected_w, _ = numpy_sgd(x, y, np.ones(N), w, 0.3, epochs=1, windows=WINDOWS[1:])
    assert_close("weight", model.weight.detach()[0], expected_w, rtol=EXACT.rtol)
    idx = WINDOWS[1]
    expected_loss = np.mean((x[idx] @ w + 0.3 - y[idx, 0]) ** 2)
    assert [r["examples"] for r in history.records] == [7]
    assert_close("loss", history.records[0]["loss"], expected_loss, rtol=EXACT.rtol)


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
