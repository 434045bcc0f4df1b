"""Watching layers while a whole model runs: each Keras layer's inputs and outputs (by wrapping
the layer's ``call``), each torch module's output (forward hooks), and Dropout keep-masks
injected on both sides.

This works for any model structure -- ``keras.Sequential``, functional, subclassed; any
``nn.Module`` -- because it changes no model: the Keras wrappers are instance attributes removed
on exit, the torch hooks are removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tfreg._compat import keras, tf


@dataclass
class KerasTrace:
    """Per Keras layer (by object id): the first call's input and its shape, output
    (post-activation) and, for a layer whose fused ``activation`` was split off, the
    pre-activation output."""

    input_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    inputs: dict[int, Any] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)
    pre_activation: dict[int, Any] = field(default_factory=dict)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


@contextmanager
def keras_watch(
    layers: list[Any],
    *,
    split_activation: frozenset[int] = frozenset(),
    masks: Mapping[int, np.ndarray] | None = None,
) -> Iterator[KerasTrace]:
    """Record ``layers``' inputs/outputs while the model runs inside the ``with`` block.

    ``split_activation``: ids of layers (Dense, Conv) whose ``activation`` is applied outside
    their ``call`` so the pre-activation output is recorded too. ``masks``: id of a Dropout layer
    -> keep-mask (Keras layout) applied in training mode with Keras' own formula
    ``where(mask, x * (1 / (1 - rate)), 0)`` (the scale rounded to the tensor's dtype, as
    ``tf.nn.dropout`` does).
    """
    trace = KerasTrace()
    masks = dict(masks or {})
    for layer in layers:
        layer.call = _wrapped(layer, trace, id(layer) in split_activation, masks.get(id(layer)))
    try:
        yield trace
    finally:
        for layer in layers:
            del layer.call  # the class's own call shows through again


def _wrapped(layer: Any, trace: KerasTrace, split: bool, mask: np.ndarray | None) -> Any:
    original = layer.call
    key = id(layer)

    def call(*args: Any, **kwargs: Any) -> Any:
        inputs = args[0] if args else next(iter(kwargs.values()))
        # a merge layer (Add, Concatenate) takes a list: its first tensor's shape stands in
        first = inputs[0] if isinstance(inputs, (list, tuple)) and inputs else inputs
        if key not in trace.input_shapes and hasattr(first, "shape"):
            trace.input_shapes[key] = _shape(first)
            trace.inputs[key] = inputs
        if mask is not None and kwargs.get("training"):
            x = tf.convert_to_tensor(inputs)
            if tuple(mask.shape) != _shape(x):
                raise ValueError(
                    f"The dropout mask for Keras layer {layer.name!r} has shape {mask.shape} but "
                    f"its input has shape {_shape(x)} (Keras layout)."
                )
            scale = tf.constant(1.0 / (1.0 - layer.rate), dtype=x.dtype)
            out = tf.where(tf.constant(mask), x * scale, tf.zeros_like(x))
        elif split:
            activation = layer.activation
            layer.activation = keras.activations.linear
            try:
                pre = original(*args, **kwargs)
            finally:
                layer.activation = activation
            trace.pre_activation.setdefault(key, pre)
            out = activation(pre)
        else:
            out = original(*args, **kwargs)
        trace.outputs.setdefault(key, out)
        return out

    return call


def _snapshot(output: Any) -> Any:
    """A detached copy of a module's output (a tensor, or nested tuples of them: LSTM's)."""
    if isinstance(output, tuple):
        return tuple(_snapshot(o) for o in output)
    return output.detach().clone() if hasattr(output, "detach") else output


@contextmanager
def torch_watch(
    modules: list[Any], *, masks: Mapping[int, np.ndarray] | None = None
) -> Iterator[dict[int, Any]]:
    """Record each of ``modules``' first output (by module id) while the model runs.

    The record is a detached copy taken when the module returns: a later in-place op
    (torchvision's ``nn.ReLU(inplace=True)`` after a BatchNorm) would otherwise overwrite the
    recorded tensor, and the BatchNorm would seem to output the ReLU's result.

    ``masks``: id of an ``nn.Dropout`` -> keep-mask *in torch's layout*, applied in training
    mode with torch's CPU formula ``x * (mask / (1 - p))``.
    """
    import torch

    outputs: dict[int, Any] = {}
    masks = dict(masks or {})

    def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
        key = id(module)
        if key in masks and module.training:
            x = inputs[0]
            mask = masks[key]
            if tuple(mask.shape) != tuple(x.shape):
                raise ValueError(
                    f"The dropout mask for a torch Dropout has shape {mask.shape} but its input "
                    f"has shape {tuple(x.shape)} (torch layout)."
                )
            noise = torch.as_tensor(mask, device=x.device).to(x.dtype)
            output = x * noise.div_(1.0 - module.p)
        if key not in outputs:
            outputs[key] = _snapshot(output)
        return output

    with _removed_on_exit([m.register_forward_hook(hook) for m in modules]):
        yield outputs


@contextmanager
def torch_inputs(modules: list[Any]) -> Iterator[dict[int, Any]]:
    """Record a detached copy of each of ``modules``' first input (by module id)."""
    inputs: dict[int, Any] = {}

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        if id(module) not in inputs and args:
            inputs[id(module)] = _snapshot(args[0])

    with _removed_on_exit([m.register_forward_pre_hook(hook) for m in modules]):
        yield inputs


@contextmanager
def _removed_on_exit(handles: list[Any]) -> Iterator[None]:
    """Remove torch hook ``handles`` when the block exits, however it exits."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["KerasTrace", "keras_watch", "torch_inputs", "torch_watch"]
