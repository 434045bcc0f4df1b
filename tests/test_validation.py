"""Bad hyperparameters and bad inputs: the error type, the argument and value in the message, and
Keras' exact message wherever Keras rejects the same input (so code matching on it keeps working).

Where we deliberately differ from Keras (booleans, NumPy scalars, factors beyond float32), the
test shows what Keras does next to what we do.
"""

from __future__ import annotations

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import tfreg
import torchref
from tfreg_core.validation import InvalidArgumentError

MODULES = [pytest.param(tfreg, id="tfreg"), pytest.param(torchref, id="torchref")]

_BAD_FACTORS = [
    pytest.param(-1, id="negative-int"),
    pytest.param(-0.5, id="negative"),
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param(-math.inf, id="-inf"),
    pytest.param("0.1", id="string"),
    pytest.param([0.1], id="list"),
]
_KERAS_ARGUMENTS = [
    pytest.param("L1", "l1", id="L1.l1"),
    pytest.param("L2", "l2", id="L2.l2"),
    pytest.param("L1L2", "l1", id="L1L2.l1"),
    pytest.param("L1L2", "l2", id="L1L2.l2"),
    pytest.param("OrthogonalRegularizer", "factor", id="Orthogonal.factor"),
]


def _keras_message(cls_name: str, **kwargs) -> str:
    with pytest.raises(ValueError) as keras_error:
        getattr(keras.regularizers, cls_name)(**kwargs)
    return str(keras_error.value)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(("cls_name", "argument"), _KERAS_ARGUMENTS)
@pytest.mark.parametrize("value", _BAD_FACTORS)
def test_bad_factor_message_is_keras_message(module, cls_name, argument, value) -> None:
    expected = _keras_message(cls_name, **{argument: value})
    assert expected.startswith(f"Invalid value for argument {argument}: ")
    with pytest.raises(InvalidArgumentError) as ours:
        getattr(module, cls_name)(**{argument: value})
    assert str(ours.value) == expected
    assert isinstance(ours.value, ValueError) and isinstance(ours.value, TypeError)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("mode", ["diag", "Rows", None, 0])
def test_bad_orthogonal_mode_message_is_keras_message(module, mode) -> None:
    expected = _keras_message("OrthogonalRegularizer", mode=mode)
    with pytest.raises(InvalidArgumentError) as ours:
        module.OrthogonalRegularizer(mode=mode)
    assert str(ours.value) == expected
    with pytest.raises(InvalidArgumentError, match=re.escape(f"Received: mode={mode}")):
        module.orthogonal_penalty(np.eye(2) if module is tfreg else torch.eye(2), 0.1, mode)


def test_orthogonal_factor_none_is_rejected_like_keras() -> None:
    """Unlike L1/L2/L1L2, Keras' Orthogonal has no None -> default rule; neither do we."""
    expected = _keras_message("OrthogonalRegularizer", factor=None)
    assert expected.endswith("expected a non-negative float.Received: factor=None")
    for module in (tfreg, torchref):
        with pytest.raises(InvalidArgumentError) as ours:
            module.OrthogonalRegularizer(factor=None)
        assert str(ours.value) == expected


@pytest.mark.parametrize(
    "shape", [pytest.param((3,), id="vector"), pytest.param((2, 2, 2), id="3d"), ()]
)
def test_orthogonal_wrong_rank_message_is_keras_message(shape) -> None:
    with pytest.raises(ValueError) as keras_error:
        keras.regularizers.OrthogonalRegularizer()(tf.ones(shape))
    expected = str(keras_error.value)
    assert (
        expected
        == f"Inputs to OrthogonalRegularizer must have rank 2. Received: inputs.shape={shape}"
    )
    with pytest.raises(InvalidArgumentError) as ours:
        tfreg.OrthogonalRegularizer()(tf.ones(shape))
    assert str(ours.value) == expected
    with pytest.raises(InvalidArgumentError) as torch_error:
        torchref.OrthogonalRegularizer()(torch.ones(shape))
    assert str(torch_error.value) == expected


# --- deliberate differences from Keras ----------------------------------------------------


@pytest.mark.parametrize("module", MODULES)
def test_bool_factor_rejected_where_keras_silently_uses_one(module) -> None:
    assert keras.regularizers.L1(True).get_config() == {"l1": 1.0}  # Keras: True -> 1.0
    with pytest.raises(
        InvalidArgumentError,
        match=re.escape("argument l1: expected a non-negative float.Received: l1=True"),
    ):
        module.L1(True)
    with pytest.raises(InvalidArgumentError, match="factor=False"):
        module.OrthogonalRegularizer(False)


@pytest.mark.parametrize("module", MODULES)
def test_numpy_scalar_accepted_where_keras_rejects_it(module) -> None:
    with pytest.raises(ValueError, match=re.escape("Received: l1=0.10000000149011612")):
        keras.regularizers.L1(np.float32(0.1))
    assert module.L1(np.float32(0.1)).get_config() == {"l1": float(np.float32(0.1))}
    assert module.L2(np.float64(0.1)).get_config() == {"l2": 0.1}


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(("cls_name", "argument"), _KERAS_ARGUMENTS)
def test_factor_beyond_float32_rejected_at_construction_naming_it(
    module, cls_name, argument
) -> None:
    """Keras also fails on 1e39, but with a conversion error naming neither argument nor value,
    and (L2, L1L2) only at the first call."""
    with pytest.raises(ValueError):  # TF: "Can't convert Python sequence with a value out of range"
        getattr(keras.regularizers, cls_name)(**{argument: 1e39})(tf.ones((2, 2)))
    with pytest.raises(InvalidArgumentError, match="fits in float32") as ours:
        getattr(module, cls_name)(**{argument: 1e39})
    assert f"Received: {argument}=1e+39" in str(ours.value)
    largest = float(np.finfo(np.float32).max)
    assert getattr(module, cls_name)(**{argument: largest}).get_config()[argument] == largest


# --- PNorm and GroupLasso --------------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("cls_name", ["PNorm", "GroupLasso"])
@pytest.mark.parametrize(
    "value", [*_BAD_FACTORS, pytest.param(None, id="None"), pytest.param(True, id="bool")]
)
def test_bad_strength(module, cls_name, value) -> None:
    kwargs = {"axis": 0} if cls_name == "GroupLasso" else {}
    with pytest.raises(InvalidArgumentError) as error:
        getattr(module, cls_name)(value, **kwargs)
    assert str(error.value) == (
        "Invalid value for argument strength: expected a non-negative float."
        f"Received: strength={value}"
    )


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(
    "p",
    [
        pytest.param(0.5, id="below-1"),
        pytest.param(0, id="zero"),
        pytest.param(-2.0, id="negative"),
        pytest.param(math.inf, id="inf"),
        pytest.param(math.nan, id="nan"),
        pytest.param("2", id="string"),
        pytest.param(True, id="bool"),
        pytest.param(None, id="None"),
    ],
)
def test_bad_p(module, p) -> None:
    expected = f"Invalid value for argument p: expected a finite number >= 1.0. Received: p={p!r}"
    with pytest.raises(InvalidArgumentError) as error:
        module.PNorm(0.1, p=p)
    assert str(error.value) == expected
    x = np.ones(3) if module is tfreg else torch.ones(3)
    with pytest.raises(InvalidArgumentError) as functional_error:
        module.pnorm_penalty(x, 0.1, p=p)
    assert str(functional_error.value) == expected


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(
    "axis",
    [
        pytest.param("0", id="string"),
        pytest.param([], id="empty"),
        pytest.param((0, 0), id="repeated"),
        pytest.param(True, id="bool"),
        pytest.param(1.0, id="float"),
        pytest.param(None, id="None"),
        pytest.param([0, "1"], id="non-int-entry"),
    ],
)
def test_bad_group_lasso_axis_at_construction(module, axis) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        module.GroupLasso(0.1, axis=axis)
    assert str(error.value) == (
        "Invalid value for argument axis: expected an int or a non-empty sequence of distinct "
        f"ints. Received: axis={axis!r}"
    )


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(
    ("axis", "shape", "message"),
    [
        pytest.param(2, (3, 2), "axis 2 is out of range for a tensor of rank 2", id="too-big"),
        pytest.param(-3, (3, 2), "axis -3 is out of range for a tensor of rank 2", id="too-small"),
        pytest.param(0, (), "axis 0 is out of range for a tensor of rank 0", id="scalar"),
        pytest.param(
            (0, -2), (3, 2), "axes repeat after resolving negatives for rank 2", id="repeat"
        ),
    ],
)
def test_bad_group_lasso_axis_for_the_tensor(module, axis, shape, message) -> None:
    x = tf.ones(shape) if module is tfreg else torch.ones(shape)
    with pytest.raises(InvalidArgumentError, match=re.escape(message)) as error:
        module.GroupLasso(0.1, axis=axis)(x)
    assert f"Received: axis={(axis,) if isinstance(axis, int) else axis!r}" in str(error.value)


# --- lookup ------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(
    "identifier",
    [
        pytest.param("l3", id="unknown-key"),
        pytest.param("Regularize", id="near-miss"),
        pytest.param(3, id="int"),
        pytest.param({"class_name": "NoSuchRegularizer", "config": {}}, id="unknown-class-dict"),
    ],
)
def test_unknown_identifier_message_is_keras_message(module, identifier) -> None:
    with pytest.raises(ValueError) as keras_error:
        keras.regularizers.get(identifier)
    expected = str(keras_error.value)
    assert expected == f"Could not interpret regularizer identifier: {identifier}"
    with pytest.raises(InvalidArgumentError) as ours:
        module.get(identifier)
    assert str(ours.value) == expected


@pytest.mark.parametrize("module", MODULES)
def test_get_none_is_none(module) -> None:
    assert keras.regularizers.get(None) is None
    assert module.get(None) is None


_FUNCTIONAL = [
    pytest.param("l1_penalty", "l1", {}, id="l1_penalty.l1"),
    pytest.param("l2_penalty", "l2", {}, id="l2_penalty.l2"),
    pytest.param("orthogonal_penalty", "factor", {}, id="orthogonal_penalty.factor"),
    pytest.param("pnorm_penalty", "strength", {"p": 3.0}, id="pnorm_penalty.strength"),
    pytest.param("group_lasso_penalty", "strength", {"axis": 0}, id="group_lasso.strength"),
]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(("function", "name", "kwargs"), _FUNCTIONAL)
@pytest.mark.parametrize("factor", _BAD_FACTORS)
def test_functional_penalty_rejects_bad_factor_naming_it(
    module, function: str, name: str, kwargs: dict, factor
) -> None:
    # Unchecked, a negative factor silently gave a negative penalty (pnorm_penalty: -1.73).
    x = np.ones((2, 3)) if module is tfreg else torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(InvalidArgumentError, match=f"argument {name}:.*Received: {name}="):
        getattr(module, function)(x, factor, **kwargs)


@pytest.mark.parametrize(("function", "name", "kwargs"), _FUNCTIONAL)
def test_torch_functional_penalty_rejects_a_non_tensor(function: str, name: str, kwargs) -> None:
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor\. Received: x of type ndarray"):
        getattr(torchref, function)(np.ones((2, 3)), 0.1, **kwargs)
