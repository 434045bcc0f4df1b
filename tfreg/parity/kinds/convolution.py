"""Dense and convolution kinds (Conv1D/2D incl. "same"/"causal" via torch padding or an
explicit ZeroPad before the conv, DepthwiseConv2D)."""

from __future__ import annotations

from typing import Any

from torch import nn

from tfreg.parity.kinds._common import VECTOR, L, as_tuple, first_mismatch
from tfreg.parity.registry import Context, Weight, register_layer_pair
from tfreg_harness.differences import note
from tfreg_harness.layouts import (
    conv_kernel_to_keras,
    conv_kernel_to_torch,
    conv_transpose_kernel_to_keras,
    conv_transpose_kernel_to_torch,
    dense_kernel_to_keras,
    dense_kernel_to_torch,
    depthwise_kernel_to_keras,
    depthwise_kernel_to_torch,
    same_padding,
)


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
    return first_mismatch([("use_bias", k.use_bias, t.bias is not None)])


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
    kernel, dilation = as_tuple(t.kernel_size, dims), as_tuple(t.dilation, dims)
    if t.padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        pads = [(total // 2, total - total // 2) for total in totals]
    elif t.padding == "valid":
        pads = [(0, 0)] * dims
    else:
        pads = [(p, p) for p in as_tuple(t.padding, dims)]
    for _, module in ctx.torch_before:
        if isinstance(module, (nn.ZeroPad1d, nn.ZeroPad2d)):
            spec = tuple(module.padding)  # (left, right[, top, bottom]): last axis first
            extra = [spec[i : i + 2] for i in range(0, len(spec), 2)][::-1]
            if len(extra) != dims:
                return f"{type(module).__name__} before a {dims}-D convolution"
            pads = [(a + b0, b + b1) for (a, b), (b0, b1) in zip(pads, extra, strict=True)]
    return pads


def _keras_padding(k: Any, ctx: Context, dims: int) -> list[tuple[int, int]]:
    kernel, strides = as_tuple(k.kernel_size, dims), as_tuple(k.strides, dims)
    dilation = as_tuple(k.dilation_rate, dims)
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
    dims = len(as_tuple(k.kernel_size, 1))
    if k.data_format != "channels_last":
        return f"Keras data_format={k.data_format!r}; the harness keeps maps channels_last"
    problem = first_mismatch(
        [
            ("kernel_size", as_tuple(k.kernel_size, dims), as_tuple(t.kernel_size, dims)),
            ("strides", as_tuple(k.strides, dims), as_tuple(t.stride, dims)),
            ("dilation", as_tuple(k.dilation_rate, dims), as_tuple(t.dilation, dims)),
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
for _keras_conv, _torch_conv in (
    (L.Conv1D, nn.Conv1d),
    (L.Conv2D, nn.Conv2d),
    (L.Conv3D, nn.Conv3d),
):
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


# --- transposed convolutions ------------------------------------------------------------------


def _transpose_crop(k: Any, ctx: Context, dims: int) -> list[tuple[int, int]]:
    """(before, after) that Keras crops from the full transposed output ``(n - 1) s + k``: none
    for "valid"; for "same" (output ``n s``) ``k - s`` in total, ``total // 2`` before."""
    kernel, strides = as_tuple(k.kernel_size, dims), as_tuple(k.strides, dims)
    if k.padding == "valid":
        return [(0, 0)] * dims
    totals = [max(kk - s, 0) for kk, s in zip(kernel, strides, strict=True)]
    return [(t // 2, t - t // 2) for t in totals]


def _conv_transpose_problem(k: Any, t: Any, ctx: Context) -> str | None:
    dims = len(as_tuple(k.kernel_size, 1))
    if k.data_format != "channels_last":
        return f"Keras data_format={k.data_format!r}; the harness keeps maps channels_last"
    problem = first_mismatch(
        [
            ("kernel_size", as_tuple(k.kernel_size, dims), as_tuple(t.kernel_size, dims)),
            ("strides", as_tuple(k.strides, dims), as_tuple(t.stride, dims)),
            ("dilation", (1,) * dims, as_tuple(t.dilation, dims)),
            ("dilation_rate (Keras)", (1,) * dims, as_tuple(k.dilation_rate, dims)),
            ("groups", 1, t.groups),
            ("output_padding (Keras)", None, k.output_padding),
            ("use_bias", k.use_bias, t.bias is not None),
        ]
    )
    if problem:
        return problem
    keras_crop = _transpose_crop(k, ctx, dims)
    # torch crops `padding` from both ends, then adds `output_padding` back at the end
    pads, extra = as_tuple(t.padding, dims), as_tuple(t.output_padding, dims)
    torch_crop = [(p, p - e) for p, e in zip(pads, extra, strict=True)]
    if torch_crop != keras_crop:
        return (
            f"cropping: Keras {k.padding!r} crops (before, after) {keras_crop} from the full "
            f"output, torch padding={pads}, output_padding={extra} crops {torch_crop}. "
            f"{note('transpose_padding')}"
        )
    return None


for _keras_tconv, _torch_tconv in (
    (L.Conv1DTranspose, nn.ConvTranspose1d),
    (L.Conv2DTranspose, nn.ConvTranspose2d),
):
    register_layer_pair(
        _keras_tconv,
        _torch_tconv,
        transfer=lambda k, t, ctx: [
            Weight(
                "kernel", "weight", conv_transpose_kernel_to_torch, conv_transpose_kernel_to_keras
            ),
            *(VECTOR if k.use_bias else ()),
        ],
        check=_conv_transpose_problem,
        torch_layout="channels_first",
        fused_activation=True,
    )
