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

    from tfreg._compat import tf
    from tfreg_harness.keras_side.devices import tf_device, torch_device

    with tf.device(tf_device(device)):
        keras_model = keras.Sequential(
            [
                keras.Input((6,), dtype="float64"),  # a float32 Input would round x
                keras.layers.Dense(8, activation="relu", dtype="float64"),
                keras.layers.Dense(3, dtype="float64"),
            ]
        )
    return keras_model, _torch_module(torch_device(device), torch_activation)


def _torch_module(device: str, torch_activation: str) -> Any:
    import torch

    activation = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[torch_activation]
    torch_module = torch.nn.Sequential(torch.nn.Linear(6, 8), activation(), torch.nn.Linear(8, 3))
    return torch_module.to(device=device, dtype=torch.float64)


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


def make_torch(device: str = "cpu") -> dict[str, Any]:
    """The torch side alone (torch only, no TensorFlow): what ``tfreg-parity --record
    --torch-factory parity_pair_example:make_torch`` names, so that ``torchref.verify`` rebuilds
    this module on a machine without TensorFlow (``device``: a torch device)."""
    import torch

    torch_module = _torch_module("cuda" if device == "gpu" else device, "relu")
    optimizer = torch.optim.SGD(torch_module.parameters(), lr=0.125)
    return {"torch_module": torch_module, "torch_optimizer": optimizer}


def make_torch_tanh() -> Any:
    """A wrong port of the same pair (tanh for relu), torch only: verify must fail it."""
    return _torch_module("cpu", "tanh")


def make_broken_pair() -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """The tuple form; torch uses tanh where Keras uses relu, so every logit differs."""
    return (*_models("cpu", "tanh"), *_data())


def make_three_things() -> tuple[Any, Any, np.ndarray]:
    """Breaks the contract (no labels): the CLI's usage error, exit 2."""
    return make_broken_pair()[:3]


def make_nan_pair() -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """A correct port fed NaN inputs: both frameworks output NaN everywhere (never a pass)."""
    x, y = _data()
    return (*_models("cpu", "relu"), np.full_like(x, np.nan), y)


def make_exiting_pair() -> None:
    """A factory that exits (a guard in the team's code, say): nothing runs, never exit 0."""
    import sys

    sys.exit(0)


def make_looping_pair() -> None:
    """A factory that never returns: --timeout must stop it."""
    while True:
        pass


def make_interrupted_pair() -> None:
    """Ctrl-C while the pair is being built (a real SIGINT to this process)."""
    import os
    import signal
    import time

    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
