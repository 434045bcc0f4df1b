"""Parameters as torch sees them in torchref.Trainer: a parameter no gradient reached in a window
keeps ``.grad`` None (the optimizer skips it: no momentum, no decoupled decay), and freezing /
unfreezing between updates behaves as in a plain torch loop doing the same. The reference is
that plain loop: ``zero_grad(set_to_none=True)``, one step per concatenated window, the same
``requires_grad`` changes after the same updates. No TensorFlow imported here.

Tolerance: float64, ``tolerance("accumulation", "float64")`` (1e-12 rel): accumulated and
concatenated windows differ only in summation order. Parameters the step must not touch are
compared bitwise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchref
from tfreg_harness import assert_close, tolerance

EXACT = tolerance("accumulation", "float64")
N, D, BATCH, K, EPOCHS = 12, 3, 2, 2, 2  # windows of 4 examples: 3 updates per epoch

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class TwoHeads(nn.Module):
    """A body and two heads; ``forward`` uses only ``head`` (``unused`` is a head trained on
    another task, or one the user forgot)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(D, 5)
        self.head = nn.Linear(5, 1)
        self.unused = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def schedule(model: TwoHeads, update: int) -> None:
    """After update 0 the body's kernel is frozen; after update 2 it and the body's bias (frozen
    before the trainer was built) are unfrozen: the fine-tuning recipes users write."""
    if update == 0:
        model.body.weight.requires_grad_(False)
    if update == 2:
        model.body.weight.requires_grad_(True)
        model.body.bias.requires_grad_(True)


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum_coupled_decay": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, weight_decay=0.05
    ),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.normal(size=(N, D)), rng.normal(size=(N, 1))


def fresh() -> TwoHeads:
    model = TwoHeads().double()
    model.body.bias.requires_grad_(False)
    return model


def plain_loop(optimizer: str, regularizer: Any = None) -> TwoHeads:
    model = fresh()
    opt = OPTIMIZERS[optimizer](model.parameters())
    x, y = data()
    update = 0
    for _ in range(EPOCHS):
        for start in range(0, N, K * BATCH):
            opt.zero_grad(set_to_none=True)
            window = slice(start, start + K * BATCH)
            loss = F.mse_loss(model(torch.as_tensor(x[window])), torch.as_tensor(y[window]))
            if regularizer is not None:
                loss = loss + torchref.penalty(model, regularizer)
            loss.backward()
            opt.step()
            schedule(model, update)
            update += 1
    return model


class Schedule:
    def __init__(self) -> None:
        self.updates = 0

    def on_update_end(self, trainer: torchref.Trainer, record: dict[str, Any]) -> None:
        schedule(trainer.model, self.updates)
        self.updates += 1


def trained(optimizer: str, regularizer: Any = None) -> TwoHeads:
    model = fresh()
    trainer = torchref.Trainer(
        model,
        "mse",
        OPTIMIZERS[optimizer](model.parameters()),
        accumulation_steps=K,
        regularizer=regularizer,
    )
    x, y = data()
    trainer.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, callbacks=[Schedule()], verbose=0
    )
    return model


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_unused_frozen_and_unfrozen_parameters_follow_a_plain_torch_loop(optimizer) -> None:
    # Before: the unused head was moved by decay/momentum (its .grad a zero sum, not None),
    # a parameter frozen after the trainer was built kept being stepped, and the bias frozen
    # before it was built, once unfrozen, was stepped with .grad summed over every update.
    expected, actual = plain_loop(optimizer), trained(optimizer)
    untouched = fresh()
    assert torch.equal(actual.unused.weight, untouched.unused.weight)
    assert torch.equal(actual.unused.bias, untouched.unused.bias)
    for (name, a), b in zip(actual.named_parameters(), expected.parameters(), strict=True):
        assert_close(name, a.detach(), b.detach(), rtol=EXACT.rtol)
    assert all(p.grad is None for p in actual.parameters())


def test_frozen_parameter_stays_bitwise_while_frozen() -> None:
    # AdamW moves a parameter with a zero gradient (decay and the old moments); torch skips one
    # whose .grad is None. Frozen after update 0, the kernel must not move until unfrozen.
    model = fresh()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    seen: list[torch.Tensor] = []

    class Watch(Schedule):
        def on_update_end(self, trainer: torchref.Trainer, record: dict[str, Any]) -> None:
            super().on_update_end(trainer, record)
            seen.append(trainer.model.body.weight.detach().clone())

    x, y = data()
    torchref.Trainer(model, "mse", opt, accumulation_steps=K).fit(
        x, y, batch_size=BATCH, epochs=2, shuffle=False, callbacks=[Watch()], verbose=0
    )
    assert torch.equal(seen[0], seen[1])  # updates 1 and 2: frozen
    assert torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3])  # unfrozen after update 2


def test_a_checkpoint_mid_window_keeps_which_parameters_were_reached() -> None:
    # Saved after the first micro-batch of a window; resumed, the unused head must stay None
    # and the reached ones keep their partial sums (not be overwritten by the next gradient).
    x, y = data()
    reference = trained("adamw")
    model = fresh()
    opt = OPTIMIZERS["adamw"](model.parameters())
    trainer = torchref.Trainer(model, "mse", opt, accumulation_steps=K)
    states: list[dict[str, Any]] = []

    class Save(Schedule):
        def on_micro_batch_end(self, trainer: torchref.Trainer, epoch: int, mb: int) -> None:
            if epoch == 1 and mb == 2:
                states.append(copy.deepcopy(trainer.state_dict()))
                trainer.stop_training = True

    save = Save()
    trainer.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, callbacks=[save], verbose=0)
    assert states[0]["window"]["touched"][-2:] == [False, False]  # the unused head
    resumed = fresh()
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        p.requires_grad_(q.requires_grad)
    rest = torchref.Trainer(
        resumed, "mse", OPTIMIZERS["adamw"](resumed.parameters()), accumulation_steps=K
    )
    rest.load_state_dict(states[0])
    again = Schedule()
    again.updates = save.updates
    rest.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, callbacks=[again], verbose=0)
    for (name, a), b in zip(resumed.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_penalty_reaches_the_unused_heads_kernel_as_in_plain_torch() -> None:
    # loss + L2 penalty: the unused head's kernel gets the penalty's gradient (and is stepped),
    # its bias (not penalized) none; the frozen kernel none while frozen.
    expected, actual = plain_loop("adamw", torchref.L2(0.01)), trained("adamw", torchref.L2(0.01))
    untouched = fresh()
    assert torch.equal(actual.unused.bias, untouched.unused.bias)
    assert not torch.equal(actual.unused.weight, untouched.unused.weight)
    for (name, a), b in zip(actual.named_parameters(), expected.parameters(), strict=True):
        assert_close(name, a.detach(), b.detach(), rtol=EXACT.rtol)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_a_sparse_embedding_gradient_trains_as_in_a_plain_loop(accumulation_steps: int) -> None:
    # Before: nn.Embedding(sparse=True) failed at its first micro-batch with torch's "copy_()
    # between dense and sparse Tensors is not implemented".
    rng = np.random.default_rng(3)
    ids, targets = rng.integers(0, 6, size=(8, 3)), rng.normal(size=(8, 3, 2))

    def embedding() -> nn.Embedding:
        torch.manual_seed(2)
        return nn.Embedding(6, 2, sparse=True).double()

    model, expected = embedding(), embedding()
    trainer = torchref.Trainer(
        model,
        "mse",
        torch.optim.SGD(model.parameters(), lr=0.1),
        accumulation_steps=accumulation_steps,
    )
    trainer.fit(ids, targets, batch_size=2, epochs=2, shuffle=False, verbose=0)
    opt = torch.optim.SGD(expected.parameters(), lr=0.1)
    window = 2 * accumulation_steps
    for _ in range(2):
        for start in range(0, 8, window):
            opt.zero_grad(set_to_none=True)
            rows = slice(start, start + window)
            out = expected(torch.as_tensor(ids[rows]))
            F.mse_loss(out, torch.as_tensor(targets[rows])).backward()
            opt.step()
    assert_close("embedding", model.weight.detach(), expected.weight.detach(), rtol=EXACT.rtol)
