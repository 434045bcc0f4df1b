"""How data reaches torchref.Trainer: DataLoaders, TensorDatasets, tensors, nested inputs (no
TensorFlow imported here). The reference is plain torch: one ``F.mse_loss`` step per window on
the concatenated window's examples."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torchref
from tfreg_core import InvalidArgumentError
from tfreg_harness import assert_close, tolerance

# float64: <= 1e-12 rel (the accumulation row of the tolerance table).
EXACT = tolerance("accumulation", "float64")
LR = 0.125
N = 19
WINDOWS = [slice(0, 12), slice(12, 19)]  # batch 4 x 3 steps: 4,4,4 | 4,3

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def mlp() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    ).double()


@pytest.fixture
def data() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(N, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(N, 2, generator=generator, dtype=torch.float64)
    return x, y


def one_step_per_window(x: torch.Tensor, y: torch.Tensor, *, epochs: int) -> torch.nn.Module:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(epochs):
        for window in WINDOWS:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x[window]), y[window]).backward()
            optimizer.step()
    return model


def trainer(model: torch.nn.Module, **kwargs) -> torchref.Trainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return torchref.Trainer(model, "mse", optimizer, accumulation_steps=3, **kwargs)


def assert_same_model(model: torch.nn.Module, reference: torch.nn.Module, rtol: float) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_close(name, a.detach().numpy(), b.detach().numpy(), rtol=rtol)


def test_dataloader_equals_one_torch_step_per_concatenated_window(data) -> None:
    x, y = data
    model = mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    history = trainer(model).fit(loader, epochs=2, verbose=0)
    assert [r["examples"] for r in history.records] == [12, 7, 12, 7]
    assert_same_model(model, one_step_per_window(x, y, epochs=2), EXACT.rtol)


def test_tensor_dataset_and_tensors_are_arrays(data) -> None:
    x, y = data
    by_dataset, by_tensors = mlp(), mlp()
    trainer(by_dataset).fit(TensorDataset(x, y), batch_size=4, epochs=2, verbose=0)  # shuffled
    trainer(by_tensors).fit(x, y, batch_size=4, epochs=2, verbose=0)
    for a, b in zip(by_dataset.parameters(), by_tensors.parameters(), strict=True):
        assert torch.equal(a, b)
    unshuffled = mlp()
    trainer(unshuffled).fit(TensorDataset(x, y), batch_size=4, shuffle=False, verbose=0)
    assert_same_model(unshuffled, one_step_per_window(x, y, epochs=1), EXACT.rtol)


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = mlp()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.cat([a, b], dim=-1))


@pytest.mark.parametrize("feed", ["dict-loader", "tuple-arrays"])
def test_multi_input_structures(data, feed) -> None:
    x, y = data
    model = TwoInputs()
    if feed == "dict-loader":
        rows = [({"a": x[i, :1], "b": x[i, 1:]}, y[i]) for i in range(N)]
        trainer(model).fit(DataLoader(rows, batch_size=4), verbose=0)  # forward(**dict)
    else:
        trainer(model).fit((x[:, :1], x[:, 1:]), y, batch_size=4, shuffle=False, verbose=0)
    assert_same_model(model.inner, one_step_per_window(x, y, epochs=1), EXACT.rtol)


def test_weighted_loader_elements(data) -> None:
    x, y = data
    w = torch.linspace(0.5, 2.0, N, dtype=torch.float64)
    by_loader, by_arrays = mlp(), mlp()
    trainer(by_loader).fit(DataLoader(TensorDataset(x, y, w), batch_size=4), verbose=0)
    trainer(by_arrays).fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0)
    for a, b in zip(by_loader.parameters(), by_arrays.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unsupported_data_is_refused_before_training(data) -> None:
    x, y = data

    class Examples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int):
            return x[i], y[i]

    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(model)
    with pytest.raises(InvalidArgumentError, match="pass DataLoader\\(dataset, batch_size"):
        t.fit(Examples(), verbose=0)
    with pytest.raises(InvalidArgumentError, match="batch_size=4"):
        t.fit(DataLoader(TensorDataset(x, y), batch_size=4), batch_size=4, verbose=0)
    with pytest.raises(InvalidArgumentError, match="TensorDataset of 1 tensors"):
        t.fit(TensorDataset(x), batch_size=4, verbose=0)
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)


def test_state_with_other_metrics_is_refused_at_load(data) -> None:
    x, _ = data
    labels = torch.zeros(N, 2, dtype=torch.float64)
    saved = trainer(mlp(), metrics=["binary_accuracy"])
    saved.fit(x, labels, batch_size=4, epochs=1, verbose=0)
    other = trainer(mlp(), metrics=["categorical_accuracy"])
    before = [p.detach().clone() for p in other.model.parameters()]
    with pytest.raises(InvalidArgumentError, match=r"metrics=\['binary_accuracy'\]\. Build"):
        other.load_state_dict(saved.state_dict())
    for a, b in zip(other.model.parameters(), before, strict=True):
        assert torch.equal(a, b)


def test_fit_to_an_epoch_already_reached_warns(data) -> None:
    x, y = data
    t = trainer(mlp())
    t.fit(x, y, batch_size=4, epochs=1, verbose=0)
    with pytest.warns(UserWarning, match="Nothing to train: the trainer is at epoch 1"):
        assert len(t.fit(x, y, batch_size=4, epochs=1, verbose=0)) == 0
