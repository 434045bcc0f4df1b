"""Pairing the layers of any built Keras model with the modules of any torch module.

Keras layers are taken in definition order (``model.layers``, nested models flattened; for a
subclassed model the order its layers were assigned), torch leaves in ``named_modules()`` order.
A Keras layer holding weights pairs with the next torch leaf of its registered kind (weightless
torch leaves before it -- a ``ZeroPad2d``, an activation -- are handed to its check as
``Context.torch_before``); a weightless Keras layer (activation, pooling, Flatten, Dropout) pairs
with the next torch leaf when that is of its kind, and otherwise counts as computed by the torch
module's ``forward`` code. ``layer_map={keras_name: torch_name or None}`` overrides the walk for
the layers it names. Every pairing the harness cannot make raises :class:`PairingError` naming
both sides; every configuration mismatch a kind's check finds does too. Nothing is ever skipped.

Layer shapes come from one eval-mode forward pass of the Keras model on a sample batch (so
"same" padding at stride 2 and Flatten orders are decided on real shapes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from tfreg._compat import keras
from tfreg.parity.capture import keras_watch
from tfreg.parity.registry import Context, LayerPair, layer_pair_for, registered, torch_classes
from tfreg_core.validation import choice
from tfreg_harness.differences import note


class PairingError(ValueError):
    """The two models cannot be paired layer by layer, or a pair computes different functions."""


@dataclass(frozen=True)
class LayerMatch:
    """One Keras layer and its torch counterpart (``torch_module is None``: the torch module's
    ``forward`` code computes it). ``part == "activation"``: the torch activation module paired
    with the Keras layer's fused ``activation=``. ``torch_channels_first``: torch's output of
    this layer is channels first."""

    keras_layer: Any
    torch_name: str | None
    torch_module: Any
    kind: LayerPair
    context: Context
    torch_channels_first: bool
    part: Literal["layer", "activation"] = "layer"

    @property
    def name(self) -> str:
        suffix = " (activation)" if self.part == "activation" else ""
        torch = "<forward code>" if self.torch_module is None else (self.torch_name or "<root>")
        return f"{self.keras_layer.name}{suffix} <-> {torch}"


@dataclass(frozen=True)
class Pairing:
    matches: tuple[LayerMatch, ...]
    input_channels_first: bool
    output_channels_first: bool

    @property
    def paired(self) -> list[LayerMatch]:
        return [m for m in self.matches if m.torch_module is not None]


def keras_layers(model: Any) -> list[Any]:
    """Leaf layers in definition order (nested models flattened, InputLayer left out)."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(keras_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            out.append(layer)
    return out


def torch_leaves(module: Any) -> list[tuple[str, Any]]:
    """Leaf modules in ``named_modules()`` order; a module of a registered class counts as one
    leaf with its children (``nn.MultiheadAttention`` holds ``out_proj``)."""
    units = torch_classes()
    out: list[tuple[str, Any]] = []
    inside: str | None = None  # name prefix of the registered unit being skipped
    for name, m in module.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        has_children = next(m.children(), None) is not None
        if not has_children or isinstance(m, units):
            out.append((name, m))
            inside = f"{name}." if name and has_children else ("" if has_children else None)
    return out


def _branch_leaf(
    leaves: list[tuple[str, Any]], j: int, kinds: tuple[type, ...], used: set[int]
) -> int | None:
    """Keras orders a functional model's layers by graph depth, so two parallel branches
    interleave (a ResNet's projection-shortcut conv comes between the main path's conv2 and
    bn2), while torch's definition order keeps each branch together. When leaf ``j`` is of
    another kind, the first unused leaf of the wanted kind in the same top-level block (the
    name's first component: ``layer2.downsample.0`` for ``layer2.bn2``) is that branch's layer."""
    if isinstance(leaves[j][1], kinds):
        return None
    block = leaves[j][0].split(".")[0]
    for k in range(j + 1, len(leaves)):
        name, module = leaves[k]
        if name.split(".")[0] != block or "." not in name:
            return None
        if k not in used and isinstance(module, kinds):
            return k
    return None


def _holds_weights(module: Any) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


def _describe(name: str | None, module: Any) -> str:
    return f"torch module {name or '<root>'!r} ({type(module).__name__})"


def _keras(layer: Any) -> str:
    return f"Keras layer {layer.name!r} ({type(layer).__name__})"


def pair_error(layer: Any, name: str | None, module: Any, problem: str) -> PairingError:
    return PairingError(
        f"{_keras(layer)} and {_describe(name, module)} do not compute the same function: {problem}"
    )


def sample_input(model: Any, sample: Any | None) -> Any:
    if sample is not None:
        return sample
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise PairingError(
            f"Keras model {model.name!r} has no symbolic inputs (a subclassed model): pass a "
            "sample batch (check_parity passes x) so layer shapes are known."
        )
    spec = inputs[0]
    return np.zeros((2, *spec.shape[1:]), dtype=spec.dtype)


def _shapes(
    model: Any, layers: list[Any], sample: Any
) -> tuple[dict[int, tuple], dict[int, tuple]]:
    with keras_watch(layers) as trace:
        model(sample, training=False)
    outputs = {key: tuple(int(d) for d in out.shape) for key, out in trace.outputs.items()}
    return trace.input_shapes, outputs


def pair_layers(
    keras_model: Any,
    torch_module: Any,
    *,
    dtype: str,
    sample: Any | None = None,
    layer_map: Mapping[str, str | None] | None = None,
    torch_input: Literal["auto", "channels_first", "channels_last"] = "auto",
) -> Pairing:
    """Pair ``keras_model``'s layers with ``torch_module``'s leaves and check every pair's
    configuration (see the module docstring). ``torch_input``: the layout torch's input has --
    ``"auto"``: channels first when the first Keras layer that decides it is a convolution,
    pooling or padding (torch's Conv/Pool modules need it), else as Keras has it."""
    from tfreg.parity.kinds import TORCH_ACTIVATIONS, activation_problem, keras_activation

    choice(torch_input, "torch_input", ("auto", "channels_first", "channels_last"))
    layers = keras_layers(keras_model)
    layer_map = dict(layer_map or {})
    unknown = set(layer_map) - {layer.name for layer in layers}
    if unknown:
        raise PairingError(
            f"layer_map names Keras layers the model does not have: {sorted(unknown)}. "
            f"Layers: {[layer.name for layer in layers]}"
        )
    kinds = {id(layer): layer_pair_for(layer) for layer in layers}
    for layer in layers:
        if kinds[id(layer)] is None:
            names = sorted(cls.__name__ for cls in registered())
            raise PairingError(
                f"{_keras(layer)} is of no registered layer kind. Registered: {', '.join(names)}. "
                "Add one with tfreg.parity.register_layer_pair."
            )
    for spec in getattr(keras_model, "inputs", None) or ():
        if "float" in str(spec.dtype) and str(spec.dtype) != dtype:
            raise PairingError(
                f"Keras model {keras_model.name!r} takes {spec.dtype} input but computes in "
                f"{dtype}: Keras rounds every batch to {spec.dtype} before the first layer, torch "
                f"does not. Build the Input with dtype={dtype!r}."
            )
    sample = sample_input(keras_model, sample)
    in_shapes, out_shapes = _shapes(keras_model, layers, sample)
    leaves = torch_leaves(torch_module)
    known_torch = torch_classes()
    for name, module in leaves:
        if not isinstance(module, known_torch):
            raise PairingError(
                f"{_describe(name, module)} is of no registered layer kind; add one with "
                "tfreg.parity.register_layer_pair."
            )
    index = {name: i for i, (name, _) in enumerate(leaves)}

    if torch_input == "auto":
        decisive = [kinds[id(layer)].torch_layout for layer in layers]
        decisive = [layout for layout in decisive if layout != "input"]
        state = bool(np.ndim(sample) > 2 and decisive and decisive[0] == "channels_first")
    else:
        state = torch_input == "channels_first"
    input_state = state
    flatten_from: tuple[int, ...] | None = None
    stacked: tuple[str, Any, int, int] | None = None  # (name, module, next layer, layers)
    matches: list[LayerMatch] = []
    pending: list[tuple[str, Any]] = []
    used: set[int] = set()  # leaves paired through layer_map, wherever they sit
    j = 0

    def next_free(k: int) -> int:
        while k in used:
            k += 1
        return k

    for layer in layers:
        j = next_free(j)
        entry = kinds[id(layer)]
        key = id(layer)
        if key not in in_shapes:
            raise PairingError(f"{_keras(layer)} was not called on the sample batch")
        weighted = bool(layer.weights)
        if flatten_from is not None and weighted and not isinstance(layer, keras.layers.Dense):
            raise PairingError(
                f"{_keras(layer)} holds weights right after a Flatten of a channels-first torch "
                f"map; only a Dense gets the Flatten permutation. {note('flatten')}"
            )
        ctx = Context(
            dtype=dtype,
            input_shape=in_shapes[key],
            output_shape=out_shapes[key],
            flatten_from=flatten_from if isinstance(layer, keras.layers.Dense) else None,
            torch_channels_first=state,
        )
        candidate: tuple[str, Any] | None = None
        if stacked is not None and weighted:
            name, module, index, count = stacked
            if entry.torch_layers is None or not isinstance(module, entry.torch_cls):
                raise PairingError(
                    f"{_describe(name, module)} computes {count} stacked layers but only {index} "
                    f"Keras layer(s) pair with it; the next is {_keras(layer)}"
                )
            candidate, ctx = (name, module), replace(ctx, torch_layer=(index, count))
            stacked = (name, module, index + 1, count) if index + 1 < count else None
        elif layer.name in layer_map:
            target = layer_map[layer.name]
            if target is not None:
                if target not in index:
                    raise PairingError(
                        f"layer_map pairs {_keras(layer)} with torch module {target!r}, which is "
                        f"not a leaf of the torch module. Leaves: {list(index)}"
                    )
                if index[target] in used:
                    raise PairingError(
                        f"layer_map pairs {_keras(layer)} with torch module {target!r}, which is "
                        "already paired with another Keras layer"
                    )
                candidate = leaves[index[target]]
                used.add(index[target])
                if not isinstance(candidate[1], entry.torch_cls):
                    raise pair_error(
                        layer, *candidate, f"layer_map pairs it with {type(candidate[1]).__name__}"
                    )
        elif weighted:
            while (
                j < len(leaves)
                and not _holds_weights(leaves[j][1])
                and not isinstance(leaves[j][1], entry.torch_cls)
            ):
                pending.append(leaves[j])
                j = next_free(j + 1)
            if j == len(leaves):
                raise PairingError(
                    f"{_keras(layer)} holds weights but the torch module has no layer left to "
                    "pair it with"
                )
            branch = _branch_leaf(leaves, j, entry.torch_cls, used)
            if branch is not None:  # a parallel branch's layer: j stays on the main path
                candidate = leaves[branch]
                used.add(branch)
            else:
                candidate, j = leaves[j], j + 1
            if not isinstance(candidate[1], entry.torch_cls):
                expected = " or ".join(c.__name__ for c in entry.torch_cls)
                raise pair_error(layer, *candidate, f"it pairs with torch {expected}")
        elif j < len(leaves) and entry.torch_cls and isinstance(leaves[j][1], entry.torch_cls):
            candidate, j = leaves[j], j + 1

        ctx = replace(ctx, torch_before=tuple(pending))  # the leaves the walk passed over
        if candidate is not None and ctx.torch_layer == (0, 1) and entry.torch_layers:
            count = entry.torch_layers(candidate[1])
            if count > 1:  # the next count - 1 Keras layers pair with the same module
                ctx = replace(ctx, torch_layer=(0, count))
                stacked = (*candidate, 1, count)
        if candidate is not None:
            problem = entry.problem(layer, candidate[1], ctx)
            if problem:
                raise pair_error(layer, *candidate, problem)
            pending = []
        elif weighted:
            raise PairingError(f"{_keras(layer)} holds weights but layer_map pairs it with None")
        elif entry.torch_optional:
            problem = entry.problem(layer, None, ctx)
            if problem:
                raise PairingError(f"{_keras(layer)} cannot be computed by torch: {problem}")

        if isinstance(layer, keras.layers.Flatten) and state and len(ctx.input_shape) > 2:
            flatten_from = ctx.input_shape[1:]
        elif isinstance(layer, keras.layers.Dense):
            flatten_from = None
        state = {"channels_first": True, "channels_last": False}.get(entry.torch_layout, state)
        name, module = candidate if candidate is not None else (None, None)
        matches.append(LayerMatch(layer, name, module, entry, ctx, state))

        j = next_free(j)
        activation = getattr(layer, "activation", None) if entry.fused_activation else None
        if (
            activation is not None
            and keras_activation(activation) != ("linear",)
            and (
                candidate is not None
                and j < len(leaves)
                and isinstance(leaves[j][1], TORCH_ACTIVATIONS)
            )
        ):
            act_name, act_module = leaves[j]
            j += 1
            act_ctx = Context(
                dtype=dtype,
                input_shape=out_shapes[key],
                output_shape=out_shapes[key],
                torch_channels_first=state,
            )
            problem = activation_problem(keras_activation(activation), act_module, act_ctx)
            if problem:
                raise pair_error(layer, act_name, act_module, f"fused {problem}")
            matches.append(
                LayerMatch(layer, act_name, act_module, entry, act_ctx, state, "activation")
            )

    if stacked is not None:
        name, module, index, count = stacked
        raise PairingError(
            f"{_describe(name, module)} computes {count} stacked layers but only {index} Keras "
            "layer(s) pair with it"
        )
    for k, (name, module) in enumerate(leaves):
        if k >= j and k not in used and _holds_weights(module):
            raise PairingError(
                f"{_describe(name, module)} holds weights but no Keras layer is left to pair it "
                f"with (Keras layers: {[layer.name for layer in layers]})"
            )
    return Pairing(tuple(matches), input_state, state)


__all__ = [
    "LayerMatch",
    "Pairing",
    "PairingError",
    "keras_layers",
    "pair_error",
    "pair_layers",
    "sample_input",
    "torch_leaves",
]
