"""Bring-your-own-model parity: check_parity / assert_parity on user-built model pairs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

from tfreg.parity import assert_parity, check_parity, seed_everything
from tfreg.parity.devices import tf_device, torch_device


def _models(dtype: str, device: str, *, torch_activation: type = torch.nn.ReLU):
    import tensorflow as tf

    with tf.device(tf_device(device)):
        keras_model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="relu", dtype=dtype),
                keras.layers.Dense(3, dtype=dtype),
            ]
        )
    torch_module = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch_activation(), torch.nn.Linear(8, 3)
    ).to(device=torch_device(device), dtype=getattr(torch, dtype))
    return keras_model, torch_module


def _data(dtype: str, rng: np.random.Generator):
    return rng.normal(size=(10, 6)).astype(dtype), rng.integers(0, 3, size=10)


def test_matching_models_pass_forward_gradients_and_steps(device: str, dtype: str) -> None:
    rng = seed_everything(3)
    keras_model, torch_module = _models(dtype, device)
    x, y = _data(dtype, rng)
    # lr 0.125 is exact in float32: Keras keeps the learning rate as a float32 variable.
    report = assert_parity(
        keras_model,
        torch_module,
        x,
        y,
        steps=3,
        keras_optimizer=keras.optimizers.SGD(0.125),
        torch_optimizer=torch.optim.SGD(torch_module.parameters(), lr=0.125),
        device=device,
    )
    names = [r.check for r in report.rows]
    assert names[:2] == ["logits", "loss"]
    assert sum(n.startswith("grad ") for n in names) == 4  # 2 kernels + 2 biases
    assert sum(n.startswith("step 3 ") for n in names) == 4
    expected_tol = {"float64": 1e-10, "float32": 1e-5}[dtype]  # model_cross claim
    assert report.rows[0].tolerance == expected_tol


def test_a_different_model_fails_and_names_the_tensors() -> None:
    rng = seed_everything(3)
    keras_model, torch_module = _models("float64", "cpu", torch_activation=torch.nn.Tanh)
    x, y = _data("float64", rng)
    report = check_parity(keras_model, torch_module, x, y)
    failed = {r.check for r in report.failed}
    assert {"logits", "loss"} <= failed
    with pytest.raises(AssertionError, match="parity failed for logits"):
        assert_parity(keras_model, torch_module, x, y)


def test_unsupported_layer_is_a_skip_with_reason_and_assert_fails() -> None:
    keras_model = keras.Sequential(
        [
            keras.Input((4, 3)),
            keras.layers.LSTM(2, dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )
    torch_module = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    x = np.zeros((2, 4, 3))
    report = check_parity(keras_model, torch_module, x, np.zeros(2, dtype=int))
    assert [r.status for r in report.rows] == ["skip", "skip"]
    assert "LSTM" in report.rows[0].detail
    assert report.ok  # the report lists the skip; only assert_parity turns it into a failure
    with pytest.raises(AssertionError, match="LSTM"):
        assert_parity(keras_model, torch_module, x, np.zeros(2, dtype=int))


def test_steps_without_optimizers_and_unknown_loss_are_rejected() -> None:
    keras_model, torch_module = _models("float64", "cpu")
    x, y = _data("float64", np.random.default_rng(0))
    with pytest.raises(ValueError, match="steps > 0 needs both"):
        check_parity(keras_model, torch_module, x, y, steps=2)
    with pytest.raises(ValueError, match="Unknown loss 'hinge'"):
        check_parity(keras_model, torch_module, x, y, loss="hinge")


def test_regression_loss_pair(device: str) -> None:
    rng = seed_everything(5)
    keras_model, torch_module = _models("float64", device)
    x = rng.normal(size=(10, 6))
    target = rng.normal(size=(10, 3))
    report = check_parity(
        keras_model, torch_module, x, target, loss="mean_squared_error", device=device
    )
    assert report.ok and report.rows[-1].detail == "steps=0"
