"""Fixtures of the single-framework suites (tests/); the root conftest.py serves both suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _keras_config import keras_setting
from _twins import TWINS, Twin


@pytest.fixture
def float64_floatx() -> Iterator[None]:
    """Keras computes in float64 for the test. fit's data adapter casts float inputs, and Keras
    losses compute, in floatx; layers take the global dtype *policy*, which Keras pins to floatx
    when the first layer is built: set both, or a float64 test run after a float32 one silently
    runs in float32. The policy is read (and saved) first: ``dtype_policy()`` pins an unset
    policy to the current floatx, so reading it after floatx became float64 saved -- and
    restored -- float64 (a later float32 test then built float64 layers)."""
    import keras

    with (
        keras_setting(keras.config.dtype_policy, keras.config.set_dtype_policy, "float64"),
        keras_setting(keras.config.floatx, keras.config.set_floatx, "float64"),
    ):
        yield


@pytest.fixture(params=list(TWINS))
def twin(request: pytest.FixtureRequest) -> Twin:
    """A case run against both twins (``tests/_twins.py``), ids ``tf`` and ``torch``; each
    framework is imported only when its parameter runs (``-k torch`` never imports TensorFlow)."""
    if request.param == "torch":
        request.getfixturevalue("single_torch_thread")
    return TWINS[request.param]()
