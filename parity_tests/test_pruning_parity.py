"""``tfreg.prune`` and ``torchref.prune`` on the same transferred seed CNN: same units removed
(although Keras flattens NHWC and torch NCHW), same outputs, same parameter counts.

Tolerances (float64): each pruned model against its own original <= 1e-12 relative (pruning
only reorders float sums); pruned Keras against pruned torch <= the transferred-model forward
tolerance (``model_cross``, 1e-10: different kernels, same arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch

import tfreg
import torchref
from tfreg_harness import tolerance
from tfreg_harness.architecture import cnn_spec
from tfreg_harness.keras_side.architecture import build_model as build_keras
from tfreg_harness.keras_side.transfer import transfer_weights
from tfreg_harness.layouts import to_channels_first
from tfreg_harness.torch_side.architecture import build_model as build_torch


def _rel(a: np.ndarray, e: np.ndarray) -> float:
    return float(np.max(np.abs(a - e)) / np.max(np.abs(e)))


def test_pruning_the_transferred_seed_cnn_agrees_across_frameworks() -> None:
    # conv(8, same) relu maxpool conv(16, same) relu flatten(4x4x16) dense(64) relu dense(10)
    spec = cnn_spec(filters=(8, 16), dense=64, classes=10)
    keras_model = build_keras(spec, (8, 8, 1), dtype="float64")
    torch_model = build_torch(spec, (8, 8, 1), dtype="float64").eval()
    rng = np.random.default_rng(0)
    conv1, _, _, conv2, _, _, dense, _, out = keras_model.layers
    k1, b1 = conv1.get_weights()
    k1[..., 3], b1[3] = 0.0, 0.0  # zero filter and bias: relu(0) = 0 passes "same" padding
    conv1.set_weights([k1, b1])
    k2, b2 = conv2.get_weights()
    k2[..., 7], b2[7] = 0.0, 0.5  # constant 0.5 after relu: folds exactly through Flatten
    conv2.set_weights([k2, b2])
    kd, bd = dense.get_weights()
    kd[np.arange(256) % 16 == 5, :] = 0.0  # NHWC rows of filter 5: it feeds nothing
    kd[:, 10], bd[10] = 0.0, 0.0
    dense.set_weights([kd, bd])
    ko, bo = out.get_weights()
    ko[20, :] = 0.0
    out.set_weights([ko, bo])
    transfer_weights(keras_model, torch_model)

    pruned = {"tfreg": tfreg.prune(keras_model), "torchref": torchref.prune(torch_model)}
    everything_but = [
        np.setdiff1d(np.arange(n), drop) for n, drop in ((8, 3), (16, [5, 7]), (64, [10, 20]))
    ]
    for result in pruned.values():
        kept = list(result.kept.values())
        for actual, expected in zip(kept, [*everything_but, np.arange(10)], strict=True):
            np.testing.assert_array_equal(actual, expected)
        before = 8 * 9 + 8 + 16 * 9 * 8 + 16 + 256 * 64 + 64 + 64 * 10 + 10
        after = 7 * 9 + 7 + 14 * 9 * 7 + 14 + 224 * 62 + 62 + 62 * 10 + 10
        assert (result.params_before, result.params_after) == (before, after)

    x = rng.normal(size=(6, 8, 8, 1))
    keras_before = np.asarray(keras_model(x))
    keras_after = np.asarray(pruned["tfreg"].model(x))
    x_nchw = torch.as_tensor(to_channels_first(x))
    with torch.no_grad():
        torch_before = torch_model(x_nchw).numpy()
        torch_after = pruned["torchref"].model(x_nchw).numpy()
    assert _rel(keras_after, keras_before) <= 1e-12
    assert _rel(torch_after, torch_before) <= 1e-12
    assert _rel(torch_after, keras_after) <= tolerance("model_cross", "float64").rtol
