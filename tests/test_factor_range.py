"""Factors out of range are refused naming the argument (both twins), and every public
constructor either builds or raises the library's InvalidArgumentError (hypothesis, bounded).
Before: a factor above float32's max on PNorm / GroupLasso / ``*_penalty`` with float32 weights
gave a silent inf; an int above 1.8e308 raised an OverflowError naming no argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tfreg
import torchref
from tfreg_core import InvalidArgumentError

TWINS = [pytest.param(tfreg, id="tfreg"), pytest.param(torchref, id="torchref")]


def _weights(module: Any, dtype: str) -> Any:
    x = np.full((3, 2), 0.5, dtype=dtype)
    return tf.constant(x) if module is tfreg else torch.tensor(x)


CALLS = {
    "pnorm_penalty": lambda m, x, f: m.pnorm_penalty(x, f),
    "group_lasso_penalty": lambda m, x, f: m.group_lasso_penalty(x, f, axis=0),
    "l1_penalty": lambda m, x, f: m.l1_penalty(x, f),
    "l2_penalty": lambda m, x, f: m.l2_penalty(x, f),
    "PNorm": lambda m, x, f: m.PNorm(f)(x),
    "GroupLasso": lambda m, x, f: m.GroupLasso(f, axis=0)(x),
}
NAMES = {"l1_penalty": "l1", "l2_penalty": "l2"}


@pytest.mark.parametrize("module", TWINS)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_factor_beyond_float32_is_refused_on_float32_weights(module: Any, call: str) -> None:
    name = NAMES.get(call, "strength")
    with pytest.raises(InvalidArgumentError, match=rf"argument {name}: it exceeds .*float32"):
        CALLS[call](module, _weights(module, "float32"), 1e39)
    # float64 weights hold it: 1e39 * the norm, finite.
    assert math.isfinite(float(CALLS[call](module, _weights(module, "float64"), 1e39)))


@pytest.mark.parametrize("module", TWINS)
@pytest.mark.parametrize("call", ["PNorm", "GroupLasso", "pnorm_penalty", "l2_penalty"])
def test_int_beyond_float64_is_refused_naming_the_argument(module: Any, call: str) -> None:
    name = NAMES.get(call, "strength")
    with pytest.raises(InvalidArgumentError, match=rf"argument {name}.*Received: {name}=1000"):
        CALLS[call](module, _weights(module, "float64"), 10**309)


_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**310), 10**310),
    st.booleans(),
    st.none(),
    st.text(max_size=2),
    st.lists(st.floats(0, 1), max_size=2),
)

CONSTRUCTORS = {
    "L1": lambda m, v: m.L1(v),
    "L2": lambda m, v: m.L2(v),
    "L1L2": lambda m, v: m.L1L2(l1=v, l2=0.0),
    "PNorm.strength": lambda m, v: m.PNorm(v),
    "PNorm.p": lambda m, v: m.PNorm(0.1, p=v),
    "GroupLasso": lambda m, v: m.GroupLasso(v, axis=0),
    "GroupLasso.axis": lambda m, v: m.GroupLasso(0.1, axis=v),
    "OrthogonalRegularizer": lambda m, v: m.OrthogonalRegularizer(v),
    "ProximalL1": lambda m, v: m.ProximalL1(l1=v),
    "ProximalGroupLasso": lambda m, v: m.ProximalGroupLasso(strength=v, axis=0),
}


@pytest.mark.parametrize("module", TWINS)
@pytest.mark.parametrize("constructor", sorted(CONSTRUCTORS))
@settings(max_examples=30, deadline=None)
@given(value=_values)
def test_constructors_build_or_raise_the_library_error(
    module: Any, constructor: str, value: Any
) -> None:
    try:
        built = CONSTRUCTORS[constructor](module, value)
    except InvalidArgumentError:
        return
    # Built: only from a real, finite, non-negative number (or a valid axis).
    if constructor == "GroupLasso.axis":
        assert isinstance(value, (int, list)) and not isinstance(value, bool)
        return
    if value is None and constructor in ("L1", "L2", "L1L2"):
        return  # Keras' L1(None): a zero factor
    assert isinstance(value, (int, float)) and not isinstance(value, bool)
    assert math.isfinite(float(value)) and value >= 0
    assert built.get_config()
