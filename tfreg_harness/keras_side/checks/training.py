"""Training parity: exact accumulation within each framework, and tfreg vs torchref trajectories.

Models are helper-built MLP pairs (``models``) with NumPy-drawn weights loaded into
both frameworks. Data sizes are chosen so windows are uneven and the last one is short.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tfreg._compat import keras
from tfreg_harness.compare import Comparison, compare
from tfreg_harness.keras_side.checks import register
from tfreg_harness.keras_side.models import ModelPair, build_mlp
from tfreg_harness.keras_side.seeding import seed_everything
from tfreg_harness.keras_side.transfer import parameter_pairs, torch_to_numpy
from tfreg_harness.tolerances import tolerance

_SEED = 7
# Keras stores learning rate and momentum as float32 variables even for float64 models, so the
# matching-mode checks use values float32 represents exactly; with lr=0.1 the float64
# trajectories separate by ~1e-8 relative per step (pinned in parity_tests/test_trajectories.py).
_LR, _MOMENTUM = 0.125, 0.875
_N, _FEATURES, _CLASSES = 26, 6, 3  # 26 = 2 full windows of 3x4 and a short window of 2


def _pair(dtype: str, device: str) -> ModelPair:
    return build_mlp(
        dtype=dtype,
        rng=seed_everything(_SEED),
        input_dim=_FEATURES,
        hidden=(8,),
        classes=_CLASSES,
        device=device,
    )


def _data(dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_SEED + 1)
    x = rng.normal(size=(_N, _FEATURES)).astype(dtype)
    y = rng.integers(0, _CLASSES, size=_N)
    sample_weight = rng.uniform(0.5, 2.0, size=_N).astype(dtype)
    return x, y, sample_weight


def keras_weights(pair: ModelPair) -> list[np.ndarray]:
    return [np.asarray(v.numpy()) for v in pair.keras.trainable_weights]


def torch_weights_in_keras_layout(pair: ModelPair) -> list[np.ndarray]:
    return [
        p.to_keras(torch_to_numpy(p.torch_tensor))
        for p in parameter_pairs(pair.keras, pair.torch)
        if p.trainable
    ]


def _compare_weights(
    label: str, actual: list[np.ndarray], expected: list[np.ndarray], rtol: float
) -> list[Comparison]:
    return [
        compare(f"{label} w{i}", a, e, rtol=rtol)
        for i, (a, e) in enumerate(zip(actual, expected, strict=True))
    ]


def _tfreg_fit(
    pair: ModelPair, k: int, batch_size: int, *, epochs: int = 1, **trainer_kwargs: Any
) -> None:
    import tfreg

    x, y, sw = _data(pair.dtype)
    optimizer = trainer_kwargs.pop("optimizer", None) or keras.optimizers.SGD(_LR)
    trainer = tfreg.Trainer(
        pair.keras,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer,
        accumulation_steps=k,
        **trainer_kwargs,
    )
    trainer.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False, sample_weight=sw, verbose=0
    )


def _torchref_fit(
    pair: ModelPair,
    k: int,
    batch_size: int,
    *,
    epochs: int = 1,
    make_optimizer: Callable[[Any], Any] | None = None,
    **trainer_kwargs: Any,
) -> None:
    import torch

    import torchref

    x, y, sw = _data(pair.dtype)
    optimizer = (make_optimizer or (lambda m: torch.optim.SGD(m.parameters(), lr=_LR)))(pair.torch)
    trainer = torchref.Trainer(
        pair.torch, "cross_entropy", optimizer, accumulation_steps=k, **trainer_kwargs
    )
    trainer.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False, sample_weight=sw, verbose=0
    )


def _accumulation(framework: str) -> Callable[[str, str], list[Comparison]]:
    fit, weights = {
        "tfreg": (_tfreg_fit, keras_weights),
        "torchref": (_torchref_fit, torch_weights_in_keras_layout),
    }[framework]

    def run(dtype: str, device: str) -> list[Comparison]:
        rtol = tolerance("accumulation", dtype).rtol
        out = []
        for k in (2, 3, 4):
            accumulated, one_batch = _pair(dtype, device), _pair(dtype, device)
            fit(accumulated, k, 4)
            fit(one_batch, 1, 4 * k)
            out += _compare_weights(f"k={k}", weights(accumulated), weights(one_batch), rtol)
        return out

    return run


def _kernel_only_decay(weight_decay: float) -> Callable[[Any], Any]:
    """torch SGD with coupled decay on kernels only -- tfreg.penalty's default scope."""

    def make(module: Any) -> Any:
        import torch

        kernels = [p for p in module.parameters() if p.ndim >= 2]
        others = [p for p in module.parameters() if p.ndim < 2]
        groups: list[dict[str, Any]] = [
            {"params": kernels, "weight_decay": weight_decay},
            {"params": others},
        ]
        return torch.optim.SGD(groups, lr=_LR)

    return make


def _trajectory(case: str, epochs: int) -> Callable[[str, str], list[Comparison]]:
    def run(dtype: str, device: str) -> list[Comparison]:
        import torch

        import tfreg
        from torchref.optimizers import KerasAdamW

        pair = _pair(dtype, device)
        # 2**-6: the L2 factor wd/2 is then a float32 number, so Keras' float32 factor rounding
        # (which tfreg reproduces) cannot separate the two trajectories in float64.
        weight_decay = 2.0**-6
        tf_kwargs: dict[str, Any] = {}
        torch_kwargs: dict[str, Any] = {}
        if case == "SGD":
            pass
        elif case == "SGD+momentum":
            tf_kwargs["optimizer"] = keras.optimizers.SGD(_LR, momentum=_MOMENTUM)
            torch_kwargs["make_optimizer"] = lambda m: torch.optim.SGD(
                m.parameters(), lr=_LR, momentum=_MOMENTUM
            )
        elif case == "L2 vs coupled weight_decay":
            tf_kwargs["regularizer"] = tfreg.L2.from_torch_weight_decay(weight_decay)
            torch_kwargs["make_optimizer"] = _kernel_only_decay(weight_decay)
        elif case == "AdamW (Keras arithmetic)":
            tf_kwargs["optimizer"] = keras.optimizers.AdamW(1e-2, weight_decay=1e-2)
            torch_kwargs["make_optimizer"] = lambda m: KerasAdamW(
                m.parameters(), lr=1e-2, weight_decay=1e-2
            )
        _tfreg_fit(pair, 3, 4, epochs=epochs, **tf_kwargs)
        _torchref_fit(pair, 3, 4, epochs=epochs, **torch_kwargs)
        rtol = tolerance("trajectory", dtype).rtol
        updates = 3 * epochs
        return _compare_weights(
            f"after {updates} updates",
            torch_weights_in_keras_layout(pair),
            keras_weights(pair),
            rtol,
        )

    return run


for _framework in ("tfreg", "torchref"):
    register(f"accumulation k x b == k*b, uneven + short window ({_framework})", "accumulation")(
        _accumulation(_framework)
    )
for _case in ("SGD", "SGD+momentum", "L2 vs coupled weight_decay", "AdamW (Keras arithmetic)"):
    # 26 examples in windows of 12 = 3 updates per epoch: 7 epochs ~ 21 updates, 34 ~ 102.
    register(f"trajectory tfreg vs torchref: {_case}, ~21 updates", "trajectories")(
        _trajectory(_case, 7)
    )
    register(f"trajectory tfreg vs torchref: {_case}, ~102 updates", "trajectories", quick=False)(
        _trajectory(_case, 34)
    )
