"""BatchNormalization (Keras) vs BatchNorm1d/2d (torch).

Train mode computes the same function once momentum (m <-> 1 - m) and epsilon are passed
explicitly; the moving *variance* then differs, by the documented cause: torch feeds the unbiased
batch variance (x n/(n-1)) into ``running_var``, Keras the biased one. These tests pin that
difference to its predicted size instead of widening a tolerance, and check the converter that
maps one framework's statistic to the other's.

Tolerance: claim "model_cross" -- float64 <= 1e-10 rel, float32 <= 1e-5 rel (the same forward
arithmetic in a different order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch import nn

from tfreg._compat import keras
from tfreg_harness.architecture import BatchNorm
from tfreg_harness.compare import assert_close, compare
from tfreg_harness.differences import (
    FRAMEWORK_DIFFERENCES,
    keras_moving_variance_from_torch,
    torch_running_var_from_keras,
)
from tfreg_harness.keras_side.models import (
    ModelPair,
    build_mlp,
    build_pair,
    forward_keras,
    forward_torch,
    model_parity,
)
from tfreg_harness.keras_side.transfer import torch_to_numpy, transfer_weights
from tfreg_harness.layouts import to_keras_output
from tfreg_harness.tolerances import tolerance

BN = FRAMEWORK_DIFFERENCES.batchnorm
# A faster-moving average than Keras' 0.99, so that five steps move the statistics far enough
# for the n/(n-1) difference to stand well clear of float32 round-off.
MOMENTUM = 0.8
STEPS = 5


def test_table_holds_the_frameworks_real_defaults() -> None:
    keras_bn = keras.layers.BatchNormalization()
    torch_bn = nn.BatchNorm1d(3)
    assert (BN.keras_momentum_default, BN.keras_epsilon_default) == (
        keras_bn.momentum,
        keras_bn.epsilon,
    )
    assert (BN.torch_momentum_default, BN.torch_epsilon_default) == (
        torch_bn.momentum,
        torch_bn.eps,
    )
    assert math.isclose(BN.torch_momentum(0.99), 0.01, rel_tol=1e-12)
    assert BN.variance_correction(4) == 4 / 3


def test_one_step_hand_computed() -> None:
    """One channel, batch (1, 2, 3, 4), Keras momentum 0.9 (torch 0.1), start mean 0, var 1.

    Batch mean 2.5, biased variance 1.25, unbiased 5/3. Moving mean: 0.9*0 + 0.1*2.5 = 0.25 in
    both. Keras variance 0.9 + 0.1*1.25 = 1.025; torch 0.9 + 0.1*5/3 = 1.0666...
    Output (both): (x - 2.5) / sqrt(1.25 + 1e-3).
    """
    tol = tolerance("model_cross", "float64")
    pair = build_pair((BatchNorm(momentum=0.9),), (1,), dtype="float64")
    pair.keras.set_weights([np.ones(1), np.zeros(1), np.zeros(1), np.ones(1)])
    transfer_weights(pair.keras, pair.torch)
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    expected_out = (x - 2.5) / math.sqrt(1.25 + 1e-3)
    keras_out = forward_keras(pair, x, training=True)[0].numpy()
    torch_out = torch_to_numpy(forward_torch(pair, x, training=True)[0])
    assert_close("Keras train-mode output", keras_out, expected_out, rtol=tol.rtol)
    assert_close("torch train-mode output", torch_out, expected_out, rtol=tol.rtol)
    bn_keras, bn_torch = pair.keras.layers[0], pair.torch[0]
    assert_close("Keras moving_mean", bn_keras.moving_mean.numpy(), [0.25], rtol=tol.rtol)
    assert_close("torch running_mean", bn_torch.running_mean.numpy(), [0.25], rtol=tol.rtol)
    assert_close("Keras moving_variance", bn_keras.moving_variance.numpy(), [1.025], rtol=tol.rtol)
    assert_close("torch running_var", bn_torch.running_var.numpy(), [0.9 + 0.5 / 3], rtol=tol.rtol)
    converted = torch_running_var_from_keras([1.025], initial=1.0, momentum=0.9, count=4, steps=1)
    assert_close("converted Keras -> torch", converted, [0.9 + 0.5 / 3], rtol=tol.rtol)


def test_train_mode_mlp_matches(dtype: str, device: str, rng: np.random.Generator) -> None:
    """The notebook's BN MLP (Dense -> BN -> ReLU, twice, -> Dense) in train mode: same logits,
    loss and gradients. The Dense biases feeding BN have gradient exactly 0 (BN removes the batch
    mean); ``model_parity`` checks those against 0 with the dtype's absolute bound
    (``zero_gradient_atol``: 64 eps x the largest gradient), never relatively."""
    tol = tolerance("model_cross", dtype)  # float64 1e-10 / float32 1e-5: see module docstring
    pair = build_mlp(dtype=dtype, rng=rng, batchnorm=True, device=device, input_dim=20)
    x = rng.normal(size=(16, 20)).astype(dtype)
    y = rng.integers(0, 10, size=16)
    comparisons = model_parity(pair, x, y, training=True)
    assert all(c.rtol == tol.rtol for c in comparisons if "== 0" not in c.name), tol.why
    failed = [str(c) for c in comparisons if not c.passed]
    assert not failed, "\n".join(failed)
    zero_checks = [c for c in comparisons if c.name.endswith("== 0")]
    assert len(zero_checks) == 2  # both hidden Dense biases


def _train_steps(pair: ModelPair, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    """STEPS train-mode forward passes through both; returns start values and NumPy references."""
    bn_keras = pair.keras.layers[0]
    v0 = bn_keras.moving_variance.numpy().copy()
    mean_ref, biased_ref, unbiased_ref = (bn_keras.moving_mean.numpy().copy(), v0.copy(), v0.copy())
    shape = tuple(pair.keras.inputs[0].shape[1:])
    axes = tuple(range(len(shape)))  # every axis but channels (batch axis included)
    for _ in range(STEPS):
        x = (rng.normal(size=(batch, *shape)) * 1.7 + 0.4).astype(pair.dtype)
        forward_keras(pair, x, training=True)
        forward_torch(pair, x, training=True)
        x64 = x.astype(np.float64)
        n = x64.size // x64.shape[-1]
        mean_ref = MOMENTUM * mean_ref + (1 - MOMENTUM) * x64.mean(axis=axes)
        biased_ref = MOMENTUM * biased_ref + (1 - MOMENTUM) * x64.var(axis=axes)
        unbiased_ref = MOMENTUM * unbiased_ref + (1 - MOMENTUM) * x64.var(axis=axes) * n / (n - 1)
    return {"v0": v0, "count": n, "mean": mean_ref, "biased": biased_ref, "unbiased": unbiased_ref}


LAYOUTS = {"BatchNorm1d": ((6,), 8), "BatchNorm2d": ((3, 3, 4), 2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moving_variance_differs_by_the_predicted_factor(
    layout: str, dtype: str, device: str, rng: np.random.Generator
) -> None:
    tol = tolerance("model_cross", dtype)  # float64 1e-10 / float32 1e-5: see module docstring
    shape, batch = LAYOUTS[layout]
    spec = (BatchNorm(momentum=MOMENTUM),)
    pair = build_pair(spec, shape, dtype=dtype, rng=rng, device=device)
    assert type(pair.torch[0]).__name__ == layout
    ref = _train_steps(pair, rng, batch)
    k_mean = pair.keras.layers[0].moving_mean.numpy()
    k_var = pair.keras.layers[0].moving_variance.numpy()
    t_mean = torch_to_numpy(pair.torch[0].running_mean)
    t_var = torch_to_numpy(pair.torch[0].running_var)

    assert_close(f"{layout} moving mean, torch vs Keras", t_mean, k_mean, rtol=tol.rtol)
    assert_close(
        f"{layout} Keras moving variance vs biased NumPy", k_var, ref["biased"], rtol=tol.rtol
    )
    assert_close(
        f"{layout} torch running_var vs unbiased NumPy", t_var, ref["unbiased"], rtol=tol.rtol
    )
    # The difference is real (far outside the tolerance) ...
    assert not compare("raw variances", t_var, k_var, rtol=100 * tol.rtol).passed
    # ... and it is exactly the documented one: torch - Keras = (n/(n-1) - 1)(v_N - m^N v0).
    carried = MOMENTUM**STEPS * ref["v0"]
    predicted_gap = (BN.variance_correction(ref["count"]) - 1) * (
        k_var.astype(np.float64) - carried
    )
    measured_gap = t_var.astype(np.float64) - k_var.astype(np.float64)
    # A difference of two variances carries their round-off, rtol x the variances' scale.
    atol = tol.rtol * float(np.max(k_var))
    assert_close(f"{layout} variance gap", measured_gap, predicted_gap, rtol=0.0, atol=atol)
    convert = {"initial": ref["v0"], "momentum": MOMENTUM, "count": ref["count"], "steps": STEPS}
    assert_close(
        f"{layout} Keras -> torch converter",
        torch_running_var_from_keras(k_var, **convert),
        t_var,
        rtol=tol.rtol,
    )
    assert_close(
        f"{layout} torch -> Keras converter",
        keras_moving_variance_from_torch(t_var, **convert),
        k_var,
        rtol=tol.rtol,
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eval_outputs_drift_and_the_converter_closes_the_gap(
    layout: str, dtype: str, rng: np.random.Generator
) -> None:
    tol = tolerance("model_cross", dtype)  # float64 1e-10 / float32 1e-5: see module docstring
    shape, batch = LAYOUTS[layout]
    pair = build_pair((BatchNorm(momentum=MOMENTUM),), shape, dtype=dtype, rng=rng)
    ref = _train_steps(pair, rng, batch)
    x = rng.normal(size=(batch, *shape)).astype(dtype)
    keras_eval = forward_keras(pair, x, training=False)[0].numpy()
    torch_eval = to_keras_output(torch_to_numpy(forward_torch(pair, x, training=False)[0]))

    # Each eval output is gamma (x - mean) / sqrt(var + eps) + beta with its own variance.
    gamma, beta, mean, k_var = (w.astype(np.float64) for w in pair.keras.get_weights())
    t_var = torch_to_numpy(pair.torch[0].running_var).astype(np.float64)
    eps = pair.keras.layers[0].epsilon
    x64 = x.astype(np.float64)
    for name, out, var in (("Keras", keras_eval, k_var), ("torch", torch_eval, t_var)):
        expected = gamma * (x64 - mean) / np.sqrt(var + eps) + beta
        assert_close(f"{layout} {name} eval output", out, expected, rtol=tol.rtol)
    assert not compare("eval outputs", torch_eval, keras_eval, rtol=tol.rtol).passed

    # Converting Keras' statistic to torch's convention makes Keras compute torch's eval output.
    variance = pair.keras.layers[0].moving_variance
    variance.assign(
        torch_running_var_from_keras(
            variance.numpy(), initial=ref["v0"], momentum=MOMENTUM, count=ref["count"], steps=STEPS
        )
    )
    converted_eval = forward_keras(pair, x, training=False)[0].numpy()
    assert_close(
        f"{layout} eval, converted Keras vs torch", converted_eval, torch_eval, rtol=tol.rtol
    )


def test_variance_correction_needs_two_values() -> None:
    with pytest.raises(ValueError, match="count=1"):
        BN.variance_correction(1)
