"""A two-headed model with dict outputs and two losses, in Keras and as a torch port.

A shared trunk (Dense -> tanh -> LayerNormalization) feeds a classification head (``"cls"``:
class logits, sparse categorical cross-entropy) and a regression head (``"reg"``: Dense -> ReLU ->
Dense, mean squared error). Keras returns ``{"cls": ..., "reg": ...}`` and trains on
``loss={"cls": ..., "reg": ...}`` with ``loss_weights``; the torch module's ``forward`` returns a
dict with the same keys, and the harness applies the same weighted sum of the two losses on both
sides (total = 1.0 * cross-entropy + 0.5 * MSE).

Keras orders a functional model's layers by graph depth: ``trunk, norm, reg_hidden, cls, reg``
(the regression head's hidden layer before the classification head), while this port defines
the heads one after the other (``cls``, then ``reg_hidden``, ``reg``), as teams write them. The
harness pairs by order, so the pair passes ``layer_map={"reg_hidden": "reg_hidden"}``; without it
the report is a pairing failure naming both layers (never a silent mismatch).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from examples.architectures import DTYPE, pair_dict, randomize

FEATURES, WIDTH, HIDDEN, CLASSES, TARGETS, BATCH = 6, 8, 5, 3, 2, 6
LOSS = {"cls": "sparse_categorical_crossentropy", "reg": "mean_squared_error"}
LOSS_WEIGHTS = {"cls": 1.0, "reg": 0.5}  # float32-exact
LAYER_MAP = {"reg_hidden": "reg_hidden"}  # Keras' depth order differs from the port's heads


def keras_model(dtype: str = DTYPE) -> Any:
    import keras

    L = keras.layers
    features = keras.Input((FEATURES,), dtype=dtype)
    x = L.Dense(WIDTH, activation="tanh", dtype=dtype, name="trunk")(features)
    x = L.LayerNormalization(epsilon=1e-5, dtype=dtype, name="norm")(x)
    cls = L.Dense(CLASSES, dtype=dtype, name="cls")(x)
    h = L.Dense(HIDDEN, activation="relu", dtype=dtype, name="reg_hidden")(x)
    reg = L.Dense(TARGETS, dtype=dtype, name="reg")(h)
    return keras.Model(features, {"cls": cls, "reg": reg}, name="two_heads")


def torch_module(dtype: str = DTYPE, *, reg_before_norm: bool = False) -> Any:
    import torch
    from torch import nn

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(FEATURES, WIDTH)
            self.norm = nn.LayerNorm(WIDTH, eps=1e-5)
            self.cls = nn.Linear(WIDTH, CLASSES)  # Keras lists it after reg_hidden
            self.reg_hidden = nn.Linear(WIDTH, HIDDEN)
            self.reg = nn.Linear(HIDDEN, TARGETS)

        def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
            shared = torch.tanh(self.trunk(features))
            normed = self.norm(shared)
            # the slip: the regression head branches off the trunk before its LayerNorm
            h = torch.relu(self.reg_hidden(shared if reg_before_norm else normed))
            return {"cls": self.cls(normed), "reg": self.reg(h)}

    return TwoHeads().to(getattr(torch, dtype))


def data(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    features = rng.normal(size=(BATCH, FEATURES))
    labels = {"cls": rng.integers(0, CLASSES, size=BATCH), "reg": rng.normal(size=(BATCH, TARGETS))}
    return features, labels


def make_pair(
    device: str = "cpu", *, dtype: str = DTYPE, seed: int = 19, reg_before_norm: bool = False
) -> dict[str, Any]:
    from tfreg_harness.keras_side.devices import torch_device

    model = keras_model(dtype)
    x, y = data(randomize(model, seed))
    y["reg"] = y["reg"].astype(dtype)
    module = torch_module(dtype, reg_before_norm=reg_before_norm).to(torch_device(device))
    return pair_dict(
        model,
        module,
        x.astype(dtype),
        y,
        device=device,
        loss=LOSS,
        loss_weights=LOSS_WEIGHTS,
        layer_map=LAYER_MAP,
    )


def make_broken_pair(*, dtype: str = DTYPE, seed: int = 19) -> dict[str, Any]:
    """The regression head fed the trunk's output before its LayerNorm (Keras feeds the normed
    features): ``cls`` still agrees, and the report names ``reg_hidden``."""
    return make_pair(dtype=dtype, seed=seed, reg_before_norm=True)
