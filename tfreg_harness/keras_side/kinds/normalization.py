"""Normalization, embedding and dropout kinds."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from torch import nn

from tfreg_harness.differences import note, torch_batchnorm_kwargs
from tfreg_harness.keras_side.kinds._common import L, first_mismatch, same
from tfreg_harness.keras_side.registry import Context, Weight, register_layer_pair


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
    if not (same(t.momentum, expected_kwargs["momentum"]) and same(t.eps, expected_kwargs["eps"])):
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
    return first_mismatch(
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


def _embedding_problem(k: Any, t: Any, ctx: Context) -> str | None:
    # mask_zero <-> padding_idx=0: torch zeroes row 0's gradient, Keras masks the padded
    # positions downstream; the two agree when no padded output reaches the loss, which the
    # gradient rows check (row 0's Keras gradient is then exactly 0).
    return first_mismatch(
        [
            ("mask_zero / padding_idx", 0 if k.mask_zero else None, t.padding_idx),
            ("max_norm", None, t.max_norm),
            ("scale_grad_by_freq", False, t.scale_grad_by_freq),
        ]
    )


def _embedding_output(y: Any, k: Any, ctx: Context) -> np.ndarray:
    # torch looked up a batch-independent index tensor once (position ids: self.pos(arange(T)))
    # where Keras looks it up per example: broadcast over the batch
    y = np.asarray(y)
    if y.ndim == len(ctx.output_shape) - 1:
        return np.broadcast_to(y, (ctx.output_shape[0], *y.shape))
    return y


register_layer_pair(
    L.Embedding,
    nn.Embedding,
    transfer=[Weight("embeddings", "weight")],
    check=_embedding_problem,
    torch_layout="channels_last",
    output=_embedding_output,
)

# Keras SpatialDropoutND drops whole channels (noise shape (N, 1.., C)), as torch's DropoutNd;
# Keras Dropout and nn.Dropout drop single elements. Each kind lists the other family's torch
# modules so that a port mixing them pairs and fails naming the layer, instead of passing with
# element masks injected on both sides.
CHANNEL_DROPOUT: dict[type[Any], type[nn.Module]] = {
    L.SpatialDropout1D: nn.Dropout1d,
    L.SpatialDropout2D: nn.Dropout2d,
    L.SpatialDropout3D: nn.Dropout3d,
}
_DROPOUTS: tuple[type[nn.Module], ...] = (nn.Dropout, *CHANNEL_DROPOUT.values())


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
    fields: list[tuple[str, Any, Any]] = [("noise_shape", None, getattr(k, "noise_shape", None))]
    if t is not None:
        fields.append(("rate", float(k.rate), float(cast(float, t.p))))
    return first_mismatch(fields)


for _keras_dropout in (L.Dropout, *CHANNEL_DROPOUT):
    register_layer_pair(_keras_dropout, _DROPOUTS, check=_dropout_problem, torch_optional=True)


def _groupnorm_problem(k: Any, t: Any, ctx: Context) -> str | None:
    rank, channels = len(ctx.input_shape), int(ctx.input_shape[-1])
    if k.axis not in (-1, rank - 1):
        return f"Keras axis={k.axis}; only the channels (last) axis maps to nn.GroupNorm"
    groups = channels if int(k.groups) == -1 else int(k.groups)
    if isinstance(t, nn.GroupNorm):
        fields = [
            ("groups / num_groups", groups, int(t.num_groups)),
            ("channels / num_channels", channels, int(t.num_channels)),
        ]
    else:  # InstanceNorm: one group per channel, batch statistics only
        fields = [
            ("groups (InstanceNorm normalizes each channel)", channels, groups),
            ("channels / num_features", channels, int(t.num_features)),
            ("track_running_stats (Keras keeps no statistics)", False, t.track_running_stats),
        ]
    affine = (bool(k.scale), bool(k.center))
    problem = first_mismatch([*fields, ("scale, center / affine", affine, (t.affine, t.affine))])
    if problem:
        return problem
    if not same(float(k.epsilon), float(t.eps)):
        return f"epsilon: Keras {k.epsilon} vs torch {t.eps}. {note('groupnorm_epsilon')}"
    return None


register_layer_pair(
    L.GroupNormalization,
    (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d),
    # consecutive channels form a group in both (Keras reshapes (..., G, C/G), torch (G, C/G, ...))
    transfer=lambda k, t, ctx: (
        [Weight("gamma", "weight"), Weight("beta", "bias")] if k.scale and k.center else []
    ),
    check=_groupnorm_problem,
    torch_layout="channels_first",
)


def _rmsnorm_problem(k: Any, t: Any, ctx: Context) -> str | None:
    rank = len(ctx.input_shape)
    if [a % rank for a in k.axis] != [rank - 1]:
        return f"Keras axis={k.axis}; only the last axis maps to nn.RMSNorm"
    if t.eps is None:  # torch then uses finfo(dtype).eps: 2.2e-16 in float64, not Keras' 1e-6
        return f"torch eps=None (finfo(dtype).eps) vs Keras epsilon {k.epsilon}: pass eps"
    return first_mismatch(
        [
            ("normalized_shape", (int(ctx.input_shape[-1]),), tuple(t.normalized_shape)),
            ("epsilon", float(k.epsilon), float(t.eps)),
            ("scale / elementwise_affine", True, t.elementwise_affine),
        ]
    )


register_layer_pair(
    L.RMSNormalization,
    nn.RMSNorm,
    transfer=[Weight("scale", "weight")],
    check=_rmsnorm_problem,
    torch_layout="channels_last",
)
