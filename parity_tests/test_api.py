"""Bring-your-own-model parity: check_parity / assert_parity on user-built model pairs.

Tolerances (claim "model_cross" for one pass: float64 <= 1e-10 rel, float32 <= 1e-5 rel;
"trajectory" after steps: float64 <= 1e-9, float32 <= 1e-3) come from tfreg_harness.tolerances
through the harness itself; the tests check which rows exist, which fail, and what they name.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import torch
from torch import nn

from tfreg.parity import assert_parity, check_parity, seed_everything
from tfreg_harness.keras_side.devices import tf_device, torch_device
from tfreg_harness.tolerances import tolerance, zero_gradient_atol
from tfreg_harness.torch_side.architecture import KerasGELU


def _models(dtype: str, device: str, *, torch_activation: type = nn.ReLU):
    import tensorflow as tf

    with tf.device(tf_device(device)):
        keras_model = keras.Sequential(
            [
                keras.Input((6,), dtype=dtype),
                keras.layers.Dense(8, activation="relu", dtype=dtype),
                keras.layers.Dense(3, dtype=dtype),
            ]
        )
    torch_module = nn.Sequential(nn.Linear(6, 8), torch_activation(), nn.Linear(8, 3)).to(
        device=torch_device(device), dtype=getattr(torch, dtype)
    )
    return keras_model, torch_module


def _data(dtype: str, rng: np.random.Generator, shape: tuple[int, ...] = (6,)):
    return rng.normal(size=(10, *shape)).astype(dtype), rng.integers(0, 3, size=10)


def test_readme_one_liner_passes_on_a_correct_pair(dtype: str, device: str) -> None:
    """Exactly the README's call: no steps, no optimizers. (Before: a 'training steps' skip row
    made assert_parity fail on every correct pair.)"""
    rng = seed_everything(3)
    keras_model, torch_module = _models(dtype, device)
    x, y = _data(dtype, rng)
    report = assert_parity(keras_model, torch_module, x, y, device=device)
    assert report.ok and not [r for r in report.rows if r.status == "skip"]
    assert report.rows[0].tolerance == tolerance("model_cross", dtype).rtol
    assert report.first_diverging_layer is None and report.first_diverging_gradient is None


def test_matching_models_pass_forward_gradients_and_steps(device: str, dtype: str) -> None:
    rng = seed_everything(3)
    keras_model, torch_module = _models(dtype, device)
    x, y = _data(dtype, rng)
    # lr 0.125 is exact in float32: Keras keeps the learning rate as a float32 variable.
    report = assert_parity(
        keras_model,
        torch_module,
        x,
        y,
        steps=3,
        keras_optimizer=keras.optimizers.SGD(0.125),
        torch_optimizer=torch.optim.SGD(torch_module.parameters(), lr=0.125),
        device=device,
    )
    names = [r.check for r in report.rows]
    assert names[:2] == ["logits", "loss"]
    assert sum(n.startswith("grad ") for n in names) == 4  # 2 kernels + 2 biases
    assert sum(n.startswith("step 3 ") for n in names) == 4
    assert names[-1] == "eval logits after steps"
    # one output row per paired layer: Dense, its fused relu <-> nn.ReLU, Dense
    assert [r.name for r in report.layers if r.stage == "output"] == [
        f"{keras_model.layers[0].name} <-> 0",
        f"{keras_model.layers[0].name} (activation) <-> 1",
        f"{keras_model.layers[1].name} <-> 2",
    ]


def test_a_wrong_activation_in_the_middle_names_the_first_diverging_layer() -> None:
    """torch applies tanh in forward where Keras has relu: every later number fails, and the
    report names the first layer that diverged (not just "logits")."""

    class Tanh(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.tanh(self.a(x)))))

    inputs = keras.Input((6,), dtype="float64")
    h = keras.layers.Dense(8, activation="relu", dtype="float64", name="first")(inputs)
    h = keras.layers.Dense(8, activation="relu", dtype="float64", name="second")(h)
    keras_model = keras.Model(inputs, keras.layers.Dense(3, dtype="float64", name="head")(h))
    x, y = _data("float64", seed_everything(3))
    report = check_parity(keras_model, Tanh().double(), x, y)
    assert {"logits", "loss"} <= {r.check for r in report.failed}
    # "first" itself matches (its pre-activation output); "second" consumes tanh(...) != relu(...)
    assert report.first_diverging_layer == "second <-> b"
    assert report.first_diverging_gradient == "first/kernel"
    with pytest.raises(AssertionError, match="first diverging layer: second <-> b"):
        assert_parity(keras_model, Tanh().double(), x, y)


def test_a_torch_activation_module_of_another_kind_fails_at_pairing() -> None:
    keras_model, torch_module = _models("float64", "cpu", torch_activation=nn.Tanh)
    x, y = _data("float64", np.random.default_rng(0))
    report = check_parity(keras_model, torch_module, x, y)
    assert [r.status for r in report.rows] == ["fail"]
    assert "activation: Keras relu vs torch tanh" in report.rows[0].detail


def test_configuration_mismatch_is_a_failure_never_a_skip() -> None:
    """Keras 'valid' conv vs torch padding=1 used to be a skip row that allow_skips=True let
    pass; now it is a failed row naming both layers and the field."""
    keras_model = keras.Sequential(
        [keras.Input((8, 8, 1), dtype="float64"), keras.layers.Conv2D(2, 3, dtype="float64")]
    )
    torch_module = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1)).double()
    x = np.zeros((2, 8, 8, 1))
    report = check_parity(
        keras_model, torch_module, x, np.zeros((2, 6, 6, 2)), loss="mean_squared_error"
    )
    assert not report.ok and [r.status for r in report.rows] == ["fail"]
    assert "'conv2d" in report.rows[0].detail and "'0' (Conv2d)" in report.rows[0].detail
    assert "padding: Keras 'valid'" in report.rows[0].detail
    with pytest.raises(TypeError, match="allow_skips"):
        assert_parity(keras_model, torch_module, x, x, allow_skips=True)


def test_unregistered_layer_fails_with_its_name() -> None:
    keras_model = keras.Sequential(
        [
            keras.Input((4, 3, 3), dtype="float64"),
            keras.layers.ConvLSTM1D(2, 2, dtype="float64", name="clstm"),
            keras.layers.Flatten(dtype="float64"),
        ]
    )
    module = nn.Sequential(nn.Conv1d(3, 2, 2), nn.Flatten()).double()
    report = check_parity(keras_model, module, np.zeros((2, 4, 3, 3)), np.zeros(2, int))
    assert report.rows[0].status == "fail"
    assert "'clstm' (ConvLSTM1D) is of no registered layer kind" in report.rows[0].detail


def test_batchnorm_training_steps_zero_gradient_and_statistics(dtype: str) -> None:
    """Dense -> BatchNorm in train mode with 3 SGD steps. The Dense bias has gradient exactly 0
    (BN removes the batch mean): it is compared with the absolute bound zero_gradient_atol (no
    rel, which used to read 3.12 for a 6.9e-18 difference). After the steps the moving mean and
    variance and the eval logits are compared -- the variance in torch's (unbiased) convention,
    predicted from Keras' biased one, with the raw gap (far above the tolerance) stated."""
    rng = seed_everything(5)
    keras_model = keras.Sequential(
        [
            keras.Input((5,), dtype=dtype),
            keras.layers.Dense(4, dtype=dtype, bias_initializer="random_normal"),
            keras.layers.BatchNormalization(momentum=0.8, dtype=dtype),
            keras.layers.ReLU(dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )
    torch_module = nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(4, momentum=0.2, eps=1e-3), nn.ReLU(), nn.Linear(4, 3)
    ).to(getattr(torch, dtype))
    x, y = rng.normal(size=(8, 5)).astype(dtype) * 2 + 1, rng.integers(0, 3, size=8)
    report = assert_parity(
        keras_model,
        torch_module,
        x,
        y,
        training=True,
        steps=3,
        keras_optimizer=keras.optimizers.SGD(0.125),
        torch_optimizer=torch.optim.SGD(torch_module.parameters(), lr=0.125),
    )
    rows = {r.check: r for r in report.rows}
    bias = keras_model.layers[0].bias.path
    zero = rows[f"grad {bias} == 0"]
    # absolute, 64 ulps of the dtype x the largest gradient: well below the relative claim
    assert zero.max_rel is None and zero.tolerance < tolerance("model_cross", dtype).rtol
    assert all(r.max_rel is None or math.isfinite(r.max_rel) for r in report.rows)
    bn = f"{keras_model.layers[1].name} <-> 1"
    assert rows[f"moving mean {bn}"].status == "pass"
    variance = rows[f"moving variance {bn} (torch convention)"]
    assert variance.status == "pass"
    raw_gap = float(variance.detail.split("raw gap ")[1].split(" ")[0])
    assert raw_gap > 100 * tolerance("trajectory", dtype).rtol  # the difference is real ...
    assert "n=8, 4 batches" in variance.detail  # ... and predicted: 1 + 3 train-mode batches
    assert (
        rows["eval logits after steps (Keras BN variance in torch's convention)"].status == "pass"
    )


def test_unconverted_moving_statistics_fail_after_steps() -> None:
    """A converter that forgets BN's running statistics: train-mode logits agree (batch
    statistics), but the moving-variance and eval rows catch it (they were never compared)."""
    rng = seed_everything(6)
    keras_model = keras.Sequential(
        [keras.Input((5,), dtype="float64"), keras.layers.BatchNormalization(dtype="float64")]
    )
    keras_model.layers[0].moving_variance.assign(np.full(5, 2.0))
    torch_module = nn.Sequential(nn.BatchNorm1d(5, momentum=0.01, eps=1e-3)).double()
    x = rng.normal(size=(8, 5))
    report = check_parity(
        keras_model,
        torch_module,
        x,
        x,
        loss="mean_squared_error",
        training=True,
        transfer=False,
        steps=1,
        keras_optimizer=keras.optimizers.SGD(0.125),
        torch_optimizer=torch.optim.SGD(torch_module.parameters(), lr=0.125),
    )
    failed = {r.check.split(" ")[0] + " " + r.check.split(" ")[1] for r in report.failed}
    assert {r.check for r in report.rows if r.check in ("logits", "loss")} == {"logits", "loss"}
    assert "logits" not in failed and "moving variance" in failed and "eval logits" in failed


def test_functional_subclassed_and_custom_modules(dtype: str) -> None:
    """Done-when: a functional Keras model with Conv1D + LSTM + LayerNorm + Dense and its
    hand-written torch module pass assert_parity in one line; a subclassed Keras model too."""
    rng = seed_everything(7)
    inputs = keras.Input((12, 3), dtype=dtype)
    h = keras.layers.Conv1D(4, 3, padding="same", activation="relu", dtype=dtype)(inputs)
    h = keras.layers.LSTM(5, dtype=dtype)(h)
    h = keras.layers.LayerNormalization(dtype=dtype)(h)
    keras_model = keras.Model(inputs, keras.layers.Dense(3, dtype=dtype)(h))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding="same")
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.norm = nn.LayerNorm(5, eps=1e-3)
            self.head = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.lstm(torch.relu(self.conv(x)).transpose(1, 2))
            return self.head(self.norm(h[:, -1]))

    x, y = _data(dtype, rng, (12, 3))
    assert_parity(keras_model, Net().to(getattr(torch, dtype)), x, y)

    class Sub(keras.Model):
        def __init__(self) -> None:
            super().__init__(dtype=dtype)
            self.hidden = keras.layers.Dense(8, dtype=dtype)
            self.out = keras.layers.Dense(3, dtype=dtype)

        def call(self, x):
            return self.out(keras.activations.gelu(self.hidden(x), approximate=True))

    sub = Sub()
    x, y = _data(dtype, rng)
    sub(x)
    # TF's tanh-gelu keeps 0.044715 as a float32 constant (9.0e-10 off nn.GELU in float64):
    # the matching mode KerasGELU computes with it, so the model_cross claim holds in both dtypes.
    torch_module = nn.Sequential(nn.Linear(6, 8), KerasGELU("tanh"), nn.Linear(8, 3))
    assert_parity(sub, torch_module.to(getattr(torch, dtype)), x, y)


def test_dropout_in_training_mode_draws_and_injects_masks() -> None:
    """check_parity(training=True) with Dropout used to crash; masks are now drawn with NumPy
    and injected on both sides."""
    rng = seed_everything(8)
    keras_model = keras.Sequential(
        [
            keras.Input((6,), dtype="float64"),
            keras.layers.Dense(16, dtype="float64"),
            keras.layers.Dropout(0.5, dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    torch_module = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x, y = _data("float64", rng)
    trained = assert_parity(keras_model, torch_module, x, y, training=True)
    dropout = next(r for r in trained.layers if r.kind == "Dropout")
    assert dropout.passed and dropout.name.endswith("<-> 1")
    # The masks are real: with them the logits differ from eval mode's (no dropout) on each side.
    evaluated = assert_parity(keras_model, torch_module, x, y)
    assert evaluated.rows[0].max_abs <= tolerance("model_cross", "float64").rtol
    masks = [np.random.default_rng(0).uniform(size=(10, 16)) >= 0.5]
    assert 0.3 < masks[0].mean() < 0.7
    assert_parity(keras_model, torch_module, x, y, training=True, dropout_masks=masks)


def test_own_converter_with_transfer_false() -> None:
    """transfer=False checks the user's own converter: a correct one passes, one that forgets a
    transpose fails at the layer it broke."""
    rng = seed_everything(9)
    keras_model, torch_module = _models("float64", "cpu")
    keras_model.layers[1].kernel.assign(rng.normal(size=(8, 3)))
    x, y = _data("float64", rng)

    def convert(transpose_second: bool) -> None:
        first, second = keras_model.layers
        with torch.no_grad():
            torch_module[0].weight.copy_(torch.from_numpy(first.kernel.numpy().T))
            torch_module[0].bias.copy_(torch.from_numpy(first.bias.numpy()))
            w = second.kernel.numpy()
            square = w.reshape(3, 8)  # a "converter" that reshapes instead of transposing
            torch_module[2].weight.copy_(
                torch.from_numpy(w.T.copy() if transpose_second else square)
            )
            torch_module[2].bias.copy_(torch.from_numpy(second.bias.numpy()))

    convert(transpose_second=True)
    assert_parity(keras_model, torch_module, x, y, transfer=False)
    convert(transpose_second=False)
    report = check_parity(keras_model, torch_module, x, y, transfer=False)
    assert report.first_diverging_layer == f"{keras_model.layers[1].name} <-> 2"


def test_layer_map_overrides_the_pairing() -> None:
    keras_model = keras.Sequential(
        [
            keras.Input((6,), dtype="float64"),
            keras.layers.Dense(4, dtype="float64", name="a"),
            keras.layers.Dense(3, dtype="float64", name="b"),
        ]
    )

    class Reordered(nn.Module):  # definition order differs from call order
        def __init__(self) -> None:
            super().__init__()
            self.second = nn.Linear(4, 3)
            self.first = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x))

    x, y = _data("float64", seed_everything(10))
    report = check_parity(keras_model, Reordered().double(), x, y)
    assert not report.ok and "'a' (Dense) and torch module 'second'" in report.rows[0].detail
    # layer_map pairs by name, wherever the modules sit in definition order.
    assert_parity(keras_model, Reordered().double(), x, y, layer_map={"a": "first", "b": "second"})
    assert_parity(keras_model, Reordered().double(), x, y, layer_map={"a": "first"})
    with pytest.raises(AssertionError, match="not a leaf of the torch module"):
        assert_parity(keras_model, Reordered().double(), x, y, layer_map={"a": "nope"})
    with pytest.raises(AssertionError, match="already paired with another Keras layer"):
        assert_parity(
            keras_model, Reordered().double(), x, y, layer_map={"a": "first", "b": "first"}
        )


def test_zero_gradient_bound_is_derived_from_the_dtype() -> None:
    # 64 ulps of the dtype times the largest gradient entry: hand values.
    assert zero_gradient_atol("float64", 0.5) == 64 * 2.0**-52 * 0.5
    assert zero_gradient_atol("float32", 1.0) == 64 * 2.0**-23
    with pytest.raises(ValueError, match="float16"):
        zero_gradient_atol("float16", 1.0)


def test_steps_without_optimizers_and_unknown_loss_are_rejected() -> None:
    keras_model, torch_module = _models("float64", "cpu")
    x, y = _data("float64", np.random.default_rng(0))
    with pytest.raises(ValueError, match="steps > 0 needs both"):
        check_parity(keras_model, torch_module, x, y, steps=2)
    with pytest.raises(ValueError, match="Unknown loss 'hinge'"):
        check_parity(keras_model, torch_module, x, y, loss="hinge")


def test_float32_input_on_a_float64_model_is_refused() -> None:
    """keras.Input defaults to float32: Keras then rounds every batch before the first float64
    layer, torch does not -- a real difference of ~3e-8, reported as a pairing failure."""
    keras_model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, dtype="float64")])
    report = check_parity(keras_model, nn.Linear(6, 3).double(), np.zeros((2, 6)), np.zeros(2, int))
    assert "takes float32 input but computes in float64" in report.rows[0].detail


def test_regression_loss_pair(device: str) -> None:
    rng = seed_everything(5)
    keras_model, torch_module = _models("float64", device)
    x = rng.normal(size=(10, 6))
    target = rng.normal(size=(10, 3))
    report = check_parity(
        keras_model, torch_module, x, target, loss="mean_squared_error", device=device
    )
    assert report.ok and [r.status for r in report.rows].count("pass") == len(report.rows)


def test_lstm_training_steps_need_torchs_second_bias_frozen() -> None:
    """Keras' LSTM has one bias, torch two that it adds (FRAMEWORK_DIFFERENCES note
    "lstm_bias"): the transfer zeros bias_hh. Gradients agree either way, but a trainable
    bias_hh is updated too, so torch's effective bias moves twice as far: a run with steps
    refuses it by name; frozen, the trajectories agree (trajectory claim: float64 <= 1e-9)."""
    rng = seed_everything(11)
    keras_model = keras.Sequential(
        [keras.Input((4, 2), dtype="float64"), keras.layers.LSTM(3, dtype="float64", name="lstm")]
    )
    x, target = rng.normal(size=(5, 4, 2)), rng.normal(size=(5, 3))

    def run(frozen: bool):
        lstm = nn.LSTM(2, 3, batch_first=True).double()
        lstm.bias_hh_l0.requires_grad_(not frozen)
        module = Net(lstm)
        params = [p for p in module.parameters() if p.requires_grad]
        return check_parity(
            keras_model, module, x, target, loss="mean_squared_error", steps=1,
            keras_optimizer=keras.optimizers.SGD(0.5),
            torch_optimizer=torch.optim.SGD(params, lr=0.5),
        )  # fmt: skip

    class Net(nn.Module):
        def __init__(self, lstm: nn.LSTM) -> None:
            super().__init__()
            self.lstm = lstm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(x)[0][:, -1]

    frozen = run(frozen=True)
    assert frozen.ok, frozen.to_text()
    keras_model.layers[0].cell.bias.assign(np.full(12, 0.1))  # a fresh start for the second run
    free = run(frozen=False)
    # refused before any step, naming the tensor (it used to fail at step 1 on the Keras bias,
    # 100% off, without naming bias_hh)
    assert [r.status for r in free.rows] == ["fail"], free.to_text()
    assert "lstm.bias_hh_l0 train in torch" in free.rows[0].detail
    assert "requires_grad_(False)" in free.rows[0].detail


def test_torch_input_layout_can_be_given() -> None:
    """A torch module that takes (N, L, C) and transposes itself: "auto" feeds it channels
    first (its first layer is a conv) and the shapes clash -- a ValueError naming the way out
    (before: torch's raw RuntimeError from the first conv); torch_input="channels_last" fits."""
    keras_model = keras.Sequential(
        [keras.Input((7, 2), dtype="float64"), keras.layers.Conv1D(3, 3, dtype="float64")]
    )

    class TakesNLC(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.transpose(1, 2)).transpose(1, 2)

    x = seed_everything(12).normal(size=(4, 7, 2))
    target = np.zeros((4, 5, 3))
    with pytest.raises(ValueError, match="needs torch_input='channels_last'"):
        check_parity(keras_model, TakesNLC().double(), x, target, loss="mean_squared_error")
    assert_parity(
        keras_model, TakesNLC().double(), x, target, loss="mean_squared_error",
        torch_input="channels_last",
    )  # fmt: skip
    with pytest.raises(ValueError, match="torch_input"):
        check_parity(keras_model, TakesNLC(), x, target, torch_input="nchw")
