"""A model pair in the shape ``tfreg-parity --model`` and the ``parity`` fixture take (used by the
CLI and plugin tests; also the README's example of ``make_pair``).

``make_pair(device)`` returns the dict form: the four required entries plus ``check_parity``
keyword arguments (here: two SGD steps, lr 0.125, exact in float32 as Keras keeps it).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _models(device: str, torch_activation: str) -> tuple[Any, Any]:
    import keras
    import torch

    from tfreg._compat import tf
    from tfreg.parity.devices import tf_device, torch_device

    with tf.device(tf_device(device)):
        keras_model = keras.Sequential(
            [
                keras.Input((6,), dtype="float64"),  # a float32 Input would round x
                keras.layers.Dense(8, activation="relu", dtype="float64"),
                keras.layers.Dense(3, dtype="float64"),
            ]
        )
    activation = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[torch_activation]
    torch_module = torch.nn.Sequential(torch.nn.Linear(6, 8), activation(), torch.nn.Linear(8, 3))
    return keras_model, torch_module.to(device=torch_device(device), dtype=torch.float64)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    return rng.normal(size=(10, 6)), rng.integers(0, 3, size=10)


def make_pair(device: str = "cpu") -> dict[str, Any]:
    import keras
    import torch

    keras_model, torch_module = _models(device, "relu")
    x, y = _data()
    return {
        "keras_model": keras_model,
        "torch_module": torch_module,
        "x": x,
        "y": y,
        "steps": 2,
        "keras_optimizer": keras.optimizers.SGD(0.125),
        "torch_optimizer": torch.optim.SGD(torch_module.parameters(), lr=0.125),
    }


def make_broken_pair() -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """The tuple form; torch uses tanh where Keras uses relu, so every logit differs."""
    return (*_models("cpu", "tanh"), *_data())


def make_three_things() -> tuple[Any, Any, np.ndarray]:
    """Breaks the contract (no labels): the CLI's usage error, exit 2."""
    return make_broken_pair()[:3]
