"""Fixtures for cross-framework tests: one seed call, dtypes, devices (GPU skipped cleanly)."""

from __future__ import annotations

import numpy as np
import pytest

from tfreg.parity import seed_everything
from tfreg_harness.keras_side.devices import available_devices

SEED = 20261123


@pytest.fixture(params=["cpu", "gpu"])
def device(request: pytest.FixtureRequest) -> str:
    if request.param not in available_devices():
        pytest.skip("no GPU visible to both TensorFlow and torch")
    return request.param


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return seed_everything(SEED)
