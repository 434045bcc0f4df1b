"""Sparsity reports, soft-thresholding and proximal L1: tfreg_core's arithmetic against
hand-computed
values, then each framework's scope, learning-rate reading and in-place update on its own."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import tfreg
import torchref
from tfreg_core import proximal as prox_core
from tfreg_core import sparsity as core
from tfreg_core.validation import InvalidArgumentError

# Two exact zeros (one negative), two entries under 5e-4 * max|w| = 1.5e-3, two large ones.
W = np.array([[0.0, -0.0, 1e-4], [2.0, -3.0, -5e-4]])


# --- tfreg_core ---------------------------------------------------------------------------------


def test_parameter_sparsity_hand_computed() -> None:
    s = core.parameter_sparsity("w", W)
    assert (s.size, s.zeros, s.near_zeros, s.nonzeros) == (6, 2, 4, 4)
    assert s.shape == (2, 3)
    assert s.threshold == 5e-4 * 3.0
    assert s.density == 4 / 6
    assert s.l1 == pytest.approx(5.0006, rel=1e-15)
    assert s.l2 == pytest.approx(math.sqrt(13.0 + 1e-8 + 2.5e-7), rel=1e-15)
    assert s.max_abs == 3.0


@pytest.mark.parametrize(
    ("rel", "atol", "near_zeros"),
    [
        pytest.param(5e-4, 0.0, 4, id="notebook-rule"),
        pytest.param(5e-4, 1e-3, 4, id="atol-below-relative"),
        pytest.param(0.0, 2e-4, 3, id="absolute-only"),
        pytest.param(0.0, 0.0, 2, id="zeros-only"),
        pytest.param(0.5, 0.0, 4, id="half-of-max"),
        pytest.param(0.7, 0.0, 5, id="strictly-below"),
    ],
)
def test_near_zero_threshold_is_max_of_relative_and_absolute(
    rel: float, atol: float, near_zeros: int
) -> None:
    assert core.parameter_sparsity("w", W, rel=rel, atol=atol).near_zeros == near_zeros


def test_all_zero_tensor_is_all_near_zero() -> None:
    # The notebook's strict |w| < 0 * rel would count none of these.
    s = core.parameter_sparsity("w", np.zeros((3, 2), np.float32))
    assert (s.zeros, s.near_zeros, s.density, s.l1, s.l2) == (6, 6, 0.0, 0.0, 0.0)


def test_totals_combine_parameters() -> None:
    report = core.sparsity_report([("a", W), ("b", np.array([[3.0, 4.0]], np.float32))])
    assert (report.size, report.zeros, report.near_zeros, report.nonzeros) == (8, 2, 4, 6)
    assert report.density == 6 / 8
    assert report.l1 == pytest.approx(12.0006, rel=1e-15)
    assert report.l2 == pytest.approx(math.sqrt(13.0 + 1e-8 + 2.5e-7 + 25.0), rel=1e-15)
    assert report.max_abs == 4.0
    assert report.scalars()["sparsity/nonzeros"] == 6.0
    assert set(report.scalars("s_")) == {
        "s_size",
        "s_zeros",
        "s_near_zeros",
        "s_nonzeros",
        "s_density",
        "s_l1",
        "s_l2",
        "s_max_abs",
    }


def test_table_and_dict() -> None:
    report = core.sparsity_report([("dense/kernel", W)], rel=1e-3, atol=1e-9)
    # Hand-computed: L1 = 2 + 3 + 1e-4 + 5e-4; L2 = sqrt(13.00000026) = 3.605551; density =
    # 4 nonzeros / 6;
    # near-zero below max(1e-3 * 3, 1e-9) = 3e-3: the two zeros, 1e-4 and -5e-4.
    rule = "-" * 74
    assert str(report) == "\n".join(
        [
            "parameter      shape  size  zeros  near0  density      L1       L2  max|w|",
            rule,
            "dense/kernel  (2, 3)     6      2      4   0.6667  5.0006  3.60555       3",
            rule,
            "total                    6      2      4   0.6667  5.0006  3.60555       3",
            "near0: w == 0 or |w| < max(rel * max|w|, atol), rel=0.001, atol=1e-09",
            "",
            # Group norms: rows 1e-4 and sqrt(13.00000025) = 3.606 (1e-4 / 3.606 = 2.8e-5);
            # columns 2, 3 and sqrt(1e-8 + 2.5e-7) = 5.1e-4 (/ 3 = 1.7e-4).
            "parameter     axis  groups  zero  min|g|>0  max|g|  <=1e-6  <=1e-5  <=1e-4  <=1e-3"
            "  <=1e-2  <=1e-1  <=1",
            "-" * 103,
            "dense/kernel     0       2     0    0.0001    3.61       0       0       1       0"
            "       0       0    1",
            "dense/kernel     1       3     0   0.00051       3       0       0       0       1"
            "       0       0    2",
            "groups: slices along axis; zero: all entries == 0; <=e: groups with 0 < |g|/max|g| "
            "<= e, above the previous edge",
        ]
    )
    as_dict = report.as_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["parameters"][0]["shape"] == [2, 3]
    assert as_dict["total"]["zeros"] == 2
    assert as_dict["groups"][1] == {
        "name": "dense/kernel",
        "axis": 1,
        "groups": 3,
        "zero_groups": 0,
        "min_norm": pytest.approx(math.sqrt(2.6e-7), rel=1e-15),
        "max_norm": 3.0,
        "histogram": [0, 0, 0, 0, 1, 0, 0, 2],
    }


def test_empty_report() -> None:
    report = core.sparsity_report([])
    assert (report.size, report.density, report.l2, report.max_abs) == (0, 0.0, 0.0, 0.0)
    assert "total" in report.to_table()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        pytest.param({"rel": -1e-3}, "rel", id="negative-rel"),
        pytest.param({"atol": float("nan")}, "atol", id="nan-atol"),
        pytest.param({"rel": "5e-4"}, "rel", id="string-rel"),
    ],
)
def test_bad_thresholds_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"{name}="):
        core.sparsity_report([("w", W)], **kwargs)


def test_non_real_values_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="dtype=complex128"):
        core.parameter_sparsity("w", np.ones(2, complex))


def test_numpy_soft_threshold_hand_computed() -> None:
    out = prox_core.soft_threshold([-3.0, -0.5, -0.25, 0.0, 0.2, 1.5], 0.5)
    np.testing.assert_array_equal(out, [-2.5, 0.0, 0.0, 0.0, 0.0, 1.0])
    with pytest.raises(InvalidArgumentError, match=r"threshold=-0\.1"):
        prox_core.soft_threshold([1.0], -0.1)


def test_proximal_spec() -> None:
    spec = prox_core.ProximalL1Spec(l1=0.01, include_bias=True)
    assert spec.get_config() == {"l1": 0.01, "include_bias": True, "threshold": "auto"}
    assert spec.threshold(0.5) == 0.005
    with pytest.raises(TypeError):
        prox_core.ProximalL1Spec(0.01)  # type: ignore[misc]
    with pytest.raises(InvalidArgumentError, match="l1=-1"):
        prox_core.ProximalL1Spec(l1=-1)
    with pytest.raises(InvalidArgumentError, match="include_bias=1"):
        prox_core.ProximalL1Spec(l1=0.1, include_bias=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"learning_rate=-0\.5"):
        spec.threshold(-0.5)


# --- tfreg -----------------------------------------------------------------------------------


def _keras_model(dtype: str = "float64") -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((3,), dtype=dtype),
            keras.layers.Dense(2, dtype=dtype, name="hidden"),
            keras.layers.BatchNormalization(dtype=dtype, name="bn"),
            keras.layers.Dense(1, dtype=dtype, name="out"),
        ],
        # Explicit names: automatic ones ("dense_20") depend on what the process built before.
        name="mlp",
    )
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    kernel.assign(W.T)
    bias.assign([0.1, -0.01])
    model.layers[2].kernel.assign([[0.3], [-0.05]])
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tf_soft_threshold(dtype: str) -> None:
    x = tf.constant([-3.0, -0.5, -0.25, 0.0, 0.2, 1.5], dtype)
    out = tfreg.soft_threshold(x, 0.5).numpy()
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, [-2.5, 0.0, 0.0, 0.0, 0.0, 1.0])
    # A Python threshold is rounded once to x's dtype, not through float32.
    assert tfreg.soft_threshold(tf.constant([0.3], dtype), 0.1).numpy()[0] == (
        np.array(0.3, dtype) - np.array(0.1, dtype)
    )
    with pytest.raises(InvalidArgumentError, match="threshold=-1"):
        tfreg.soft_threshold(x, -1)


def test_tf_report_scope() -> None:
    model = _keras_model()
    report = tfreg.sparsity_report(model)
    assert [p.name for p in report.parameters] == [
        "mlp/hidden/kernel",
        "mlp/out/kernel",
    ]
    assert report.parameters[0].shape == (3, 2)
    assert (report.zeros, report.near_zeros, report.size) == (2, 4, 8)
    with_bias = tfreg.sparsity_report(model, include_bias=True)
    # + dense bias (2), BN gamma/beta (2 + 2), dense_1 bias (1); never BN moving statistics.
    assert with_bias.size == 8 + 7
    assert with_bias.zeros == 2 + 2 + 1  # beta and the last bias start at zero
    with pytest.raises(InvalidArgumentError, match="include_bias='yes'"):
        tfreg.sparsity_report(model, include_bias="yes")  # type: ignore[arg-type]


def test_tf_apply_proximal_l1_float_learning_rate() -> None:
    model = _keras_model()
    tfreg.apply_proximal_l1(model, l1=0.1, learning_rate=0.5)  # threshold 0.05
    np.testing.assert_array_equal(
        model.layers[0].kernel.numpy(), [[0.0, 1.95], [0.0, -2.95], [0.0, 0.0]]
    )
    np.testing.assert_array_equal(model.layers[2].kernel.numpy(), [[0.25], [0.0]])
    np.testing.assert_array_equal(model.layers[0].bias.numpy(), [0.1, -0.01])  # exempt
    tfreg.apply_proximal_l1(model, l1=0.1, learning_rate=0.5, include_bias=True)
    np.testing.assert_array_equal(model.layers[0].bias.numpy(), [0.05, 0.0])


def _sgd_step(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])


def test_tf_threshold_uses_the_learning_rate_of_the_step_just_taken() -> None:
    # lr_t = 1.0 * 0.5**t: the first step uses 1.0; afterwards optimizer.learning_rate is 0.5.
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    variable = tf.Variable([[0.2, 1.0]], dtype=tf.float64)
    optimizer.apply_gradients([(tf.zeros_like(variable), variable)])
    assert float(optimizer.learning_rate) == 0.5
    tfreg.apply_proximal_l1([variable], l1=0.3, learning_rate=optimizer)  # threshold 1.0 * 0.3
    np.testing.assert_allclose(variable.numpy(), [[0.0, 0.7]], rtol=1e-7)
    optimizer.apply_gradients([(tf.zeros_like(variable), variable)])  # used lr 0.5
    tfreg.apply_proximal_l1([variable], l1=0.3, learning_rate=optimizer)
    np.testing.assert_allclose(variable.numpy(), [[0.0, 0.55]], rtol=1e-7)


def test_tf_loss_scale_optimizer_uses_the_inner_schedule() -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=schedule))
    variable = tf.Variable([[0.2, 1.0]], dtype=tf.float32)
    optimizer.apply_gradients([(tf.zeros_like(variable), variable)])
    tfreg.apply_proximal_l1([variable], l1=0.3, learning_rate=optimizer)  # threshold 1.0 * 0.3
    np.testing.assert_allclose(variable.numpy(), [[0.0, 0.7]], rtol=1e-6)


def test_tf_constant_optimizer_learning_rate_and_no_retracing() -> None:
    model = _keras_model()
    optimizer = keras.optimizers.SGD(learning_rate=0.5)
    proximal = tfreg.ProximalL1(l1=0.1)

    @tf.function
    def step() -> None:
        _sgd_step(model, optimizer)
        proximal.apply(model, optimizer)

    for _ in range(3):
        step()
    assert step.experimental_get_tracing_count() == 1
    # Three thresholds of 0.05 on the last kernel [[0.3], [-0.05]].
    np.testing.assert_allclose(model.layers[2].kernel.numpy(), [[0.15], [0.0]], rtol=1e-12)


def test_tf_rejects_before_changing_anything() -> None:
    model = _keras_model()
    before = [v.numpy().copy() for v in model.weights]
    accumulating = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    with pytest.raises(InvalidArgumentError, match="gradient_accumulation_steps=2"):
        tfreg.apply_proximal_l1(model, l1=0.1, learning_rate=accumulating)
    with pytest.raises(InvalidArgumentError, match=r"l1=-0\.1"):
        tfreg.apply_proximal_l1(model, l1=-0.1, learning_rate=0.1)
    with pytest.raises(InvalidArgumentError, match="learning_rate=fast"):
        tfreg.apply_proximal_l1(model, l1=0.1, learning_rate="fast")
    with pytest.raises(InvalidArgumentError, match="must be a bool"):
        tfreg.ProximalL1(l1=0.1, include_bias=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model_or_variables"):
        tfreg.apply_proximal_l1(tf.Variable([1.0]), l1=0.1, learning_rate=0.1)
    for v, b in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)


def test_tf_proximal_config() -> None:
    proximal = tfreg.ProximalL1(l1=0.25, include_bias=True)
    assert tfreg.ProximalL1(**proximal.get_config()).get_config() == proximal.get_config()
    assert repr(proximal) == "ProximalL1(l1=0.25, include_bias=True, threshold='auto')"


def test_sparsity_callback_logs_into_history() -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    model.layers[0].kernel.assign([[0.0, 1.0], [2.0, 0.0], [-3.0, 1e-5]])
    model.layers[1].kernel.assign([[1.0], [-1.0]])
    # lr 0: the weights (and so every logged number) are known in advance.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    callback = tfreg.SparsityCallback()
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 1), np.float32)
    history = model.fit(x, y, epochs=2, batch_size=2, verbose=0, callbacks=[callback])
    logged = history.history
    assert logged["sparsity/zeros"] == [2.0, 2.0]
    assert logged["sparsity/near_zeros"] == [3.0, 3.0]  # 1e-5 < 5e-4 * 3
    assert logged["sparsity/size"] == [8.0, 8.0]
    assert logged["sparsity/density"] == [0.75, 0.75]
    assert logged["sparsity/l1"][0] == pytest.approx(8.00001, rel=1e-6)
    assert "loss" in logged
    assert len(callback.reports) == 2
    assert callback.reports[0].parameters[0].name == model.layers[0].kernel.path
    # Group view: kernel 0 has no zero row or column; kernel 1 (2, 1) neither.
    path = model.layers[0].kernel.path
    assert logged[f"sparsity/zero_groups/{path}/axis0"] == [0.0, 0.0]
    model.layers[0].kernel.assign([[0.0, 1.0], [0.0, 0.0], [0.0, 1e-5]])  # 1 zero row, 1 column
    model.fit(x, y, epochs=1, batch_size=2, verbose=0, callbacks=[callback])
    assert callback.reports[-1].zero_groups(path, 0) == 1
    assert callback.reports[-1].zero_groups(path, 1) == 1
    assert callback.reports[-1].group_scalars()[f"sparsity/zero_groups/{path}/axis1"] == 1.0


def test_sparsity_callback_with_real_training() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 5)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    callback = tfreg.SparsityCallback(rel=0.0, atol=1e-3, prefix="sp_")
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[callback]).history
    l1 = [float(np.abs(r.parameters[0].max_abs)) for r in callback.reports]
    assert history["sp_max_abs"] == l1
    assert history["sp_size"] == [5.0] * 3
    with pytest.raises(InvalidArgumentError, match="atol=-1"):
        tfreg.SparsityCallback(atol=-1)


# --- torchref --------------------------------------------------------------------------------


def _torch_model() -> torch.nn.Sequential:
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1)
    ).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.as_tensor(W))
        model[0].bias.copy_(torch.tensor([0.1, -0.01], dtype=torch.float64))
        model[2].weight.copy_(torch.tensor([[0.3, -0.05]], dtype=torch.float64))
        model[2].bias.zero_()
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_torch_soft_threshold(dtype: torch.dtype) -> None:
    x = torch.tensor([-3.0, -0.5, -0.25, 0.0, 0.2, 1.5], dtype=dtype)
    out = torchref.soft_threshold(x, 0.5)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.numpy(), [-2.5, 0.0, 0.0, 0.0, 0.0, 1.0])
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    assert torchref.soft_threshold(torch.tensor([0.3], dtype=dtype), 0.1)[0].item() == (
        np_dtype(0.3) - np_dtype(0.1)
    )
    with pytest.raises(InvalidArgumentError, match="threshold=-1"):
        torchref.soft_threshold(x, -1)


def test_torch_report_scope_and_names() -> None:
    model = _torch_model()
    report = torchref.sparsity_report(model)
    assert [p.name for p in report.parameters] == ["0.weight", "2.weight"]
    assert (report.zeros, report.near_zeros, report.size) == (2, 4, 8)
    assert torchref.sparsity_report(model, include_bias=True).size == 8 + 7
    unnamed = torchref.sparsity_report([model[0].weight])
    assert unnamed.parameters[0].name == "p0"


def test_torch_apply_proximal_l1() -> None:
    model = _torch_model()
    torchref.apply_proximal_l1(model, l1=0.1, learning_rate=0.5)
    np.testing.assert_array_equal(
        model[0].weight.detach().numpy(), [[0.0, 0.0, 0.0], [1.95, -2.95, 0.0]]
    )
    np.testing.assert_array_equal(model[2].weight.detach().numpy(), [[0.25, 0.0]])
    np.testing.assert_array_equal(model[0].bias.detach().numpy(), [0.1, -0.01])
    assert model[0].weight.requires_grad


def test_torch_reads_each_param_groups_learning_rate() -> None:
    model = _torch_model()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.5}, {"params": model[2].parameters()}],
        lr=2.0,
    )
    torchref.ProximalL1(l1=0.1).apply(model, optimizer)  # thresholds 0.05 and 0.2
    np.testing.assert_array_equal(model[0].weight.detach().numpy()[1], [1.95, -2.95, 0.0])
    np.testing.assert_array_equal(model[2].weight.detach().numpy(), [[0.3 - 0.2, 0.0]])


def test_torch_rejects_before_changing_anything() -> None:
    model = _torch_model()
    before = [p.detach().clone() for p in model.parameters()]
    only_first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match=r"\['2.weight'\]"):
        torchref.apply_proximal_l1(model, l1=0.1, learning_rate=only_first)
    with pytest.raises(InvalidArgumentError, match="learning_rate=-1"):
        torchref.apply_proximal_l1(model, l1=0.1, learning_rate=-1)
    with pytest.raises(InvalidArgumentError, match="l1=nan"):
        torchref.apply_proximal_l1(model, l1=float("nan"), learning_rate=0.1)
    with pytest.raises(TypeError, match="module_or_tensors"):
        torchref.apply_proximal_l1(model[0].weight, l1=0.1, learning_rate=0.1)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize(
    "learning_rate",
    [
        pytest.param(lambda: tf.constant(-0.5), id="eager-tensor"),
        pytest.param(lambda: tf.Variable(-0.5), id="variable"),
        pytest.param(lambda: tf.constant(float("nan")), id="nan-tensor"),
    ],
)
def test_tf_negative_tensor_learning_rate_rejected_eagerly(learning_rate) -> None:
    # A negative threshold would push every weight away from zero; torchref rejects it too.
    model = _keras_model()
    before = [v.numpy().copy() for v in model.weights]
    with pytest.raises(InvalidArgumentError, match="learning_rate="):
        tfreg.apply_proximal_l1(model, l1=0.1, learning_rate=learning_rate())
    with pytest.raises(InvalidArgumentError, match="learning_rate="):
        tfreg.ProximalL1(l1=0.1).apply(model, learning_rate())
    for v, b in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)


def test_tf_negative_tensor_learning_rate_rejected_in_graph_before_any_assign() -> None:
    model = _keras_model()
    before = [v.numpy().copy() for v in model.weights]
    proximal = tfreg.ProximalL1(l1=0.1)

    @tf.function
    def step(learning_rate: tf.Tensor) -> None:
        proximal.apply(model, learning_rate)

    step(tf.constant(0.0))  # threshold 0: a valid call that changes nothing
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-negative"):
        step(tf.constant(-0.5))
    assert step.experimental_get_tracing_count() == 1
    for v, b in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)
