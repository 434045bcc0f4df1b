"""Claim "accumulation": k micro-batches of b, accumulated, give the update of one batch of k*b.

References are *not* our own trainers: for TensorFlow it is Keras' ``model.fit`` with
``batch_size = k*b`` (its ``"sum_over_batch_size"`` loss on the concatenated batch, sample
weights included), for torch a plain one-batch ``backward(); step()``. The compared quantity is
the weight *change* (SGD with lr 1, so it is minus the summed gradients of the updates), the
rtol is relative to its largest entry (``tfreg_harness.compare``), and float64 claims round-off
only.

Also here: tfreg vs torchref on the same transferred MLP (claim "model_cross"), and BatchNorm
under accumulation, whose statistics are per micro-batch by design (pinned exactly).
"""

from __future__ import annotations

from itertools import pairwise

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import tfreg
import torchref
from tfreg_harness import assert_close, tolerance
from tfreg_harness.keras_side.devices import tf_device, torch_device
from tfreg_harness.keras_side.models import build_mlp
from tfreg_harness.keras_side.transfer import parameter_pairs, torch_to_numpy

CLASSES, FEATURES = 3, 6


pytestmark = pytest.mark.usefixtures("single_torch_thread")


class Case:
    def __init__(self, steps: int, batch: int, n: int, *, drop: bool = False) -> None:
        self.steps, self.batch, self.n, self.drop = steps, batch, n, drop

    @property
    def used(self) -> int:  # examples the run trains on
        window = self.steps * self.batch
        return (self.n // window) * window if self.drop else self.n


CASES = {
    "k1": Case(1, 5, 10),
    "k2": Case(2, 5, 20),
    "k3": Case(3, 5, 30),
    "k4": Case(4, 5, 40),
    # 17 = 4+4+4 | 4+1: uneven micro-batches and a short last window of 5, as its own update
    "uneven-short-window": Case(3, 4, 17),
    "drop-remainder": Case(3, 4, 17, drop=True),
}


@pytest.fixture
def floatx(dtype: str):
    # Keras' fit casts float inputs and builds its default loss in floatx: make it the run dtype.
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)
    yield
    keras.config.set_floatx(previous)


def _data(rng: np.random.Generator, n: int, dtype: str):
    x = rng.normal(size=(n, FEATURES)).astype(dtype)
    y = rng.integers(0, CLASSES, size=n)
    sw = rng.uniform(0.25, 2.0, size=n).astype(dtype)
    return x, y, sw


def _keras_loss(dtype: str) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_tfreg_accumulation_equals_keras_one_batch(rng, dtype, device, floatx, case) -> None:
    tol = tolerance("accumulation", dtype)
    pair = build_mlp(
        dtype=dtype, rng=rng, input_dim=FEATURES, hidden=(5,), classes=CLASSES, device=device
    )
    x, y, sw = _data(rng, case.n, dtype)
    before = [w.copy() for w in pair.keras.get_weights()]

    with tf.device(tf_device(device)):
        reference = keras.models.clone_model(pair.keras)
        reference.set_weights(before)
        reference.compile(keras.optimizers.SGD(1.0), _keras_loss(dtype))
        window = case.steps * case.batch
        reference.fit(
            x[: case.used], y[: case.used], sample_weight=sw[: case.used],
            batch_size=window, epochs=1, shuffle=False, verbose=0,
        )  # fmt: skip
        trainer = tfreg.Trainer(
            pair.keras,
            _keras_loss(dtype),
            keras.optimizers.SGD(1.0),
            accumulation_steps=case.steps,
            drop_remainder=case.drop,
        )
        trainer.fit(x, y, batch_size=case.batch, shuffle=False, sample_weight=sw, verbose=0)
    assert int(trainer.optimizer.iterations.numpy()) == int(reference.optimizer.iterations.numpy())
    for i, (ours, ref, w0) in enumerate(
        zip(pair.keras.get_weights(), reference.get_weights(), before, strict=True)
    ):
        report = assert_close(f"delta[{i}]", ours - w0, ref - w0, rtol=tol.rtol)
        assert report.max_rel <= tol.rtol, tol.why


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_torchref_accumulation_equals_torch_one_batch(rng, dtype, device, case) -> None:
    tol = tolerance("accumulation", dtype)
    pair = build_mlp(
        dtype=dtype, rng=rng, input_dim=FEATURES, hidden=(5,), classes=CLASSES, device=device
    )
    x, y, sw = _data(rng, case.n, dtype)
    model = pair.torch
    before = [p.detach().clone() for p in model.parameters()]

    reference = build_mlp(
        dtype=dtype, input_dim=FEATURES, hidden=(5,), classes=CLASSES, device=device
    ).torch
    reference.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(reference.parameters(), lr=1.0)
    window = case.steps * case.batch
    for start in range(0, case.used, window):
        xb, yb, wb = (
            torch.as_tensor(a[start : start + window], device=torch_device(device))
            for a in (x, y, sw)
        )
        sgd.zero_grad()
        per_example = torch.nn.functional.cross_entropy(reference(xb), yb, reduction="none")
        ((wb * per_example).sum() / len(xb)).backward()
        sgd.step()

    trainer = torchref.Trainer(
        model,
        "cross_entropy",
        torch.optim.SGD(model.parameters(), lr=1.0),
        accumulation_steps=case.steps,
        drop_remainder=case.drop,
    )
    trainer.fit(x, y, batch_size=case.batch, shuffle=False, sample_weight=sw, verbose=0)
    for i, (ours, ref, w0) in enumerate(
        zip(model.parameters(), reference.parameters(), before, strict=True)
    ):
        assert_close(
            f"delta[{i}]", (ours - w0).detach().cpu(), (ref - w0).detach().cpu(), rtol=tol.rtol
        )


def test_tfreg_and_torchref_agree_on_losses_and_updates(rng, dtype, device) -> None:
    tol = tolerance("model_cross", dtype)
    pair = build_mlp(
        dtype=dtype, rng=rng, input_dim=FEATURES, hidden=(5,), classes=CLASSES, device=device
    )
    x, y, sw = _data(rng, 17, dtype)
    pairs = parameter_pairs(pair.keras, pair.torch)
    before = [p.keras_variable.numpy().copy() for p in pairs]
    common = {
        "accumulation_steps": 3,
        "regularizer": None,
        "metrics": ["sparse_categorical_accuracy"],
    }
    with tf.device(tf_device(device)):
        tf_history = tfreg.Trainer(
            pair.keras, _keras_loss(dtype), keras.optimizers.SGD(1.0), **common
        ).fit(x, y, batch_size=4, epochs=2, sample_weight=sw, verbose=0)
    torch_history = torchref.Trainer(
        pair.torch, "cross_entropy", torch.optim.SGD(pair.torch.parameters(), lr=1.0), **common
    ).fit(x, y, batch_size=4, epochs=2, sample_weight=sw, verbose=0)
    assert_close(
        "per-update loss",
        np.array(tf_history.history["loss"]),
        np.array(torch_history.history["loss"]),
        rtol=tol.rtol,
    )
    assert tf_history.history["sparse_categorical_accuracy"] == pytest.approx(
        torch_history.history["sparse_categorical_accuracy"]
    )
    for p, w0 in zip(pairs, before, strict=True):
        torch_value = p.to_keras(torch_to_numpy(p.torch_tensor))
        assert_close(p.layer, p.keras_variable.numpy() - w0, torch_value - w0, rtol=tol.rtol)


def _bn_input_means(model: keras.Model, x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    kernel, bias = model.layers[0].get_weights()
    h = x @ kernel + bias
    return [h[a:b].mean(axis=0) for a, b in pairwise(np.cumsum([0, *sizes]))]


@pytest.mark.parametrize("framework", ["tfreg", "torchref"])
def test_batchnorm_statistics_are_per_micro_batch(rng, framework) -> None:
    """Documented: accumulation makes the gradient exact, not BatchNorm. Within a window the
    weights are fixed, so the moving mean after one update is the momentum-m average applied
    once per micro-batch, to each micro-batch's own mean -- and the update differs from the
    one-batch update (batch statistics of 4 are not those of 8)."""
    dtype = "float64"
    pair = build_mlp(
        dtype=dtype, rng=rng, input_dim=FEATURES, hidden=(5,), classes=CLASSES, batchnorm=True
    )
    x, y, _ = _data(rng, 8, dtype)
    means = _bn_input_means(pair.keras, x, [4, 4])
    m = 0.99  # Keras' momentum; torch's is 1 - m (set by the harness)
    moving0 = pair.keras.layers[1].moving_mean.numpy().copy()
    expected = m * (m * moving0 + (1 - m) * means[0]) + (1 - m) * means[1]

    if framework == "tfreg":
        one_batch = keras.models.clone_model(pair.keras)
        one_batch.set_weights(pair.keras.get_weights())
        tfreg.Trainer(one_batch, _keras_loss(dtype), keras.optimizers.SGD(1.0)).fit(
            x, y, batch_size=8, shuffle=False, verbose=0
        )
        tfreg.Trainer(
            pair.keras, _keras_loss(dtype), keras.optimizers.SGD(1.0), accumulation_steps=2
        ).fit(x, y, batch_size=4, shuffle=False, verbose=0)
        moving = pair.keras.layers[1].moving_mean.numpy()
        kernel, ref_kernel = pair.keras.get_weights()[0], one_batch.get_weights()[0]
    else:
        one_batch = build_mlp(
            dtype=dtype, input_dim=FEATURES, hidden=(5,), classes=CLASSES, batchnorm=True
        ).torch
        one_batch.load_state_dict(pair.torch.state_dict())
        torchref.Trainer(
            one_batch, "cross_entropy", torch.optim.SGD(one_batch.parameters(), lr=1.0)
        ).fit(x, y, batch_size=8, shuffle=False, verbose=0)
        torchref.Trainer(
            pair.torch,
            "cross_entropy",
            torch.optim.SGD(pair.torch.parameters(), lr=1.0),
            accumulation_steps=2,
        ).fit(x, y, batch_size=4, shuffle=False, verbose=0)
        moving = pair.torch[1].running_mean.numpy()
        kernel, ref_kernel = (
            pair.torch[0].weight.detach().numpy(),
            one_batch[0].weight.detach().numpy(),
        )

    assert_close("moving mean", moving, expected, rtol=tolerance("accumulation", dtype).rtol)
    # Not an accumulation error but BatchNorm's definition: the difference is far above round-off.
    gap = np.max(np.abs(kernel - ref_kernel)) / np.max(np.abs(ref_kernel))
    assert gap > 1e-6
