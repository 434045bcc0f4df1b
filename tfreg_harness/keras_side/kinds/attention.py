"""Attention kinds: Keras ``MultiHeadAttention`` <-> ``nn.MultiheadAttention(batch_first=True)``.

Compared per projection: Keras' query/key/value kernels ``(d, heads, head_dim)`` are the row
blocks q; k; v of torch's ``in_proj_weight`` ``(3 * heads * head_dim, d)`` (biases ``(heads,
head_dim)`` the blocks of ``in_proj_bias``), the output kernel ``(heads, head_dim, d)`` is
``out_proj.weight`` transposed. Masks are the forward code's business and differ in sign (Keras
``attention_mask`` True = attend, torch ``key_padding_mask`` True = ignore: see the note
``attention_mask``); a wrong mask shows in the attention layer's own output comparison.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import nn

from tfreg_harness.differences import note
from tfreg_harness.keras_side.kinds._common import L, first_mismatch
from tfreg_harness.keras_side.registry import Context, Weight, register_layer_pair
from tfreg_harness.layouts import (
    attention_output_to_keras,
    attention_output_to_torch,
    attention_projection_to_keras,
    attention_projection_to_torch,
)


def _projection_weights(k: Any, torch_paths: tuple[str, str, str, str]) -> list[Weight]:
    """Keras' query/key/value kernels ``(d, heads, head_dim)`` are torch's transposed
    ``(heads * head_dim, d)`` rows (heads consecutive), biases ``(heads, head_dim)`` flattened,
    the output kernel ``(heads, head_dim, d)`` the transposed out weight. ``torch_paths``: the
    torch weight paths of q, k, v and out; a bias path replaces ``weight`` by ``bias``."""
    heads = int(k.num_heads)
    out: list[Weight] = []
    keras_names = ("query_dense", "key_dense", "value_dense", "output_dense")
    for keras_name, path in zip(keras_names, torch_paths, strict=True):
        last = keras_name == "output_dense"
        out.append(
            Weight(
                f"{keras_name}.kernel",
                path,
                attention_output_to_torch if last else attention_projection_to_torch,
                (lambda a: attention_output_to_keras(a, heads=heads))
                if last
                else (lambda a: attention_projection_to_keras(a, heads=heads)),
            )
        )
        if k.use_bias:
            bias = path.replace("weight", "bias")
            out.append(
                Weight(f"{keras_name}.bias", bias)
                if last
                else Weight(
                    f"{keras_name}.bias",
                    bias,
                    lambda a: a.reshape(-1),
                    lambda a: a.reshape(heads, -1),
                )
            )
    return out


def _attention_weights(k: Any, t: Any, ctx: Context) -> list[Weight]:
    width = int(k.num_heads) * int(k.key_dim)  # torch's embed_dim (the check holds it)
    rows = [f"in_proj_weight[{i * width}:{(i + 1) * width}]" for i in range(3)]
    return _projection_weights(k, (rows[0], rows[1], rows[2], "out_proj.weight"))


def _attention_problem(k: Any, t: Any, ctx: Context) -> str | None:
    if len(ctx.input_shape) != 3:
        return f"input rank {len(ctx.input_shape)}: only (batch, length, features) maps to torch"
    value_dim = k.value_dim if k.value_dim is not None else k.key_dim
    problem = first_mismatch(
        [
            ("num_heads", int(k.num_heads), int(t.num_heads)),
            ("num_heads * key_dim / embed_dim", int(k.num_heads) * int(k.key_dim), t.embed_dim),
            ("value_dim / head_dim", int(value_dim), int(t.head_dim)),
            ("query features / embed_dim", int(ctx.input_shape[-1]), t.embed_dim),
            ("output_shape / embed_dim", None, k.get_config().get("output_shape")),
            ("attention_axes", (1,), tuple(k.attention_axes or (1,))),
            ("batch_first", True, t.batch_first),
            ("use_bias", bool(k.use_bias), t.in_proj_bias is not None),
            ("key/value features (kdim, vdim)", True, t._qkv_same_embed_dim),
            ("add_bias_kv", False, t.bias_k is not None),
            ("add_zero_attn", False, t.add_zero_attn),
            ("dropout (no mask injection)", (0.0, 0.0), (float(k.dropout), float(t.dropout))),
        ]
    )
    scale = 1.0 / math.sqrt(int(k.key_dim))
    if problem is None and ctx.dtype == "float64" and float(np.float32(scale)) != scale:
        problem = f"key_dim {k.key_dim}: {note('attention_scale')}"
    return problem


def _attention_output(y: Any, k: Any, ctx: Context) -> Any:
    return y[0] if isinstance(y, tuple) else y  # torch returns (output, weights or None)


register_layer_pair(
    L.MultiHeadAttention,
    nn.MultiheadAttention,
    transfer=_attention_weights,
    check=_attention_problem,
    torch_layout="channels_last",
    output=_attention_output,
)


def _dot_attention_problem(k: Any, t: Any, ctx: Context) -> str | None:
    # weightless dot-product attention is forward code (softmax(q k^T) v); a learned scale or
    # concat score has a Keras variable torch would need a module for
    return first_mismatch(
        [
            ("use_scale (a learned Keras variable)", False, bool(k.use_scale)),
            ("score_mode", "dot", k.score_mode),
            ("dropout (no mask injection)", 0.0, float(k.dropout)),
        ]
    )


register_layer_pair(L.Attention, (), check=_dot_attention_problem, torch_optional=True)


# --- a hand-written attention: four nn.Linear (q, k, v, out), the attention in forward code ----

_HEADS_ATTRIBUTES = ("num_heads", "n_heads", "heads")  # read off the module holding the Linears


def _linear_attention_weights(k: Any, t: Any, ctx: Context) -> list[Weight]:
    """Each projection is one ``nn.Linear`` (heads consecutive in its rows, as
    ``view(b, n, heads, head_dim)`` splits them)."""
    return _projection_weights(k, ("query.weight", "key.weight", "value.weight", "output.weight"))


def _linear_attention_problem(k: Any, t: Any, ctx: Context) -> str | None:
    if len(ctx.input_shape) != 3:
        return f"input rank {len(ctx.input_shape)}: only (batch, length, features) maps to torch"
    heads, key_dim = int(k.num_heads), int(k.key_dim)
    value_dim = int(k.value_dim if k.value_dim is not None else k.key_dim)
    owner = t.owner[0]
    torch_heads = next((getattr(owner, a) for a in _HEADS_ATTRIBUTES if hasattr(owner, a)), None)
    linears = {part: getattr(t, part) for part in ("query", "key", "value", "output")}
    problem = first_mismatch(
        [
            # without such an attribute a wrong head count shows in this layer's output
            ("num_heads", heads, heads if torch_heads is None else int(torch_heads)),
            ("query features / query in_features", ctx.input_shape[-1], t.query.in_features),
            ("num_heads * key_dim / query out_features", heads * key_dim, t.query.out_features),
            ("num_heads * key_dim / key out_features", heads * key_dim, t.key.out_features),
            ("num_heads * value_dim / value out_features", heads * value_dim, t.value.out_features),
            ("num_heads * value_dim / output in_features", heads * value_dim, t.output.in_features),
            ("output_shape", None, k.get_config().get("output_shape")),
            ("query features / output out_features", ctx.input_shape[-1], t.output.out_features),
            ("attention_axes", (1,), tuple(k.attention_axes or (1,))),
            ("dropout (no mask injection)", 0.0, float(k.dropout)),
            *(
                (f"use_bias ({part})", bool(k.use_bias), linear.bias is not None)
                for part, linear in linears.items()
            ),
        ]
    )
    scale = 1.0 / math.sqrt(key_dim)
    if problem is None and ctx.dtype == "float64" and float(np.float32(scale)) != scale:
        problem = f"key_dim {k.key_dim}: {note('attention_scale')}"
    return problem


register_layer_pair(
    L.MultiHeadAttention,
    (nn.Linear,) * 4,
    transfer=_linear_attention_weights,
    check=_linear_attention_problem,
    torch_layout="channels_last",
    torch_group=("query", "key", "value", "output"),
)
