"""Pooling, padding and reshaping kinds."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from tfreg_harness.differences import note
from tfreg_harness.keras_side.kinds._common import L, as_tuple, first_mismatch
from tfreg_harness.keras_side.registry import Context, register_layer_pair
from tfreg_harness.layouts import flatten_permutation, same_padding


def _pool_problem(k: Any, t: Any, ctx: Context) -> str | None:
    dims = len(ctx.input_shape) - 2
    if k.data_format != "channels_last":
        return f"Keras data_format={k.data_format!r}; the harness keeps maps channels_last"
    if k.padding == "same":
        sizes = ctx.input_shape[1:-1]
        pads = [
            same_padding(n, p, s)
            for n, p, s in zip(
                sizes, as_tuple(k.pool_size, dims), as_tuple(k.strides, dims), strict=True
            )
        ]
        if any(p != (0, 0) for p in pads):
            return f"Keras padding='same' pads {pads} here; torch pooling cannot pad asymmetrically"
    return first_mismatch(
        [
            ("pool_size", as_tuple(k.pool_size, dims), as_tuple(t.kernel_size, dims)),
            ("strides", as_tuple(k.strides, dims), as_tuple(t.stride, dims)),
            ("padding", (0,) * dims, as_tuple(t.padding, dims)),
            ("ceil_mode", False, t.ceil_mode),
            ("dilation", (1,) * dims, as_tuple(getattr(t, "dilation", 1), dims)),
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
        check=lambda k, t, ctx: first_mismatch(
            [("keepdims", False, k.keepdims), ("data_format", "channels_last", k.data_format)]
            + ([] if t is None else [("output_size", 1, as_tuple(t.output_size, 1)[0])])
        ),
        torch_layout="channels_last",
        output=_global_output,
        torch_optional=True,
    )


def _zero_padding_problem(k: Any, t: Any, ctx: Context) -> str | None:
    keras_pads = k.padding if isinstance(k.padding[0], (tuple, list)) else (k.padding,)
    torch_spec = tuple(t.padding)
    torch_pads = [tuple(torch_spec[i : i + 2]) for i in range(0, len(torch_spec), 2)][::-1]
    return first_mismatch(
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
        else first_mismatch([("start_dim, end_dim", (1, -1), (t.start_dim, t.end_dim))])
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


def _upsampling_problem(k: Any, t: Any, ctx: Context) -> str | None:
    dims = len(ctx.input_shape) - 2
    size = as_tuple(k.size, dims)
    if getattr(k, "data_format", "channels_last") != "channels_last":
        return f"Keras data_format={k.data_format!r}; the harness keeps maps channels_last"
    mode = getattr(k, "interpolation", "nearest")
    if t is None:  # F.interpolate in forward: the next paired layer's output checks it
        return None
    factor = t.scale_factor
    torch_size = as_tuple(factor if isinstance(factor, (tuple, list)) else int(factor or 0), dims)
    problem = first_mismatch(
        [
            ("size / scale_factor", size, torch_size),
            ("interpolation / mode", mode, t.mode),
        ]
    )
    if problem is None and t.mode == "bilinear" and ctx.dtype == "float64":
        problem = "Keras (tf.image.resize) resizes in float32 even for float64 maps"
    if problem is None and t.mode != "nearest" and t.align_corners:
        problem = "align_corners: Keras samples half-pixel centres (False) vs torch True"
    return None if problem is None else f"{problem}. {note('upsampling')}"


for _keras_up in (L.UpSampling1D, L.UpSampling2D):
    register_layer_pair(_keras_up, nn.Upsample, check=_upsampling_problem, torch_optional=True)


for _keras_crop in (L.Cropping1D, L.Cropping2D, L.Cropping3D):
    # torch has no cropping module: forward code slices the map (x[..., a:-b]); the next paired
    # layer's output checks it
    register_layer_pair(_keras_crop, (), torch_optional=True)


def _rescaling_problem(k: Any, t: Any, ctx: Context) -> str | None:
    # Keras casts scale and offset through float32 (1/255 -> 0.0039215688), even in float64
    rounded = [v for v in (k.scale, k.offset) if float(np.float32(v)) != float(v)]
    if ctx.dtype == "float64" and rounded:
        return (
            f"Keras rounds scale/offset {rounded} to float32 even in float64 (~6e-8 rel): use "
            "float32 numbers (1 / 256, 0.5) or compare in float32"
        )
    return None


# Parameter-free ops torch writes in forward: x * scale + offset, F.normalize(x, dim=-1),
# x * (x != value).any(-1, keepdim=True) (Keras' Masking also masks the layers after it: a torch
# port has to do the same, which the paired layers' outputs check).
register_layer_pair(L.Rescaling, (), check=_rescaling_problem, torch_optional=True)
for _keras_op in (L.UnitNormalization, L.Masking):
    register_layer_pair(_keras_op, (), torch_optional=True)
