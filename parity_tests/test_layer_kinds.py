"""A library of tiny model pairs, one per layer kind, each in three forms:

1. the correct pair passes ``assert_parity`` (claim "model_cross": float64 <= 1e-10 rel,
   float32 <= 1e-5 rel on logits, loss, gradients and every paired layer's output);
2. a deliberately broken pair -- transposed weight, wrong gate order, wrong eps or padding in
   the forward code, wrong activation -- fails, and the report names the first diverging layer;
3. a mismatched configuration fails at pairing (before any weight moves), naming the field.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tfreg.parity import assert_parity, check_parity, seed_everything, transfer_weights
from tfreg_harness.differences import FRAMEWORK_DIFFERENCES
from tfreg_harness.tolerances import tolerance
from tfreg_harness.torch_side.architecture import KerasGELU, KerasLeakyReLU

L = keras.layers
BATCH = 6


class Net(nn.Module):
    """A torch module from named submodules and a forward function (the user's own module)."""

    def __init__(self, forward: Callable[..., torch.Tensor], **modules: nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self, x)


def _seq(shape: tuple[int, ...], dtype: str, *layers: Any, integer: bool = False) -> Any:
    model = keras.Sequential([keras.Input(shape, dtype="int32" if integer else dtype)])
    for layer in layers:
        model.add(layer)
    return model


@dataclass(frozen=True)
class Case:
    keras: Callable[[str], Any]  # dtype -> built Keras model (layers named as below)
    torch: Callable[[], nn.Module]  # the correct hand-written torch module (float32)
    shape: tuple[int, ...]
    broken: Callable[[nn.Module], nn.Module]  # correct transferred module -> broken one
    first_diverging: str  # Keras layer name the report must name for the broken pair
    mismatch: Callable[[], nn.Module]
    mismatch_says: str
    integer_input: bool = False
    training: bool = False


def _transpose_spatial(name: str) -> Callable[[nn.Module], nn.Module]:
    def broken(module: nn.Module) -> nn.Module:
        weight = module.get_submodule(name).weight
        with torch.no_grad():
            weight.copy_(weight.transpose(-1, -2).clone())
        return module

    return broken


def _swap_gate_blocks(name: str, units: int) -> Callable[[nn.Module], nn.Module]:
    """A converter that keeps Keras' gate order: swaps torch's first two gate blocks."""

    def broken(module: nn.Module) -> nn.Module:
        rnn = module.get_submodule(name)
        with torch.no_grad():
            for tensor in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0):
                first, second = tensor[:units].clone(), tensor[units : 2 * units].clone()
                tensor[:units], tensor[units : 2 * units] = second, first
        return module

    return broken


def _swap_in_out(module: nn.Module, name: str) -> nn.Module:
    """A converter that forgot the in/out transpose of a square-channel kernel."""
    weight = module.get_submodule(name).weight
    with torch.no_grad():
        weight.copy_(weight.transpose(0, 1).clone())
    return module


def _replace_forward(forward: Callable[..., torch.Tensor]) -> Callable[[nn.Module], nn.Module]:
    def broken(module: nn.Module) -> nn.Module:
        module._forward = forward
        return module

    return broken


CASES: dict[str, Case] = {
    "dense": Case(
        keras=lambda d: _seq(
            (5,), d, L.Dense(5, activation="relu", dtype=d, name="a"), L.Dense(5, dtype=d, name="b")
        ),
        torch=lambda: nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5)),
        shape=(5,),
        broken=_transpose_spatial("2"),  # a square kernel copied without its transpose
        first_diverging="b",
        mismatch=lambda: nn.Sequential(nn.Linear(5, 5, bias=False), nn.ReLU(), nn.Linear(5, 5)),
        mismatch_says="use_bias: Keras True vs torch False",
    ),
    "conv2d same stride 2": Case(
        keras=lambda d: _seq(
            (8, 8, 2),
            d,
            L.Conv2D(3, 3, strides=2, padding="same", dtype=d, name="conv"),
            L.Flatten(dtype=d, name="flat"),
            L.Dense(2, dtype=d, name="head"),
        ),
        # TF pads (0, 1) on each spatial axis here: torch needs the explicit asymmetric pad.
        torch=lambda: nn.Sequential(
            nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(2, 3, 3, stride=2), nn.Flatten(), nn.Linear(48, 2)
        ),
        shape=(8, 8, 2),
        broken=_transpose_spatial("1"),
        first_diverging="conv",
        mismatch=lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(48, 2)
        ),
        mismatch_says="pads (before, after) [(0, 1), (0, 1)]",
    ),
    "conv1d dilation groups + global pooling": Case(
        keras=lambda d: _seq(
            (10, 4),
            d,
            L.Conv1D(4, 3, dilation_rate=2, groups=2, dtype=d, name="conv"),
            L.Activation("elu", dtype=d, name="act"),
            L.GlobalAveragePooling1D(dtype=d, name="pool"),
            L.Dense(3, dtype=d, name="head"),
        ),
        torch=lambda: Net(
            lambda s, x: s.head(s.pool(F.elu(s.conv(x))).flatten(1)),
            conv=nn.Conv1d(4, 4, 3, dilation=2, groups=2),
            pool=nn.AdaptiveAvgPool1d(1),
            head=nn.Linear(4, 3),
        ),
        shape=(10, 4),
        # wrong activation in the forward code: the Keras Activation layer has no torch module
        # to compare with, so the first layer to see the difference is the pooling after it
        broken=_replace_forward(lambda s, x: s.head(s.pool(F.selu(s.conv(x))).flatten(1))),
        first_diverging="pool",
        mismatch=lambda: Net(
            lambda s, x: s.head(s.pool(F.elu(s.conv(x))).flatten(1)),
            conv=nn.Conv1d(4, 4, 3, dilation=2),
            pool=nn.AdaptiveAvgPool1d(1),
            head=nn.Linear(4, 3),
        ),
        mismatch_says="groups: Keras 2 vs torch 1",
    ),
    "zero pad 1d + causal conv + max pooling 1d": Case(
        keras=lambda d: _seq(
            (9, 2),
            d,
            L.ZeroPadding1D((1, 2), dtype=d, name="pad"),
            L.Conv1D(3, 2, padding="causal", dtype=d, name="conv"),
            L.MaxPooling1D(2, dtype=d, name="pool"),
            L.GlobalMaxPooling1D(dtype=d, name="gmax"),
            L.Dense(2, dtype=d, name="head"),
        ),
        # "causal" pads (k - 1) * d zeros before: an explicit ZeroPad1d((1, 0)) in torch
        torch=lambda: nn.Sequential(
            nn.ZeroPad1d((1, 2)),
            nn.ZeroPad1d((1, 0)),
            nn.Conv1d(2, 3, 2),
            nn.MaxPool1d(2),
            nn.AdaptiveMaxPool1d(1),
            nn.Flatten(),
            nn.Linear(3, 2),
        ),
        shape=(9, 2),
        broken=_transpose_spatial("2"),  # (out, in, k) with in == k == 2: in and k swapped
        first_diverging="conv",
        mismatch=lambda: nn.Sequential(
            nn.ZeroPad1d((1, 2)),
            nn.Conv1d(2, 3, 2),
            nn.MaxPool1d(2),
            nn.AdaptiveMaxPool1d(1),
            nn.Flatten(),
            nn.Linear(3, 2),
        ),
        mismatch_says="padding: Keras 'causal' pads (before, after) [(1, 0)]",
    ),
    "depthwise": Case(
        keras=lambda d: _seq(
            (5, 5, 2),
            d,
            L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", dtype=d, name="dw"),
            L.Flatten(dtype=d, name="flat"),
            L.Dense(2, dtype=d, name="head"),
        ),
        torch=lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(100, 2)
        ),
        shape=(5, 5, 2),
        broken=_transpose_spatial("0"),
        first_diverging="dw",
        mismatch=lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(100, 2)
        ),
        mismatch_says="groups: Keras 2 vs torch 1",
    ),
    "embedding + lstm": Case(
        keras=lambda d: _seq(
            (7,),
            d,
            L.Embedding(10, 4, dtype=d, name="emb"),
            L.LSTM(3, dtype=d, name="lstm"),
            L.Dense(3, dtype=d, name="head"),
            integer=True,
        ),
        torch=lambda: Net(
            lambda s, x: s.head(s.lstm(s.emb(x))[0][:, -1]),
            emb=nn.Embedding(10, 4),
            lstm=nn.LSTM(4, 3, batch_first=True),
            head=nn.Linear(3, 3),
        ),
        shape=(7,),
        broken=_swap_gate_blocks("lstm", 3),
        first_diverging="lstm",
        mismatch=lambda: Net(
            lambda s, x: s.head(s.lstm(s.emb(x))[0][:, -1]),
            emb=nn.Embedding(10, 4, padding_idx=0),
            lstm=nn.LSTM(4, 3, batch_first=True),
            head=nn.Linear(3, 3),
        ),
        mismatch_says="padding_idx",
        integer_input=True,
    ),
    "gru": Case(
        keras=lambda d: _seq(
            (6, 3), d, L.GRU(4, return_sequences=True, dtype=d, name="gru"), L.Flatten(dtype=d)
        ),
        torch=lambda: Net(lambda s, x: s.gru(x)[0].flatten(1), gru=nn.GRU(3, 4, batch_first=True)),
        shape=(6, 3),
        broken=_swap_gate_blocks("gru", 4),  # Keras' (z, r, h) order copied as is
        first_diverging="gru",
        mismatch=lambda: Net(lambda s, x: s.gru(x)[0].flatten(1), gru=nn.GRU(3, 4)),
        mismatch_says="batch_first: Keras True vs torch False",
    ),
    "layernorm": Case(
        keras=lambda d: _seq(
            (5,),
            d,
            L.Dense(4, dtype=d, name="a"),
            L.LayerNormalization(epsilon=1e-3, dtype=d, name="ln"),
            L.Dense(3, dtype=d, name="b"),
        ),
        torch=lambda: Net(
            lambda s, x: s.b(s.ln(s.a(x))),
            a=nn.Linear(5, 4),
            ln=nn.LayerNorm(4, eps=1e-3),
            b=nn.Linear(4, 3),
        ),
        shape=(5,),
        broken=_replace_forward(  # wrong eps in the forward code
            lambda s, x: s.b(F.layer_norm(s.a(x), (4,), s.ln.weight, s.ln.bias, eps=1e-5))
        ),
        first_diverging="ln",
        mismatch=lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)),
        mismatch_says="epsilon: Keras 0.001 vs torch 1e-05",
    ),
    "batchnorm conv (train mode)": Case(
        keras=lambda d: _seq(
            (6, 6, 2),
            d,
            L.Conv2D(3, 3, dtype=d, name="conv"),
            L.BatchNormalization(dtype=d, name="bn"),
            L.ReLU(dtype=d, name="relu"),
            L.MaxPooling2D(2, dtype=d, name="pool"),
            L.Flatten(dtype=d, name="flat"),
            L.Dense(2, dtype=d, name="head"),
        ),
        torch=lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3, momentum=0.01, eps=1e-3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 2),
        ),
        shape=(6, 6, 2),
        broken=_transpose_spatial("0"),
        first_diverging="conv",
        mismatch=lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 2),
        ),
        mismatch_says="momentum 1 - m, eps passed explicitly",
        training=True,
    ),
    "zero padding + average pooling": Case(
        keras=lambda d: _seq(
            (6, 6, 1),
            d,
            L.ZeroPadding2D(((1, 0), (0, 1)), dtype=d, name="pad"),
            L.AveragePooling2D(2, dtype=d, name="pool"),
            L.Flatten(dtype=d, name="flat"),
            L.Dense(2, dtype=d, name="head"),
        ),
        torch=lambda: nn.Sequential(
            nn.ZeroPad2d((0, 1, 1, 0)), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(9, 2)
        ),
        shape=(6, 6, 1),
        # F.pad in the forward code with the (H, W) pads swapped: the Keras padding layer then
        # has no torch module, so the first layer to see it is the pooling
        broken=lambda m: Net(
            lambda s, x: s.head(s.pool(F.pad(x, (1, 0, 0, 1))).flatten(1)), pool=m[1], head=m[3]
        ),
        first_diverging="pool",
        mismatch=lambda: nn.Sequential(
            nn.ZeroPad2d((0, 1, 1, 0)), nn.AvgPool2d(2, stride=1), nn.Flatten(), nn.Linear(25, 2)
        ),
        mismatch_says="strides: Keras (2, 2) vs torch (1, 1)",
    ),
    "reshape + permute": Case(
        keras=lambda d: _seq(
            (5,),
            d,
            L.Dense(12, dtype=d, name="a"),
            L.Reshape((3, 4), dtype=d, name="reshape"),
            L.Permute((2, 1), dtype=d, name="permute"),
            L.Flatten(dtype=d, name="flat"),
            L.Dense(3, dtype=d, name="b"),
        ),
        torch=lambda: Net(
            lambda s, x: s.b(s.a(x).view(-1, 3, 4).transpose(1, 2).flatten(1)),
            a=nn.Linear(5, 12),
            b=nn.Linear(12, 3),
        ),
        shape=(5,),
        broken=_replace_forward(lambda s, x: s.b(s.a(x).view(-1, 4, 3).flatten(1))),
        first_diverging="b",
        mismatch=lambda: Net(
            lambda s, x: s.b(s.a(x)), a=nn.Linear(5, 12), c=nn.Linear(3, 3), b=nn.Linear(12, 3)
        ),
        mismatch_says="torch module 'b' (Linear) holds weights but no Keras layer is left",
    ),
}

# --- issue-19 kinds: graph ops, attention, transposed convs, group norm, upsampling -------------


def _functional(shape: tuple[int, ...], dtype: str, build: Callable[..., Any], **kw: Any) -> Any:
    inputs = keras.Input(shape, dtype=kw.pop("input_dtype", dtype))
    return keras.Model(inputs, build(inputs, dtype))


def _residual(x: Any, d: str) -> Any:
    h = L.Dense(4, dtype=d, name="a")(x)
    merged = L.Concatenate(dtype=d, name="cat")([L.Add(dtype=d, name="add")([x, h]), h])
    return L.Dense(2, dtype=d, name="b")(merged)


def _dot_attention(x: Any, d: str) -> Any:
    query = L.Rescaling(0.5, dtype=d, name="scale")(x)
    keys = L.Dense(4, dtype=d, name="a")(x)
    attended = L.Attention(dtype=d, name="attention")([query, keys])
    normalized = L.UnitNormalization(dtype=d, name="unit")(attended)
    return L.Dense(2, dtype=d, name="b")(L.Flatten(dtype=d, name="flat")(normalized))


def _attention(x: Any, d: str) -> Any:
    keep = keras.ops.expand_dims(keras.ops.not_equal(x, 0), 1)
    h = L.Embedding(10, 8, dtype=d, name="emb")(x)
    h = L.MultiHeadAttention(2, 4, dtype=d, name="attn")(h, h, attention_mask=keep)
    return L.Dense(2, dtype=d, name="head")(L.GlobalAveragePooling1D(dtype=d, name="pool")(h))


def _attention_net(heads: int = 2) -> nn.Module:
    def forward(s: Any, x: torch.Tensor) -> torch.Tensor:
        h = s.emb(x)
        h = s.attn(h, h, h, key_padding_mask=x == 0, need_weights=False)[0]
        return s.head(s.pool(h.transpose(1, 2)).flatten(1))

    return Net(
        forward,
        emb=nn.Embedding(10, 8),
        attn=nn.MultiheadAttention(8, heads, batch_first=True),
        pool=nn.AdaptiveAvgPool1d(1),
        head=nn.Linear(8, 2),
    )


def _masked_mean(x: Any, d: str) -> Any:
    h = L.Embedding(10, 3, mask_zero=True, dtype=d, name="emb")(x)
    return L.Dense(2, dtype=d, name="head")(L.GlobalAveragePooling1D(dtype=d, name="pool")(h))


def _masked_mean_net(padding_idx: int | None = 0) -> nn.Module:
    def forward(s: Any, x: torch.Tensor) -> torch.Tensor:
        keep = (x != 0).unsqueeze(-1).to(s.head.weight.dtype)
        return s.head((s.emb(x) * keep).sum(1) / keep.sum(1))

    return Net(forward, emb=nn.Embedding(10, 3, padding_idx=padding_idx), head=nn.Linear(3, 2))


def _upsampling_model(d: str, interpolation: str) -> Any:
    return _seq(
        (2, 2, 2),
        d,
        L.Conv2D(3, 1, dtype=d, name="conv"),
        L.UpSampling2D(2, interpolation=interpolation, dtype=d, name="up"),
        L.Flatten(dtype=d, name="flat"),
        L.Dense(2, dtype=d, name="head"),
    )


def _upsample_net(mode: str, align_corners: bool | None = None) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 1),
        nn.Upsample(scale_factor=2, mode=mode, align_corners=align_corners),
        nn.Flatten(),
        nn.Linear(48, 2),
    )


def _transpose_net(eps: float = 1e-3) -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(2, 4, 3, stride=1, padding=1),
        nn.GroupNorm(2, 4, eps=eps),
        nn.Flatten(),
        nn.Linear(36, 2),
    )


CASES.update(
    {
        "merge layers (Add, Concatenate) in forward code": Case(
            keras=lambda d: _functional((4,), d, _residual),
            torch=lambda: Net(
                lambda s, x: s.b(torch.cat([x + s.a(x), s.a(x)], dim=1)),
                a=nn.Linear(4, 4),
                b=nn.Linear(8, 2),
            ),
            shape=(4,),
            # concatenated the wrong way round: the merges have no module; b is named
            broken=_replace_forward(lambda s, x: s.b(torch.cat([s.a(x), x + s.a(x)], dim=1))),
            first_diverging="b",
            mismatch=lambda: Net(lambda s, x: s.b(x), a=nn.Linear(4, 4), b=nn.Linear(4, 2)),
            mismatch_says="'b' (Linear) do not compute the same function",
        ),
        "multi-head attention with padding mask": Case(
            keras=lambda d: _functional((5,), d, _attention, input_dtype="int32"),
            torch=_attention_net,
            shape=(5,),
            # key_padding_mask given Keras' keep-mask (True = attend): inverted semantics
            broken=_replace_forward(
                lambda s, x: s.head(
                    s.pool(
                        s.attn(s.emb(x), s.emb(x), s.emb(x), key_padding_mask=x != 0)[0].transpose(
                            1, 2
                        )
                    ).flatten(1)
                )
            ),
            first_diverging="attn",
            mismatch=lambda: _attention_net(heads=1),
            mismatch_says="num_heads: Keras 2 vs torch 1",
            integer_input=True,
        ),
        "embedding mask_zero <-> padding_idx": Case(
            keras=lambda d: _functional((5,), d, _masked_mean, input_dtype="int32"),
            torch=_masked_mean_net,
            shape=(5,),
            broken=_replace_forward(lambda s, x: s.head(s.emb(x).mean(1))),  # mask ignored
            first_diverging="head",
            mismatch=lambda: _masked_mean_net(padding_idx=None),
            mismatch_says="mask_zero / padding_idx: Keras 0 vs torch None",
            integer_input=True,
        ),
        "conv2d transpose + group norm": Case(
            keras=lambda d: _seq(
                (3, 3, 2),
                d,
                L.Conv2DTranspose(4, 3, padding="same", dtype=d, name="up"),
                L.GroupNormalization(2, dtype=d, name="gn"),
                L.Flatten(dtype=d, name="flat"),
                L.Dense(2, dtype=d, name="head"),
            ),
            torch=_transpose_net,
            shape=(3, 3, 2),
            broken=_transpose_spatial("0"),
            first_diverging="up",
            mismatch=lambda: _transpose_net(eps=1e-5),  # torch's default eps, Keras' is 1e-3
            mismatch_says="epsilon: Keras 0.001 vs torch 1e-05",
        ),
        "upsampling2d nearest": Case(
            keras=lambda d: _upsampling_model(d, "nearest"),
            torch=lambda: _upsample_net("nearest"),
            shape=(2, 2, 2),
            # bilinear in the forward code: no module to check, so head is the first to differ
            broken=lambda m: Net(
                lambda s, x: s.head(
                    F.interpolate(s.conv(x), scale_factor=2, mode="bilinear").flatten(1)
                ),
                conv=m[0],
                head=m[3],
            ),
            first_diverging="head",
            mismatch=lambda: _upsample_net("bilinear"),
            mismatch_says="interpolation / mode: Keras 'nearest' vs torch 'bilinear'",
        ),
        "bidirectional gru, last step": Case(
            keras=lambda d: _seq(
                (4, 3),
                d,
                L.Bidirectional(L.GRU(2, dtype=d), dtype=d, name="bi"),
                L.Dense(2, dtype=d, name="head"),
            ),
            torch=lambda: Net(
                lambda s, x: s.head(
                    torch.cat([s.gru(x)[0][:, -1, :2], s.gru(x)[0][:, 0, 2:]], dim=1)
                ),
                gru=nn.GRU(3, 2, batch_first=True, bidirectional=True),
                head=nn.Linear(4, 2),
            ),
            shape=(4, 3),
            broken=_replace_forward(lambda s, x: s.head(s.gru(x)[0][:, -1])),  # backward at T-1
            first_diverging="head",
            mismatch=lambda: Net(
                lambda s, x: s.head(s.gru(x)[0][:, -1]),
                gru=nn.GRU(3, 2, batch_first=True),
                head=nn.Linear(4, 2),
            ),
            mismatch_says="bidirectional (Keras Bidirectional): Keras True vs torch False",
        ),
        "prelu per channel + cropping in forward code": Case(
            keras=lambda d: _seq(
                (5, 5, 2),
                d,
                L.Conv2D(3, 1, dtype=d, name="conv"),
                L.PReLU(shared_axes=[1, 2], dtype=d, name="prelu"),
                L.Cropping2D(((1, 0), (0, 2)), dtype=d, name="crop"),
                L.Flatten(dtype=d, name="flat"),
                L.Dense(2, dtype=d, name="head"),
            ),
            torch=lambda: Net(
                lambda s, x: s.head(s.prelu(s.conv(x))[:, :, 1:, :-2].flatten(1)),
                conv=nn.Conv2d(2, 3, 1),
                prelu=nn.PReLU(3),
                head=nn.Linear(36, 2),
            ),
            shape=(5, 5, 2),
            # cropped on the wrong side: the crop is forward code, so head is named
            broken=_replace_forward(
                lambda s, x: s.head(s.prelu(s.conv(x))[:, :, :-1, 2:].flatten(1))
            ),
            first_diverging="head",
            mismatch=lambda: Net(
                lambda s, x: s.head(s.prelu(s.conv(x))[:, :, 1:, :-2].flatten(1)),
                conv=nn.Conv2d(2, 3, 1),
                prelu=nn.PReLU(1),
                head=nn.Linear(36, 2),
            ),
            mismatch_says="slopes: Keras 3 vs torch num_parameters=1",
        ),
        "stacked simple rnn": Case(
            keras=lambda d: _seq(
                (4, 3),
                d,
                L.SimpleRNN(2, return_sequences=True, dtype=d, name="rnn1"),
                L.SimpleRNN(2, dtype=d, name="rnn2"),
                L.Dense(2, dtype=d, name="head"),
            ),
            torch=lambda: Net(
                lambda s, x: s.head(s.rnn(x)[0][:, -1]),
                rnn=nn.RNN(3, 2, num_layers=2, batch_first=True),
                head=nn.Linear(2, 2),
            ),
            shape=(4, 3),
            # the first step taken for the last: the module's output agrees, head is named
            broken=_replace_forward(lambda s, x: s.head(s.rnn(x)[0][:, 0])),
            first_diverging="head",
            mismatch=lambda: Net(
                lambda s, x: s.head(s.rnn(x)[0][:, -1]),
                rnn=nn.RNN(3, 2, num_layers=2, batch_first=True, nonlinearity="relu"),
                head=nn.Linear(2, 2),
            ),
            mismatch_says="activation / nonlinearity: Keras 'tanh' vs torch 'relu'",
        ),
        "conv3d": Case(
            keras=lambda d: _seq(
                (3, 4, 4, 2),
                d,
                L.Conv3D(2, (1, 2, 3), dtype=d, name="conv"),
                L.Flatten(dtype=d, name="flat"),
                L.Dense(2, dtype=d, name="head"),
            ),
            torch=lambda: nn.Sequential(nn.Conv3d(2, 2, (1, 2, 3)), nn.Flatten(), nn.Linear(36, 2)),
            shape=(3, 4, 4, 2),
            broken=lambda m: _swap_in_out(m, "0"),
            first_diverging="conv",
            mismatch=lambda: nn.Sequential(
                nn.Conv3d(2, 2, (1, 3, 2)), nn.Flatten(), nn.Linear(36, 2)
            ),
            mismatch_says="kernel_size: Keras (1, 2, 3) vs torch (1, 3, 2)",
        ),
        "rms normalization": Case(
            keras=lambda d: _seq(
                (5,),
                d,
                L.Dense(4, dtype=d, name="a"),
                L.RMSNormalization(epsilon=1e-3, dtype=d, name="rms"),
                L.Dense(2, dtype=d, name="b"),
            ),
            torch=lambda: nn.Sequential(nn.Linear(5, 4), nn.RMSNorm(4, eps=1e-3), nn.Linear(4, 2)),
            shape=(5,),
            # torch's RMSNorm default eps in the forward code
            broken=lambda m: Net(
                lambda s, x: s.b(F.rms_norm(s.a(x), (4,), s.rms.weight)), a=m[0], rms=m[1], b=m[2]
            ),
            first_diverging="rms",
            mismatch=lambda: nn.Sequential(nn.Linear(5, 4), nn.RMSNorm(4), nn.Linear(4, 2)),
            mismatch_says="torch eps=None",
        ),
        "instance norm (GroupNormalization, one group per channel)": Case(
            keras=lambda d: _seq(
                (4, 4, 3),
                d,
                L.Conv2D(3, 1, dtype=d, name="conv"),
                L.GroupNormalization(-1, epsilon=1e-5, dtype=d, name="norm"),
                L.Flatten(dtype=d, name="flat"),
                L.Dense(2, dtype=d, name="head"),
            ),
            torch=lambda: nn.Sequential(
                nn.Conv2d(3, 3, 1),
                nn.InstanceNorm2d(3, affine=True),
                nn.Flatten(),
                nn.Linear(48, 2),
            ),
            shape=(4, 4, 3),
            broken=lambda m: _swap_in_out(m, "0"),
            first_diverging="conv",
            mismatch=lambda: nn.Sequential(
                nn.Conv2d(3, 3, 1),
                nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
                nn.Flatten(),
                nn.Linear(48, 2),
            ),
            mismatch_says="track_running_stats (Keras keeps no statistics): Keras False vs torch",
        ),
        "rescaling, dot attention, unit normalization in forward code": Case(
            keras=lambda d: _functional((3, 4), d, _dot_attention),
            torch=lambda: Net(
                lambda s, x: s.b(
                    F.normalize(
                        torch.softmax((x * 0.5) @ s.a(x).transpose(1, 2), -1) @ s.a(x), dim=-1
                    ).flatten(1)
                ),
                a=nn.Linear(4, 4),
                b=nn.Linear(12, 2),
            ),
            shape=(3, 4),
            # the Rescaling forgotten in the forward code: b is the first paired layer to differ
            broken=_replace_forward(
                lambda s, x: s.b(
                    F.normalize(
                        torch.softmax(x @ s.a(x).transpose(1, 2), -1) @ s.a(x), dim=-1
                    ).flatten(1)
                )
            ),
            first_diverging="b",
            mismatch=lambda: Net(lambda s, x: s.b(s.a(x)), a=nn.Linear(4, 4), b=nn.Linear(4, 2)),
            mismatch_says="'b' (Linear) do not compute the same function",
        ),
    }
)


def test_rescaling_by_a_non_float32_number_is_refused_in_float64() -> None:
    """Keras' Rescaling casts its scale through float32 even in float64 (1/255 ->
    0.0039215688): 2.3e-10 off on an input of 1, 6e-8 relative -- above the float64 claim, so
    the check refuses it naming the cause; a float32-exact scale (1/256) passes."""
    ones = np.ones((1, 1))
    gap = float(L.Rescaling(1 / 255, dtype="float64")(ones).numpy()[0, 0]) - 1 / 255
    assert 2.0e-10 < abs(gap) < 2.5e-10, gap
    for scale, ok in ((1 / 255, False), (1 / 256, True)):
        model = _seq(
            (3,), "float64", L.Rescaling(scale, dtype="float64"), L.Dense(2, dtype="float64")
        )
        module = Net(lambda s, x, c=scale: s.d(x * c), d=nn.Linear(3, 2)).double()
        x, y = np.random.default_rng(1).normal(size=(4, 3)), np.array([0, 1, 0, 1])
        report = check_parity(model, module, x, y)
        assert report.ok is ok, report.to_text()
        assert ok or "rounds scale/offset" in report.rows[0].detail


def test_transposed_conv_same_with_odd_crop_is_refused() -> None:
    """Keras 'same' at kernel 3 stride 2 crops (0, 1) from the full output; torch's padding /
    output_padding crop symmetrically then add at the end, so no ConvTranspose2d matches: a
    failed pairing row naming the difference, not a near-miss comparison."""
    layer = L.Conv2DTranspose(2, 3, strides=2, padding="same", dtype="float64")
    keras_model = _seq((3, 3, 1), "float64", layer)
    module = nn.ConvTranspose2d(1, 2, 3, stride=2, padding=1, output_padding=1).double()
    x = np.ones((2, 3, 3, 1))
    report = check_parity(keras_model, module, x, np.zeros((2, 6, 6), dtype=int))
    assert [r.status for r in report.rows] == ["fail"]
    assert "crops (before, after) [(0, 1), (0, 1)]" in report.rows[0].detail


def test_documented_attention_scale_difference_is_pinned() -> None:
    """Keras' MultiHeadAttention scales queries by 1/sqrt(key_dim) cast through float32, even in
    float64 (1/sqrt(2) -> 0.70710676908...): ~8e-9 off torch's exact scale on unit-size inputs,
    above the float64 claim, so the float64 check refuses a key_dim whose scale is not
    float32-exact; at key_dim 4 (0.5) the two agree to round-off."""
    x = np.random.default_rng(0).normal(size=(2, 5, 4))
    for key_dim, low, high in ((2, 1e-9, 1e-7), (4, 0.0, 1e-15)):
        layer = L.MultiHeadAttention(2, key_dim, dtype="float64")
        keras_out = layer(x, x).numpy()
        t = torch.from_numpy(x)
        project = {
            name: torch.einsum("btd,dhk->bthk", t, torch.from_numpy(dense.kernel.numpy()))
            + torch.from_numpy(dense.bias.numpy())
            for name, dense in (
                ("q", layer.query_dense),
                ("k", layer.key_dense),
                ("v", layer.value_dense),
            )
        }
        scores = torch.einsum("bthk,bshk->bhts", project["q"] / math.sqrt(key_dim), project["k"])
        heads = torch.einsum("bhts,bshk->bthk", scores.softmax(-1), project["v"])
        out = torch.einsum(
            "bthk,hkd->btd", heads, torch.from_numpy(layer.output_dense.kernel.numpy())
        )
        gap = float(np.max(np.abs(out.numpy() + layer.output_dense.bias.numpy() - keras_out)))
        assert low <= gap <= high, (key_dim, gap)
    inputs = keras.Input((5, 4), dtype="float64")
    keras_model = keras.Model(inputs, L.MultiHeadAttention(2, 2, dtype="float64")(inputs, inputs))
    module = Net(
        lambda s, x: s.attn(x, x, x)[0], attn=nn.MultiheadAttention(4, 2, batch_first=True)
    )
    report = check_parity(keras_model, module.double(), x, np.zeros((2, 5), dtype=int))
    assert [r.status for r in report.rows] == ["fail"]
    assert "1/sqrt(key_dim) rounded to float32" in report.rows[0].detail


def test_bilinear_upsampling_pairs_in_float32_and_pins_float64() -> None:
    """Keras bilinear UpSampling2D = torch ``align_corners=False`` (half-pixel centres):
    a float32 pair passes at 1e-5. TensorFlow resizes in float32 even for float64 maps, ~1e-8
    off an exact float64 interpolation, so the float64 check refuses it (naming the cause);
    ``align_corners=True`` samples other points (>0.05 apart here) and is refused too."""
    x = np.random.default_rng(5).normal(size=(1, 3, 3, 1))  # not float32 numbers
    keras_out = L.UpSampling2D(2, interpolation="bilinear", dtype="float64")(x).numpy()
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    gaps = [
        float(
            np.max(
                np.abs(
                    F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=corners)
                    .permute(0, 2, 3, 1)
                    .numpy()
                    - keras_out
                )
            )
        )
        for corners in (False, True)
    ]
    assert 1e-10 < gaps[0] < 1e-6 and gaps[1] > 0.05, gaps
    rng = seed_everything(47)
    x32, y = rng.normal(size=(BATCH, 2, 2, 2)).astype("float32"), rng.integers(0, 2, BATCH)
    assert_parity(
        _upsampling_model("float32", "bilinear"), _upsample_net("bilinear", False), x32, y
    )
    for dtype, module, says in (
        ("float64", _upsample_net("bilinear", False), "resizes in float32"),
        ("float32", _upsample_net("bilinear", True), "align_corners"),
    ):
        model = _upsampling_model(dtype, "bilinear")
        report = check_parity(model, module.to(getattr(torch, dtype)), x32.astype(dtype), y)
        assert [r.status for r in report.rows] == ["fail"] and says in report.rows[0].detail


def _data(case: Case, dtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = (
        rng.integers(0, 10, size=(BATCH, *case.shape))
        if case.integer_input
        else rng.normal(size=(BATCH, *case.shape)).astype(dtype)
    )
    return x, rng.integers(0, 2, size=BATCH)


def _pair(case: Case, dtype: str) -> tuple[Any, nn.Module, np.ndarray, np.ndarray]:
    rng = seed_everything(41)
    keras_model = case.keras(dtype)
    for variable in keras_model.trainable_weights:  # non-trivial biases too
        variable.assign(rng.uniform(-0.6, 0.6, size=tuple(variable.shape)).astype(dtype))
    x, y = _data(case, dtype, rng)
    return keras_model, case.torch().to(getattr(torch, dtype)), x, y


@pytest.mark.parametrize("name", list(CASES))
def test_correct_pair_passes(name: str, dtype: str) -> None:
    # model_cross: float64 <= 1e-10, float32 <= 1e-5 (logits, loss, gradients, layer outputs)
    case = CASES[name]
    keras_model, torch_module, x, y = _pair(case, dtype)
    report = assert_parity(keras_model, torch_module, x, y, training=case.training)
    assert all(r.tolerance == tolerance("model_cross", dtype).rtol for r in report.layers if r.rel)
    assert report.layers and all(r.passed for r in report.layers)


@pytest.mark.parametrize("name", list(CASES))
def test_broken_pair_names_the_first_diverging_layer(name: str) -> None:
    case = CASES[name]
    keras_model, torch_module, x, y = _pair(case, "float64")
    transfer_weights(keras_model, torch_module, sample=x)
    broken = case.broken(torch_module)
    report = check_parity(keras_model, broken, x, y, training=case.training, transfer=False)
    assert not report.ok
    assert report.first_diverging_layer is not None, report.to_text()
    assert report.first_diverging_layer.split(" ")[0] == case.first_diverging, report.to_text()


@pytest.mark.parametrize("name", list(CASES))
def test_mismatched_configuration_fails_at_pairing(name: str) -> None:
    case = CASES[name]
    keras_model, _, x, y = _pair(case, "float64")
    module = case.mismatch().double()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    report = check_parity(keras_model, module, x, y, training=case.training)
    assert [r.status for r in report.rows] == ["fail"]
    assert case.mismatch_says in report.rows[0].detail, report.rows[0].detail
    for key, value in module.state_dict().items():  # refused before any weight moved
        assert torch.equal(value, before[key]), key


# --- activations ---------------------------------------------------------------------------

ACTIVATIONS: dict[str, tuple[Callable[[], Any], Callable[[], nn.Module]]] = {
    "relu": (lambda: L.Activation("relu"), nn.ReLU),
    "gelu exact (matching mode)": (lambda: L.Activation("gelu"), lambda: KerasGELU("none")),
    "gelu tanh (matching mode)": (
        lambda: L.Activation(functools.partial(keras.activations.gelu, approximate=True)),
        lambda: KerasGELU("tanh"),
    ),
    "leaky_relu (matching mode)": (lambda: L.LeakyReLU(0.2), lambda: KerasLeakyReLU(0.2)),
    "silu": (lambda: L.Activation("silu"), nn.SiLU),
    "elu": (lambda: L.ELU(alpha=0.7), lambda: nn.ELU(alpha=0.7)),
    "sigmoid": (lambda: L.Activation("sigmoid"), nn.Sigmoid),
    "tanh": (lambda: L.Activation("tanh"), nn.Tanh),
    "softmax": (L.Softmax, lambda: nn.Softmax(dim=-1)),
    "ReLU(max_value=6) <-> ReLU6": (lambda: L.ReLU(max_value=6.0), nn.ReLU6),
    "relu6 <-> Hardtanh(0, 6)": (lambda: L.Activation("relu6"), lambda: nn.Hardtanh(0.0, 6.0)),
    "ReLU(max_value=1.5) <-> Hardtanh(0, 1.5)": (
        lambda: L.ReLU(max_value=1.5),
        lambda: nn.Hardtanh(0.0, 1.5),
    ),
    "hard_swish": (lambda: L.Activation("hard_swish"), nn.Hardswish),
    "mish": (lambda: L.Activation("mish"), nn.Mish),
    "softplus": (lambda: L.Activation("softplus"), nn.Softplus),
    "log_softmax": (lambda: L.Activation("log_softmax"), lambda: nn.LogSoftmax(dim=-1)),
}


def _activation_pair(keras_act: Any, torch_act: nn.Module, dtype: str) -> tuple[Any, ...]:
    if isinstance(keras_act, str):
        keras_act = L.Activation(keras_act)
    keras_act.dtype_policy = keras.DTypePolicy(dtype)
    keras_model = _seq((4,), dtype, L.Dense(5, dtype=dtype), keras_act, L.Dense(3, dtype=dtype))
    torch_module = nn.Sequential(nn.Linear(4, 5), torch_act, nn.Linear(5, 3))
    rng = seed_everything(43)
    x = rng.normal(size=(BATCH, 4)).astype(dtype) * 2
    return keras_model, torch_module.to(getattr(torch, dtype)), x, rng.integers(0, 3, BATCH)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_pairs_pass(name: str, dtype: str) -> None:
    keras_act, torch_act = ACTIVATIONS[name]
    report = assert_parity(*_activation_pair(keras_act(), torch_act(), dtype))
    assert len([r for r in report.layers if r.stage == "output"]) == 3  # activation paired


def test_activation_lambda_without_known_function_is_refused() -> None:
    report = check_parity(*_activation_pair(L.Activation(lambda x: x * 2), nn.ReLU(), "float64"))
    assert "cannot verify activation" in report.rows[0].detail


@pytest.mark.parametrize(
    ("keras_act", "torch_act", "says"),
    [
        ("gelu", lambda: nn.GELU(), "gelu constants differ in float64"),
        (L.LeakyReLU(0.2), lambda: nn.LeakyReLU(0.2), "float32 0.20000000298"),
        ("gelu", lambda: KerasGELU("tanh"), "gelu approximate: Keras 'none' vs torch 'tanh'"),
        ("relu", lambda: nn.Tanh(), "activation: Keras relu vs torch tanh"),
        (L.ReLU(max_value=1.5), lambda: nn.ReLU6(), "ReLU max_value: Keras 1.5 vs torch 6.0"),
        ("relu", lambda: nn.ReLU6(), "activation: Keras relu vs torch clamp"),
    ],
    ids=["gelu-float64", "leaky-float64", "gelu-approximate", "relu-tanh", "max6", "relu-relu6"],
)
def test_activation_mismatch_fails_at_pairing(keras_act: Any, torch_act: Any, says: str) -> None:
    report = check_parity(*_activation_pair(keras_act, torch_act(), "float64"))
    assert [r.status for r in report.rows] == ["fail"] and says in report.rows[0].detail


def test_exact_torch_activations_are_fine_in_float32() -> None:
    # The float32 constants are invisible in float32: plain nn.GELU / nn.LeakyReLU pass there.
    assert_parity(*_activation_pair("gelu", nn.GELU(), "float32"))
    assert_parity(*_activation_pair(L.LeakyReLU(0.2), nn.LeakyReLU(0.2), "float32"))


def test_documented_activation_differences_are_pinned() -> None:
    """Size and cause of the float64 differences (FRAMEWORK_DIFFERENCES.activations): TF keeps
    1/sqrt(2) (exact gelu) and 0.044715 (tanh gelu) as float32 constants, Keras' LeakyReLU its
    slope; torch uses exact Python floats. Measured on [-4, 4]; the matching mode closes it."""
    act = FRAMEWORK_DIFFERENCES.activations
    x = np.linspace(-4.0, 4.0, 2001)
    t = torch.from_numpy(x)
    exact = keras.activations.gelu(x).numpy()
    tanh = keras.activations.gelu(x, approximate=True).numpy()
    leaky = L.LeakyReLU(0.2, dtype="float64")(x).numpy()
    leaky_gap = 4 * abs(act.keras_slope(0.2) - 0.2)
    gaps = {
        "gelu exact": (exact, F.gelu(t), KerasGELU("none")(t), act.gelu_exact_float64_gap),
        "gelu tanh": (
            tanh,
            F.gelu(t, approximate="tanh"),
            KerasGELU("tanh")(t),
            act.gelu_tanh_float64_gap,
        ),
        "leaky": (leaky, F.leaky_relu(t, 0.2), KerasLeakyReLU(0.2)(t), leaky_gap),
    }
    for name, (keras_out, torch_out, matched, documented) in gaps.items():
        gap = float(np.max(np.abs(keras_out - torch_out.numpy())))
        assert 0.5 * documented < gap < 2 * documented, (name, gap)
        assert gap > tolerance("model_cross", "float64").rtol  # above the float64 claim
        # matching mode: within one ulp of the grid's largest |value| (4: ulp 8.9e-16)
        assert float(np.max(np.abs(keras_out - matched.numpy()))) <= 8.9e-16, name
    # The leaky gap is the slope's float32 rounding at the grid's end: 4 * 2.98e-9.
    assert math.isclose(act.keras_slope(0.2), 0.20000000298023224, rel_tol=1e-15)


# --- PixelShuffle: no Keras layer, a channel order that differs -------------------------------


def test_depth_to_space_and_pixel_shuffle_order_channels_differently() -> None:
    """Pinned: tf.nn.depth_to_space reads input channel (i*r + j)*C + c for output channel c at
    block offset (i, j); torch's PixelShuffle reads c*r*r + i*r + j. The same array gives other
    maps; permuting the channels by that formula makes them equal (exact: only copies)."""
    import tensorflow as tf

    r, c = 2, 3
    x = seed_everything(11).normal(size=(2, 4, 5, r * r * c))  # NHWC, Keras' layout
    keras_out = tf.nn.depth_to_space(x, r).numpy()  # (2, 8, 10, c)
    torch_out = nn.PixelShuffle(r)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert not np.allclose(keras_out, torch_out.numpy())
    # by hand, one element: output (n, h*r + i, w*r + j, ch) reads input channel (i*r + j)*C + ch
    assert keras_out[1, 3, 6, 2] == x[1, 1, 3, (1 * r + 0) * c + 2]
    assert torch_out[1, 3, 6, 2].item() == x[1, 1, 3, 2 * r * r + 1 * r + 0]
    torch_channel_for = [
        ch * r * r + i * r + j for i in range(r) for j in range(r) for ch in range(c)
    ]
    permuted = np.empty_like(x)
    permuted[..., torch_channel_for] = x  # Keras channel k sits at torch channel order[k]
    shuffled = nn.PixelShuffle(r)(torch.from_numpy(permuted).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(keras_out, shuffled.permute(0, 2, 3, 1).numpy())


def test_pixel_shuffle_is_refused_with_the_reason() -> None:
    """Before: the Keras stand-in (a Lambda around depth_to_space) was refused as "of no
    registered layer kind", without the channel-order difference that makes the pair wrong."""
    import tensorflow as tf

    images = keras.Input((4, 4, 2), dtype="float64")
    x = keras.layers.Conv2D(8, 1, dtype="float64", name="conv")(images)
    x = keras.layers.Lambda(lambda t: tf.nn.depth_to_space(t, 2), dtype="float64", name="shuffle")(
        x
    )
    logits = keras.layers.Dense(3, dtype="float64", name="head")(
        keras.layers.Flatten(dtype="float64")(x)
    )
    torch_module = nn.Sequential(
        nn.Conv2d(2, 8, 1), nn.PixelShuffle(2), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)
    ).double()
    rng = seed_everything(11)
    report = check_parity(
        keras.Model(images, logits), torch_module, rng.normal(size=(2, 4, 4, 2)), [0, 1]
    )
    assert [r.status for r in report.rows] == ["fail"]
    detail = report.rows[0].detail
    assert "torch module '1' (PixelShuffle) has no Keras layer" in detail, detail
    assert "reads c*r*r + i*r + j (channel-major)" in detail, detail


def test_keras_normalization_is_refused_with_the_reason() -> None:
    """Before: "of no registered layer kind", without saying that adapt()'s mean/variance are
    non-trainable weights with no torch tensor to go to, nor what to do instead."""
    rng = seed_everything(12)
    x = rng.normal(size=(6, 4))
    normalization = keras.layers.Normalization(dtype="float64", name="norm")
    normalization.adapt(x)
    keras_model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), normalization, keras.layers.Dense(3, dtype="float64")]
    )
    report = check_parity(keras_model, nn.Linear(4, 3).double(), x, rng.integers(0, 3, 6))
    assert [r.status for r in report.rows] == ["fail"]
    detail = report.rows[0].detail
    assert "Keras layer 'norm' (Normalization) has no torch layer" in detail, detail
    assert "normalize the data before the model" in detail, detail
