"""Proximal group lasso parity: tfreg.Trainer and torchref.Trainer follow the same trajectory to
the same exact zero groups, under SGD, SGD with momentum and Adam, with accumulation k in {1, 3}.

Set-up: an MLP 8 -> 6 -> 3 (tfreg_harness.keras_side.models.build_mlp: identical initial
weights), 48 examples whose class depends on the first 3 features only, micro-batches of 4,
about 60 updates.
The prox groups each kernel's *input* units: Keras kernel ``(in, out)`` ``axis=1``, torch
``Linear.weight (out, in)`` ``axis=0`` -- the same groups in the other layout. Adam is Keras'
``Adam`` against ``torchref.KerasAdamW`` (Keras' epsilon placement; torch's own Adam thresholds
differently, see ``tests/test_proximal.py``), with the default ``threshold="auto"``, i.e. the
preconditioned prox on both sides. Learning rates and momentum are float32 numbers on the torch
side (Keras keeps them as float32).

Tolerances: weights claim "trajectory" (float64 1e-9 rel: per-step round-off of two frameworks'
softmax-cross-entropy and reductions, amplified over 60 updates; float32 1e-3, realistic use).
Zero groups are asserted *identical* in both dtypes; float32 over 6 seeds (measured: the float32
kernels end ~1e-6 relative apart and no group sat within that of its threshold -- a flip would be
a real divergence to investigate, not noise).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import tfreg
import torchref
from tfreg.parity import seed_everything
from tfreg_harness import assert_close, tolerance
from tfreg_harness.keras_side.models import build_mlp
from tfreg_harness.keras_side.transfer import parameter_pairs, torch_to_numpy

N, FEATURES, HIDDEN, CLASSES, BATCH = 48, 8, 6, 3, 4
UPDATES = 60

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def f32(value: float) -> float:
    return float(np.float32(value))


# (Keras optimizer, torch optimizer, strength): strengths sized so that some, not all, groups die.
OPTIMIZERS = {
    "sgd": (
        lambda: keras.optimizers.SGD(0.1),
        lambda p: torch.optim.SGD(p, lr=f32(0.1)),
        0.16,
    ),
    "sgd-momentum": (
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=f32(0.05), momentum=f32(0.9)),
        0.3,
    ),
    "adam": (
        lambda: keras.optimizers.Adam(0.01),
        lambda p: torchref.KerasAdamW(p, lr=0.01),
        0.1,
    ),
}


def _data(rng: np.random.Generator, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((N, FEATURES))
    y = np.argmax(x[:, :3] @ rng.standard_normal((3, CLASSES)), axis=1)
    return x.astype(dtype), y


def _run(seed: int, dtype: str, optimizer: str, steps: int):
    rng = seed_everything(seed)
    keras_opt, torch_opt, strength = OPTIMIZERS[optimizer]
    pair = build_mlp(dtype=dtype, rng=rng, input_dim=FEATURES, hidden=(HIDDEN,), classes=CLASSES)
    x, y = _data(rng, dtype)
    epochs = UPDATES * BATCH * steps // N
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)
    tfreg.Trainer(
        pair.keras,
        loss,
        keras_opt(),
        accumulation_steps=steps,
        proximal=tfreg.ProximalGroupLasso(strength, axis=1),
    ).fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    torchref.Trainer(
        pair.torch,
        "cross_entropy",
        torch_opt(pair.torch.parameters()),
        accumulation_steps=steps,
        proximal=torchref.ProximalGroupLasso(strength, axis=0),
    ).fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    kernels = [
        (p.keras_variable.numpy(), p.to_keras(torch_to_numpy(p.torch_tensor)))
        for p in parameter_pairs(pair.keras, pair.torch)
        if p.trainable and len(p.keras_variable.shape) == 2
    ]
    return kernels


def _zero_rows(kernel: np.ndarray) -> list[int]:
    return np.flatnonzero(np.all(kernel == 0, axis=1)).tolist()


def _assert_same_zero_groups(kernels, label: str) -> int:
    zero = 0
    for i, (keras_kernel, torch_kernel) in enumerate(kernels):
        assert _zero_rows(keras_kernel) == _zero_rows(torch_kernel), f"{label} kernel {i}"
        zero += len(_zero_rows(keras_kernel))
    return zero


@pytest.mark.parametrize("steps", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_float64_trajectories_and_zero_groups(optimizer: str, steps: int) -> None:
    tol = tolerance("trajectory", "float64")  # 1e-9 rel: see the module docstring
    kernels = _run(0, "float64", optimizer, steps)
    for i, (keras_kernel, torch_kernel) in enumerate(kernels):
        assert_close(f"{optimizer} k={steps} kernel {i}", torch_kernel, keras_kernel, rtol=tol.rtol)
    zero = _assert_same_zero_groups(kernels, f"{optimizer} k={steps}")
    # Real structured sparsity: irrelevant inputs / dead hidden units, not every group.
    assert 0 < zero < FEATURES + HIDDEN


@pytest.mark.slow  # 6 seeds x 2 frameworks: ~5-20 s per case on 2 shared cores
@pytest.mark.parametrize("steps", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_float32_zero_groups_identical_over_six_seeds(optimizer: str, steps: int) -> None:
    tol = tolerance("trajectory", "float32")  # 1e-3 rel: realistic float32 use
    total = 0
    for seed in range(6):
        kernels = _run(seed, "float32", optimizer, steps)
        for i, (keras_kernel, torch_kernel) in enumerate(kernels):
            assert_close(f"seed {seed} kernel {i}", torch_kernel, keras_kernel, rtol=tol.rtol)
        total += _assert_same_zero_groups(kernels, f"{optimizer} k={steps} seed {seed}")
    assert total > 0
