"""Record TensorFlow results into a reference bundle for ``python -m torchref.verify``.

Use when the torch side runs elsewhere (a GPU machine without TensorFlow): record here, copy the
``.npz``, verify there. Inputs are drawn from NumPy with fixed seeds, so the bundle is the whole
experiment.

:func:`record_bundle` records the built-in cases (penalties, an MLP, a Trainer run);
:func:`record_user_pair` records *your* pair (``tfreg-parity --model M:make_pair --record PATH
--torch-factory T:make_torch``): the weights Keras holds (in torch layout, as the torch module's
``state_dict`` after the transfer), the input as torch receives it, and Keras' outputs, loss,
gradients (torch layout) and the weights after each of ``steps`` optimizer updates. The torch
machine rebuilds the module by importing ``T:make_torch`` -- a function of your code base that
needs torch only and returns the module (and, for ``steps``, ``{"torch_module": m,
"torch_optimizer": opt}``) -- loads the recorded weights and compares.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from tfreg._compat import keras, tf
from tfreg_harness.bundle import DTYPES, Case, save_bundle
from tfreg_harness.data import digit_like_images
from tfreg_harness.keras_side.checks.penalties import (
    PENALTY_CASES,
    penalty_weights,
    tf_value_and_grad,
)
from tfreg_harness.keras_side.devices import tf_device
from tfreg_harness.keras_side.environment import machine, versions
from tfreg_harness.keras_side.models import (
    LOSS_PAIRS,
    ModelPair,
    build_mlp,
    evaluate_keras,
    forward_torch,
)
from tfreg_harness.keras_side.seeding import seed_everything
from tfreg_harness.keras_side.transfer import (
    copy_weights,
    model_dtype,
    parameter_pairs,
    torch_to_numpy,
)
from tfreg_harness.keras_side.user_pair import PairSpecError, load_pair_factory, make_user_pair
from tfreg_harness.layouts import to_channels_first

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
        arrays: dict[str, Any] = {
            "x": x,
            "y": y,
            "logits": evaluation.logits,
            "loss": evaluation.loss,
        }
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


def _meta() -> dict[str, object]:
    env = versions()
    return {
        "recorded_by": "tfreg",
        "tensorflow": env["tensorflow"],
        "keras": env["keras"],
        "versions": env,
        "device": "cpu",
        "machine": machine(),
    }


def record_bundle(path: str | Path, *, dtypes: tuple[str, ...] = ("float32", "float64")) -> int:
    """Write the bundle of built-in cases; return the number of cases."""
    cases = penalty_cases(dtypes) + mlp_cases(dtypes)
    save_bundle(path, cases, _meta())
    return len(cases)


# check_parity keyword arguments a recording reproduces; the others must keep their defaults.
_RECORDABLE = {"loss", "steps", "keras_optimizer", "torch_optimizer", "rtol", "layer_map"}
_RECORDABLE |= {"torch_input", "seed"}
_DEFAULTS = {"training": False, "transfer": True, "dropout_masks": None}


def _refuse(spec: str, message: str) -> PairSpecError:
    return PairSpecError(f"--record of --model {spec!r}: {message}")


def user_pair_case(spec: str, torch_factory: str) -> Case:
    """The ``"pair"`` case of ``spec``'s pair (see the module docstring), built on the CPU.

    Refused with :class:`PairSpecError` (before anything is recorded): a pair the recording
    cannot reproduce on the torch side (``training=True`` -- dropout masks are injected by the
    harness --, ``transfer=False``, a Keras variable held by several torch tensors), a torch
    factory that cannot be imported or whose module has another ``state_dict`` than the pair's.
    """
    from tfreg_harness.torch_side.verify import FactoryError, load_torch_factory, make_torch

    args, kwargs = make_user_pair(spec, load_pair_factory(spec), "cpu")
    keras_model, torch_module, x, y = args
    for key, default in _DEFAULTS.items():
        if key in kwargs and kwargs[key] is not default and kwargs[key] != default:
            raise _refuse(spec, f"{key}={kwargs[key]!r} cannot be recorded (only {default!r})")
    if any(isinstance(v, dict | list | tuple) for v in (x, y)):
        raise _refuse(spec, "only one input array and one target array can be recorded")
    rtol = kwargs.get("rtol")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, int | float)):
        raise _refuse(spec, f"rtol={rtol!r}: only a number (or none) can be recorded")
    loss = kwargs.get("loss", "sparse_categorical_crossentropy")
    steps = kwargs.get("steps", 0)
    keras_optimizer = kwargs.get("keras_optimizer")
    if steps and keras_optimizer is None:
        raise _refuse(spec, f"{steps} steps need a keras_optimizer")
    dtype = model_dtype(keras_model)
    if dtype not in DTYPES:
        raise _refuse(spec, f"the model's dtype {dtype} is not one of {DTYPES}")
    try:
        torch_side, optimizer = make_torch(load_torch_factory(torch_factory), torch_factory, "cpu")
    except FactoryError as exc:
        raise _refuse(spec, str(exc)) from None
    if steps and optimizer is None:
        raise _refuse(spec, f"{steps} steps: {torch_factory} must return a torch_optimizer too")
    theirs = {k: tuple(v.shape) for k, v in torch_module.state_dict().items()}
    rebuilt = {k: tuple(v.shape) for k, v in torch_side.state_dict().items()}
    if theirs != rebuilt:
        differ = sorted(
            k for k in theirs.keys() | rebuilt.keys() if theirs.get(k) != rebuilt.get(k)
        )
        raise _refuse(spec, f"{torch_factory} builds another module (state {differ} differ)")

    pair = ModelPair(
        keras_model,
        torch_module,
        dtype,
        "cpu",
        kwargs.get("layer_map"),
        kwargs.get("torch_input", "auto"),
    )
    pairs = pair.parameter_pairs(x)
    trainable = [p for p in pairs if p.trainable]
    shared = [p.torch_name for p in trainable if len(p.torch_names) != 1]
    if shared:
        raise _refuse(spec, f"Keras variables held by several torch tensors ({shared})")
    copy_weights(pairs, direction="keras_to_torch")
    arrays = {f"state/{k}": torch_to_numpy(v) for k, v in torch_module.state_dict().items()}
    evaluation = evaluate_keras(pair, x, y, loss=loss)
    raw = torch_to_numpy(forward_torch(pair, x)[0])
    logits = np.asarray(evaluation.logits)
    if raw.shape != logits.shape and to_channels_first(logits).shape == raw.shape:
        logits = to_channels_first(logits)  # torch's output stays channels first
    if raw.shape != logits.shape:
        raise _refuse(spec, f"torch output {raw.shape} vs Keras {logits.shape}")
    pairing = pair.pairing(x)
    arrays |= {
        "x": to_channels_first(x) if pairing.input_channels_first else np.asarray(x),
        "y": np.asarray(y),
        "logits": logits,
        "loss": np.asarray(evaluation.loss),
    }
    arrays |= {
        f"grad/{p.torch_names[0]}": p.to_torch(evaluation.gradients[p.keras_variable.path])
        for p in trainable
    }
    for step in range(1, steps + 1):
        assert keras_optimizer is not None  # refused above when steps ask for one
        if step > 1:
            evaluation = evaluate_keras(pair, x, y, loss=loss)
        with tf.device(tf_device("cpu")):
            keras_optimizer.apply_gradients(
                [
                    (tf.constant(evaluation.gradients[p.keras_variable.path]), p.keras_variable)
                    for p in trainable
                ]
            )
        arrays |= {
            f"step{step}/{p.torch_names[0]}": p.to_torch(np.asarray(p.keras_variable.numpy()))
            for p in trainable
        }
    params = {
        "torch_factory": torch_factory,
        "loss": LOSS_PAIRS[loss][1],
        "steps": steps,
        "rtol": None if rtol is None else float(rtol),
    }
    return Case(f"model {spec}", "pair", "model_cross", dtype, params, arrays)


def record_user_pair(path: str | Path, spec: str, torch_factory: str) -> int:
    """Write a bundle holding the ``"pair"`` case of ``spec`` (:func:`user_pair_case`)."""
    save_bundle(path, [user_pair_case(spec, torch_factory)], _meta())
    return 1
