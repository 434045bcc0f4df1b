"""Bring-your-own-model parity: compare *your* Keras model with *your* torch module.

::

    from tfreg.parity import assert_parity

    def test_my_model_matches():
        keras_model, torch_module = build_keras(), build_torch()      # same architecture
        assert_parity(keras_model, torch_module, x, y, steps=5,
                      keras_optimizer=keras.optimizers.SGD(0.125),
                      torch_optimizer=torch.optim.SGD(torch_module.parameters(), lr=0.125))

Weights are copied Keras -> torch with the layout maps (Dense/Linear, Conv2D/Conv2d,
BatchNormalization/BatchNorm1d/2d; pools, Flatten, Dropout and activations carry none), then the
report compares forward outputs, the loss, every parameter's gradient and, with ``steps``, the
weights after each of ``steps`` optimizer updates. Tolerances come from ``tfreg_harness.tolerances``
(``model_cross`` for one pass, ``trajectory`` for steps) at the model's dtype unless ``rtol`` is
given. A check that cannot run (an unsupported layer, ``steps=0``) is a *skip* row with the
reason: ``check_parity`` never hides it and ``assert_parity`` fails on it unless
``allow_skips=True``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tfreg._compat import keras, tf
from tfreg.parity.devices import tf_device
from tfreg.parity.models import (
    LOSS_PAIRS,
    ModelPair,
    batchnorm_cancelled_biases,
    compare_evaluations,
    evaluate_keras,
    evaluate_torch,
)
from tfreg.parity.transfer import parameter_pairs, torch_to_numpy, transfer_weights
from tfreg_core.validation import InvalidArgumentError
from tfreg_harness.compare import Comparison, compare
from tfreg_harness.report import Report, Row
from tfreg_harness.tolerances import tolerance


def _rows(comparisons: list[Comparison], dtype: str, device: str, prefix: str = "") -> list[Row]:
    return [
        Row(
            f"{prefix}{c.name}",
            dtype,
            device,
            "pass" if c.passed else "fail",
            max_abs=c.max_abs,
            max_rel=c.max_rel,
            tolerance=c.rtol if c.rtol > 0 else c.atol,
        )
        for c in comparisons
    ]


def _model_dtype(keras_model: Any) -> str:
    dtypes = {str(v.dtype) for v in keras_model.trainable_weights}
    if len(dtypes) != 1:
        raise InvalidArgumentError(
            f"keras_model must have one variable dtype (mixed precision is not compared). "
            f"Received variable dtypes: {sorted(dtypes)}"
        )
    return dtypes.pop()


def check_parity(
    keras_model: keras.Model,
    torch_module: Any,
    x: Any,
    y: Any,
    *,
    loss: str = "sparse_categorical_crossentropy",
    training: bool = False,
    steps: int = 0,
    keras_optimizer: keras.optimizers.Optimizer | None = None,
    torch_optimizer: Any = None,
    device: str = "cpu",
    rtol: float | None = None,
) -> Report:
    """Transfer weights Keras -> torch and compare the two models; returns a :class:`Report`.

    ``x`` is in Keras layout (NHWC images); ``y`` as ``loss`` expects it (integer labels for
    ``"sparse_categorical_crossentropy"``, see ``tfreg.parity.models.LOSS_PAIRS``). ``training``
    runs both models in training mode (BatchNorm batch statistics; models with Dropout need
    ``training=False`` or injected masks, see ``tfreg.parity.model_parity``). The torch module
    must live on ``device``'s torch device already.
    """
    if loss not in LOSS_PAIRS:
        raise InvalidArgumentError(
            f"Unknown loss {loss!r}. Expected one of {sorted(LOSS_PAIRS)}. Received: loss={loss!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InvalidArgumentError(f"steps must be a non-negative int. Received: steps={steps!r}")
    if steps and (keras_optimizer is None or torch_optimizer is None):
        raise InvalidArgumentError(
            "steps > 0 needs both keras_optimizer and torch_optimizer. Received: "
            f"keras_optimizer={keras_optimizer!r}, torch_optimizer={torch_optimizer!r}"
        )
    dtype = _model_dtype(keras_model)
    report = Report()
    try:
        transfer_weights(keras_model, torch_module, direction="keras_to_torch")
    except ValueError as exc:
        reason = f"weight transfer impossible: {exc}"
        for name in ("forward, loss and gradients", "training steps"):
            report.extend([Row(name, dtype, device, "skip", detail=reason)])
        return report
    pair = ModelPair(keras_model, torch_module, (), tuple(np.shape(x)[1:]), dtype, device)
    evaluate = {"training": training, "loss": loss}
    comparisons = compare_evaluations(
        evaluate_keras(pair, x, y, **evaluate),
        evaluate_torch(pair, x, y, **evaluate),
        dtype=dtype,
        zero_gradients=batchnorm_cancelled_biases(keras_model) if training else (),
        rtol=rtol,
    )
    report.extend(_rows(comparisons, dtype, device))
    if steps == 0:
        report.extend([Row("training steps", dtype, device, "skip", detail="steps=0")])
        return report
    step_rtol = tolerance("trajectory", dtype).rtol if rtol is None else rtol
    pairs = [p for p in parameter_pairs(keras_model, torch_module) if p.trainable]
    for step in range(1, steps + 1):
        keras_eval = evaluate_keras(pair, x, y, **evaluate)
        evaluate_torch(pair, x, y, **evaluate)  # leaves .grad on the torch parameters
        with tf.device(tf_device(device)):
            keras_optimizer.apply_gradients(
                [
                    (tf.constant(keras_eval.gradients[p.keras_variable.path]), p.keras_variable)
                    for p in pairs
                ]
            )
        torch_optimizer.step()
        after = [
            compare(
                f"step {step} {p.keras_variable.path}",
                p.to_keras(torch_to_numpy(p.torch_tensor)),
                np.asarray(p.keras_variable.numpy()),
                rtol=step_rtol,
            )
            for p in pairs
        ]
        report.extend(_rows(after, dtype, device))
    return report


def assert_parity(
    keras_model: keras.Model,
    torch_module: Any,
    x: Any,
    y: Any,
    *,
    allow_skips: bool = False,
    **kwargs: Any,
) -> Report:
    """:func:`check_parity`, raising ``AssertionError`` with the whole table when any row failed
    (or was skipped, unless ``allow_skips``). For pytest: call it in a test."""
    report = check_parity(keras_model, torch_module, x, y, **kwargs)
    bad = report.failed + ([] if allow_skips else [r for r in report.rows if r.status == "skip"])
    if bad:
        names = ", ".join(
            f"{r.check} ({r.status}{': ' + r.detail if r.detail else ''})" for r in bad
        )
        raise AssertionError(f"parity failed for {names}\n{report.to_text()}")
    return report
