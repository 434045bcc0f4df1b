"""Penalty parity: tfreg vs Keras (bit-identical) and tfreg vs torchref (value and gradient)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from tfreg import regularizers as tfr
from tfreg._compat import keras, tf
from tfreg_harness.compare import Comparison, compare
from tfreg_harness.keras_side.checks import SkipCheck, register
from tfreg_harness.keras_side.devices import tf_device, torch_device
from tfreg_harness.keras_side.seeding import seed_everything
from tfreg_harness.tolerances import tolerance


class PenaltyCase(NamedTuple):
    """One tfreg penalty and its torchref twin; ``transpose``: the torch tensor is ``w.T``
    (Dense kernel (in, out) vs Linear weight (out, in))."""

    name: str
    tfreg_regularizer: Any
    torchref: tuple[str, dict[str, Any]]
    transpose: bool
    shapes: list[tuple[int, ...]]


PENALTY_CASES: list[PenaltyCase] = [
    PenaltyCase("L1", tfr.L1(0.037), ("L1", {"l1": 0.037}), False, [(7, 5), (3, 3, 2, 4), (11,)]),
    PenaltyCase("L2", tfr.L2(0.037), ("L2", {"l2": 0.037}), False, [(7, 5), (3, 3, 2, 4), (11,)]),
    PenaltyCase(
        "L1L2", tfr.L1L2(0.01, 0.02), ("L1L2", {"l1": 0.01, "l2": 0.02}), False, [(7, 5), (11,)]
    ),
    # Dense kernel (in, out) rows == Linear weight (out, in) columns.
    PenaltyCase(
        "Orthogonal(rows)",
        tfr.OrthogonalRegularizer(0.05, "rows"),
        ("OrthogonalRegularizer", {"factor": 0.05, "mode": "columns"}),
        True,
        [(7, 5), (3, 6)],
    ),
    PenaltyCase(
        "PNorm(p=1.5)",
        tfr.PNorm(0.1, p=1.5),
        ("PNorm", {"strength": 0.1, "p": 1.5}),
        False,
        [(7, 5)],
    ),
    PenaltyCase(
        "PNorm(p=2)", tfr.PNorm(0.1, p=2), ("PNorm", {"strength": 0.1, "p": 2}), False, [(7, 5)]
    ),
    PenaltyCase(
        "GroupLasso",
        tfr.GroupLasso(0.1, axis=1),
        ("GroupLasso", {"strength": 0.1, "axis": 0}),
        True,
        [(7, 5), (4, 3)],
    ),
]

_KERAS_TWINS: dict[str, Callable[[], Any]] = {
    "L1": lambda: keras.regularizers.L1(0.037),
    "L2": lambda: keras.regularizers.L2(0.037),
    "L1L2": lambda: keras.regularizers.L1L2(0.01, 0.02),
    "Orthogonal(rows)": lambda: keras.regularizers.OrthogonalRegularizer(0.05, "rows"),
}


def tf_value_and_grad(reg: Any, w: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    with tf.device(tf_device(device)):
        x = tf.constant(w)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = reg(x)
        grad = tape.gradient(value, x)
    return value.numpy(), grad.numpy()


def penalty_weights(dtype: str, shape: tuple[int, ...], seed_offset: int) -> np.ndarray:
    rng = seed_everything(1234 + seed_offset)
    w = rng.normal(size=shape).astype(dtype)
    w.flat[0] = 0.0  # a zero entry exercises the subgradient/zero-safe paths
    return w


def _penalty_vs_torchref(name: str, dtype: str, device: str) -> list[Comparison]:
    from tfreg_harness.torch_side.verify import penalty_value_and_grad

    spec = next(c for c in PENALTY_CASES if c.name == name)
    class_name, kwargs = spec.torchref
    tol = tolerance("penalty_cross", dtype).rtol
    out = []
    for i, shape in enumerate(spec.shapes):
        w = penalty_weights(dtype, shape, i)
        value, grad = tf_value_and_grad(spec.tfreg_regularizer, w, device)
        t_value, t_grad = penalty_value_and_grad(
            class_name, kwargs, w, transpose=spec.transpose, device=torch_device(device)
        )
        out.append(compare(f"{name}{shape} value", t_value, value, rtol=tol))
        out.append(compare(f"{name}{shape} grad", t_grad, grad, rtol=tol))
    return out


def _penalty_vs_keras(name: str, dtype: str, device: str) -> list[Comparison]:
    if name == "Orthogonal(rows)" and dtype == "float64":
        raise SkipCheck(
            "Keras' OrthogonalRegularizer raises on float64 weights (tfreg supports them)"
        )
    _, tf_reg, _, _, shapes = next(c for c in PENALTY_CASES if c.name == name)
    keras_reg = _KERAS_TWINS[name]()
    tol = tolerance("penalty_vs_keras", dtype).rtol
    out = []
    for i, shape in enumerate(shapes):
        w = penalty_weights(dtype, shape, i)
        value, grad = tf_value_and_grad(tf_reg, w, device)
        k_value, k_grad = tf_value_and_grad(keras_reg, w, device)
        out.append(compare(f"{name}{shape} value", value, k_value, rtol=tol))
        out.append(compare(f"{name}{shape} grad", grad, k_grad, rtol=tol))
    return out


def _register_all() -> None:
    for case_name, *_ in PENALTY_CASES:
        register(f"penalty {case_name}: tfreg vs torchref", "penalties")(
            partial(_penalty_vs_torchref, case_name)
        )
        if case_name in _KERAS_TWINS:
            register(f"penalty {case_name}: tfreg vs keras", "penalties")(
                partial(_penalty_vs_keras, case_name)
            )


_register_all()
