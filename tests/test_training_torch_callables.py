"""torchref.Trainer with the loss callables torch users write: ``F.cross_entropy`` and the other
``torch.nn.functional`` losses (and ``functools.partial`` of them), per-token callables declared
with ``torchref.per_element``, and opaque callables (refused before any update). The reference
is one plain torch step per concatenated window: ``loss(model(X_W), Y_W).backward();
optimizer.step()``. No TensorFlow imported here.

Tolerance: float64, ``tolerance("accumulation", "float64")`` (1e-12 rel, norm-wise) on the weight
change: the accumulated and the concatenated update differ only in summation order.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchref
from tfreg_core import InvalidArgumentError
from tfreg_harness import assert_close, compare, tolerance

EXACT = tolerance("accumulation", "float64")
VOCAB, WIDTH, T = 7, 8, 8
SIZES = [3, 1, 2, 4, 2, 2]  # k=4: windows 3+1+2+4 | 2+2 (uneven micro-batches, a short window)
K = 4

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class TinyGPT(nn.Module):
    """Token + position embedding, one causal single-head self-attention block, a head; logits
    as (N, VOCAB, T), torch's class-axis-second layout for per-token class-index losses."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(T, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1]))
        q, k, v = self.qkv(self.norm(h)).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.head(h).transpose(1, 2)


def lm_data() -> tuple[np.ndarray, np.ndarray]:
    """Next-token labels of sequences of lengths 2..8 padded to T, padding labelled -100."""
    rng = np.random.default_rng(17)
    n = sum(SIZES)
    tokens = rng.integers(0, VOCAB, size=(n, T + 1))
    labels = tokens[:, 1:].copy()
    lengths = rng.integers(1, T + 1, size=n)
    labels[np.arange(T)[None, :] >= lengths[:, None]] = -100
    return tokens[:, :T], labels


def micro_batches(*arrays: np.ndarray) -> list[tuple[torch.Tensor, ...]]:
    bounds = np.cumsum([0, *SIZES])
    return [tuple(torch.as_tensor(a[s:e]) for a in arrays) for s, e in itertools.pairwise(bounds)]


def plain_torch(model: nn.Module, loss: Callable[..., torch.Tensor], x, y) -> nn.Module:
    """One SGD (momentum) step per concatenated window of K micro-batches."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    bounds = [*np.cumsum([0, *SIZES])[::K].tolist(), len(x)]
    for start, end in itertools.pairwise(bounds):
        if start == end:
            continue
        opt.zero_grad()
        loss(model(torch.as_tensor(x[start:end])), torch.as_tensor(y[start:end])).backward()
        opt.step()
    return model


def trained(model: nn.Module, loss: Any, x, y) -> nn.Module:
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    torchref.Trainer(model, loss, opt, accumulation_steps=K).fit(
        micro_batches(x, y), epochs=1, verbose=0
    )
    return model


def weight_change(after: nn.Module, before: nn.Module) -> np.ndarray:
    return np.concatenate(
        [
            (a - b).detach().numpy().ravel()
            for a, b in zip(after.parameters(), before.parameters(), strict=True)
        ]
    )


def per_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def flattened_per_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The usual language-model idiom: (N*T, V) logits against (N*T,) labels.
    flat = logits.transpose(1, 2).reshape(-1, VOCAB)
    return F.cross_entropy(flat, labels.reshape(-1), reduction="none")


def padding_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return labels >= 0


CLASS_WEIGHT = torch.tensor([0.5, 2.0, 1.0, 1.5, 0.25, 1.0, 3.0], dtype=torch.float64)
GPT_LOSSES: dict[str, tuple[Any, Callable[..., torch.Tensor]]] = {
    # name: (what the user passes, the plain torch loss of the reference)
    "F.cross_entropy": (F.cross_entropy, F.cross_entropy),
    "nn.CrossEntropyLoss": (nn.CrossEntropyLoss(), F.cross_entropy),
    "per_element_ignore_index": (
        torchref.per_element(per_token, ignore_index=-100),
        F.cross_entropy,
    ),
    "per_element_flattened": (
        torchref.per_element(flattened_per_token, ignore_index=-100),
        F.cross_entropy,
    ),
    "per_element_mask": (torchref.per_element(per_token, mask=padding_mask), F.cross_entropy),
    "partial_weight_smoothing": (
        functools.partial(F.cross_entropy, weight=CLASS_WEIGHT, label_smoothing=0.1),
        functools.partial(F.cross_entropy, weight=CLASS_WEIGHT, label_smoothing=0.1),
    ),
    "partial_reduction_none": (
        functools.partial(F.cross_entropy, reduction="none", ignore_index=-100),
        F.cross_entropy,
    ),
}


@pytest.fixture(scope="module")
def gpt() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    return TinyGPT().double(), *lm_data()


@pytest.mark.parametrize("name", list(GPT_LOSSES))
def test_tiny_gpt_with_padded_labels_equals_one_step_on_the_window(gpt, name) -> None:
    # Before (measured here): F.cross_entropy and its partial trained the mean of micro-batch
    # means (0.14 rel off); a plain per-token callable divided by every token, padding
    # included (0.41 off). Now: exact, or refused unless declared with per_element.
    model, x, y = gpt
    loss, reference = GPT_LOSSES[name]
    assert (y != -100).sum() < y.size  # padding present: a per-token count must skip it
    expected = weight_change(plain_torch(model, reference, x, y), model)
    actual = weight_change(trained(model, loss, x, y), model)
    assert_close(name, actual, expected, rtol=EXACT.rtol)


@pytest.mark.parametrize(
    "loss, reference",
    [
        (F.mse_loss, F.mse_loss),
        (
            functools.partial(F.smooth_l1_loss, beta=0.3),
            functools.partial(F.smooth_l1_loss, beta=0.3),
        ),
        (functools.partial(F.huber_loss, delta=0.5), functools.partial(F.huber_loss, delta=0.5)),
        (F.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    ],
    ids=["mse_loss", "smooth_l1_beta", "huber_delta", "bce_with_logits"],
)
def test_functional_elementwise_losses_on_an_uneven_mlp(loss, reference) -> None:
    # Before: 0.10 (mse), 0.11, 0.10, 0.65 (bce) rel off: each micro-batch's mean weighed
    # as much as any other.
    rng = np.random.default_rng(3)
    n = sum(SIZES)
    x, y = rng.normal(size=(n, 4)), rng.integers(0, 2, size=(n, 2)).astype(np.float64)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    expected = weight_change(plain_torch(model, reference, x, y), model)
    actual = weight_change(trained(model, loss, x, y), model)
    assert_close("weight change", actual, expected, rtol=EXACT.rtol)


def test_mean_of_micro_batch_means_is_far_from_the_window(gpt) -> None:
    # The size of the bug the rows above fix, pinned: averaging F.cross_entropy's micro-batch
    # means (what the trainer did before) is 0.14 rel off the window's update here.
    model, x, y = gpt
    expected = weight_change(plain_torch(model, F.cross_entropy, x, y), model)

    def mean_of_means(batches: Sequence[tuple[torch.Tensor, ...]]) -> nn.Module:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        for start in range(0, len(batches), K):
            window = batches[start : start + K]
            opt.zero_grad()
            sum(F.cross_entropy(m(bx), by) for bx, by in window).backward()
            for p in m.parameters():
                p.grad /= len(window)
            opt.step()
        return m

    naive = weight_change(mean_of_means(micro_batches(x, y)), model)
    assert compare("naive", naive, expected, rtol=0.0).max_rel > 0.1


# ---------------------------------------------------------------------------------------------
# Refused before any update, with the way to fix it
# ---------------------------------------------------------------------------------------------


class BatchMeanModule(nn.Module):
    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(y_pred, y_true)


@pytest.mark.parametrize(
    "loss",
    [lambda p, t: F.cross_entropy(p, t), per_token, BatchMeanModule()],
    ids=["lambda", "per_token_function", "custom_module"],
)
def test_opaque_callables_are_refused_naming_per_element(gpt, loss) -> None:
    model = gpt[0]
    with pytest.raises(InvalidArgumentError, match=r"torchref\.per_element"):
        torchref.Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=0.1))


def refused_untouched(
    model: nn.Module, loss: Any, batches: Any, match: str, **options: Any
) -> None:
    """``fit`` raises ``match`` with the weights and the optimizer state untouched."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match=match):
        torchref.Trainer(model, loss, opt, accumulation_steps=K, **options).fit(
            batches, epochs=1, verbose=0
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not opt.state


def fit_untouched(loss: Any, gpt: Any, match: str) -> None:
    refused_untouched(copy.deepcopy(gpt[0]), loss, micro_batches(gpt[1], gpt[2]), match)


def test_per_element_callable_returning_a_mean_is_refused_before_any_update(gpt) -> None:
    fit_untouched(torchref.per_element(F.cross_entropy), gpt, "per-element values")


@pytest.mark.parametrize("counted", ["ignore_index", "mask"])
def test_per_element_values_laid_out_unlike_the_targets_are_refused(gpt, counted) -> None:
    # Time-major values (T, N) for (N, T) targets: before, any same-size shape was reshaped to
    # the values' and matched element by element in memory order, pairing each value with
    # another token's target (0.52 rel off on a small LM). Only flattened values are matched.
    def time_major(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_token(logits, labels).T

    options: dict[str, Any] = (
        {"ignore_index": -100} if counted == "ignore_index" else {"mask": padding_mask}
    )
    fit_untouched(torchref.per_element(time_major, **options), gpt, "must match")


def test_per_element_mask_of_another_shape_is_refused(gpt) -> None:
    def row_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return labels[:, 0] >= 0

    fit_untouched(torchref.per_element(per_token, mask=row_mask), gpt, "must match")


@pytest.mark.parametrize(
    "loss, match",
    [
        (functools.partial(F.cross_entropy, torch.zeros(2)), "keyword arguments only"),
        (functools.partial(F.mse_loss, weight=torch.ones(2)), "does not take"),
        (nn.CrossEntropyLoss(reduction="sum"), "reduction='sum' is not"),
        (functools.partial(F.cross_entropy, reduction="sum"), "reduction='sum' is not"),
    ],
    ids=["positional", "unknown_keyword", "module_sum", "functional_sum"],
)
def test_functional_losses_the_trainer_cannot_read_are_refused(gpt, loss, match) -> None:
    model = gpt[0]
    with pytest.raises(InvalidArgumentError, match=match):
        torchref.Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=0.1))


def test_per_element_arguments_are_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="ignore_index or mask"):
        torchref.per_element(per_token, ignore_index=-100, mask=padding_mask)
    with pytest.raises(InvalidArgumentError, match="ignore_index must be an int"):
        torchref.per_element(per_token, ignore_index=-100.0)
    with pytest.raises(InvalidArgumentError, match="callable"):
        torchref.per_element("cross_entropy")


class TwoHeads(nn.Module):
    """A trunk and two heads: class logits and one regression value, returned as a tuple."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 6)
        self.classes = nn.Linear(6, 3)
        self.value = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return self.classes(h), self.value(h)


def two_head_loss(outputs: Any, targets: Any) -> torch.Tensor:
    """Per example: cross-entropy of head 1 plus half the squared error of head 2."""
    (logits, value), (labels, target) = outputs, targets
    squared = F.mse_loss(value, target, reduction="none").squeeze(-1)
    return F.cross_entropy(logits, labels, reduction="none") + 0.5 * squared


def two_head_batches() -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    rng = np.random.default_rng(5)
    n = sum(SIZES)
    x, labels, target = rng.normal(size=(n, 5)), rng.integers(0, 3, size=n), rng.normal(size=(n, 1))
    return [(a, (b, c)) for a, b, c in micro_batches(x, labels, target)]


def test_multi_output_model_with_a_per_element_loss_equals_one_step_on_the_window() -> None:
    # Before: a tuple of targets crashed in torch.as_tensor ("only 0-dimensional arrays can be
    # converted to Python scalars"), before any update but from deep inside the trainer.
    model, batches = TwoHeads().double(), two_head_batches()
    ours = copy.deepcopy(model)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5, momentum=0.9)
    loss = torchref.per_element(two_head_loss)
    torchref.Trainer(ours, loss, opt, accumulation_steps=K).fit(batches, epochs=1, verbose=0)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    for start in range(0, len(batches), K):
        window = batches[start : start + K]
        x = torch.cat([b[0] for b in window])
        labels, target = (torch.cat([b[1][i] for b in window]) for i in (0, 1))
        logits, value = reference(x)
        ref_opt.zero_grad()
        (F.cross_entropy(logits, labels) + 0.5 * F.mse_loss(value, target)).backward()
        ref_opt.step()
    actual, expected = weight_change(ours, model), weight_change(reference, model)
    assert_close("two heads", actual, expected, rtol=EXACT.rtol)


@pytest.mark.parametrize(
    "loss, match",
    [
        (F.cross_entropy, "one prediction tensor and one target tensor"),
        ("mse", "one prediction tensor and one target tensor"),
        (torchref.per_element(two_head_loss, ignore_index=-100), "ignore_index"),
    ],
    ids=["functional", "name", "per_element_ignore_index"],
)
def test_structured_outputs_a_loss_cannot_read_are_refused_before_any_update(loss, match) -> None:
    refused_untouched(TwoHeads().double(), loss, two_head_batches(), match)


def test_metrics_on_a_multi_output_model_are_refused_before_any_update() -> None:
    refused_untouched(
        TwoHeads().double(),
        torchref.per_element(two_head_loss),
        two_head_batches(),
        r"metrics=.* read one prediction tensor",
        metrics=["sparse_categorical_accuracy"],
    )


def test_flattened_per_element_values_take_sample_weights_per_example(gpt) -> None:
    # Before: (N*T,) values against (N,) sample weights raised a RuntimeError from a broadcast
    # ("size of tensor a (24) must match ... (3)"). Flattened values are read back in the
    # targets' (N, T) layout, so each example's weight multiplies its tokens.
    model, x, y = gpt
    w = np.random.default_rng(3).uniform(0.5, 2.0, size=len(x))
    ours = copy.deepcopy(model)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5, momentum=0.9)
    loss = torchref.per_element(flattened_per_token, ignore_index=-100)
    torchref.Trainer(ours, loss, opt, accumulation_steps=K).fit(
        micro_batches(x, y, w), epochs=1, verbose=0
    )

    def weighted(rows: slice) -> Callable[..., torch.Tensor]:
        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            values = per_token(logits, labels) * torch.as_tensor(w[rows])[:, None]
            return values.sum() / (labels != -100).sum()

        return loss_fn

    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    bounds = [*np.cumsum([0, *SIZES])[::K].tolist(), len(x)]
    for start, end in itertools.pairwise(bounds):
        if start < end:
            ref_opt.zero_grad()
            rows = slice(start, end)
            weighted(rows)(reference(torch.as_tensor(x[rows])), torch.as_tensor(y[rows])).backward()
            ref_opt.step()
    expected, actual = weight_change(reference, model), weight_change(ours, model)
    assert_close("flattened, weighted", actual, expected, rtol=EXACT.rtol)


def test_sample_weights_for_values_without_a_batch_axis_are_refused(gpt) -> None:
    model, x, y = gpt
    w = np.full(len(x), 2.0)
    batches = micro_batches(x, y, w)
    refused_untouched(
        copy.deepcopy(model), torchref.per_element(flattened_per_token), batches, "sample_weight"
    )
