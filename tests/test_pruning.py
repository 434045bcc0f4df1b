"""``prune(model)`` in both frameworks: outputs unchanged, hand-counted sizes, refusals.

Tolerance: float64 outputs within 1e-12 relative (norm-wise, ``max|a-e| / max|e|``). Pruning
removes exact zeros, or folds a constant unit's ``a * W[j]`` into the next bias (added once
instead of inside the sum): only the order of the float64 sums changes, a few ulps (measured
<= 2e-15). A wrong index (an NHWC/NCHW flatten mix-up, a BN channel sliced with the wrong unit)
changes outputs by O(1).

Every index set and parameter count below is worked out by hand from the zeros each test plants.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tfreg
import torchref
from tfreg._compat import keras

RTOL = 1e-12
nn = torch.nn


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert error <= RTOL, error


# ---------------------------------------------------------------- an MLP: all three rules
def _mlp_weights() -> list[np.ndarray]:
    """Dense 4 -> 5 (relu) -> 3, Keras layout. Planted: input 2 has zero rows (removable with
    inputs=True); unit 1 has zero incoming weights and bias 0.7 (relu(0.7) = 0.7 folds into the
    next bias); unit 3 has zero outgoing weights."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(4, 5)), rng.normal(size=5)
    w2, b2 = rng.normal(size=(5, 3)), rng.normal(size=3)
    w1[2, :] = 0.0
    w1[:, 1], b1[1] = 0.0, 0.7
    w2[3, :] = 0.0
    return [w1, b1, w2, b2]


def _keras_mlp(weights: list[np.ndarray]) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, activation="relu", dtype="float64", name="hidden"),
            keras.layers.Dense(3, dtype="float64", name="out"),
        ]
    )
    model.set_weights(weights)
    return model


def _torch_mlp(weights: list[np.ndarray]) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for layer, (w, b) in zip((model[0], model[2]), (weights[:2], weights[2:]), strict=True):
            layer.weight.copy_(torch.as_tensor(w.T))
            layer.bias.copy_(torch.as_tensor(b))
    return model


def _forward(model: object, x: np.ndarray) -> np.ndarray:
    if isinstance(model, nn.Module):
        with torch.no_grad():
            return model(torch.as_tensor(x)).numpy()
    return np.asarray(model(x, training=False))


@pytest.mark.parametrize("framework", ["tfreg", "torchref"])
def test_mlp_removes_dead_units_and_inputs(framework: str) -> None:
    weights = _mlp_weights()
    model = _keras_mlp(weights) if framework == "tfreg" else _torch_mlp(weights)
    lib = tfreg if framework == "tfreg" else torchref
    x = np.random.default_rng(1).normal(size=(16, 4))
    before = _forward(model, x)

    result = lib.prune(model, inputs=True)
    hidden, out = list(result.kept)
    np.testing.assert_array_equal(result.inputs, [0, 1, 3])
    np.testing.assert_array_equal(result.kept[hidden], [0, 2, 4])
    np.testing.assert_array_equal(result.kept[out], [0, 1, 2])
    assert result.params_before == 4 * 5 + 5 + 5 * 3 + 3 == 43
    assert result.params_after == 3 * 3 + 3 + 3 * 3 + 3 == 24
    _close(_forward(result.model, x[:, result.inputs]), before)
    # The fold by hand: the output bias gains relu(0.7) * (unit 1's outgoing row).
    new_bias = (
        result.model.layers[-1].get_weights()[1]
        if framework == "tfreg"
        else result.model[2].bias.detach().numpy()
    )
    np.testing.assert_allclose(new_bias, weights[3] + 0.7 * weights[2][1], rtol=1e-15)
    _close(_forward(model, x), before)  # the original is untouched

    kept_inputs = lib.prune(model)  # inputs=False keeps the input signature
    np.testing.assert_array_equal(kept_inputs.inputs, [0, 1, 2, 3])
    assert kept_inputs.params_after == 4 * 3 + 3 + 3 * 3 + 3 == 27
    _close(_forward(kept_inputs.model, x), before)


# ---------------------------------------------------------------- a CNN: Conv -> BN -> Flatten
def _cnn_weights() -> dict[str, np.ndarray]:
    """Conv(2->3, 3x3) -> BN -> ReLU -> Conv(3->4, 2x2) -> ReLU -> Flatten -> Dense 5 -> Dense 2
    on 6x6 inputs, Keras layout. Planted: filter 0 of conv1 is all zero with bias 0 -- NOT dead,
    BatchNorm shifts it to the constant relu(beta_0 - gamma_0 mean_0 / sqrt(var_0 + eps)) = 1;
    filter 1 of conv2 has zero outgoing Dense rows; Dense unit 2 has zero kernel and bias."""
    rng = np.random.default_rng(2)
    w = {
        "c1": rng.normal(size=(3, 3, 2, 3)),
        "c1b": rng.normal(size=3),
        "gamma": rng.uniform(0.5, 2, 3),
        "beta": rng.normal(size=3),
        "mean": rng.normal(size=3),
        "var": rng.uniform(0.5, 2, 3),
        "c2": rng.normal(size=(2, 2, 3, 4)),
        "c2b": rng.normal(size=4),
        "d1b": rng.normal(size=5),
        "d2": rng.normal(size=(5, 2)),
        "d2b": rng.normal(size=2),
    }
    w["c1"][..., 0], w["c1b"][0], w["mean"][0], w["beta"][0] = 0.0, 0.0, 0.0, 1.0
    w["d1b"][2] = 0.0
    return w


def _dense_kernel(w: dict[str, np.ndarray], positions: int, channels_last: bool) -> np.ndarray:
    """Dense 1's kernel (positions * 4 rows): zero rows for channel 1 of conv2, zero column 2."""
    kernel = np.random.default_rng(3).normal(size=(positions * 4, 5))
    rows = np.arange(positions * 4)
    channel = rows % 4 if channels_last else rows // positions
    kernel[channel == 1, :] = 0.0
    kernel[:, 2] = 0.0
    return kernel


def _keras_cnn(padding: str, functional: bool) -> keras.Model:
    w = _cnn_weights()
    positions = 9 if padding == "valid" else 16
    L, f64 = keras.layers, "float64"
    layers = [
        L.Conv2D(3, 3, dtype=f64, name="conv1"),
        L.BatchNormalization(epsilon=1e-3, dtype=f64, name="bn"),
        L.ReLU(dtype=f64),
        L.Conv2D(4, 2, padding=padding, dtype=f64, name="conv2"),
        L.Activation("relu", dtype=f64),
        L.Flatten(dtype=f64),
        L.Dropout(0.5, dtype=f64),
        L.Dense(5, dtype=f64, name="dense1"),
        L.Dense(2, dtype=f64, name="dense2"),
    ]
    if functional:
        x = inputs = keras.Input((6, 6, 2), dtype=f64)
        for layer in layers:
            x = layer(x)
        model = keras.Model(inputs, x)
    else:
        model = keras.Sequential([keras.Input((6, 6, 2), dtype=f64), *layers])
    convs = [w[k] for k in ("c1", "c1b", "gamma", "beta", "mean", "var", "c2", "c2b")]
    model.set_weights([*convs, _dense_kernel(w, positions, True), w["d1b"], w["d2"], w["d2b"]])
    return model


def _torch_cnn(padding: str) -> nn.Sequential:
    w = _cnn_weights()
    positions = 9 if padding == "valid" else 16
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, eps=1e-3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, padding=padding),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(positions * 4, 5),
        nn.Linear(5, 2),
    ).double()
    conv = (3, 2, 0, 1)  # Keras (kh, kw, in, out) -> torch (out, in, kh, kw)
    values = {
        "0.weight": w["c1"].transpose(conv),
        "0.bias": w["c1b"],
        "1.weight": w["gamma"],
        "1.bias": w["beta"],
        "1.running_mean": w["mean"],
        "1.running_var": w["var"],
        "3.weight": w["c2"].transpose(conv),
        "3.bias": w["c2b"],
        "7.weight": _dense_kernel(w, positions, False).T,
        "7.bias": w["d1b"],
        "8.weight": w["d2"].T,
        "8.bias": w["d2b"],
    }
    state = model.state_dict()
    state.update({k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in values.items()})
    model.load_state_dict(state)
    return model.eval()


CNN_BEFORE = (2 * 9 * 3 + 3) + 4 * 3 + (3 * 4 * 4 + 4)  # conv1, BN (4 per channel), conv2
CASES = [
    pytest.param("tfreg", False, id="keras-sequential"),
    pytest.param("tfreg", True, id="keras-functional"),
    pytest.param("torchref", False, id="torch"),
]


def _pruned_cnn(framework: str, padding: str, functional: bool) -> object:
    """Prunes the CNN and checks its outputs on random images; returns the PruneResult."""
    model = _keras_cnn(padding, functional) if framework == "tfreg" else _torch_cnn(padding)
    lib = tfreg if framework == "tfreg" else torchref
    x = np.random.default_rng(4).normal(size=(8, 6, 6, 2))
    x = x if framework == "tfreg" else x.transpose(0, 3, 1, 2)
    before = _forward(model, x)
    result = lib.prune(model)
    _close(_forward(result.model, x), before)
    return result


@pytest.mark.parametrize(("framework", "functional"), CASES)
def test_cnn_folds_a_batchnorm_shifted_zero_filter_through_valid_conv(
    framework: str, functional: bool
) -> None:
    result = _pruned_cnn(framework, "valid", functional)
    assert [k.tolist() for k in result.kept.values()] == [[1, 2], [0, 2, 3], [0, 1, 3, 4], [0, 1]]
    assert result.notes == ()
    assert result.params_before == CNN_BEFORE + (36 * 5 + 5) + (5 * 2 + 2) == 318
    after = (2 * 9 * 2 + 2) + 4 * 2 + (2 * 4 * 3 + 3) + (27 * 4 + 4) + (4 * 2 + 2)
    assert result.params_after == after == 195


@pytest.mark.parametrize(("framework", "functional"), CASES)
def test_cnn_keeps_a_constant_filter_before_a_zero_padded_conv(
    framework: str, functional: bool
) -> None:
    # conv2 pads with zeros: at its borders the constant 1 from BN is seen through fewer taps,
    # so no bias can stand in for it; the filter stays (a note says why), the rest is pruned.
    result = _pruned_cnn(framework, "same", functional)
    assert [k.tolist() for k in result.kept.values()] == [
        [0, 1, 2],
        [0, 2, 3],
        [0, 1, 3, 4],
        [0, 1],
    ]
    (note,) = result.notes
    assert "[0]" in note and "pads with zeros" in note and "same" in note
    after = (2 * 9 * 3 + 3) + 4 * 3 + (3 * 4 * 3 + 3) + (16 * 3 * 4 + 4) + (4 * 2 + 2)
    assert result.params_after == after == 314


def test_torch_keeps_dtype_mode_and_names() -> None:
    model = _torch_cnn("valid").train()
    result = torchref.prune(model)
    assert result.model.training and not model.eval().training
    assert [n for n, _ in result.model.named_children()] == [str(i) for i in range(9)]
    assert all(p.dtype == torch.float64 for p in result.model.parameters())


# ---------------------------------------------------------------- refusals
def _keras_refused() -> list[tuple[keras.Model, str]]:
    L = keras.layers
    x = inputs = keras.Input((4,))
    h = L.Dense(4, name="left")(x)
    residual = keras.Model(inputs, L.Add(name="plus")([h, x]))
    shared_dense = L.Dense(4, name="twice")
    shared = keras.Model(inputs, shared_dense(shared_dense(x)))
    seq = keras.Input((5, 3))
    return [
        (residual, "'plus'.*merge"),
        (shared, "'twice'.*shared"),
        (keras.Sequential([seq, L.LSTM(4, name="rnn"), L.Dense(2)]), "'rnn'.*recurrent"),
        (
            keras.Sequential([keras.Input((6, 6, 2)), L.DepthwiseConv2D(3, name="dw")]),
            "'dw'.*depthwise",
        ),
        (
            keras.Sequential([keras.Input((6, 6, 4)), L.Conv2D(4, 3, groups=2, name="grouped")]),
            "'grouped'.*groups=2",
        ),
        (
            keras.Sequential([inputs, L.Dense(4, activation="softmax", name="sm"), L.Dense(2)]),
            "'sm'.*softmax.*mixes units",
        ),
        (keras.Sequential([inputs, L.Dense(4), L.Reshape((2, 2), name="rs")]), "'rs'.*not known"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_keras_refuses_what_it_cannot_prune_exactly(case: int) -> None:
    model, message = _keras_refused()[case]
    with pytest.raises(ValueError, match=message):
        tfreg.prune(model)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x + self.a(x))


def _torch_refused() -> list[tuple[nn.Module, str]]:
    shared = nn.Linear(4, 4)
    return [
        (_Residual(), "plain torch.nn.Sequential.*_Residual"),
        (nn.Sequential(shared, nn.ReLU(), shared), "'2'.*used twice"),
        (nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 2)), "'0'.*recurrent"),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten()), "'0'.*groups=4"),
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1), nn.Linear(4, 2)), "'1'.*mixes units"),
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Linear(4, 2)), "'1'.*needs a Flatten"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)), "'1'"),
        (nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (2, 2))), "'1'.*not known"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_torch_refuses_what_it_cannot_prune_exactly(case: int) -> None:
    model, message = _torch_refused()[case]
    with pytest.raises(ValueError, match=message):
        torchref.prune(model)


def test_inputs_flag_is_checked_and_needs_raw_features() -> None:
    with pytest.raises(TypeError, match="inputs"):
        torchref.prune(_torch_mlp(_mlp_weights()), inputs=1)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0'.*inputs=True"):
        torchref.prune(flat, inputs=True)
