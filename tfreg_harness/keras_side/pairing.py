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
Weights outside every paired layer -- ``add_weight`` in a custom Keras layer or model, a torch
parameter outside every paired module (a root-level ``nn.Parameter``) -- pair one by one, by name
or through ``layer_map={"layer/variable": "torch_parameter"}`` (:func:`free_parameters`); a
trainable one left without counterpart is a :class:`PairingError`.

Layer shapes come from one eval-mode forward pass of the Keras model on a sample batch (so
"same" padding at stride 2 and Flatten orders are decided on real shapes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from tfreg._compat import keras
from tfreg_core.validation import choice
from tfreg_harness.differences import note
from tfreg_harness.keras_side.capture import keras_watch
from tfreg_harness.keras_side.registry import (
    KERAS_WITHOUT_TORCH_LAYER,
    TORCH_WITHOUT_KERAS_LAYER,
    Context,
    LayerPair,
    layer_pair_for,
    layer_pairs_for,
    registered,
    torch_classes,
)

# The layout torch's input has (see pair_layers); "auto" reads it off the torch layers.
TorchInput = Literal["auto", "channels_first", "channels_last"]


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
class FreeParameter:
    """A Keras variable outside every registered layer kind (``add_weight`` in a custom layer
    or model) paired with a torch parameter outside every paired module (a root-level
    ``nn.Parameter``: position embedding, CLS token); same layout on both sides."""

    keras_variable: Any
    torch_name: str
    torch_tensor: Any


@dataclass(frozen=True)
class Pairing:
    """The result of :func:`pair_layers`: every Keras leaf layer's match in definition order, and
    whether torch takes its input / gives its output channels first (the Keras side is always
    channels last). ``paired`` leaves out Keras layers computed in the torch module's forward
    code."""

    matches: tuple[LayerMatch, ...]
    input_channels_first: bool
    output_channels_first: bool
    free: tuple[FreeParameter, ...] = ()
    outputs: Mapping[str, tuple[int, ...]] | None = None  # a structured output's shapes by name
    output_shape: tuple[int, ...] | None = None  # a single output's shape

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


def _kind_of(options: tuple[LayerPair, ...], module: Any, default: LayerPair) -> LayerPair:
    """Of a Keras class's kinds, the one whose (first) torch class ``module`` is."""
    return next((o for o in options if isinstance(module, o.torch_cls[:1])), default)


def _next_kind(
    options: tuple[LayerPair, ...], leaves: list[tuple[str, Any]], j: int, default: LayerPair
) -> LayerPair:
    """A Keras class with a single-module kind and a group kind: the first torch leaf from ``j``
    holding weights decides which one pairs."""
    if len(options) < 2:
        return default
    for _, module in leaves[j:]:
        if _holds_weights(module) or any(isinstance(module, o.torch_cls) for o in options):
            return _kind_of(options, module, default)
    return default


def _group(
    layer: Any,
    entry: LayerPair,
    leaves: list[tuple[str, Any]],
    start: int,
    used: set[int],
    root: Any,
) -> tuple[tuple[str, Any], int]:
    """The ``torch_group`` of ``entry``: the consecutive leaves from ``start``, each of its part's
    class, as ``(joined name, TorchGroup)``, and the index after them."""
    from tfreg_harness.keras_side.group import TorchGroup

    parts: list[tuple[str, str, Any]] = []
    for offset, (part, cls) in enumerate(zip(entry.torch_group, entry.torch_cls, strict=True)):
        k = start + offset
        if k >= len(leaves) or k in used or not isinstance(leaves[k][1], cls):
            found = "no leaf left" if k >= len(leaves) else _describe(*leaves[k])
            chain = " -> ".join(
                f"{p} ({c.__name__})"
                for p, c in zip(entry.torch_group, entry.torch_cls, strict=True)
            )
            raise PairingError(
                f"{_keras(layer)} pairs with {len(entry.torch_group)} consecutive torch leaves "
                f"{chain}; its {part} leaf should be torch {cls.__name__}, found {found}"
            )
        parts.append((part, *leaves[k]))
    name = "+".join(leaf_name for _, leaf_name, _ in parts)
    owners = {leaf_name.rpartition(".")[0] for _, leaf_name, _ in parts}
    owner = root.get_submodule(owners.pop()) if len(owners) == 1 else root
    return (name, TorchGroup(parts, owner)), start + len(parts)


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


def named_outputs(output: Any) -> dict[str, Any] | None:
    """A model's structured output as ``{name: tensor}`` -- a dict by its keys, a list or tuple
    by position (``"0"``, ``"1"``, ...); ``None`` for a single tensor."""
    if isinstance(output, Mapping):
        return {str(k): v for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return {str(i): v for i, v in enumerate(output)}
    return None


def _shapes(
    model: Any, layers: list[Any], sample: Any
) -> tuple[
    dict[int, tuple[int, ...]],
    dict[int, tuple[int, ...]],
    tuple[int, ...] | dict[str, tuple[int, ...]],
]:
    with keras_watch(layers) as trace:
        result = model(sample, training=False)
    outputs = {key: _shape_of(out) for key, out in trace.outputs.items()}
    named = named_outputs(result)
    if named is None:
        return trace.input_shapes, outputs, tuple(int(d) for d in result.shape)
    return trace.input_shapes, outputs, {k: _shape_of(v) for k, v in named.items()}


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def pair_layers(
    keras_model: Any,
    torch_module: Any,
    *,
    dtype: str,
    sample: Any | None = None,
    layer_map: Mapping[str, str | None] | None = None,
    torch_input: TorchInput = "auto",
) -> Pairing:
    """Pair ``keras_model``'s layers with ``torch_module``'s leaves and check every pair's
    configuration (see the module docstring). ``torch_input``: the layout torch's input has --
    ``"auto"``: channels first when the first Keras layer that decides it is a convolution,
    pooling or padding (torch's Conv/Pool modules need it), else as Keras has it."""
    choice(torch_input, "torch_input", ("auto", "channels_first", "channels_last"))
    layers, found = _layers_to_pair(keras_model)
    layer_map = dict(layer_map or {})
    variable_keys = _check_layer_map(keras_model, layers, layer_map)
    leaves = torch_leaves(torch_module)
    _refuse_torch_without_keras(leaves)  # before the Keras side, whose stand-in has no kind
    kinds = _kinds(layers, found)
    _check_input_dtype(keras_model, dtype)
    sample = sample_input(keras_model, sample)
    in_shapes, out_shapes, model_outputs = _shapes(keras_model, layers, sample)
    _check_torch_kinds(leaves)
    input_state = _input_channels_first(torch_input, layers, kinds, sample)
    walk = _Walk(dtype, torch_module, leaves, layer_map, kinds, in_shapes, out_shapes, input_state)
    for layer in layers:
        walk.pair(layer)
    walk.finish(layers)
    paired_modules = [m.torch_module for m in walk.matches if m.torch_module is not None]
    free = free_parameters(
        keras_model, layers, torch_module, paired_modules, {k: layer_map[k] for k in variable_keys}
    )
    matches, state = tuple(walk.matches), walk.state
    if isinstance(model_outputs, dict):
        return Pairing(matches, input_state, state, free, model_outputs)
    return Pairing(matches, input_state, state, free, output_shape=model_outputs)


def _layers_to_pair(keras_model: Any) -> tuple[list[Any], dict[int, LayerPair | None]]:
    """The Keras layers to pair, in definition order, and each one's registered kind (None: of
    no kind). A custom layer holding weights (add_weight) and of no registered kind is left out:
    torch computes it in forward code, and its weights pair parameter by parameter
    (:func:`free_parameters`). A Keras built-in of no registered kind stays, to be refused."""
    all_layers = keras_layers(keras_model)
    found = {id(layer): layer_pair_for(layer) for layer in all_layers}
    layers = [
        layer
        for layer in all_layers
        if found[id(layer)] is not None or not layer.weights or _builtin(layer)
    ]
    return layers, found


def _check_layer_map(
    keras_model: Any, layers: list[Any], layer_map: Mapping[str, str | None]
) -> set[str]:
    """Refuse a ``layer_map`` key that names neither a layer to pair nor a free Keras variable;
    returns the keys that name free variables."""
    variable_keys = {k for k in layer_map if _free_variable(keras_model, layers, k) is not None}
    unknown = set(layer_map) - {layer.name for layer in layers} - variable_keys
    if unknown:
        raise PairingError(
            f"layer_map names Keras layers the model does not have: {sorted(unknown)}. "
            f"Layers: {[layer.name for layer in layers]}"
        )
    return variable_keys


def _refuse_torch_without_keras(leaves: list[tuple[str, Any]]) -> None:
    for name, module in leaves:
        topic = TORCH_WITHOUT_KERAS_LAYER.get(type(module).__name__)
        if topic is not None:
            raise PairingError(f"{_describe(name, module)} has no Keras layer: {note(topic)}")


def _kinds(layers: list[Any], found: dict[int, LayerPair | None]) -> dict[int, LayerPair]:
    """Every layer's kind, by layer id; a layer of no registered kind is refused."""
    kinds: dict[int, LayerPair] = {}
    for layer in layers:
        kind = found[id(layer)]
        topic = KERAS_WITHOUT_TORCH_LAYER.get(type(layer).__name__)
        if kind is None and topic is not None:
            raise PairingError(f"{_keras(layer)} has no torch layer: {note(topic)}")
        if kind is None:
            names = sorted(cls.__name__ for cls in registered())
            raise PairingError(
                f"{_keras(layer)} is of no registered layer kind. Registered: {', '.join(names)}. "
                "Add one with tfreg.parity.register_layer_pair."
            )
        kinds[id(layer)] = kind
    return kinds


def _check_input_dtype(keras_model: Any, dtype: str) -> None:
    for spec in getattr(keras_model, "inputs", None) or ():
        if "float" in str(spec.dtype) and str(spec.dtype) != dtype:
            raise PairingError(
                f"Keras model {keras_model.name!r} takes {spec.dtype} input but computes in "
                f"{dtype}: Keras rounds every batch to {spec.dtype} before the first layer, torch "
                f"does not. Build the Input with dtype={dtype!r}."
            )


def _check_torch_kinds(leaves: list[tuple[str, Any]]) -> None:
    known_torch = torch_classes()
    for name, module in leaves:
        if not isinstance(module, known_torch):
            raise PairingError(
                f"{_describe(name, module)} is of no registered layer kind; add one with "
                "tfreg.parity.register_layer_pair."
            )


def _input_channels_first(
    torch_input: TorchInput, layers: list[Any], kinds: dict[int, LayerPair], sample: Any
) -> bool:
    """Whether torch's input is channels first: as ``torch_input`` says, or for ``"auto"``
    when the first layer whose kind decides a layout wants channels first (and the input has
    spatial dimensions)."""
    if torch_input != "auto":
        return torch_input == "channels_first"
    decisive = [kinds[id(layer)].torch_layout for layer in layers]
    decisive = [layout for layout in decisive if layout != "input"]
    return bool(np.ndim(sample) > 2 and decisive and decisive[0] == "channels_first")


class _Walk:
    """The walk of :func:`pair_layers`: Keras layers in order against the torch leaves, each
    layer paired with a leaf (``pair``), then the leftovers refused (``finish``).

    Its state: ``j``, the next torch leaf on the main path; ``used``, leaves paired out of order
    (through ``layer_map``, a parallel branch, a group); ``pending``, weightless leaves the walk
    passed over (handed to the next pair's check as ``Context.torch_before``); ``stacked``, a
    stacked torch RNN still pairing Keras layers ``(name, module, next layer, layers)``;
    ``state``, whether torch's current map is channels first; ``flatten_from``, the map a
    Flatten consumed channels last while torch held it channels first (the next Dense's
    kernel is permuted)."""

    def __init__(
        self,
        dtype: str,
        torch_module: Any,
        leaves: list[tuple[str, Any]],
        layer_map: Mapping[str, str | None],
        kinds: dict[int, LayerPair],
        in_shapes: dict[int, tuple[int, ...]],
        out_shapes: dict[int, tuple[int, ...]],
        state: bool,
    ) -> None:
        self.dtype, self.torch_module, self.leaves = dtype, torch_module, leaves
        self.layer_map, self.kinds = layer_map, kinds
        self.in_shapes, self.out_shapes = in_shapes, out_shapes
        self.index = {name: i for i, (name, _) in enumerate(leaves)}
        self.state = state
        self.flatten_from: tuple[int, ...] | None = None
        self.stacked: tuple[str, Any, int, int] | None = None
        self.matches: list[LayerMatch] = []
        self.pending: list[tuple[str, Any]] = []
        self.used: set[int] = set()
        self.j = 0

    def next_free(self, k: int) -> int:
        while k in self.used:
            k += 1
        return k

    def pair(self, layer: Any) -> None:
        """Pair ``layer`` (and its fused activation) and move the walk past it."""
        self.j = self.next_free(self.j)
        key = id(layer)
        if key not in self.in_shapes:
            raise PairingError(f"{_keras(layer)} was not called on the sample batch")
        weighted = bool(layer.weights)
        dense = isinstance(layer, keras.layers.Dense)
        if self.flatten_from is not None and weighted and not dense:
            raise PairingError(
                f"{_keras(layer)} holds weights right after a Flatten of a channels-first torch "
                f"map; only a Dense gets the Flatten permutation. {note('flatten')}"
            )
        ctx = Context(
            dtype=self.dtype,
            input_shape=self.in_shapes[key],
            output_shape=self.out_shapes[key],
            flatten_from=self.flatten_from if dense else None,
            torch_channels_first=self.state,
        )
        candidate, entry, ctx = self._candidate(layer, self.kinds[key], ctx, weighted)
        ctx = replace(ctx, torch_before=tuple(self.pending))  # the leaves the walk passed over
        ctx = self._check(layer, entry, candidate, ctx, weighted)
        if isinstance(layer, keras.layers.Flatten) and self.state and len(ctx.input_shape) > 2:
            self.flatten_from = ctx.input_shape[1:]
        elif dense:
            self.flatten_from = None
        layout = {"channels_first": True, "channels_last": False}
        self.state = layout.get(entry.torch_layout, self.state)
        paired_name, paired = candidate if candidate is not None else (None, None)
        self.matches.append(LayerMatch(layer, paired_name, paired, entry, ctx, self.state))
        self.j = self.next_free(self.j)
        self._fused_activation(layer, entry, candidate)

    def _candidate(
        self, layer: Any, entry: LayerPair, ctx: Context, weighted: bool
    ) -> tuple[tuple[str, Any] | None, LayerPair, Context]:
        """The torch leaf (or group) ``layer`` pairs with, its kind and context: the stacked
        RNN still pairing, ``layer_map``'s, the next of its kind on the walk, or -- for a
        weightless layer -- the next leaf when it is of its kind (else forward code, None)."""
        if self.stacked is not None and weighted:
            return self._stacked(layer, entry, ctx)
        if layer.name in self.layer_map:
            candidate, entry = self._mapped(layer, entry)
            return candidate, entry, ctx
        if weighted:
            candidate, entry = self._walked(layer, entry)
            return candidate, entry, ctx
        leaves, j = self.leaves, self.j
        if j < len(leaves) and entry.torch_cls and isinstance(leaves[j][1], entry.torch_cls):
            self.j += 1
            return leaves[j], entry, ctx
        return None, entry, ctx

    def _stacked(
        self, layer: Any, entry: LayerPair, ctx: Context
    ) -> tuple[tuple[str, Any], LayerPair, Context]:
        assert self.stacked is not None
        name, module, position, count = self.stacked
        if entry.torch_layers is None or not isinstance(module, entry.torch_cls):
            raise PairingError(
                f"{_describe(name, module)} computes {count} stacked layers but only "
                f"{position} Keras layer(s) pair with it; the next is {_keras(layer)}"
            )
        self.stacked = (name, module, position + 1, count) if position + 1 < count else None
        return (name, module), entry, replace(ctx, torch_layer=(position, count))

    def _mapped(self, layer: Any, entry: LayerPair) -> tuple[tuple[str, Any] | None, LayerPair]:
        target = self.layer_map[layer.name]
        if target is None:
            return None, entry
        if target not in self.index:
            raise PairingError(
                f"layer_map pairs {_keras(layer)} with torch module {target!r}, which is "
                f"not a leaf of the torch module. Leaves: {list(self.index)}"
            )
        start = self.index[target]
        if start in self.used:
            raise PairingError(
                f"layer_map pairs {_keras(layer)} with torch module {target!r}, which is "
                "already paired with another Keras layer"
            )
        candidate = self.leaves[start]
        entry = _kind_of(layer_pairs_for(layer), candidate[1], entry)
        if not isinstance(candidate[1], entry.torch_cls[:1]):
            raise pair_error(
                layer, *candidate, f"layer_map pairs it with {type(candidate[1]).__name__}"
            )
        end = start + 1
        if entry.torch_group:  # the target is the group's first leaf
            candidate, end = _group(layer, entry, self.leaves, start, self.used, self.torch_module)
        self.used.update(range(start, end))
        return candidate, entry

    def _walked(self, layer: Any, entry: LayerPair) -> tuple[tuple[str, Any], LayerPair]:
        """The next leaf (or group) of ``layer``'s kind; weightless leaves before it are
        pending, and a parallel branch's leaf is taken where it sits (``j`` stays)."""
        leaves = self.leaves
        entry = _next_kind(layer_pairs_for(layer), leaves, self.j, entry)
        while (
            self.j < len(leaves)
            and not _holds_weights(leaves[self.j][1])
            and not isinstance(leaves[self.j][1], entry.torch_cls)
        ):
            self.pending.append(leaves[self.j])
            self.j = self.next_free(self.j + 1)
        if self.j == len(leaves):
            raise PairingError(
                f"{_keras(layer)} holds weights but the torch module has no layer left to "
                "pair it with"
            )
        branch = _branch_leaf(leaves, self.j, entry.torch_cls, self.used)
        if entry.torch_group:  # consecutive leaves from j, checked part by part
            candidate, self.j = _group(layer, entry, leaves, self.j, self.used, self.torch_module)
        elif branch is not None:  # a parallel branch's layer: j stays on the main path
            candidate = leaves[branch]
            self.used.add(branch)
        else:
            candidate, self.j = leaves[self.j], self.j + 1
        if not entry.torch_group and not isinstance(candidate[1], entry.torch_cls):
            expected = " or ".join(c.__name__ for c in entry.torch_cls)
            raise pair_error(layer, *candidate, f"it pairs with torch {expected}")
        return candidate, entry

    def _check(
        self,
        layer: Any,
        entry: LayerPair,
        candidate: tuple[str, Any] | None,
        ctx: Context,
        weighted: bool,
    ) -> Context:
        """Check the pair's configuration (a leaf computing several stacked layers starts
        pairing the next ones); returns the pair's context."""
        if candidate is not None and ctx.torch_layer == (0, 1) and entry.torch_layers:
            count = entry.torch_layers(candidate[1])
            if count > 1:  # the next count - 1 Keras layers pair with the same module
                ctx = replace(ctx, torch_layer=(0, count))
                self.stacked = (*candidate, 1, count)
        if candidate is not None:
            problem = entry.problem(layer, candidate[1], ctx)
            if problem:
                raise pair_error(layer, *candidate, problem)
            self.pending = []
        elif weighted:
            raise PairingError(f"{_keras(layer)} holds weights but layer_map pairs it with None")
        elif entry.torch_optional:
            problem = entry.problem(layer, None, ctx)
            if problem:
                raise PairingError(f"{_keras(layer)} cannot be computed by torch: {problem}")
        return ctx

    def _fused_activation(
        self, layer: Any, entry: LayerPair, candidate: tuple[str, Any] | None
    ) -> None:
        """Pair the torch activation leaf after a paired layer with its fused ``activation=``."""
        from tfreg_harness.keras_side.kinds import (
            TORCH_ACTIVATIONS,
            activation_problem,
            keras_activation,
        )

        activation = getattr(layer, "activation", None) if entry.fused_activation else None
        if (
            activation is None
            or keras_activation(activation) == ("linear",)
            or candidate is None
            or self.j >= len(self.leaves)
            or not isinstance(self.leaves[self.j][1], TORCH_ACTIVATIONS)
        ):
            return
        act_name, act_module = self.leaves[self.j]
        self.j += 1
        shape = self.out_shapes[id(layer)]
        act_ctx = Context(
            dtype=self.dtype, input_shape=shape, output_shape=shape, torch_channels_first=self.state
        )
        problem = activation_problem(keras_activation(activation), act_module, act_ctx)
        if problem:
            raise pair_error(layer, act_name, act_module, f"fused {problem}")
        self.matches.append(
            LayerMatch(layer, act_name, act_module, entry, act_ctx, self.state, "activation")
        )

    def finish(self, layers: list[Any]) -> None:
        """Refuse what the walk left: a stacked RNN short of layers, a leaf holding weights."""
        if self.stacked is not None:
            name, module, position, count = self.stacked
            raise PairingError(
                f"{_describe(name, module)} computes {count} stacked layers but only {position} "
                "Keras layer(s) pair with it"
            )
        for k, (name, module) in enumerate(self.leaves):
            if k >= self.j and k not in self.used and _holds_weights(module):
                raise PairingError(
                    f"{_describe(name, module)} holds weights but no Keras layer is left to pair "
                    f"it with (Keras layers: {[layer.name for layer in layers]})"
                )


def _builtin(layer: Any) -> bool:
    return type(layer).__module__.split(".")[0] == "keras"


def _free_variables(keras_model: Any, layers: list[Any]) -> list[Any]:
    """Keras variables no registered layer kind maps: ``add_weight`` in a custom layer or in
    the model itself."""
    covered = {id(v) for layer in layers for v in layer.weights}
    return [v for v in keras_model.weights if id(v) not in covered]


def _free_variable(keras_model: Any, layers: list[Any], key: str) -> Any | None:
    """The free Keras variable ``key`` names: its path, or the path's tail (``"pe/pos"``)."""
    found = [
        v
        for v in _free_variables(keras_model, layers)
        if v.path == key or v.path.endswith("/" + key)
    ]
    return found[0] if len(found) == 1 else None


def free_parameters(
    keras_model: Any,
    layers: list[Any],
    torch_module: Any,
    paired_modules: list[Any],
    explicit: Mapping[str, str | None],
) -> tuple[FreeParameter, ...]:
    """Pair the Keras variables outside every paired layer with the torch parameters outside
    every paired module: ``explicit`` (``layer_map`` entries keyed by a Keras variable path)
    first, then by name (the variable's name equals the parameter name's last part, one
    candidate each side). A *trainable* variable or parameter left without a counterpart is a
    :class:`PairingError`: one side would train a weight the other does not have (a
    non-trainable leftover changes the forward pass, which the comparisons catch)."""
    keras_free = _free_variables(keras_model, layers)
    covered = {id(t) for module in paired_modules for t in module.parameters()}
    torch_free = {n: t for n, t in torch_module.named_parameters() if id(t) not in covered}
    out: list[FreeParameter] = []
    for key, target in explicit.items():
        variable = _free_variable(keras_model, layers, key)
        if target is None or target not in torch_free:
            raise PairingError(
                f"layer_map pairs Keras variable {key!r} with torch parameter {target!r}, which "
                f"is no parameter outside the paired modules. Those: {sorted(torch_free)}"
            )
        out.append(FreeParameter(variable, target, torch_free.pop(target)))
        keras_free = [v for v in keras_free if v is not variable]
    for variable in list(keras_free):
        short = str(variable.name)
        names = [n for n in torch_free if n.rsplit(".", 1)[-1] == short]
        same_name = [v for v in keras_free if str(v.name) == short]
        if len(names) == 1 and len(same_name) == 1:
            out.append(FreeParameter(variable, names[0], torch_free.pop(names[0])))
            keras_free = [v for v in keras_free if v is not variable]
    lonely = [f"Keras variable {v.path!r}" for v in keras_free if v.trainable]
    lonely += [f"torch parameter {n!r}" for n, t in torch_free.items() if t.requires_grad]
    if lonely:
        raise PairingError(
            f"trainable {', '.join(lonely)} {'has' if len(lonely) == 1 else 'have'} no "
            "counterpart on the other side (a weight outside every paired layer -- a custom "
            "layer's add_weight, a root-level nn.Parameter -- pairs by name, or through "
            "layer_map={'keras_layer/variable': 'torch_parameter'}; a custom layer can also "
            "get a kind with tfreg.parity.register_layer_pair); unpaired "
            f"Keras variables: {[v.path for v in keras_free]}, torch parameters: "
            f"{sorted(torch_free)}"
        )
    return tuple(out)


__all__ = [
    "FreeParameter",
    "LayerMatch",
    "Pairing",
    "PairingError",
    "free_parameters",
    "keras_layers",
    "named_outputs",
    "pair_error",
    "pair_layers",
    "sample_input",
    "torch_leaves",
]
