"""No false verdicts: correct ports that used to fail, wrong ports that used to pass, and ports
that used to crash the harness instead of getting a failure row.

Tolerances: the harness' own ("model_cross": float64 <= 1e-10 rel, float32 <= 1e-5 rel of the
compared tensor -- of the layer's gradients for a gradient; see tfreg_harness.tolerances).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
from torch import nn

from tfreg.parity import assert_parity, check_parity, seed_everything
from tfreg.parity.models import dropout_masks_for
from tfreg_harness.differences import torch_batchnorm_kwargs

F64 = "float64"


# --- in-place ops after a captured module ------------------------------------------------------


def _conv_bn_relu_keras() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((6, 6, 2), dtype=F64),
            keras.layers.Conv2D(4, 3, padding="same", use_bias=False, dtype=F64, name="conv"),
            keras.layers.BatchNormalization(dtype=F64, name="bn"),
            keras.layers.ReLU(dtype=F64, name="relu"),
            keras.layers.GlobalAveragePooling2D(dtype=F64, name="pool"),
            keras.layers.Dense(3, dtype=F64, name="fc"),
        ]
    )


class _TorchvisionStyle(nn.Module):
    """A torchvision basic-block stem: the ReLU runs in place on the BatchNorm's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, **torch_batchnorm_kwargs(momentum=0.99, epsilon=1e-3))
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


@pytest.mark.parametrize("training", [False, True])
def test_inplace_relu_does_not_overwrite_the_captured_batchnorm_output(training: bool) -> None:
    """Before: the hook kept BN's output tensor itself, which ReLU(inplace=True) then zeroed
    where negative: 'output bn <-> bn' failed at rel 0.67 (eval) / 0.94 (train)."""
    rng = seed_everything(1)
    x, y = rng.normal(size=(5, 6, 6, 2)), rng.integers(0, 3, 5)
    torch_module = _TorchvisionStyle().double()
    report = assert_parity(_conv_bn_relu_keras(), torch_module, x, y, training=training)
    bn = next(r for r in report.layers if r.name == "bn <-> bn")
    assert bn.passed and bn.max_abs < 1e-12


# --- Flatten order ----------------------------------------------------------------------------


class _Flattens(nn.Module):
    """conv -> (permute) -> flatten -> fc; ``order``: the NCHW axes permuted before flattening."""

    def __init__(self, order: tuple[int, ...] | None) -> None:
        super().__init__()
        self.conv, self.fc, self.order = nn.Conv2d(2, 3, 3), nn.Linear(27, 4), order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc((h if self.order is None else h.permute(*self.order)).flatten(1))


def _flatten_keras() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((5, 5, 2), dtype=F64),
            keras.layers.Conv2D(3, 3, dtype=F64, name="conv"),
            keras.layers.Flatten(dtype=F64, name="flat"),
            keras.layers.Dense(4, dtype=F64, name="dense"),
        ]
    )


@pytest.mark.parametrize("order", [None, (0, 2, 3, 1)], ids=["nchw", "permuted_to_nhwc"])
def test_a_correct_port_passes_in_either_flatten_order(order: tuple[int, ...] | None) -> None:
    """Before: a port that permutes to NHWC and then flattens (Keras' order) failed at rel 1.0
    on the logits, naming dense <-> fc: the harness permuted the kernel rows anyway."""
    rng = seed_everything(2)
    x, y = rng.normal(size=(5, 5, 5, 2)), rng.integers(0, 4, 5)
    assert_parity(_flatten_keras(), _Flattens(order).double(), x, y)


def test_a_third_flatten_order_is_a_failure_row_naming_the_layer_and_cause() -> None:
    """NCHW permuted to (N, W, H, C) -- H and W swapped -- is no order the harness maps."""
    rng = seed_everything(2)
    x, y = rng.normal(size=(5, 5, 5, 2)), rng.integers(0, 4, 5)
    report = check_parity(_flatten_keras(), _Flattens((0, 3, 2, 1)).double(), x, y)
    first = report.failed[0]
    assert first.check == "flatten order dense <-> fc"
    assert "neither Keras' (H, W, C) order nor torch's (C, H, W) order" in first.detail
    assert report.first_diverging_layer == "dense <-> fc"


# --- SpatialDropout: channel masks ------------------------------------------------------------


def _spatial_dropout_pair(dims: int, torch_dropout: type) -> tuple[keras.Model, nn.Module]:
    spatial = (6,) * dims
    conv, pool = {1: (nn.Conv1d, nn.AdaptiveAvgPool1d), 2: (nn.Conv2d, nn.AdaptiveAvgPool2d)}[dims]
    keras_layers = keras.layers
    keras_model = keras.Sequential(
        [
            keras.Input((*spatial, 2), dtype=F64),
            getattr(keras_layers, f"Conv{dims}D")(8, 3, padding="same", dtype=F64, name="conv"),
            getattr(keras_layers, f"SpatialDropout{dims}D")(0.5, dtype=F64, name="drop"),
            getattr(keras_layers, f"GlobalAveragePooling{dims}D")(dtype=F64, name="pool"),
            keras_layers.Dense(3, dtype=F64, name="fc"),
        ]
    )
    torch_module = nn.Sequential(
        conv(2, 8, 3, padding="same"), torch_dropout(0.5), pool(1), nn.Flatten(), nn.Linear(8, 3)
    )
    return keras_model, torch_module.double()


@pytest.mark.parametrize("dims", [1, 2])
def test_spatial_dropout_pairs_with_torch_channel_dropout(dims: int) -> None:
    """Before: nn.Dropout2d (the right port) was refused as an unregistered torch class."""
    rng = seed_everything(4)
    x, y = rng.normal(size=(6, *(6,) * dims, 2)), rng.integers(0, 3, 6)
    torch_dropout = {1: nn.Dropout1d, 2: nn.Dropout2d}[dims]
    keras_model, torch_module = _spatial_dropout_pair(dims, torch_dropout)
    # torch's native Dropout2d draws its own masks: this passes only because the harness
    # injects the same channel masks on both sides
    assert_parity(keras_model, torch_module, x, y, training=True)
    assert_parity(keras_model, torch_module, x, y)
    (mask,) = dropout_masks_for(keras_model, x, np.random.default_rng(0))
    # channel masks: constant over the spatial axes, about half the channels kept
    flat = mask.reshape(6, -1, 8)
    assert np.array_equal(flat, np.broadcast_to(flat[:, :1], flat.shape))
    assert 0.25 < flat[:, 0].mean() < 0.75


def test_spatial_dropout_against_element_dropout_fails_naming_the_layer() -> None:
    """Before: a false PASS -- element masks were injected on both sides, so torch's nn.Dropout
    (which drops single elements) looked like Keras' SpatialDropout2D."""
    rng = seed_everything(4)
    x, y = rng.normal(size=(6, 6, 6, 2)), rng.integers(0, 3, 6)
    keras_model, torch_module = _spatial_dropout_pair(2, nn.Dropout)
    report = check_parity(keras_model, torch_module, x, y, training=True)
    assert [r.status for r in report.rows] == ["fail"]
    assert "'drop' (SpatialDropout2D)" in report.rows[0].detail
    assert "pair it with nn.Dropout2d" in report.rows[0].detail
    # and the mirror image: Keras' element Dropout against torch's channel Dropout2d
    keras_model = keras.Sequential(
        [
            keras.Input((6, 6, 2), dtype=F64),
            keras.layers.Dropout(0.5, dtype=F64, name="drop"),
            keras.layers.Dense(3, dtype=F64, name="fc"),
        ]
    )
    torch_module = nn.Sequential(nn.Dropout2d(0.5), nn.Linear(2, 3)).double()
    report = check_parity(keras_model, torch_module, x, x[..., :3], loss="mean_squared_error")
    assert "'drop' (Dropout)" in report.rows[0].detail
    assert "drops single elements" in report.rows[0].detail
