"""The architectures parity-CI teams port, end to end (``examples/architectures``): each Keras
model and its independently written torch module pass ``assert_parity`` with 3 SGD steps, and
the same pair with one subtle porting mistake fails naming the layer where it shows first.

Tolerances (float64, the harness' table): logits, loss, gradients and every paired layer's
output <= 1e-10 rel ("model_cross"); weights after each step <= 1e-9 rel ("trajectory").
Measured: every row <= ~4e-15 rel.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tfreg.parity import assert_parity, check_parity, transfer_weights
from tfreg_harness.tolerances import tolerance

# the examples package lives at the repository root, which plain `pytest` does not put on sys.path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# module -> what the broken twin's report must name: the first diverging Keras layer, or (for a
# refusal before any step) the torch tensor in the failing row
ARCHITECTURES = {
    "bert": "attn",
    "bilstm": "lstm.bias_hh_l0",
    "unet": "dec",
    "resnet": "b1_bn2",  # needs torch outputs captured before in-place ops (h19b)
}


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
    if "." in ARCHITECTURES[name]:
        assert report.rows[0].status == "fail" and len(report.rows) == 1
        assert ARCHITECTURES[name] in report.rows[0].detail, report.rows[0].detail
        return
    assert report.first_diverging_layer is not None, report.to_text()
    assert report.first_diverging_layer.split(" ")[0] == ARCHITECTURES[name], report.to_text()


def test_bilstm_gate_order_slip_in_the_top_reverse_layer_names_bi2() -> None:
    """Keras' gate order copied into torch's layer-1 reverse direction (i, f swapped there only):
    the inner layer bi1 has no torch output of its own; bi2 (the module's output) is named."""
    pair = _module("bilstm").make_pair()
    transfer_weights(pair["keras_model"], pair["torch_module"], sample=pair["x"])
    lstm, units = pair["torch_module"].lstm, _module("bilstm").HIDDEN
    with torch.no_grad():
        for tensor in (lstm.weight_ih_l1_reverse, lstm.weight_hh_l1_reverse):
            first = tensor[:units].clone()
            tensor[:units] = tensor[units : 2 * units]
            tensor[units : 2 * units] = first
    report = check_parity(**{**pair, "steps": 0}, transfer=False)
    assert report.first_diverging_layer is not None
    assert report.first_diverging_layer.split(" ")[0] == "bi2", report.to_text()


def test_stacked_torch_lstm_needs_as_many_keras_layers() -> None:
    """nn.LSTM(num_layers=2) against one Keras Bidirectional: a failed pairing row, not a pass on
    half the model."""
    import keras

    pair = _module("bilstm").make_pair()
    model = pair["keras_model"]
    shorter = keras.Sequential([model.layers[0], model.layers[1], model.layers[3]])
    report = check_parity(shorter, pair["torch_module"], pair["x"], pair["y"])
    assert [r.status for r in report.rows] == ["fail"]
    assert "computes 2 stacked layers but only 1" in report.rows[0].detail, report.rows[0].detail
