"""torchref.Trainer with torch loss modules as users build them (reduction="mean"), against
exactly ``loss_module(model(X_window), Y_window).backward(); optimizer.step()`` on each
concatenated window; ignore_index, class weights, target checks and training modes. No
TensorFlow imported here. The window whose every label is ignored is a case both twins share:
``test_trainer_loss_cases.py``.

Tolerance: the accumulated update against one step on the concatenated window, float64,
``tolerance("accumulation", "float64")`` (1e-12 rel): the two differ only in summation order.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchref
from tfreg_core import InvalidArgumentError
from tfreg_harness import assert_close, tolerance

EXACT = tolerance("accumulation", "float64")
LR = 0.1
N, D, C, T = 11, 4, 3, 5
BATCH = 2  # micro-batches 2,2,2,2,2,1: uneven windows and a short last one for k = 2, 3

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class PerTimestep(nn.Module):
    """(N, T, D) -> (N, C, T) logits, torch's layout for per-timestep class-index losses."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x).permute(0, 2, 1)


def dense(outputs: int, log_softmax: bool = False) -> nn.Module:
    layers = [nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, outputs)]
    return nn.Sequential(*layers, *([nn.LogSoftmax(-1)] if log_softmax else []))


def classes(rng: np.random.Generator, shape: tuple[int, ...], ignored: int = 0) -> np.ndarray:
    y = rng.integers(0, C, size=shape)
    y.reshape(-1)[rng.choice(y.size, size=ignored, replace=False)] = -100
    return y


def case(name: str, rng: np.random.Generator) -> tuple[nn.Module, nn.Module, np.ndarray, Any]:
    """(model, loss module, x, y) for one loss as a torch user builds it."""
    x = rng.normal(size=(N, D))
    real = rng.normal(size=(N, C))
    binary = rng.integers(0, 2, size=(N, C)).astype(np.float64)
    weight = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    probabilities = rng.dirichlet(np.ones(C), size=N)
    cases: dict[str, Callable[[], tuple[nn.Module, nn.Module, Any]]] = {
        "mse": lambda: (dense(C), nn.MSELoss(), real),
        "l1": lambda: (dense(C), nn.L1Loss(), real),
        "huber": lambda: (dense(C), nn.HuberLoss(delta=0.5), real),
        "smooth_l1": lambda: (dense(C), nn.SmoothL1Loss(beta=0.3), real),
        "bce_logits": lambda: (
            dense(C),
            nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)),
            binary,
        ),
        "kl_batchmean": lambda: (
            dense(C, True),
            nn.KLDivLoss(reduction="batchmean"),
            probabilities,
        ),
        "kl_mean": lambda: (dense(C, True), nn.KLDivLoss(), probabilities),
        "cross_entropy": lambda: (dense(C), nn.CrossEntropyLoss(), classes(rng, (N,))),
        "cross_entropy_weighted_smoothed_ignored": lambda: (
            dense(C),
            nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1),
            classes(rng, (N,), ignored=3),
        ),
        "cross_entropy_probabilities_weighted": lambda: (
            dense(C),
            nn.CrossEntropyLoss(weight=weight, label_smoothing=0.2),
            probabilities,
        ),
        "nll_weighted_ignore_1": lambda: (
            dense(C, True),
            nn.NLLLoss(weight=weight, ignore_index=1),
            rng.integers(0, C, size=N),
        ),
        "per_timestep_ignored": lambda: (
            PerTimestep(),
            nn.CrossEntropyLoss(weight=weight),
            classes(rng, (N, T), ignored=17),
        ),
    }
    model, loss, y = cases[name]()
    if name == "per_timestep_ignored":
        x = rng.normal(size=(N, T, D))
    return model.double(), loss, x, y


def window_reference(model, loss, x, y, *, k: int) -> nn.Module:
    """What the trainer must equal: one SGD step per concatenated window of k micro-batches."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for start in range(0, len(x), k * BATCH):
        window = slice(start, start + k * BATCH)
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # KLDivLoss(reduction="mean")'s advice
            loss(model(torch.as_tensor(x[window])), torch.as_tensor(y[window])).backward()
        opt.step()
    return model


LOSS_CASES = [
    "mse",
    "l1",
    "huber",
    "smooth_l1",
    "bce_logits",
    "kl_batchmean",
    "kl_mean",
    "cross_entropy",
    "cross_entropy_weighted_smoothed_ignored",
    "cross_entropy_probabilities_weighted",
    "nll_weighted_ignore_1",
    "per_timestep_ignored",
]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name", LOSS_CASES)
def test_mean_loss_module_equals_one_step_on_the_concatenated_window(name, k) -> None:
    model, loss, x, y = case(name, np.random.default_rng(3))
    expected = window_reference(model, loss, x, y, k=k)
    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=LR)
    history = torchref.Trainer(trained, loss, optimizer, accumulation_steps=k).fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
    )
    assert [r["examples"] for r in history.records][-1] == (N - 1) % (k * BATCH) + 1
    for (label, a), b in zip(trained.named_parameters(), expected.parameters(), strict=True):
        assert_close(label, a.detach(), b.detach(), rtol=EXACT.rtol)
    assert loss.reduction in ("mean", "batchmean")  # the user's module is left as built


def test_class_weight_denominator_is_the_sum_of_the_targets_weights() -> None:
    # Window 0 (k=2, batch 2): labels 0, 1, -100, 2 with weights (0.5, 2, 1.25): torch's mean
    # divides by 0.5 + 2 + 1.25 = 3.75, not by the 4 examples nor the 3 counted ones.
    weight = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    model = dense(C).double()
    x = np.random.default_rng(0).normal(size=(6, D))
    y = np.array([0, 1, -100, 2, 1, 1])
    loss = nn.CrossEntropyLoss(weight=weight)
    trainer = torchref.Trainer(
        model,
        loss,
        torch.optim.SGD(model.parameters(), lr=0.0),
        accumulation_steps=2,
    )
    history = trainer.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert [r["elements"] for r in history.records] == [3.75, 4.0]
    logits = model(torch.as_tensor(x[:4]))
    expected = loss(logits, torch.as_tensor(y[:4])).item()
    assert_close("data_loss", history.records[0]["data_loss"], expected, rtol=EXACT.rtol)


def test_cross_entropy_name_does_not_count_ignored_labels() -> None:
    # "cross_entropy" is nn.CrossEntropyLoss(): labels -100 are ignored and not counted.
    model = dense(C).double()
    x = np.random.default_rng(1).normal(size=(8, D))
    y = np.array([0, -100, 2, 1, -100, -100, 1, 0])
    expected = window_reference(model, nn.CrossEntropyLoss(), x[:8], y, k=4)
    trained = copy.deepcopy(model)
    history = torchref.Trainer(
        trained, "cross_entropy", torch.optim.SGD(trained.parameters(), lr=LR), accumulation_steps=4
    ).fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(trained.parameters(), expected.parameters(), strict=True):
        assert_close("param", a.detach(), b.detach(), rtol=EXACT.rtol)
    assert history.records[0]["elements"] == 5.0


def test_reduction_none_class_weights_follow_the_mean_definition() -> None:
    # reduction="none" leaves the denominator to the trainer: the module's own "mean" rule.
    weight = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    model, _, x, y = case("cross_entropy_weighted_smoothed_ignored", np.random.default_rng(3))
    mean = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    expected = window_reference(model, mean, x, y, k=3)
    none = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction="none")
    trained = copy.deepcopy(model)
    torchref.Trainer(
        trained, none, torch.optim.SGD(trained.parameters(), lr=LR), accumulation_steps=3
    ).fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(trained.parameters(), expected.parameters(), strict=True):
        assert_close("param", a.detach(), b.detach(), rtol=EXACT.rtol)


# ---------------------------------------------------------------------------------------------
# Clear errors before any update
# ---------------------------------------------------------------------------------------------


def untouched_after(make_fit: Callable[[nn.Module], None], match: str) -> None:
    model = dense(C).double()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match=match):
        make_fit(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("loss", ["cross_entropy", nn.CrossEntropyLoss(), nn.NLLLoss()])
def test_float_labels_for_a_class_index_loss_are_refused(loss) -> None:
    x = np.random.default_rng(4).normal(size=(6, D))
    y = np.array([0.0, 1.7, 2.0, 1.0, 0.2, 1.0])  # .long() would truncate 1.7 and 0.2

    def fit(model: nn.Module) -> None:
        torchref.Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=LR)).fit(
            x, y, batch_size=2, verbose=0
        )

    untouched_after(fit, r"y\.dtype=torch\.float64")


@pytest.mark.parametrize("loss", ["mse", nn.MSELoss(), nn.L1Loss()])
def test_targets_that_would_broadcast_are_refused(loss) -> None:
    x = np.random.default_rng(5).normal(size=(6, D))

    def fit(model: nn.Module) -> None:
        torchref.Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=LR)).fit(
            x, np.ones((6, 1)), batch_size=2, verbose=0
        )

    untouched_after(fit, r"y\.shape=\(2, 1\)")


def test_keras_names_expand_targets_without_the_unit_axis() -> None:
    # "mse" with (N,) targets on (N, 1) outputs: Keras expands y to (N, 1). Before, torch
    # broadcast (N, 1) - (N,) to (N, N) and trained on the wrong loss.
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(6, D)), rng.normal(size=6)
    model = dense(1).double()
    expected = window_reference(model, nn.MSELoss(), x[:6], y[:6, None], k=3)
    trained = copy.deepcopy(model)
    torchref.Trainer(
        trained, "mse", torch.optim.SGD(trained.parameters(), lr=LR), accumulation_steps=3
    ).fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(trained.parameters(), expected.parameters(), strict=True):
        assert_close("param", a.detach(), b.detach(), rtol=EXACT.rtol)


def test_optimizer_over_another_modules_parameters_is_refused() -> None:
    model, other = dense(C).double(), dense(C).double()
    with pytest.raises(InvalidArgumentError, match="optimizer=SGD"):
        torchref.Trainer(model, "cross_entropy", torch.optim.SGD(other.parameters(), lr=LR))
    # A subset of the model's parameters (fine-tuning the head) is fine.
    torchref.Trainer(model, "cross_entropy", torch.optim.SGD(model[2].parameters(), lr=LR))


def test_class_weights_must_be_non_negative() -> None:
    model = dense(C).double()
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match=r"loss\.weight="):
        torchref.Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=LR))


# ---------------------------------------------------------------------------------------------
# Training modes (the RNG state in checkpoints: tests/test_training_torch.py)
# ---------------------------------------------------------------------------------------------


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, C))


def test_frozen_batchnorm_stays_frozen_and_modes_are_restored() -> None:
    model = bn_model().double()
    model.train()
    model[1].eval()  # the user freezes the BatchNorm's statistics
    running = model[1].running_mean.clone()
    seen = []

    class Modes:
        def on_micro_batch_end(self, trainer, epoch, micro_batch):
            seen.append((trainer.model.training, trainer.model[1].training))

    x, y = np.random.default_rng(7).normal(size=(8, D)), np.arange(8) % C
    torchref.Trainer(
        model, "cross_entropy", torch.optim.SGD(model.parameters(), lr=LR), accumulation_steps=2
    ).fit(x, y, batch_size=2, epochs=2, callbacks=[Modes()], verbose=0)
    assert set(seen) == {(True, False)}
    assert torch.equal(model[1].running_mean, running)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]


def test_eval_model_trains_in_training_mode_and_is_restored_when_fit_raises() -> None:
    model = bn_model().double()
    model.eval()
    seen = []

    class Modes:
        def on_micro_batch_end(self, trainer, epoch, micro_batch):
            seen.append(trainer.model[2].training)

    x = np.random.default_rng(8).normal(size=(8, D))
    y = np.arange(8) % C
    y[5] = 7  # an out-of-range class: a stream's micro-batch 2 is refused (second window)
    trainer = torchref.Trainer(
        model, "cross_entropy", torch.optim.SGD(model.parameters(), lr=LR), accumulation_steps=2
    )
    stream = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    with pytest.raises(InvalidArgumentError, match="micro-batch 2 of epoch 0"):
        trainer.fit(stream, callbacks=[Modes()], verbose=0)
    assert seen == [True, True]
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("loss", ["cross_entropy", nn.CrossEntropyLoss()])
def test_no_host_reads_per_micro_batch(loss, monkeypatch) -> None:
    # Reads of tensor values (item, bool) happen per update, never per micro-batch: one
    # update of 8 micro-batches reads as often as one update of 16.
    reads = []
    for name in ("item", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_for(micro_batches: int) -> int:
        model = dense(C).double()
        x = np.random.default_rng(10).normal(size=(2 * micro_batches, D))
        trainer = torchref.Trainer(
            model,
            loss,
            torch.optim.SGD(model.parameters(), lr=LR),
            accumulation_steps=micro_batches,
        )
        reads.clear()
        trainer.fit(x, np.arange(2 * micro_batches) % C, batch_size=2, shuffle=False, verbose=0)
        return len(reads)

    assert reads_for(8) == reads_for(16)
