"""Penalty values and gradients computed by hand, configs, ``from_config`` round trips.

Every check runs on tfreg and on torchref: both must give the hand-computed number, so neither is
the other's expected value. Keras-named classes apply their factor through float32 (as Keras
does), so their hand values use ``f32(factor)``; the functional core and PNorm/GroupLasso use the
factor exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import tfreg
import torchref


def f32(value: float) -> float:
    """``value`` rounded to float32: the factor Keras actually multiplies by."""
    return float(np.float32(value))


def tf_value_and_grad(reg: Callable[[Any], Any], w: np.ndarray) -> tuple[float, np.ndarray]:
    variable = tf.Variable(w)
    with tf.GradientTape() as tape:
        value = reg(variable)
    return float(value), tape.gradient(value, variable).numpy()


def torch_value_and_grad(reg: Callable[[Any], Any], w: np.ndarray) -> tuple[float, np.ndarray]:
    tensor = torch.tensor(w, requires_grad=True)
    value = reg(tensor)
    value.backward()
    return float(value.detach()), tensor.grad.numpy()


FRAMEWORKS = [
    pytest.param((tfreg, tf_value_and_grad), id="tfreg"),
    pytest.param((torchref, torch_value_and_grad), id="torchref"),
]

SQRT2 = math.sqrt(2.0)
# (name, make(module), float64 input, hand value, hand gradient)
HAND_CASES = [
    (
        "L1(0.1)-on-[1,-2,3]",  # 0.1 * (1 + 2 + 3)
        lambda m: m.L1(0.1),
        [1.0, -2.0, 3.0],
        f32(0.1) * 6.0,
        [f32(0.1), -f32(0.1), f32(0.1)],
    ),
    (
        "l1_penalty-exact-factor",
        lambda m: lambda x: m.l1_penalty(x, 0.1),
        [1.0, -2.0, 3.0],
        0.6,
        [0.1, -0.1, 0.1],
    ),
    (
        "L2(0.1)-on-[1,-2,3]",  # 0.1 * (1 + 4 + 9), gradient 2 * l2 * x (no 1/2)
        lambda m: m.L2(0.1),
        [1.0, -2.0, 3.0],
        f32(0.1) * 14.0,
        [2 * f32(0.1), -4 * f32(0.1), 6 * f32(0.1)],
    ),
    (
        "l2_penalty-exact-factor",
        lambda m: lambda x: m.l2_penalty(x, 0.1),
        [1.0, -2.0, 3.0],
        1.4,
        [0.2, -0.4, 0.6],
    ),
    (
        "L1L2(0.1,0.2)-on-[1,-2,3]",  # 0.6 + 2.8
        lambda m: m.L1L2(l1=0.1, l2=0.2),
        [1.0, -2.0, 3.0],
        f32(0.1) * 6.0 + f32(0.2) * 14.0,
        [f32(0.1) + 2 * f32(0.2), -f32(0.1) - 4 * f32(0.2), f32(0.1) + 6 * f32(0.2)],
    ),
    (
        "L1L2(l2=0.2)-has-no-L1-term",  # Keras' defaults are 0.0, not 0.01
        lambda m: m.L1L2(l2=0.2),
        [1.0, -2.0, 3.0],
        f32(0.2) * 14.0,
        [2 * f32(0.2), -4 * f32(0.2), 6 * f32(0.2)],
    ),
    (
        "PNorm(0.5,p=2)-on-[3,4]",  # 0.5 * 5; gradient 0.5 * x / ||x||
        lambda m: m.PNorm(0.5, p=2),
        [3.0, 4.0],
        2.5,
        [0.3, 0.4],
    ),
    (
        "PNorm(0.5,p=1)-on-[3,-4]",
        lambda m: m.PNorm(0.5, p=1),
        [3.0, -4.0],
        3.5,
        [0.5, -0.5],
    ),
    (
        "PNorm(0.5,p=3)-on-[3,4,5]",  # (27 + 64 + 125) ** (1/3) = 6; grad 0.5 * x**2 / 6**2
        lambda m: m.PNorm(0.5, p=3),
        [3.0, 4.0, 5.0],
        3.0,
        [0.5 * 9 / 36, 0.5 * 16 / 36, 0.5 * 25 / 36],
    ),
    (
        "PNorm(0.5,p=1.5)-on-[4,-4]",  # (8 + 8) ** (2/3); grad 0.5 * sign * sqrt(|x| / ||x||)
        lambda m: m.PNorm(0.5, p=1.5),
        [4.0, -4.0],
        0.5 * 16.0 ** (2.0 / 3.0),
        [
            0.5 * math.sqrt(4.0 / 16.0 ** (2.0 / 3.0)),
            -0.5 * math.sqrt(4.0 / 16.0 ** (2.0 / 3.0)),
        ],
    ),
    (
        "GroupLasso(0.1,axis=1)-row-groups",  # row norms 5, 0, 10; zero group: gradient 0
        lambda m: m.GroupLasso(0.1, axis=1),
        [[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]],
        1.5,
        [[0.06, 0.08], [0.0, 0.0], [0.06, 0.08]],
    ),
    (
        "GroupLasso(0.1,axis=0)-column-groups",  # column norms sqrt(45), sqrt(80)
        lambda m: m.GroupLasso(0.1, axis=0),
        [[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]],
        0.1 * 7.0 * math.sqrt(5.0),
        [[0.1 / math.sqrt(5), 0.1 / math.sqrt(5)], [0.0, 0.0], [0.2 / math.sqrt(5)] * 2],
    ),
    (
        "GroupLasso(0.1,axis=(0,1))-one-group",  # sqrt(125)
        lambda m: m.GroupLasso(0.1, axis=(0, 1)),
        [[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]],
        0.1 * math.sqrt(125.0),
        [
            [0.3 / math.sqrt(125), 0.4 / math.sqrt(125)],
            [0.0, 0.0],
            [0.6 / math.sqrt(125), 0.8 / math.sqrt(125)],
        ],
    ),
    (
        # Unit rows (1,0) and (1,1)/sqrt2: one pair, |cos| = 1/sqrt2. d cos/da = b/|a||b| -
        # cos a/|a|^2 = (0, 1/sqrt2); d cos/db = a/|a||b| - cos b/|b|^2 = (1, -1)/(2 sqrt2).
        "Orthogonal(0.1,rows)-two-rows",
        lambda m: m.OrthogonalRegularizer(0.1, mode="rows"),
        [[1.0, 0.0], [1.0, 1.0]],
        f32(0.1) / SQRT2,
        [[0.0, f32(0.1) / SQRT2], [f32(0.1) / (2 * SQRT2), -f32(0.1) / (2 * SQRT2)]],
    ),
    (
        "Orthogonal(0.1,columns)-identity-is-orthogonal",  # every product is 0, sign(0) = 0
        lambda m: m.OrthogonalRegularizer(0.1, mode="columns"),
        [[1.0, 0.0], [0.0, 1.0]],
        0.0,
        [[0.0, 0.0], [0.0, 0.0]],
    ),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    ("make", "w", "value", "grad"), [pytest.param(*c[1:], id=c[0]) for c in HAND_CASES]
)
def test_hand_computed_value_and_gradient(framework, make, w, value, grad) -> None:
    module, value_and_grad = framework
    got_value, got_grad = value_and_grad(make(module), np.array(w, dtype=np.float64))
    assert got_value == pytest.approx(value, rel=1e-15, abs=1e-16)
    np.testing.assert_allclose(got_grad, np.array(grad), rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    ("mode", "value"),
    [
        # Unit rows (1,0), (1,1)/sqrt2, (0,1): |cos| = 1/sqrt2, 0, 1/sqrt2 -> mean sqrt2/3.
        pytest.param("rows", SQRT2 / 3.0, id="rows"),
        # Columns (1,1,0)/sqrt2, (0,1,2)/sqrt5: one pair, cos = 1/sqrt10.
        pytest.param("columns", 1.0 / math.sqrt(10.0), id="columns"),
    ],
)
def test_orthogonal_three_by_two_by_hand(framework, mode, value) -> None:
    module, value_and_grad = framework
    w = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    got, _ = value_and_grad(module.OrthogonalRegularizer(0.1, mode=mode), w)
    assert got == pytest.approx(f32(0.1) * value, rel=1e-15)


def test_documented_values_in_readable_form() -> None:
    """The numbers the issue quotes, in float32 as users see them."""
    x = tf.constant([1.0, -2.0, 3.0])
    assert float(tfreg.L1(0.1)(x)) == pytest.approx(0.6, rel=1e-7)
    assert float(tfreg.PNorm(0.5, p=2)(tf.constant([3.0, 4.0]))) == 2.5
    assert float(torchref.PNorm(0.5, p=2)(torch.tensor([3.0, 4.0]))) == 2.5


# --- get_config ----------------------------------------------------------------------------

KERAS_CONFIG_CASES = [
    pytest.param("L1", {"l1": 0.037}, {"l1": f32(0.037)}, id="L1-float32-rounded"),
    pytest.param("L1", {}, {"l1": f32(0.01)}, id="L1-default"),
    pytest.param("L1", {"l1": None}, {"l1": f32(0.01)}, id="L1-None-is-default"),
    pytest.param("L2", {"l2": 0.037}, {"l2": 0.037}, id="L2-kept-as-given"),
    pytest.param("L2", {"l2": None}, {"l2": 0.01}, id="L2-None-is-default"),
    pytest.param("L2", {"l2": 3}, {"l2": 3.0}, id="L2-int-becomes-float"),
    pytest.param("L1L2", {"l1": 0.037, "l2": 0.011}, {"l1": 0.037, "l2": 0.011}, id="L1L2"),
    pytest.param("L1L2", {}, {"l1": 0.0, "l2": 0.0}, id="L1L2-default-zero"),
    pytest.param("L1L2", {"l1": None, "l2": None}, {"l1": 0.0, "l2": 0.0}, id="L1L2-None-zero"),
    pytest.param(
        "OrthogonalRegularizer",
        {"factor": 0.037, "mode": "columns"},
        {"factor": f32(0.037), "mode": "columns"},
        id="Orthogonal-columns",
    ),
    pytest.param(
        "OrthogonalRegularizer", {}, {"factor": f32(0.01), "mode": "rows"}, id="Orthogonal-default"
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), KERAS_CONFIG_CASES)
def test_keras_named_configs_equal_keras_own(name, kwargs, expected) -> None:
    keras_config = getattr(keras.regularizers, name)(**kwargs).get_config()
    assert keras_config == expected  # the hand-written dict is what Keras itself returns
    for module in (tfreg, torchref):
        config = getattr(module, name)(**kwargs).get_config()
        assert config == keras_config
        assert [type(v) for v in config.values()] == [type(v) for v in keras_config.values()]


OWN_CONFIG_CASES = [
    pytest.param("PNorm", {}, {"strength": 0.01, "p": 2.0}, id="PNorm-default"),
    pytest.param("PNorm", {"strength": 0.5, "p": 3}, {"strength": 0.5, "p": 3.0}, id="PNorm-p3"),
    pytest.param(
        "PNorm", {"strength": 0.037, "p": 1.5}, {"strength": 0.037, "p": 1.5}, id="PNorm-exact"
    ),
    pytest.param(
        "GroupLasso", {"axis": 1}, {"strength": 0.01, "axis": 1}, id="GroupLasso-int-axis"
    ),
    pytest.param(
        "GroupLasso",
        {"strength": 0.2, "axis": (0, 1, 2)},
        {"strength": 0.2, "axis": [0, 1, 2]},  # a list: what JSON gives back
        id="GroupLasso-tuple-axis",
    ),
    pytest.param(
        "GroupLasso", {"axis": np.int64(-1)}, {"strength": 0.01, "axis": -1}, id="GroupLasso-np-int"
    ),
]


@pytest.mark.parametrize("module", [tfreg, torchref], ids=["tfreg", "torchref"])
@pytest.mark.parametrize(("name", "kwargs", "expected"), OWN_CONFIG_CASES)
def test_own_class_configs(module, name, kwargs, expected) -> None:
    config = getattr(module, name)(**kwargs).get_config()
    assert config == expected
    # JSON-friendly plain Python types: int axis stays int, p is a float even when given as 3.
    assert {k: type(v) for k, v in config.items()} == {k: type(v) for k, v in expected.items()}


ROUND_TRIP = [
    pytest.param("L1", {"l1": 0.037}, id="L1"),
    pytest.param("L2", {"l2": 0.037}, id="L2"),
    pytest.param("L1L2", {"l1": 0.013, "l2": 0.029}, id="L1L2"),
    pytest.param("OrthogonalRegularizer", {"factor": 0.07, "mode": "columns"}, id="Orthogonal"),
    pytest.param("PNorm", {"strength": 0.043, "p": 1.5}, id="PNorm"),
    pytest.param("GroupLasso", {"strength": 0.031, "axis": (1, 0)}, id="GroupLasso"),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(("name", "kwargs"), ROUND_TRIP)
def test_from_config_round_trip_is_exact(framework, name, kwargs) -> None:
    module, value_and_grad = framework
    original = getattr(module, name)(**kwargs)
    rebuilt = type(original).from_config(original.get_config())
    assert type(rebuilt) is type(original)
    assert rebuilt.get_config() == original.get_config()
    # A second trip must not round further (L1's float32-rounded factor is a fixed point).
    assert type(original).from_config(rebuilt.get_config()).get_config() == original.get_config()
    w = np.random.default_rng(3).normal(size=(4, 3))
    assert value_and_grad(rebuilt, w)[0] == value_and_grad(original, w)[0]


@pytest.mark.parametrize("module", [tfreg, torchref], ids=["tfreg", "torchref"])
def test_hyperparameters_after_the_first_are_keyword_only(module) -> None:
    with pytest.raises(TypeError, match="positional"):
        module.PNorm(0.1, 3)
    with pytest.raises(TypeError, match="positional"):
        module.GroupLasso(0.1, 1)
    with pytest.raises(TypeError, match="axis"):
        module.GroupLasso(0.1)  # no default grouping: it depends on the layer's layout


def test_classes_subclass_their_frameworks_base() -> None:
    for name in ("L1", "L2", "L1L2", "OrthogonalRegularizer", "PNorm", "GroupLasso"):
        assert issubclass(getattr(tfreg, name), keras.regularizers.Regularizer)
        assert issubclass(getattr(torchref, name), torchref.Regularizer)
