"""The architectures parity-CI teams port, end to end (``examples/architectures``): each Keras
model and its independently written torch module pass ``assert_parity`` with 3 SGD steps, and
the same pair with one subtle porting mistake fails naming the layer where it shows first.

Tolerances (float64, the harness' table): logits, loss, gradients and every paired layer's
output <= 1e-10 rel ("model_cross"); weights after each step <= 1e-9 rel ("trajectory").
Measured: every row <= ~4e-15 rel.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from tfreg.parity import assert_parity, check_parity
from tfreg_harness.tolerances import tolerance

# module -> the Keras layer the broken twin's report must name first
ARCHITECTURES = {"bert": "attn"}


def _module(name: str) -> Any:
    return importlib.import_module(f"examples.architectures.{name}")


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_pair_passes_with_steps(name: str) -> None:
    report = assert_parity(**_module(name).make_pair())
    rows = [r for r in report.rows if r.max_rel is not None]
    steps = [r for r in rows if r.check.startswith("step ")]
    assert steps and len(rows) > len(steps)  # gradients, layer outputs and trajectories ran
    assert all(r.tolerance <= tolerance("trajectory", "float64").rtol for r in rows)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_broken_architecture_names_the_layer(name: str) -> None:
    report = check_parity(**_module(name).make_broken_pair())
    assert not report.ok
    assert report.first_diverging_layer is not None, report.to_text()
    assert report.first_diverging_layer.split(" ")[0] == ARCHITECTURES[name], report.to_text()
