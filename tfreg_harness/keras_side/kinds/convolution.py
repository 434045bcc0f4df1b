"""Dense and convolution kinds (Conv1D/2D incl. "same"/"causal" via torch padding or an
explicit ZeroPad before the conv, DepthwiseConv2D)."""

from __future__ import annotations

from typing import Any

from torch import nn

from tfreg_harness.differences import note
from tfreg_harness.keras_side.kinds._common import VECTOR, L, as_tuple, first_mismatch
from tfreg_harness.keras_side.registry import Context, Weight, register_layer_pair
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


def _conv_mismatch(k: Any, t: Any, dims: int, fields: list[tuple[str, Any, Any]]) -> str | None:
    """The first disagreement of a Keras convolution and its torch module: a channels-first
    Keras map, then kernel size and strides, then the kind's own ``fields``."""
    if k.data_format != "channels_last":
        return f"Keras data_format={k.data_format!r}; the harness keeps maps channels_last"
    return first_mismatch(
        [
            ("kernel_size", as_tuple(k.kernel_size, dims), as_tuple(t.kernel_size, dims)),
            ("strides", as_tuple(k.strides, dims), as_tuple(t.stride, dims)),
            *fields,
        ]
    )


def _conv_problem(k: Any, t: Any, ctx: Context, *, groups: int) -> str | None:
    dims = len(as_tuple(k.kernel_size, 1))
    problem = _conv_mismatch(
        k,
        t,
        dims,
        [
            ("dilation", as_tuple(k.dilation_rate, dims), as_tuple(t.dilation, dims)),
            ("groups", groups, t.groups),
            ("use_bias", k.use_bias, t.bias is not None),
            ("padding_mode", "zeros", t.padding_mode),
        ],
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
    problem = _conv_mismatch(
        k,
        t,
        dims,
        [
            ("dilation", (1,) * dims, as_tuple(t.dilation, dims)),
            ("dilation_rate (Keras)", (1,) * dims, as_tuple(k.dilation_rate, dims)),
            ("groups", 1, t.groups),
            ("output_padding (Keras)", None, k.output_padding),
            ("use_bias", k.use_bias, t.bias is not None),
        ],
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


# --- separable convolutions: a depthwise conv then a pointwise 1x1 conv -----------------------


def _separable_depthwise_to_torch(kernel: Any) -> Any:
    """Keras ``depthwise_kernel`` ``(*k, in, m)`` -> torch ``(in*m, 1, *k)`` (channel ``c*m+j``)."""
    return conv_kernel_to_torch(kernel.reshape(*kernel.shape[:-2], 1, -1))


def _separable_weights(k: Any, t: Any, ctx: Context) -> list[Weight]:
    multiplier, channels = int(k.depth_multiplier), int(ctx.input_shape[-1])
    depthwise = Weight(
        "depthwise_kernel",
        "depthwise.weight",
        _separable_depthwise_to_torch,
        lambda a: conv_kernel_to_keras(a).reshape(*a.shape[2:], channels, multiplier),
    )
    pointwise = Weight(
        "pointwise_kernel", "pointwise.weight", conv_kernel_to_torch, conv_kernel_to_keras
    )
    bias = (Weight("bias", "pointwise.bias"),) if k.use_bias else ()
    return [depthwise, pointwise, *bias]


def _separable_problem(k: Any, t: Any, ctx: Context) -> str | None:
    """Keras: depthwise conv (strides, padding, dilation; no bias) then a 1x1 conv with the bias."""
    dims = len(as_tuple(k.kernel_size, 1))
    channels, multiplier = int(ctx.input_shape[-1]), int(k.depth_multiplier)
    depthwise, pointwise = t.depthwise, t.pointwise
    problem = first_mismatch(
        [
            (
                "depth_multiplier (depthwise out_channels / in_channels)",
                multiplier,
                _ratio(depthwise.out_channels, depthwise.in_channels),
            ),
            (
                "depthwise bias (Keras has none: the bias is the pointwise conv's)",
                None,
                None if depthwise.bias is None else "a bias",
            ),
            ("pointwise kernel_size", (1,) * dims, as_tuple(pointwise.kernel_size, dims)),
            ("pointwise strides", (1,) * dims, as_tuple(pointwise.stride, dims)),
            (
                "pointwise padding",
                (0,) * dims,
                (0,) * dims
                if pointwise.padding in ("same", "valid")
                else as_tuple(pointwise.padding, dims),
            ),
            ("pointwise groups", 1, pointwise.groups),
            ("pointwise in_channels", channels * multiplier, pointwise.in_channels),
            ("filters / pointwise out_channels", int(k.filters), pointwise.out_channels),
            ("use_bias (on the pointwise conv)", bool(k.use_bias), pointwise.bias is not None),
        ]
    )
    if problem:
        return problem
    # the depthwise conv carries Keras' kernel_size, strides, dilation and padding
    return _conv_problem(_NoBias(k), depthwise, ctx, groups=channels)


def _ratio(a: int, b: int) -> int | float:
    return a // b if a % b == 0 else a / b


class _NoBias:
    """``k`` seen as its depthwise half, which has no bias."""

    def __init__(self, k: Any) -> None:
        self._k = k
        self.use_bias = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._k, name)


for _keras_sep, _torch_sep in ((L.SeparableConv1D, nn.Conv1d), (L.SeparableConv2D, nn.Conv2d)):
    register_layer_pair(
        _keras_sep,
        (_torch_sep, _torch_sep),
        transfer=_separable_weights,
        check=_separable_problem,
        torch_layout="channels_first",
        fused_activation=True,
        torch_group=("depthwise", "pointwise"),
    )
