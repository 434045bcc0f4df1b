"""Which neurons, filters and input features a chain of Dense/Conv layers can lose, framework-free.

``tfreg.pruning.prune`` and ``torchref.pruning.prune`` read a model into a list of
:class:`LinearLayer` (kernels in Keras layout, ``(*taps, in, out)``; the torch twin transposes
``Linear.weight (out, in)`` and ``Conv2d.weight (out, in, kh, kw)`` into it) and one
:class:`Boundary` per pair of consecutive linear layers, and :func:`plan_pruning` decides here,
in NumPy, what goes. Unit ``j`` (a Dense column, a conv filter) of layer ``i`` is removed when

1. its *outgoing* weights are all zero: every input row of layer ``i + 1`` that reads channel
   ``j`` (all ``S`` flatten positions of it, when a ``Flatten`` lies between) is zero, so the
   unit's value never reaches the output; or
2. its *incoming* weights are all zero: then its pre-activation is the constant bias ``b_j`` at
   every position (zero padding times zero weights adds nothing), and after the elementwise
   layers between (activation, inference-mode BatchNorm, Dropout as identity, pooling) it is the
   constant ``a_j = act(b_j)``; layer ``i + 1`` then receives ``a_j * W_{i+1}[j]`` at every
   position, which is folded into its bias: ``b_{i+1} += a_j * sum_{taps, positions}
   W_{i+1}[..., rows(j), :]``. The fold is exact for a Dense next layer, after ``Flatten`` and for
   a convolution without zero padding (every output position sees every tap); for a convolution
   that pads with zeros (``padding="same"``) the border outputs see fewer taps, so a unit with
   ``a_j != 0`` is kept there and :attr:`PrunePlan.notes` says why (``a_j == 0`` is removable
   anywhere). The constant is computed by the framework itself (:attr:`Boundary.constant`), so
   it is the very number the original model computes.

Removing a unit removes columns of layer ``i`` and rows of layer ``i + 1``, which can make other
units dead; the rules run to a fixed point. With ``inputs=True`` the first layer's all-zero input
rows go too (the model's input signature changes: :attr:`PrunePlan.inputs` are the columns to keep).
A layer never loses all its units (one is kept, exactly as it was). The model's outputs are never
removed.

Why outputs agree to round-off: every removed term is an exact zero, or (rule 2) a constant the
next layer's bias now adds once instead of per row; only the order of the float sums changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Boundary", "LinearLayer", "PrunePlan", "PruneResult", "plan_pruning"]


@dataclass(frozen=True)
class LinearLayer:
    """One Dense / Conv layer: ``kernel`` in Keras layout ``(*taps, in, out)``, ``bias (out,)``."""

    name: str
    kernel: np.ndarray
    bias: np.ndarray | None


@dataclass(frozen=True)
class Boundary:
    """What lies between linear layers ``i`` and ``i + 1``.

    ``positions``: how many input rows of layer ``i + 1`` each channel of layer ``i`` feeds (the
    spatial size ``S`` when a ``Flatten`` lies between, else 1). ``channels_last``: the flatten
    order -- row ``s * C + c`` (Keras, NHWC) or ``c * S + s`` (torch, NCHW). ``fold_refused``:
    ``None`` when a constant channel folds exactly into layer ``i + 1``'s bias, else the reason it
    does not. ``constant`` maps pre-activation constants (one per *original* channel of layer
    ``i``) to the values layer ``i + 1`` receives, through the layers in between.
    """

    positions: int
    channels_last: bool
    fold_refused: str | None
    constant: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PrunePlan:
    """:func:`plan_pruning`'s answer: original indices kept, and the new weights.

    ``inputs``: kept input rows of the first layer; ``kept[i]``: kept output units of layer ``i``
    (all, for the last); ``kernels`` / ``biases``: the sliced (and bias-folded) weights in Keras
    layout; a bias is created where a fold needed one and the layer had none.
    """

    inputs: np.ndarray
    kept: tuple[np.ndarray, ...]
    kernels: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray | None, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class PruneResult:
    """What ``prune(model)`` returns, in both frameworks.

    ``model``: the new, smaller model (the original is untouched). ``kept``: per Dense/Conv layer
    name, the original indices of the output units (neurons, filters) it keeps. ``inputs``: the
    original input features the new model takes (all unless ``inputs=True``): feed it
    ``x[..., inputs]``. ``params_before`` / ``params_after``: the stored weights of every layer
    (kernels, biases, BatchNorm scale, offset and moving statistics -- Keras' ``count_params()``;
    in torch all parameters and floating-point buffers). ``notes``: dead units that were kept, and
    why.
    """

    model: Any
    kept: Mapping[str, np.ndarray]
    inputs: np.ndarray
    params_before: int
    params_after: int
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        widths = ", ".join(f"{name}: {len(k)}" for name, k in self.kept.items())
        lines = [
            f"pruned: {self.params_before} -> {self.params_after} parameters; "
            f"{len(self.inputs)} inputs; units kept: {widths}",
            *self.notes,
        ]
        return "\n".join(lines)


def _all_zero_except(array: np.ndarray, axis: int) -> np.ndarray:
    """For each index along ``axis``: whether every entry of that slice is exactly zero."""
    moved = np.moveaxis(array, axis, 0)
    return np.asarray(~np.any(moved.reshape(moved.shape[0], -1) != 0, axis=1))


def _row_channels(rows: int, channels: int, boundary: Boundary) -> np.ndarray:
    """The channel of layer ``i`` that each input row of layer ``i + 1`` reads."""
    r = np.arange(rows)
    return r % channels if boundary.channels_last else r // boundary.positions


def plan_pruning(
    layers: Sequence[LinearLayer], boundaries: Sequence[Boundary], *, inputs: bool
) -> PrunePlan:
    """Decide what goes (see the module docstring for the rules and why they are exact)."""
    if len(boundaries) != len(layers) - 1:
        raise ValueError(f"{len(layers)} layers need {len(layers) - 1} boundaries")
    kernels = [np.asarray(layer.kernel) for layer in layers]
    biases = [None if layer.bias is None else np.array(layer.bias) for layer in layers]
    kept = [np.arange(k.shape[-1]) for k in kernels]
    kept_inputs = np.arange(kernels[0].shape[-2])
    for i, boundary in enumerate(boundaries):
        rows = boundary.positions * kernels[i].shape[-1]
        if kernels[i + 1].shape[-2] != rows:
            raise ValueError(
                f"layer {layers[i + 1].name!r} takes {kernels[i + 1].shape[-2]} inputs, but "
                f"{layers[i].name!r} gives {kernels[i].shape[-1]} channels x "
                f"{boundary.positions} positions"
            )
    notes: dict[int, str] = {}
    changed = True
    while changed:
        changed = False
        if inputs:
            drop = _all_zero_except(kernels[0], -2)
            if drop.all():  # keep one input, as a layer keeps one unit
                drop[0] = False
            if drop.any():
                kernels[0] = np.compress(~drop, kernels[0], axis=-2)
                kept_inputs = kept_inputs[~drop]
                changed = True
        for i, boundary in enumerate(boundaries):
            changed |= _prune_boundary(i, boundary, layers, kernels, biases, kept, notes)
    return PrunePlan(
        inputs=kept_inputs,
        kept=tuple(kept),
        kernels=tuple(kernels),
        biases=tuple(biases),
        notes=tuple(notes[i] for i in sorted(notes)),
    )


def _prune_boundary(
    i: int,
    boundary: Boundary,
    layers: Sequence[LinearLayer],
    kernels: list[np.ndarray],
    biases: list[np.ndarray | None],
    kept: list[np.ndarray],
    notes: dict[int, str],
) -> bool:
    """One pass of both rules over the units of layer ``i``; updates the lists in place."""
    channels = kernels[i].shape[-1]
    nxt = kernels[i + 1]
    row_channel = _row_channels(nxt.shape[-2], channels, boundary)
    zero_rows = _all_zero_except(nxt, -2)
    out_zero = np.array([zero_rows[row_channel == j].all() for j in range(channels)])
    in_zero = _all_zero_except(kernels[i], -1)
    dead = in_zero & ~out_zero  # rule 2 candidates: constant units that still reach layer i+1
    post = np.zeros(channels)
    if dead.any():
        pre = np.zeros(layers[i].kernel.shape[-1])  # one per original channel
        if biases[i] is not None:
            pre[kept[i]] = biases[i]
        post = np.where(dead, np.asarray(boundary.constant(pre))[kept[i]], 0.0)
    needs_fold = dead & (post != 0)
    notes.pop(i, None)
    if needs_fold.any() and boundary.fold_refused is not None:
        notes[i] = (
            f"{layers[i].name!r}: {int(needs_fold.sum())} unit(s) with zero incoming weights "
            f"kept (original indices {kept[i][needs_fold].tolist()}): their constant output "
            f"would not fold exactly, because {boundary.fold_refused}"
        )
        needs_fold[:] = False
        dead &= post == 0
    drop = out_zero | dead
    if drop.all():  # a layer keeps at least one unit, unchanged
        drop[0] = needs_fold[0] = False
    if not drop.any():
        return False
    if needs_fold.any():
        per_row = np.where(needs_fold[row_channel], post[row_channel], 0.0)
        summed = nxt.reshape(-1, *nxt.shape[-2:]).sum(axis=0)  # over the taps
        fold = (per_row @ summed).astype(nxt.dtype)
        biases[i + 1] = fold if biases[i + 1] is None else biases[i + 1] + fold
    keep = ~drop
    kernels[i] = np.compress(keep, kernels[i], axis=-1)
    bias = biases[i]
    if bias is not None:
        biases[i] = bias[keep]
    kernels[i + 1] = np.compress(keep[row_channel], nxt, axis=-2)
    kept[i] = kept[i][keep]
    return True
