"""Mixed precision in torchref.Trainer: ``autocast="bfloat16"`` / ``"float16"`` (float32 master
weights and accumulators; float16 with dynamic loss scaling once per window, torch.amp.
GradScaler's rule), checkpointed; ``fit`` inside a user's ``torch.autocast`` refused. References:
a plain torch loop with ``torch.autocast`` around the forward of each concatenated window (and
``torch.amp.GradScaler`` for float16). No TensorFlow imported here.

Tolerances (float32 master weights; norm-wise rel on the weight change):
- one micro-batch per window (k=1), any count N of counted elements: bitwise. The trainer
  back-propagates ``scale / N * sum`` (scale 1 for bfloat16) where the loop back-propagates
  ``scale * mean``: the same float32 values, so every low-precision rounding is the same.
- k > 1: each micro-batch's weight gradient leaves its low-precision matmul rounded (unit
  roundoff u = 2^-9 for bfloat16, 2^-11 for float16) before the float32 sum; the loop rounds
  the window's once. Per update that is at most (k + 1) u of the gradient: bfloat16, k = 4:
  5 * 2^-9 ~ 1e-2 (measured 5.6e-3 after 5 updates), bound 2e-2; float16, k = 4:
  5 * 2^-11 ~ 2.4e-3 (measured 3.2e-4), bound 2.4e-3.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchref
from tfreg_core import InvalidArgumentError
from tfreg_harness import assert_close, compare

N, D, C, WINDOW = 40, 8, 3, 8
BF16_K4_BOUND = 2e-2  # 2 x (k + 1) * 2^-9, k = 4 (see the module docstring)
FP16_K4_BOUND = 5 * 2.0**-11  # (k + 1) * 2^-11, k = 4

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def change(model: nn.Module, base: nn.Module) -> np.ndarray:
    return torch.cat(
        [
            (p - q).detach().ravel()
            for p, q in zip(model.parameters(), base.parameters(), strict=True)
        ]
    ).numpy()


# ---------------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = rng.integers(0, C, size=N)
    y[[1, 2, 3, 9, 10, 17]] = -100  # unevenly ignored: a per-micro-batch mean would be far off
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C)), x, y


def autocast_loop(base: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    model = copy.deepcopy(base)
    opt = sgd(model)
    for _ in range(epochs):
        for s in range(0, N, WINDOW):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(torch.as_tensor(x[s : s + WINDOW]))
            F.cross_entropy(out.float(), torch.as_tensor(y[s : s + WINDOW])).backward()
            opt.step()
    return model


def bf16_trained(base: nn.Module, x, y, *, k: int, epochs: int, autocast: Any) -> nn.Module:
    model = copy.deepcopy(base)
    torchref.Trainer(
        model, "cross_entropy", sgd(model), accumulation_steps=k, autocast=autocast
    ).fit(x, y, batch_size=WINDOW // k, epochs=epochs, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("autocast", ["bfloat16", torch.bfloat16])
def test_bfloat16_one_micro_batch_per_window_is_the_autocast_loop_bitwise(
    classifier, autocast
) -> None:
    # Before: fit inside the user's torch.autocast reused the weights' bf16 copies cached at
    # the first forward: 1.37 rel off after 10 updates, the losses repeating every epoch.
    base, x, y = classifier
    y = np.where(y < 0, 0, y)  # every label counts: 8 per window, a power of two (docstring)
    expected = autocast_loop(base, x, y, epochs=2)
    actual = bf16_trained(base, x, y, k=1, epochs=2, autocast=autocast)
    assert np.array_equal(change(actual, base), change(expected, base))
    assert all(p.dtype == torch.float32 for p in actual.parameters())  # master weights


def test_bfloat16_one_micro_batch_per_window_is_bitwise_with_any_count(classifier) -> None:
    # Windows of 5, 6, 8, 7, 8 counted labels (-100 ignored): before, the trainer back-propagated
    # the window's sum and divided in float32 afterwards, where the loop back-propagates the
    # mean, so every bf16 rounding fell elsewhere: 3.1e-3 rel off after 10 updates, 4.7e-3 on
    # an Embedding + LayerNorm LM, over the (k + 1) * 2^-9 = 3.9e-3 the docstring promised.
    base, x, y = classifier
    expected = autocast_loop(base, x, y, epochs=2)
    actual = bf16_trained(base, x, y, k=1, epochs=2, autocast="bfloat16")
    assert np.array_equal(change(actual, base), change(expected, base))


def test_bfloat16_accumulated_window_is_within_the_rounding_bound(classifier) -> None:
    base, x, y = classifier
    expected = change(autocast_loop(base, x, y, epochs=1), base)
    actual = change(bf16_trained(base, x, y, k=4, epochs=1, autocast="bfloat16"), base)
    assert_close("bf16 k=4, 5 updates", actual, expected, rtol=BF16_K4_BOUND)


def test_fit_inside_a_users_autocast_is_refused_before_any_update(classifier) -> None:
    base, x, y = classifier
    model = copy.deepcopy(base)
    opt = sgd(model)
    trainer = torchref.Trainer(model, "cross_entropy", opt)
    with (
        pytest.raises(InvalidArgumentError, match=r"autocast=torch\.bfloat16"),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        trainer.fit(x, y, batch_size=8, verbose=0)
    assert np.array_equal(change(model, base), np.zeros_like(change(model, base)))
    assert not opt.state


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"autocast": "float8"}, "autocast must be"),
        ({"autocast": "bfloat16", "grad_scaler": torch.amp.GradScaler("cpu")}, "grad_scaler"),
        ({"grad_scaler": torch.amp.GradScaler("cpu")}, "grad_scaler"),
        ({"autocast": "float16", "grad_scaler": "dynamic"}, "torch.amp.GradScaler"),
        ({"autocast": "float16", "on_nonfinite": "raise"}, "on_nonfinite='raise'"),
    ],
)
def test_mixed_precision_options_are_checked(classifier, kwargs, match) -> None:
    model = copy.deepcopy(classifier[0])
    with pytest.raises(InvalidArgumentError, match=match):
        torchref.Trainer(model, "cross_entropy", sgd(model), **kwargs)


def test_autocast_needs_float32_master_weights(classifier) -> None:
    model = copy.deepcopy(classifier[0]).double()
    with pytest.raises(InvalidArgumentError, match="must be float32"):
        torchref.Trainer(model, "cross_entropy", sgd(model), autocast="bfloat16")


def test_get_config_round_trips_autocast(classifier) -> None:
    model = copy.deepcopy(classifier[0])
    config = torchref.Trainer(model, "cross_entropy", sgd(model), autocast="bfloat16").get_config()
    assert config["autocast"] == "bfloat16"
    assert torchref.Trainer(model, "cross_entropy", sgd(model), **config).get_config() == config


# ---------------------------------------------------------------------------------------------
# float16: loss scaling once per window, as torch.amp.GradScaler
# ---------------------------------------------------------------------------------------------

FP16_N = 64


@pytest.fixture(scope="module")
def regression() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    # Targets ~1000: at scale 2^16, float16 gradients of the outputs overflow; inputs ~0.01 and
    # no bias keep the batch sums of the weight gradient below the per-example values, so the
    # overflow is decided per example and the same windows overflow however they are split.
    rng = np.random.default_rng(0)
    x = (0.01 * rng.normal(size=(FP16_N, 4))).astype(np.float32)
    y = (300 * rng.normal(size=(FP16_N, 1)) + 1000).astype(np.float32)
    torch.manual_seed(0)
    return nn.Linear(4, 1, bias=False), x, y


def scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)


def grad_scaler_loop(base: nn.Module, x, y) -> tuple[nn.Module, list[float], list[bool]]:
    model, scales, skipped = copy.deepcopy(base), [], []
    opt, gs = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), scaler()
    for _ in range(2):
        for s in range(0, FP16_N, WINDOW):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(torch.as_tensor(x[s : s + WINDOW]))
            before = model.weight.detach().clone()
            gs.scale(F.mse_loss(out.float(), torch.as_tensor(y[s : s + WINDOW]))).backward()
            gs.step(opt)
            gs.update()
            skipped.append(torch.equal(before, model.weight))
            scales.append(gs.get_scale())
    return model, scales, skipped


class Scales:
    def __init__(self) -> None:
        self.scales: list[float] = []
        self.first: list[Any] = []

    def on_update_end(self, trainer: torchref.Trainer, record: dict[str, Any]) -> None:
        self.scales.append(trainer.state_dict()["loss_scale"]["scale"])
        if not self.first:
            self.first = [p.detach().clone() for p in trainer.model.parameters()]
            self.first.append(dict(trainer.optimizer.state))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_float16_skips_and_scales_as_grad_scaler_once_per_window(regression, k) -> None:
    # Before: float16 autocast trained with no loss scaling at all.
    base, x, y = regression
    expected, scales, skipped = grad_scaler_loop(base, x, y)
    assert skipped[:8] == [True] * 8 and not all(skipped)  # 2^16 -> 2^8 before a first step
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = Scales()
    history = torchref.Trainer(
        model, "mse", opt, accumulation_steps=k, autocast="float16", grad_scaler=scaler()
    ).fit(x, y, batch_size=WINDOW // k, epochs=2, shuffle=False, callbacks=[seen], verbose=0)
    assert [r["skipped"] for r in history.records] == skipped
    assert seen.scales == scales
    # The overflowing first window changed neither the weights nor the optimizer state.
    assert torch.equal(seen.first[0], base.weight) and seen.first[1] == {}
    actual, reference = change(model, base), change(expected, base)
    if k == 1:
        assert np.array_equal(actual, reference)
    else:
        assert_close(f"float16 k={k}", actual, reference, rtol=FP16_K4_BOUND)


def test_loss_scale_is_checkpointed_and_resumed(regression) -> None:
    base, x, y = regression

    def make(model: nn.Module) -> torchref.Trainer:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return torchref.Trainer(
            model, "mse", opt, accumulation_steps=2, autocast="float16", grad_scaler=scaler()
        )

    whole = copy.deepcopy(base)
    make(whole).fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    first = make(copy.deepcopy(base))
    first.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    state = first.state_dict()
    assert state["loss_scale"]["scale"] < 2.0**16  # it backed off
    resumed_model = copy.deepcopy(base)
    resumed = make(resumed_model)
    resumed.load_state_dict(state)
    resumed.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert compare("resumed", change(resumed_model, base), change(whole, base), rtol=0).passed


def test_bfloat16_mid_window_checkpoint_resumes_bitwise(classifier) -> None:
    # The window's unit (1 / u scales each bf16 backward) is part of the checkpoint: a resumed
    # window divides its sums by the unit its first micro-batches were scaled with.
    base, x, y = classifier

    def make(model: nn.Module) -> torchref.Trainer:
        return torchref.Trainer(
            model, "cross_entropy", sgd(model), accumulation_steps=4, autocast="bfloat16"
        )

    class StopMidWindow:
        def on_micro_batch_end(self, trainer: Any, epoch: int, micro_batch: int) -> None:
            if micro_batch == 5:
                trainer.stop_training = True

    whole = copy.deepcopy(base)
    make(whole).fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    first = make(copy.deepcopy(base))
    first.fit(x, y, batch_size=2, epochs=1, shuffle=False, callbacks=[StopMidWindow()], verbose=0)
    assert first.accumulator.micro_batches == 2
    resumed_model = copy.deepcopy(base)
    resumed = make(resumed_model)
    resumed.load_state_dict(first.state_dict())
    resumed.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert np.array_equal(change(resumed_model, base), change(whole, base))
