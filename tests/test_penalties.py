"""``penalty(model, regularizer)``: which variables it sums over, in tfreg and torchref alike.

Rule: kernels only (trainable, rank >= 2); biases and normalization scales/offsets only with
``include_bias=True``; non-trainable state (BatchNorm moving statistics) never; an explicit list is
taken as given. Expected values are sums over NumPy copies of the weights, never the other
framework's output. Also: the coupled weight-decay conversion (the import boundaries are pinned
in ``tests/test_dependency_rule.py``).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import tfreg
import torchref
from tfreg_core.validation import InvalidArgumentError

# PNorm(p=1) applies its strength exactly, so the expected sums below hold to float64 round-off.
STRENGTH = 0.25


def l1_of(*arrays: np.ndarray) -> float:
    return STRENGTH * sum(float(np.abs(a).sum()) for a in arrays)


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    """Dense(4->3) -> BatchNorm(3) -> Dense(3->2), every value nonzero and distinct so that a
    wrongly included or excluded variable changes the sum."""
    rng = np.random.default_rng(11)
    shapes = {
        "kernel1": (4, 3),
        "bias1": (3,),
        "gamma": (3,),
        "beta": (3,),
        "moving_mean": (3,),
        "moving_var": (3,),
        "kernel2": (3, 2),
        "bias2": (2,),
    }
    return {name: rng.uniform(0.5, 2.0, size=shape) for name, shape in shapes.items()}


def keras_model(w: dict[str, np.ndarray]) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, dtype="float64", name="first"),
            keras.layers.BatchNormalization(dtype="float64", name="norm"),
            keras.layers.Dense(2, dtype="float64", name="second"),
        ],
        name="model",
    )
    order = ["kernel1", "bias1", "gamma", "beta", "moving_mean", "moving_var", "kernel2", "bias2"]
    model.set_weights([w[name] for name in order])
    return model


def torch_model(w: dict[str, np.ndarray]) -> torch.nn.Sequential:
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    ).double()
    params = {
        "0.weight": w["kernel1"].T,
        "0.bias": w["bias1"],
        "1.weight": w["gamma"],
        "1.bias": w["beta"],
        "1.running_mean": w["moving_mean"],
        "1.running_var": w["moving_var"],
        "2.weight": w["kernel2"].T,
        "2.bias": w["bias2"],
    }
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()}, strict=False)
    return model


def test_tfreg_penalises_kernels_only_by_default(weights) -> None:
    model = keras_model(weights)
    value = tfreg.penalty(model, tfreg.PNorm(STRENGTH, p=1))
    assert float(value) == pytest.approx(l1_of(weights["kernel1"], weights["kernel2"]), rel=1e-15)
    assert value.dtype == tf.float64
    names = [v.path for v in tfreg.penalized_variables(model)]
    assert names == ["model/first/kernel", "model/second/kernel"]


def test_torchref_penalises_kernels_only_by_default(weights) -> None:
    value = torchref.penalty(torch_model(weights), torchref.PNorm(STRENGTH, p=1))
    assert value.item() == pytest.approx(l1_of(weights["kernel1"], weights["kernel2"]), rel=1e-15)
    assert value.dtype == torch.float64


def _all_trainable(w: dict[str, np.ndarray]) -> float:
    # Biases and BatchNorm gamma/beta join; the moving statistics never do.
    return l1_of(*(w[n] for n in ("kernel1", "bias1", "gamma", "beta", "kernel2", "bias2")))


def test_tfreg_include_bias_adds_biases_and_norm_params_never_moving_stats(weights) -> None:
    model = keras_model(weights)
    value = tfreg.penalty(model, tfreg.PNorm(STRENGTH, p=1), include_bias=True)
    assert float(value) == pytest.approx(_all_trainable(weights), rel=1e-15)
    penalised = {v.path for v in tfreg.penalized_variables(model, include_bias=True)}
    assert not penalised & {v.path for v in model.non_trainable_variables}


def test_torchref_include_bias_adds_biases_and_norm_params_never_buffers(weights) -> None:
    model = torch_model(weights)
    value = torchref.penalty(model, torchref.PNorm(STRENGTH, p=1), include_bias=True)
    assert value.item() == pytest.approx(_all_trainable(weights), rel=1e-15)
    penalised = {id(t) for t in torchref.penalized_parameters(model, include_bias=True)}
    assert not penalised & {id(b) for b in model.buffers()}


def test_frozen_weights_are_not_penalised(weights) -> None:
    model = keras_model(weights)
    model.layers[0].trainable = False
    expected = l1_of(weights["kernel2"])
    assert float(tfreg.penalty(model, tfreg.PNorm(STRENGTH, p=1))) == pytest.approx(expected)
    module = torch_model(weights)
    module[0].weight.requires_grad_(False)
    assert torchref.penalty(module, torchref.PNorm(STRENGTH, p=1)).item() == pytest.approx(expected)


def test_explicit_variables_are_taken_as_given(weights) -> None:
    model = keras_model(weights)
    bn = model.layers[1]
    value = tfreg.penalty([bn.gamma, bn.moving_mean], tfreg.PNorm(STRENGTH, p=1))
    assert float(value) == pytest.approx(l1_of(weights["gamma"], weights["moving_mean"]), rel=1e-15)
    module = torch_model(weights)
    t_value = torchref.penalty(
        [module[1].weight, module[1].running_mean], torchref.PNorm(STRENGTH, p=1)
    )
    assert t_value.item() == pytest.approx(
        l1_of(weights["gamma"], weights["moving_mean"]), rel=1e-15
    )


def test_penalty_gradient_reaches_kernels_only(weights) -> None:
    model = keras_model(weights)
    with tf.GradientTape() as tape:
        value = tfreg.penalty(model, tfreg.L2(0.5))
    grads = tape.gradient(value, model.trainable_variables)
    assert [g is None for g in grads] == [False, True, True, True, False, True]
    np.testing.assert_allclose(grads[0].numpy(), 2 * 0.5 * weights["kernel1"], rtol=1e-15)


def test_empty_model_and_empty_list_give_zero() -> None:
    empty = keras.Sequential([keras.Input((3,)), keras.layers.Flatten()])
    for value in (tfreg.penalty(empty, "l2"), tfreg.penalty([], "l2")):
        assert float(value) == 0.0
        assert value.dtype == keras.config.floatx()
    for t_value in (torchref.penalty(torch.nn.Sequential(), "l2"), torchref.penalty([], "l2")):
        assert t_value.item() == 0.0
        assert t_value.dtype == torch.get_default_dtype()


def test_nothing_penalised_gives_a_zero_in_the_models_dtype() -> None:
    # Only rank-1 variables (BN scale/offset): nothing is a kernel, yet the zero must add to a
    # float64 loss, so it takes the model's dtype instead of float32.
    norm = keras.layers.BatchNormalization(dtype="float64")
    norm.build((None, 3))
    value = tfreg.penalty(norm, "l2")
    assert value.dtype == tf.float64 and float(value) == 0.0
    t_norm = torch.nn.BatchNorm1d(3).to(torch.float64)
    t_value = torchref.penalty(t_norm, "l2")
    assert t_value.dtype == torch.float64 and t_value.item() == 0.0
    assert t_value.device == t_norm.weight.device


@pytest.mark.parametrize(
    "module", [pytest.param(tfreg, id="tfreg"), pytest.param(torchref, id="torchref")]
)
def test_none_regularizer_is_rejected_naming_it(module) -> None:
    model = keras.layers.Dense(2) if module is tfreg else torch.nn.Linear(3, 2)
    if module is tfreg:
        model.build((None, 3))
    with pytest.raises(InvalidArgumentError, match="Received: regularizer=None"):
        module.penalty(model, None)


def test_regularizer_given_as_key_config_or_keras_object(weights) -> None:
    model = keras_model(weights)
    expected = float(tfreg.penalty(model, tfreg.L2(0.01)))
    assert float(tfreg.penalty(model, "l2")) == expected  # Keras' default l2 = 0.01
    assert float(tfreg.penalty(model, {"class_name": "L2", "config": {"l2": 0.01}})) == expected
    assert float(tfreg.penalty(model, keras.regularizers.L2(0.01))) == expected
    assert torchref.penalty(torch_model(weights), "l2").item() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("include_bias", ["yes", 1, None, np.bool_(True)])
def test_non_bool_include_bias_is_a_type_error(include_bias, weights) -> None:
    """Also for penalized_variables/penalized_parameters, which used to take any truthy value."""
    message = f"include_bias must be a bool. Received: include_bias={include_bias!r}"
    model, module = keras_model(weights), torch_model(weights)
    for call in (
        lambda: tfreg.penalty(model, "l2", include_bias=include_bias),
        lambda: tfreg.penalized_variables(model, include_bias=include_bias),
        lambda: torchref.penalty(module, "l2", include_bias=include_bias),
        lambda: torchref.penalized_parameters(module, include_bias=include_bias),
    ):
        with pytest.raises(TypeError) as error:
            call()
        assert str(error.value) == message


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(lambda: tf.Variable(np.ones((3, 2))), id="tf.Variable"),
        pytest.param(lambda: tf.ones((3, 2)), id="tf.Tensor"),
        pytest.param(lambda: np.ones((3, 2)), id="ndarray"),
        pytest.param(lambda: keras.Variable(np.ones((3, 2))), id="keras.Variable"),
        pytest.param(lambda: "model", id="string"),
        pytest.param(lambda: 3, id="int"),
    ],
)
def test_tfreg_rejects_a_single_tensor_or_non_model(target) -> None:
    """A lone tensor iterates over its rows: PNorm would silently become a sum of row norms."""
    with pytest.raises(TypeError, match="expects a keras Layer/Model"):
        tfreg.penalty(target(), tfreg.PNorm(0.1))


@pytest.mark.parametrize(
    "target", [pytest.param(torch.ones(3, 2), id="tensor"), pytest.param("model", id="string")]
)
def test_torchref_rejects_a_single_tensor_or_non_module(target) -> None:
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module"):
        torchref.penalty(target, torchref.PNorm(0.1))


# --- coupled weight decay == L2(wd / 2) ----------------------------------------------------


def _sgd_step(weight: np.ndarray, lr: float, weight_decay: float, penalty) -> np.ndarray:
    w = torch.tensor(weight, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=lr, weight_decay=weight_decay)
    loss = penalty(w) if penalty is not None else (w * 0.0).sum()  # no loss: decay alone
    loss.backward()
    optimizer.step()
    return w.detach().numpy()


def test_from_torch_weight_decay_step_is_identical_to_sgd_weight_decay() -> None:
    """One SGD step with weight_decay=wd and no loss == one SGD step (no decay) on the penalty.
    wd = 2**-13 (~1.2e-4): wd / 2 is a float32 number, so L2's float32 factor is exact."""
    rng = np.random.default_rng(5)
    weight, lr, wd = rng.normal(size=(4, 3)), 0.1, 2.0**-13
    reg = torchref.L2.from_torch_weight_decay(wd)
    assert reg.get_config() == {"l2": wd / 2} and reg.to_torch_weight_decay() == wd
    decayed = _sgd_step(weight, lr, wd, None)
    penalised = _sgd_step(weight, lr, 0.0, reg)
    np.testing.assert_array_equal(penalised, decayed)
    assert not np.array_equal(decayed, weight)


def test_from_torch_weight_decay_with_a_non_float32_factor_is_off_by_its_rounding() -> None:
    """wd = 1e-4: L2 (Keras' float32 factor) moves the weights by 2 * f32(wd / 2) * w instead of
    wd * w; the functional l2_penalty(w, wd / 2) is exact."""
    rng = np.random.default_rng(5)
    weight, lr, wd = rng.normal(size=(4, 3)), 0.1, 1e-4
    decayed = _sgd_step(weight, lr, wd, None)
    keras_factor = _sgd_step(weight, lr, 0.0, torchref.L2.from_torch_weight_decay(wd))
    exact = _sgd_step(weight, lr, 0.0, lambda w: torchref.l2_penalty(w, wd / 2))
    np.testing.assert_array_equal(exact, decayed)
    factor_error = lr * (2 * float(np.float32(wd / 2)) - wd) * weight  # ~1e-13 * w
    # Each update rounds w once (<= eps/2 * |w|): the difference is known to ~2 eps * max|w|.
    rounding = 2 * np.finfo(np.float64).eps * np.abs(weight).max()
    assert np.abs(factor_error).max() > 100 * rounding
    np.testing.assert_allclose(decayed - keras_factor, factor_error, rtol=0, atol=rounding)
    tf_reg = tfreg.L2.from_torch_weight_decay(wd)
    assert tf_reg.get_config() == {"l2": wd / 2} and tf_reg.to_torch_weight_decay() == wd


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_from_torch_weight_decay_does_not_hold_under_maximize(optimizer) -> None:
    """Pinned difference: torch negates the objective's gradient before adding wd * w, so under
    maximize=True coupled decay still shrinks the weights while L2(wd / 2) in the objective is
    maximized and grows them. One SGD step: decay moves w by -lr*wd*w, the penalty by +lr*wd*w
    (difference 2*lr*wd*w, to float64 round-off); Adam: the decay's part of the step is reversed
    too (2.0 of it, measured)."""
    rng = np.random.default_rng(5)
    weight, x, lr, wd = rng.normal(size=(4, 3)), rng.normal(size=(6, 3)), 0.1, 2.0**-13

    def step(weight_decay: float, regularizer: Any) -> np.ndarray:
        w = torch.tensor(weight, requires_grad=True)
        objective = -(torch.as_tensor(x) @ w.T).square().mean()  # a reward, maximized
        if regularizer is not None:
            objective = objective + regularizer(w)
        objective.backward()
        optimizer([w], lr=lr, weight_decay=weight_decay, maximize=True).step()
        return w.detach().numpy()

    decayed = step(wd, None)
    penalised = step(0.0, torchref.L2.from_torch_weight_decay(wd))
    plain = step(0.0, None)
    decay_part, penalty_part = decayed - plain, penalised - plain
    rounding = 4 * np.finfo(np.float64).eps * np.abs(weight).max()
    if optimizer is torch.optim.SGD:
        np.testing.assert_allclose(decay_part, -lr * wd * weight, rtol=0, atol=rounding)
        np.testing.assert_allclose(penalty_part, lr * wd * weight, rtol=0, atol=rounding)
    else:  # Adam's normalisation: the sign flips, the size is about the same
        assert np.all(np.sign(decay_part) == -np.sign(penalty_part))
        rel = np.abs(decayed - penalised).max() / np.abs(decay_part).max()
        assert 1.9 < rel < 2.1


def test_trainer_refuses_a_regularizer_with_a_maximizing_optimizer() -> None:
    model = torch.nn.Linear(3, 1).double()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    with pytest.raises(ValueError, match=r"maximize=True"):
        torchref.Trainer(model, "mse", sgd, regularizer=torchref.L2.from_torch_weight_decay(1e-4))
    torchref.Trainer(model, "mse", sgd)  # maximize without a penalty: the user's objective


def test_scope_function_has_both_twins_names_in_both_frameworks(weights) -> None:
    assert tfreg.penalized_parameters is tfreg.penalized_variables
    assert torchref.penalized_variables is torchref.penalized_parameters
    tf_shapes = [tuple(v.shape) for v in tfreg.penalized_parameters(keras_model(weights))]
    torch_shapes = [tuple(t.shape) for t in torchref.penalized_variables(torch_model(weights))]
    assert tf_shapes == [(4, 3), (3, 2)] and torch_shapes == [(3, 4), (2, 3)]
