"""The built-in layer kinds, registered through the public ``register_layer_pair`` like any user
kind. Each entry is the weight layout map (``tfreg_harness.layouts``) plus the configuration
that must agree; a disagreement is a failure naming both layers and the field.

Kinds: Dense, Conv1D/2D (valid/same/causal via torch padding or an explicit ``ZeroPad1d/2d``
before the conv; strides, dilation, groups), DepthwiseConv2D, Embedding, LayerNormalization,
BatchNormalization, Dropout, Max/Average pooling 1D/2D, Global pooling 1D/2D, Flatten, Reshape,
Permute, ZeroPadding1D/2D, the activation layers (ReLU, LeakyReLU, ELU, Softmax, Activation:
relu, gelu exact/tanh, leaky_relu, silu, elu, sigmoid, tanh, softmax, linear), LSTM and GRU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from tfreg._compat import keras
from tfreg.parity.registry import Context, Weight, register_layer_pair
from tfreg_harness.differences import FRAMEWORK_DIFFERENCES, note, torch_batchnorm_kwargs
from tfreg_harness.layouts import (
    conv_kernel_to_keras,
    conv_kernel_to_torch,
    dense_kernel_to_keras,
    dense_kernel_to_torch,
    depthwise_kernel_to_keras,
    depthwise_kernel_to_torch,
    flatten_permutation,
    gate_permutation,
    recurrent_kernel_to_keras,
    recurrent_kernel_to_torch,
    same_padding,
)
from torchref.architecture import KerasGELU

L = keras.layers
_ACT = FRAMEWORK_DIFFERENCES.activations
VECTOR = (Weight("bias", "bias"),)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def _first_mismatch(fields: Sequence[tuple[str, Any, Any]]) -> str | None:
    for what, keras_value, torch_value in fields:
        if keras_value != torch_value:
            return f"{what}: Keras {keras_value!r} vs torch {torch_value!r}"
    return None


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * n


# --- activations: each side reduced to (name, parameter) -------------------------------------


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
    }
    name = names.get(fn)
    if name == "gelu":
        return ("gelu", "tanh" if kwargs.get("approximate", False) else "none")
    if name == "leaky_relu":
        return ("leaky_relu", float(kwargs.get("negative_slope", 0.2)))
    if name == "elu":
        return ("elu", float(kwargs.get("alpha", 1.0)))
    if name == "softmax":
        return ("softmax", int(kwargs.get("axis", -1)))
    if name is None or (kwargs and name in ("relu", "tanh", "sigmoid", "silu", "linear")):
        return ("unknown", repr(fn))
    return (name,)


def keras_activation(layer_or_fn: Any) -> tuple[Any, ...]:
    """Keras' activation as ``(name, parameter)``: ``("gelu", "tanh")``, ``("leaky_relu",
    0.3)``, ``("relu",)``, ... ``("unknown", repr)`` when the harness cannot tell."""
    if isinstance(layer_or_fn, L.LeakyReLU):
        return ("leaky_relu", float(layer_or_fn.negative_slope))
    if isinstance(layer_or_fn, L.ReLU):
        plain = (layer_or_fn.negative_slope, layer_or_fn.max_value, layer_or_fn.threshold)
        return ("relu",) if plain in ((0.0, None, 0.0), (0, None, 0)) else ("unknown", plain)
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
    simple = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
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
TORCH_ACTIVATIONS += (nn.SiLU, nn.Identity, KerasGELU)


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
    elif name == "elu" and not _same(keras_side[1], torch_side[1]):
        return f"elu alpha: Keras {keras_side[1]!r} vs torch {torch_side[1]!r}"
    elif name == "softmax":
        rank = len(ctx.output_shape)
        axis = keras_side[1] % rank
        expected = (1 if axis == rank - 1 else axis + 1) if ctx.torch_channels_first else axis
        if torch_side[1] is None or torch_side[1] % rank != expected:
            return (
                f"softmax axis: Keras {keras_side[1]} is torch dim {expected}, not {torch_side[1]}"
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


# --- Dense, convolutions ----------------------------------------------------------------------


def _dense_weights(k: Any, t: Any, ctx: Context) -> list[Weight]:
    hint = ctx.flatten_from
    kernel = Weight(
        "kernel",
        "weight",
        lambda a: dense_kernel_to_torch(a, flatten_from=hint),
        lambda a: dense_kernel_to_keras(a, flatten_from=hint),
    )
    return [kernel, *VECTOR] if k.use_bias else [kernel]


def _dense_problem(k: Any, t: Any, ctx: Context) -> str | None:
    if ctx.torch_channels_first and len(ctx.input_shape) > 2:
        return (
            "Keras Dense mixes the last (channels) axis of a feature map that torch holds channels "
            "first, where nn.Linear would mix the last spatial axis (Flatten first)"
        )
    return _first_mismatch([("use_bias", k.use_bias, t.bias is not None)])


register_layer_pair(
    L.Dense,
    nn.Linear,
    transfer=_dense_weights,
    check=lambda k, t, ctx: _dense_problem(k, t, ctx),
    torch_layout="channels_last",
    fused_activation=True,
)


def _torch_padding(t: Any, ctx: Context, dims: int) -> list[tuple[int, int]] | str:
    """Per spatial axis (before, after): torch's own conv padding plus every ZeroPad before it."""
    kernel, dilation = _tuple(t.kernel_size, dims), _tuple(t.dilation, dims)
    if t.padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        pads = [(total // 2, total - total // 2) for total in totals]
    elif t.padding == "valid":
        pads = [(0, 0)] * dims
    else:
        pads = [(p, p) for p in _tuple(t.padding, dims)]
    for _, module in ctx.torch_before:
        if isinstance(module, (nn.ZeroPad1d, nn.ZeroPad2d)):
            spec = tuple(module.padding)  # (left, right[, top, bottom]): last axis first
            extra = [spec[i : i + 2] for i in range(0, len(spec), 2)][::-1]
            if len(extra) != dims:
                return f"{type(module).__name__} before a {dims}-D convolution"
            pads = [(a + b0, b + b1) for (a, b), (b0, b1) in zip(pads, extra, strict=True)]
    return pads


def _keras_padding(k: Any, ctx: Context, dims: int) -> list[tuple[int, int]]:
    kernel, strides = _tuple(k.kernel_size, dims), _tuple(k.strides, dims)
    dilation = _tuple(k.dilation_rate, dims)
    if k.padding == "valid":
        return [(0, 0)] * dims
    if k.padding == "causal":
        return [((kernel[0] - 1) * dilation[0], 0)]
    sizes = ctx.input_shape[1:-1]
    return [
        same_padding(n, kk, s, d)
        for n, kk, s, d in zip(sizes, kernel, strides, dilation, strict=True)
    ]


def _conv_problem(k: Any, t: Any, ctx: Context, *, groups: int) -> str | None:
    dims = len(_tuple(k.kernel_size, 1))
    if k.data_format != "channels_last":
        return f"Keras data_format={k.data_format!r}; the harness keeps maps channels_last"
    problem = _first_mismatch(
        [
            ("kernel_size", _tuple(k.kernel_size, dims), _tuple(t.kernel_size, dims)),
            ("strides", _tuple(k.strides, dims), _tuple(t.stride, dims)),
            ("dilation", _tuple(k.dilation_rate, dims), _tuple(t.dilation, dims)),
            ("groups", groups, t.groups),
            ("use_bias", k.use_bias, t.bias is not None),
            ("padding_mode", "zeros", t.padding_mode),
        ]
    )
    if problem:
        return problem
    torch_pads = _torch_padding(t, ctx, dims)
    if isinstance(torch_pads, str):
        return torch_pads
    keras_pads = _keras_padding(k, ctx, dims)
    if torch_pads != keras_pads:
        return (
            f"padding: Keras {k.padding!r} pads (before, after) {keras_pads} on input "
            f"{ctx.input_shape}, torch {torch_pads}. {note('same_padding')}"
        )
    return None


CONV_WEIGHTS = (Weight("kernel", "weight", conv_kernel_to_torch, conv_kernel_to_keras),)
for _keras_conv, _torch_conv in ((L.Conv1D, nn.Conv1d), (L.Conv2D, nn.Conv2d)):
    register_layer_pair(
        _keras_conv,
        _torch_conv,
        transfer=lambda k, t, ctx: [*CONV_WEIGHTS, *(VECTOR if k.use_bias else ())],
        check=lambda k, t, ctx: _conv_problem(k, t, ctx, groups=k.groups),
        torch_layout="channels_first",
        fused_activation=True,
    )


def _depthwise_weights(k: Any, t: Any, ctx: Context) -> list[Weight]:
    multiplier = int(k.depth_multiplier)
    kernel = Weight(
        "kernel",
        "weight",
        depthwise_kernel_to_torch,
        lambda a: depthwise_kernel_to_keras(a, multiplier=multiplier),
    )
    return [kernel, *(VECTOR if k.use_bias else ())]


register_layer_pair(
    L.DepthwiseConv2D,
    nn.Conv2d,
    transfer=_depthwise_weights,
    check=lambda k, t, ctx: _conv_problem(k, t, ctx, groups=int(ctx.input_shape[-1])),
    torch_layout="channels_first",
    fused_activation=True,
)


# --- normalization, embedding, dropout --------------------------------------------------------


def _batchnorm_weights(k: Any, t: Any, ctx: Context) -> list[Weight]:
    out = [Weight("gamma", "weight")] if k.scale else []
    out += [Weight("beta", "bias")] if k.center else []
    return [*out, Weight("moving_mean", "running_mean"), Weight("moving_variance", "running_var")]


def _batchnorm_problem(k: Any, t: Any, ctx: Context) -> str | None:
    rank = len(ctx.input_shape)
    expected = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d
    if type(t) is not expected:
        return f"a rank-{rank} input pairs with torch {expected.__name__}, found {type(t).__name__}"
    if k.axis not in (-1, rank - 1):
        return f"Keras axis={k.axis}; only the channels (last) axis maps"
    if getattr(k, "renorm", False):
        return "Keras renorm=True has no torch counterpart"
    if not t.track_running_stats or t.momentum is None:
        return (
            "torch module must track running stats with a float momentum "
            f"(track_running_stats={t.track_running_stats}, momentum={t.momentum})"
        )
    if k.center != t.affine or k.scale != t.affine:
        return f"Keras center={k.center}, scale={k.scale} vs torch affine={t.affine}"
    expected_kwargs = torch_batchnorm_kwargs(momentum=k.momentum, epsilon=k.epsilon)
    if not (
        _same(t.momentum, expected_kwargs["momentum"]) and _same(t.eps, expected_kwargs["eps"])
    ):
        return (
            f"Keras momentum={k.momentum}, epsilon={k.epsilon} needs torch {expected_kwargs} "
            f"(momentum 1 - m, eps passed explicitly); torch has momentum={t.momentum}, "
            f"eps={t.eps}. {note('batchnorm_momentum')}"
        )
    return None


register_layer_pair(
    L.BatchNormalization,
    (nn.BatchNorm1d, nn.BatchNorm2d),
    transfer=_batchnorm_weights,
    check=_batchnorm_problem,
    torch_layout="channels_first",  # torch normalizes dim 1; a no-op for (N, C) vectors
)


def _layernorm_problem(k: Any, t: Any, ctx: Context) -> str | None:
    rank = len(ctx.input_shape)
    axes = [a % rank for a in (k.axis if isinstance(k.axis, (list, tuple)) else [k.axis])]
    if axes != [rank - 1]:
        return f"Keras axis={k.axis}; only the last axis maps to nn.LayerNorm"
    if getattr(k, "rms_scaling", False):
        return "Keras rms_scaling=True is nn.RMSNorm, not nn.LayerNorm"
    affine = t.elementwise_affine
    return _first_mismatch(
        [
            ("normalized_shape", (int(ctx.input_shape[-1]),), tuple(t.normalized_shape)),
            ("epsilon", float(k.epsilon), float(t.eps)),
            ("scale (gamma)", k.scale, affine),
            ("center (beta)", k.center, affine and t.bias is not None),
        ]
    )


register_layer_pair(
    L.LayerNormalization,
    nn.LayerNorm,
    transfer=lambda k, t, ctx: [
        *([Weight("gamma", "weight")] if k.scale else []),
        *([Weight("beta", "bias")] if k.center else []),
    ],
    check=_layernorm_problem,
    torch_layout="channels_last",
)

register_layer_pair(
    L.Embedding,
    nn.Embedding,
    transfer=[Weight("embeddings", "weight")],
    check=lambda k, t, ctx: _first_mismatch(
        [
            ("mask_zero (torch has no masks)", k.mask_zero, False),
            ("padding_idx (zeroes that row's gradient in torch)", None, t.padding_idx),
            ("max_norm", None, t.max_norm),
            ("scale_grad_by_freq", False, t.scale_grad_by_freq),
        ]
    ),
    torch_layout="channels_last",
)

# Keras SpatialDropoutND drops whole channels (noise shape (N, 1.., C)), as torch's DropoutNd;
# Keras Dropout and nn.Dropout drop single elements. Each kind lists the other family's torch
# modules so that a port mixing them pairs and fails naming the layer, instead of passing with
# element masks injected on both sides.
CHANNEL_DROPOUT = {L.SpatialDropout1D: nn.Dropout1d, L.SpatialDropout2D: nn.Dropout2d}
CHANNEL_DROPOUT[L.SpatialDropout3D] = nn.Dropout3d
_DROPOUTS = (nn.Dropout, *CHANNEL_DROPOUT.values())


def _dropout_problem(k: Any, t: Any, ctx: Context) -> str | None:
    expected = CHANNEL_DROPOUT.get(type(k), nn.Dropout)
    if t is not None and type(t) is not expected:
        drops = "whole channels" if expected is not nn.Dropout else "single elements"
        return (
            f"Keras {type(k).__name__} drops {drops}, torch {type(t).__name__} does not: pair it "
            f"with nn.{expected.__name__}"
        )
    if getattr(k, "data_format", "channels_last") != "channels_last":
        return f"Keras data_format={k.data_format!r}; the harness keeps maps channels_last"
    return _first_mismatch(
        [("noise_shape", None, getattr(k, "noise_shape", None))]
        + ([] if t is None else [("rate", float(k.rate), float(t.p))])
    )


for _keras_dropout in (L.Dropout, *CHANNEL_DROPOUT):
    register_layer_pair(_keras_dropout, _DROPOUTS, check=_dropout_problem, torch_optional=True)


# --- pooling, padding, reshaping ------------------------------------------------------------


def _pool_problem(k: Any, t: Any, ctx: Context) -> str | None:
    dims = len(ctx.input_shape) - 2
    if k.data_format != "channels_last":
        return f"Keras data_format={k.data_format!r}; the harness keeps maps channels_last"
    if k.padding == "same":
        sizes = ctx.input_shape[1:-1]
        pads = [
            same_padding(n, p, s)
            for n, p, s in zip(
                sizes, _tuple(k.pool_size, dims), _tuple(k.strides, dims), strict=True
            )
        ]
        if any(p != (0, 0) for p in pads):
            return f"Keras padding='same' pads {pads} here; torch pooling cannot pad asymmetrically"
    return _first_mismatch(
        [
            ("pool_size", _tuple(k.pool_size, dims), _tuple(t.kernel_size, dims)),
            ("strides", _tuple(k.strides, dims), _tuple(t.stride, dims)),
            ("padding", (0,) * dims, _tuple(t.padding, dims)),
            ("ceil_mode", False, t.ceil_mode),
            ("dilation", (1,) * dims, _tuple(getattr(t, "dilation", 1), dims)),
        ]
    )


for _keras_pool, _torch_pool in (
    (L.MaxPooling1D, nn.MaxPool1d),
    (L.MaxPooling2D, nn.MaxPool2d),
    (L.AveragePooling1D, nn.AvgPool1d),
    (L.AveragePooling2D, nn.AvgPool2d),
):
    register_layer_pair(
        _keras_pool, _torch_pool, check=_pool_problem, torch_layout="channels_first"
    )


def _global_output(y: Any, k: Any, ctx: Context) -> np.ndarray:
    return np.asarray(y).reshape(np.asarray(y).shape[:2])  # (N, C, 1[, 1]) -> (N, C)


for _keras_global, _torch_global in (
    (L.GlobalAveragePooling1D, nn.AdaptiveAvgPool1d),
    (L.GlobalAveragePooling2D, nn.AdaptiveAvgPool2d),
    (L.GlobalMaxPooling1D, nn.AdaptiveMaxPool1d),
    (L.GlobalMaxPooling2D, nn.AdaptiveMaxPool2d),
):
    register_layer_pair(
        _keras_global,
        _torch_global,
        check=lambda k, t, ctx: _first_mismatch(
            [("keepdims", False, k.keepdims), ("data_format", "channels_last", k.data_format)]
            + ([] if t is None else [("output_size", 1, _tuple(t.output_size, 1)[0])])
        ),
        torch_layout="channels_last",
        output=_global_output,
        torch_optional=True,
    )


def _zero_padding_problem(k: Any, t: Any, ctx: Context) -> str | None:
    keras_pads = k.padding if isinstance(k.padding[0], (tuple, list)) else (k.padding,)
    torch_spec = tuple(t.padding)
    torch_pads = [tuple(torch_spec[i : i + 2]) for i in range(0, len(torch_spec), 2)][::-1]
    return _first_mismatch(
        [("padding (before, after) per axis", [tuple(p) for p in keras_pads], torch_pads)]
    )


register_layer_pair(
    L.ZeroPadding1D, nn.ZeroPad1d, check=_zero_padding_problem, torch_layout="channels_first"
)
register_layer_pair(
    L.ZeroPadding2D, nn.ZeroPad2d, check=_zero_padding_problem, torch_layout="channels_first"
)


def _channels_last_only(k: Any, t: Any, ctx: Context) -> str | None:
    # A channels-first torch map holds its elements in another order: no reshape of it can
    # equal Keras' reshape of the channels-last map.
    if ctx.torch_channels_first and len(ctx.input_shape) > 2:
        return "torch holds this input channels first, so the elements are in another order"
    return None


def _flatten_output(y: Any, k: Any, ctx: Context) -> np.ndarray:
    # torch flattened a channels-first map in (C, H, W) order; put it in Keras' (H, W, C) order
    if ctx.torch_channels_first and len(ctx.input_shape) > 2:
        return np.asarray(y)[:, np.argsort(flatten_permutation(ctx.input_shape[1:]))]
    return np.asarray(y)


register_layer_pair(
    L.Flatten,
    nn.Flatten,
    output=_flatten_output,
    check=lambda k, t, ctx: (
        None
        if t is None
        else _first_mismatch([("start_dim, end_dim", (1, -1), (t.start_dim, t.end_dim))])
    ),
    torch_layout="channels_last",
    torch_optional=True,
)
for _keras_reshape in (L.Reshape, L.Permute):
    register_layer_pair(
        _keras_reshape,
        (),
        check=_channels_last_only,
        torch_layout="channels_last",
        torch_optional=True,
    )


# --- recurrent layers ---------------------------------------------------------------------------


def _recurrent_problem(k: Any, t: Any, ctx: Context, *, gru: bool) -> str | None:
    cell = k.cell
    acts = keras.activations
    fields = [
        ("units / hidden_size", int(k.units), int(t.hidden_size)),
        ("input size", int(ctx.input_shape[-1]), int(t.input_size)),
        ("num_layers", 1, t.num_layers),
        ("bidirectional", False, t.bidirectional),
        ("batch_first", True, t.batch_first),
        ("use_bias", cell.use_bias, t.bias),
        ("activation", "tanh", "tanh" if cell.activation is acts.tanh else repr(cell.activation)),
        (
            "recurrent_activation",
            "sigmoid",
            "sigmoid"
            if cell.recurrent_activation is acts.sigmoid
            else repr(cell.recurrent_activation),
        ),
        ("go_backwards", False, k.go_backwards),
        ("return_state", False, k.return_state),
        ("stateful", False, k.stateful),
        (
            "dropout, recurrent_dropout",
            (0.0, 0.0),
            (float(cell.dropout), float(cell.recurrent_dropout)),
        ),
    ]
    if gru:
        fields.append(
            ("reset_after (torch applies the reset gate after the matmul)", True, cell.reset_after)
        )
    else:
        fields.append(("proj_size", 0, t.proj_size))
    problem = _first_mismatch(fields)
    if problem:
        return f"{problem}. {note('gru_gates' if gru else 'lstm_bias')}"
    return None


def _recurrent_weights(k: Any, t: Any, ctx: Context, *, gru: bool) -> list[Weight]:
    perm = gate_permutation(int(k.units), *(("zrh", "rzh") if gru else ("ifco", "ifco")))
    inverse = np.argsort(perm)
    out = [
        Weight(
            "cell.kernel",
            "weight_ih_l0",
            lambda a: recurrent_kernel_to_torch(a, perm),
            lambda a: recurrent_kernel_to_keras(a, perm),
        ),
        Weight(
            "cell.recurrent_kernel",
            "weight_hh_l0",
            lambda a: recurrent_kernel_to_torch(a, perm),
            lambda a: recurrent_kernel_to_keras(a, perm),
        ),
    ]
    if not k.cell.use_bias:
        return out
    if gru:  # reset_after=True: Keras bias (2, 3u) = [input bias, recurrent bias]
        bias = Weight(
            "cell.bias",
            ("bias_ih_l0", "bias_hh_l0"),
            lambda b: (b[0][perm], b[1][perm]),
            lambda ts: np.stack([ts[0][inverse], ts[1][inverse]]),
        )
    else:  # one Keras bias = torch bias_ih + bias_hh; the transfer zeros bias_hh
        bias = Weight(
            "cell.bias",
            ("bias_ih_l0", "bias_hh_l0"),
            lambda b: (b[perm], np.zeros_like(b)),
            lambda ts: (ts[0] + ts[1])[inverse],
            grad_to_keras=lambda gs: gs[0][inverse],
        )
    return [*out, bias]


def _recurrent_output(y: Any, k: Any, ctx: Context) -> np.ndarray:
    sequence = y[0] if isinstance(y, tuple) else y  # torch returns (output, state)
    return sequence if k.return_sequences else sequence[:, -1]


for _keras_rnn, _torch_rnn, _gru in ((L.LSTM, nn.LSTM, False), (L.GRU, nn.GRU, True)):
    register_layer_pair(
        _keras_rnn,
        _torch_rnn,
        transfer=functools.partial(_recurrent_weights, gru=_gru),
        check=functools.partial(_recurrent_problem, gru=_gru),
        torch_layout="channels_last",
        output=_recurrent_output,
    )


__all__ = ["TORCH_ACTIVATIONS", "activation_problem", "keras_activation", "torch_activation"]
