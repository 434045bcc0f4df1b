"""Record TensorFlow results into a reference bundle for ``python -m torchref.verify``.

Use when the torch side runs elsewhere (a GPU machine without TensorFlow): record here, copy the
``.npz``, verify there. Inputs are drawn from NumPy with fixed seeds, so the bundle is the whole
experiment.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from tfreg._compat import keras
from tfreg.parity.checks.penalties import PENALTY_CASES, penalty_weights, tf_value_and_grad
from tfreg.parity.environment import machine, versions
from tfreg.parity.models import ModelPair, build_mlp, evaluate_keras
from tfreg.parity.seeding import seed_everything
from tfreg.parity.transfer import parameter_pairs
from tfreg_harness.bundle import Case, save_bundle
from tfreg_harness.data import digit_like_images

# A small MLP on digits-sized inputs. The bundle stores its weights in torch layout and its
# layers as data, so torchref.verify rebuilds it without any Keras layout knowledge.
_MLP: dict[str, Any] = {"input_dim": 64, "hidden": (16,), "classes": 10}
_TRAIN: dict[str, Any] = {"accumulation_steps": 3, "batch_size": 8, "epochs": 2, "lr": 0.125}


def penalty_cases(dtypes: tuple[str, ...] = ("float32", "float64")) -> list[Case]:
    cases = []
    for dtype in dtypes:
        for spec in PENALTY_CASES:
            for i, shape in enumerate(spec.shapes):
                w = penalty_weights(dtype, shape, i)
                value, grad = tf_value_and_grad(spec.tfreg_regularizer, w, "cpu")
                cases.append(
                    Case(
                        name=f"penalty {spec.name}{shape}",
                        kind="penalty",
                        claim="penalty_cross",
                        dtype=dtype,
                        params={"torchref": list(spec.torchref), "transpose": spec.transpose},
                        arrays={"w": w, "value": value, "grad": grad},
                    )
                )
    return cases


def _mlp(dtype: str) -> ModelPair:
    return build_mlp(dtype=dtype, rng=seed_everything(21), **_MLP)


def _torch_layout(
    pair: ModelPair, values: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Trainable weights (or ``values`` keyed by Keras path) in torch layout, as ``param{i}``."""
    pairs = [p for p in parameter_pairs(pair.keras, pair.torch) if p.trainable]
    return {
        f"param{i}": p.to_torch(
            np.asarray(p.keras_variable.numpy())
            if values is None
            else values[p.keras_variable.path]
        )
        for i, p in enumerate(pairs)
    }


def _layers() -> list[list[object]]:
    sizes = [_MLP["input_dim"], *_MLP["hidden"], _MLP["classes"]]
    layers: list[list[object]] = []
    for fan_in, fan_out in pairwise(sizes):
        layers += [["linear", fan_in, fan_out], ["relu"]]
    return layers[:-1]


def _digits(dtype: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = digit_like_images(n, dtype=dtype, seed=7)
    return x.reshape(n, 64), y


def mlp_cases(dtypes: tuple[str, ...] = ("float32", "float64")) -> list[Case]:
    """Forward/loss/gradient of the MLP, and a 2-epoch tfreg.Trainer run with accumulation."""
    import tfreg

    cases = []
    for dtype in dtypes:
        pair = _mlp(dtype)
        x, y = _digits(dtype, 32)
        evaluation = evaluate_keras(pair, x, y)
        arrays = {"x": x, "y": y, "logits": evaluation.logits, "loss": evaluation.loss}
        arrays |= _torch_layout(pair)
        arrays |= {
            k.replace("param", "grad"): v
            for k, v in _torch_layout(pair, evaluation.gradients).items()
        }
        cases.append(
            Case(
                "mlp logits, loss, gradients",
                "mlp",
                "model_cross",
                dtype,
                {"layers": _layers()},
                arrays,
            )
        )

        pair = _mlp(dtype)
        x, y = _digits(dtype, 44)  # 44 = 1 full window of 3x8 + a short one of 20: uneven
        sample_weight = np.random.default_rng(3).uniform(0.5, 2.0, size=len(y)).astype(dtype)
        initial = _torch_layout(pair)
        trainer = tfreg.Trainer(
            pair.keras,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            keras.optimizers.SGD(_TRAIN["lr"]),
            accumulation_steps=_TRAIN["accumulation_steps"],
        )
        trainer.fit(
            x,
            y,
            batch_size=_TRAIN["batch_size"],
            epochs=_TRAIN["epochs"],
            shuffle=False,
            sample_weight=sample_weight,
            verbose=0,
        )
        arrays = {"x": x, "y": y, "sample_weight": sample_weight} | initial
        arrays |= {k.replace("param", "final"): v for k, v in _torch_layout(pair).items()}
        cases.append(
            Case(
                "Trainer k=3 x b=8, uneven windows, SGD",
                "train_mlp",
                "trajectory",
                dtype,
                {"layers": _layers(), **_TRAIN},
                arrays,
            )
        )
    return cases


def record_bundle(path: str | Path, *, dtypes: tuple[str, ...] = ("float32", "float64")) -> int:
    """Write the bundle; return the number of cases."""
    cases = penalty_cases(dtypes) + mlp_cases(dtypes)
    env = versions()
    meta = {
        "recorded_by": "tfreg",
        "tensorflow": env["tensorflow"],
        "keras": env["keras"],
        "versions": env,
        "device": "cpu",
        "machine": machine(),
    }
    save_bundle(path, cases, meta)
    return len(cases)
