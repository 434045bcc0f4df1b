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

from tfreg.parity import assert_parity, check_parity, cli, transfer_weights
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
    "twoheads": "reg_hidden",  # dict outputs, a loss dict with loss_weights
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


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_runs_as_a_model_example(name: str, capsys: pytest.CaptureFixture) -> None:
    """``tfreg-parity --model examples.architectures.<name>:make_pair`` exits 0. Before: exit 2
    for the pairs whose dict carries ``device`` ("unknown keys ['device']")."""
    assert cli.main(["--model", f"examples.architectures.{name}:make_pair"]) == 0, (
        capsys.readouterr()
    )


def test_a_model_dict_naming_another_device_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    module = _module("twoheads")
    monkeypatch.setattr(
        module,
        "wrong_device",
        lambda device: {**module.make_pair(), "device": "gpu"},
        raising=False,
    )
    assert cli.main(["--model", "examples.architectures.twoheads:wrong_device"]) == 2
    assert "called for device 'cpu' but returned device='gpu'" in capsys.readouterr().err


def test_two_heads_in_another_order_than_keras_is_a_pairing_failure_without_layer_map() -> None:
    """Keras lists reg_hidden before cls (graph depth); the port defines cls first. Without the
    layer_map the report is one pairing failure naming both layers, never a silent pass."""
    pair = _module("twoheads").make_pair()
    del pair["layer_map"]
    report = check_parity(**pair)
    assert [r.status for r in report.rows] == ["fail"]
    detail = report.rows[0].detail
    assert "Keras layer 'reg_hidden' (Dense) and torch module 'cls' (Linear)" in detail, detail


def test_two_heads_loss_is_the_weighted_sum_of_the_two_losses() -> None:
    """The loss both sides are compared on is Keras' weighted loss dict, pinned against NumPy on
    the model's outputs: cross-entropy (from logits) + 0.5 * mean squared error (float64
    round-off)."""
    import numpy as np

    from tfreg_harness.keras_side.models import ModelPair, evaluate_keras

    pair = _module("twoheads").make_pair()
    keras_model, x, y = pair["keras_model"], pair["x"], pair["y"]
    outputs = keras_model(x)
    logits, reg = np.asarray(outputs["cls"]), np.asarray(outputs["reg"])
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    cross_entropy = -log_softmax[np.arange(len(logits)), y["cls"]].mean()
    expected = cross_entropy + 0.5 * ((reg - y["reg"]) ** 2).mean()
    evaluation = evaluate_keras(
        ModelPair(keras_model, pair["torch_module"], "float64", layer_map=pair["layer_map"]),
        x,
        y,
        loss=pair["loss"],
        loss_weights=pair["loss_weights"],
    )
    np.testing.assert_allclose(evaluation.loss, expected, rtol=1e-13)


# --- float32: correct architectures never fail, broken twins always do ------------------------
# Tolerances: the harness' float32 table (1e-5 rel; gradients against their layer's largest
# gradient, tfreg_harness.tolerances.GRADIENT_SCALE_RULE). The default suite runs each
# architecture on FLOAT32_SEEDS (~4 s on an idle 2-core machine); the full sweep (20 seeds x 5
# architectures, correct and broken: 200 runs, 78 s idle, ~7 min when the cores are shared) runs
# with `pytest -m slow parity_tests/test_architectures.py`.

FLOAT32_SEEDS = range(3)


def _wrong_verdicts(name: str, seeds: range, *, broken: bool) -> list[int]:
    """Seeds whose float32 verdict is wrong: a failure for the correct pair, a pass for the
    broken twin."""
    module = _module(name)
    make = module.make_broken_pair if broken else module.make_pair
    return [s for s in seeds if check_parity(**make(dtype="float32", seed=s)).ok == broken]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_float32_architecture_passes_on_several_seeds(name: str) -> None:
    assert _wrong_verdicts(name, FLOAT32_SEEDS, broken=False) == []


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_float32_broken_architecture_fails_naming_the_same_layer(name: str) -> None:
    report = check_parity(**_module(name).make_broken_pair(dtype="float32"))
    assert not report.ok
    if "." in ARCHITECTURES[name]:
        assert ARCHITECTURES[name] in report.rows[0].detail, report.rows[0].detail
        return
    assert report.first_diverging_layer is not None, report.to_text()
    assert report.first_diverging_layer.split(" ")[0] == ARCHITECTURES[name], report.to_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_float32_sweep_20_seeds_no_false_verdicts(
    name: str, request: pytest.FixtureRequest
) -> None:
    """Issue 19's proof: 20 seeds x the five architectures, 0 false failures, and the broken
    twins fail on every seed. Opt-in with ``-m slow``: ``make test`` runs slow-marked tests, and
    this sweep would take over a minute of the suite's budget."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the 20-seed float32 sweep runs with -m slow")
    assert _wrong_verdicts(name, range(20), broken=False) == []
    assert _wrong_verdicts(name, range(20), broken=True) == []
