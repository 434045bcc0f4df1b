"""Sparsity parity: identical reports for transferred weights (counts exactly, norms to
round-off), after proximal L1 has produced exact zeros."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tfreg._compat import keras, tf
from tfreg_harness.compare import Comparison, compare
from tfreg_harness.keras_side.checks import register
from tfreg_harness.keras_side.devices import tf_device
from tfreg_harness.keras_side.models import build_cnn
from tfreg_harness.keras_side.seeding import seed_everything
from tfreg_harness.keras_side.transfer import transfer_weights
from tfreg_harness.tolerances import tolerance


def _reports(dtype: str, device: str) -> list[Comparison]:
    import tfreg
    import torchref

    pair = build_cnn(dtype=dtype, rng=seed_everything(13), device=device)
    # One large proximal step zeroes about a third of each kernel and leaves survivors just
    # above zero, so exact-zero and near-zero counts are both non-trivial.
    with tf.device(tf_device(device)):
        tfreg.apply_proximal_l1(pair.keras, l1=0.1, learning_rate=1.0)
    transfer_weights(pair.keras, pair.torch)
    kwargs: dict[str, Any] = {"rel": 0.05, "atol": 1e-3}
    ours, theirs = (
        tfreg.sparsity_report(pair.keras, **kwargs),
        torchref.sparsity_report(pair.torch, **kwargs),
    )
    norms = tolerance("sparsity_norms", dtype).rtol
    out = []
    for k, t in zip(ours.parameters, theirs.parameters, strict=True):
        counts = (
            np.array([t.size, t.zeros, t.near_zeros]),
            np.array([k.size, k.zeros, k.near_zeros]),
        )
        out.append(compare(f"{k.name} size/zeros/near-zeros", *counts, rtol=0.0))  # equal
        out.append(compare(f"{k.name} l1, l2", [t.l1, t.l2], [k.l1, k.l2], rtol=norms))
    if not 0 < ours.zeros < ours.near_zeros < ours.size:
        raise AssertionError(f"degenerate sparsity scenario: {ours.zeros=} {ours.near_zeros=}")
    return out


register("sparsity report: counts equal, norms (transferred CNN)", "sparsity")(_reports)


def _logistic(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(17)
    x = rng.standard_normal((120, 20))
    w = np.zeros(20)
    w[:4] = [2.0, -1.5, 1.0, -0.5]
    y = (x @ w + 0.5 * rng.standard_normal(120) > 0).astype(dtype)[:, None]
    return x.astype(dtype), y


def _proximal_trajectory(updates: int) -> Callable[[str, str], list[Comparison]]:
    def run(dtype: str, device: str) -> list[Comparison]:
        import torch

        import tfreg
        import torchref
        from tfreg_harness.architecture import Dense
        from tfreg_harness.keras_side.checks.training import (
            keras_weights,
            torch_weights_in_keras_layout,
        )
        from tfreg_harness.keras_side.models import build_pair

        x, y = _logistic(dtype)
        pair = build_pair(
            (Dense(1),), (x.shape[1],), dtype=dtype, rng=seed_everything(19), device=device
        )
        lr, l1 = 0.5, 0.02  # 0.5 is exact in float32, as Keras stores the learning rate
        fit: dict[str, Any] = {
            "batch_size": len(y),
            "epochs": updates,
            "shuffle": False,
            "verbose": 0,
        }
        with tf.device(tf_device(device)):
            tfreg.Trainer(
                pair.keras,
                keras.losses.BinaryCrossentropy(from_logits=True),
                keras.optimizers.SGD(lr),
                proximal=tfreg.ProximalL1(l1=l1),
            ).fit(x, y, **fit)
        torchref.Trainer(
            pair.torch,
            "binary_cross_entropy_with_logits",
            torch.optim.SGD(pair.torch.parameters(), lr=lr),
            proximal=torchref.ProximalL1(l1=l1),
        ).fit(x, y, **fit)
        ours, theirs = keras_weights(pair), torch_weights_in_keras_layout(pair)
        rtol = tolerance("trajectory", dtype).rtol
        out = [
            compare(f"after {updates} updates w{i}", t, k, rtol=rtol)
            for i, (t, k) in enumerate(zip(theirs, ours, strict=True))
        ]
        zeros = int(np.sum(ours[0] == 0))
        if not 0 < zeros < ours[0].size:
            raise AssertionError(f"proximal L1 produced {zeros} exact zeros of {ours[0].size}")
        if dtype == "float64":  # the claim: the *set* of exact zeros is identical
            out.append(
                compare(
                    "exact-zero set",
                    (theirs[0] == 0).astype(float),
                    (ours[0] == 0).astype(float),
                    rtol=0.0,
                )
            )
        return out

    return run


register("proximal L1 trajectory + zero set, 50 updates", "sparsity")(_proximal_trajectory(50))
register("proximal L1 trajectory + zero set, 200 updates", "sparsity", quick=False)(
    _proximal_trajectory(200)
)
