"""Activation kinds: each side reduced to ``(name, parameter)`` and compared."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from torch import nn

from tfreg._compat import keras
from tfreg_harness.differences import FRAMEWORK_DIFFERENCES, note
from tfreg_harness.keras_side.kinds._common import L, same
from tfreg_harness.keras_side.registry import Context, Weight, register_layer_pair
from tfreg_harness.torch_side.architecture import KerasGELU

_ACT = FRAMEWORK_DIFFERENCES.activations


def _keras_function(fn: Any) -> tuple[Any, ...]:
    kwargs: dict[str, Any] = {}
    if isinstance(fn, functools.partial):
        fn, kwargs = fn.func, dict(fn.keywords)
    acts = keras.activations
    names = {
        acts.relu: "relu",
        acts.gelu: "gelu",
        acts.tanh: "tanh",
        acts.sigmoid: "sigmoid",
        acts.silu: "silu",
        acts.elu: "elu",
        acts.leaky_relu: "leaky_relu",
        acts.softmax: "softmax",
        acts.linear: "linear",
        acts.relu6: "relu6",
        acts.hard_swish: "hard_swish",
        acts.hard_silu: "hard_swish",
        acts.mish: "mish",
        acts.softplus: "softplus",
        acts.log_softmax: "log_softmax",
    }
    name = names.get(fn)
    if name == "gelu":
        return ("gelu", "tanh" if kwargs.get("approximate", False) else "none")
    if name == "leaky_relu":
        return ("leaky_relu", float(kwargs.get("negative_slope", 0.2)))
    if name == "elu":
        return ("elu", float(kwargs.get("alpha", 1.0)))
    if name in ("softmax", "log_softmax"):
        return (name, int(kwargs.get("axis", -1)))
    if name == "relu6" and not kwargs:
        return ("clamp", 6.0)
    if name is None or kwargs:
        return ("unknown", repr(fn))
    return (name,)


def keras_activation(layer_or_fn: Any) -> tuple[Any, ...]:
    """Keras' activation as ``(name, parameter)``: ``("gelu", "tanh")``, ``("leaky_relu",
    0.3)``, ``("relu",)``, ... ``("unknown", repr)`` when the harness cannot tell."""
    if isinstance(layer_or_fn, L.LeakyReLU):
        return ("leaky_relu", float(layer_or_fn.negative_slope))
    if isinstance(layer_or_fn, L.ReLU):
        slope, top, threshold = (
            layer_or_fn.negative_slope,
            layer_or_fn.max_value,
            layer_or_fn.threshold,
        )
        if slope or threshold:
            return ("unknown", (slope, top, threshold))
        # ReLU(max_value=m) is a clamp to [0, m]: torch ReLU6 for m = 6, Hardtanh(0, m) else
        return ("relu",) if top is None else ("clamp", float(top))
    if isinstance(layer_or_fn, L.ELU):
        return ("elu", float(layer_or_fn.alpha))
    if isinstance(layer_or_fn, L.Softmax):
        return ("softmax", int(layer_or_fn.axis))
    if isinstance(layer_or_fn, L.Activation):
        return _keras_function(layer_or_fn.activation)
    return _keras_function(layer_or_fn)


def torch_activation(module: Any) -> tuple[Any, ...]:
    """torch's activation module as ``(name, parameter[, constants])`` (see
    :func:`keras_activation`); gelu carries ``"tf"`` for ``KerasGELU``, ``"exact"`` else."""
    if isinstance(module, KerasGELU):
        return ("gelu", module.approximate, "tf")
    if isinstance(module, nn.GELU):
        return ("gelu", module.approximate, "exact")
    if isinstance(module, nn.LeakyReLU):
        return ("leaky_relu", float(module.negative_slope))
    if isinstance(module, nn.ELU):
        return ("elu", float(module.alpha))
    if isinstance(module, nn.Softmax):
        return ("softmax", module.dim)
    if isinstance(module, nn.Hardtanh) and float(module.min_val) == 0.0:  # ReLU6 is one
        return ("clamp", float(module.max_val))
    if isinstance(module, nn.Softplus):
        return ("softplus",) if module.beta == 1 else ("unknown", repr(module))
    if isinstance(module, nn.LogSoftmax):
        return ("log_softmax", module.dim)
    simple = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
    simple |= {nn.Hardswish: "hard_swish", nn.Mish: "mish"}
    for cls, name in simple.items():
        if isinstance(module, cls):
            return (name,)
    return ("linear",) if isinstance(module, nn.Identity) else ("unknown", repr(module))


TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.GELU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softmax,
    nn.Tanh,
    nn.Sigmoid,
)
TORCH_ACTIVATIONS += (nn.SiLU, nn.Identity, KerasGELU, nn.Hardtanh, nn.Hardswish, nn.Mish)
TORCH_ACTIVATIONS += (nn.Softplus, nn.LogSoftmax)


def activation_problem(keras_side: tuple[Any, ...], torch_module: Any, ctx: Context) -> str | None:
    """Why torch's activation module does not compute Keras' activation (``None``: it does)."""
    torch_side = torch_activation(torch_module)
    if "unknown" in (keras_side[0], torch_side[0]):
        return f"cannot verify activation: Keras {keras_side} vs torch {torch_side}"
    if keras_side[0] != torch_side[0]:
        return f"activation: Keras {keras_side[0]} vs torch {torch_side[0]}"
    name = keras_side[0]
    if name == "gelu":
        if keras_side[1] != torch_side[1]:
            return f"gelu approximate: Keras {keras_side[1]!r} vs torch {torch_side[1]!r}"
        if torch_side[2] == "exact" and ctx.dtype == "float64":
            return f"gelu constants differ in float64. {note('gelu')}"
    elif name == "leaky_relu":
        used = _ACT.keras_slope(keras_side[1])
        slope = torch_side[1]
        close = math.isclose(slope, used, rel_tol=1e-6)
        if slope != used and not (close and ctx.dtype == "float32"):
            if close:
                return f"negative_slope {slope!r} vs Keras' float32 {used!r}. {note('leaky_relu')}"
            return f"negative_slope: Keras {keras_side[1]!r} vs torch {slope!r}"
    elif name == "elu" and not same(keras_side[1], torch_side[1]):
        return f"elu alpha: Keras {keras_side[1]!r} vs torch {torch_side[1]!r}"
    elif name == "clamp" and keras_side[1] != torch_side[1]:
        return f"ReLU max_value: Keras {keras_side[1]!r} vs torch {torch_side[1]!r}"
    elif name in ("softmax", "log_softmax"):
        rank = len(ctx.output_shape)
        axis = keras_side[1] % rank
        expected = (1 if axis == rank - 1 else axis + 1) if ctx.torch_channels_first else axis
        if torch_side[1] is None or torch_side[1] % rank != expected:
            return (
                f"{name} axis: Keras {keras_side[1]} is torch dim {expected}, not {torch_side[1]}"
            )
    return None


for _cls in (L.ReLU, L.LeakyReLU, L.ELU, L.Softmax, L.Activation):
    register_layer_pair(
        _cls,
        TORCH_ACTIVATIONS,
        check=lambda k, t, ctx: (
            None if t is None else activation_problem(keras_activation(k), t, ctx)
        ),
        torch_optional=True,
    )


# --- PReLU: a learned slope per channel (Keras alpha over the unshared axes) -------------------


def _prelu_problem(k: Any, t: Any, ctx: Context) -> str | None:
    shape = tuple(int(d) for d in k.alpha.shape)
    if any(d != 1 for d in shape[:-1]):
        return (
            f"Keras alpha has shape {shape}: only a slope per channel (shared_axes = every axis "
            "but the last) or one slope maps to nn.PReLU"
        )
    return (
        None
        if shape[-1] == t.num_parameters
        else (f"slopes: Keras {shape[-1]} vs torch num_parameters={t.num_parameters}")
    )


def _prelu_weights(k: Any, t: Any, ctx: Context) -> list[Weight]:
    shape = tuple(int(d) for d in k.alpha.shape)
    return [
        Weight(
            "alpha",
            "weight",
            lambda a: np.ascontiguousarray(np.reshape(a, -1)),
            lambda a: np.reshape(a, shape),
        )
    ]


register_layer_pair(
    L.PReLU,
    nn.PReLU,
    transfer=_prelu_weights,
    check=_prelu_problem,
)
