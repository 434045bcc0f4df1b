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
    from tfreg_harness.keras_side.kinds import (
        TORCH_ACTIVATIONS,
        activation_problem,
        keras_activation,
    )

    choice(torch_input, "torch_input", ("auto", "channels_first", "channels_last"))
    all_layers = keras_layers(keras_model)
    found = {id(layer): layer_pair_for(layer) for layer in all_layers}
    # a custom layer holding weights (add_weight) and of no registered kind: torch computes it in
    # forward code; its weights pair parameter by parameter (free_parameters). A Keras built-in
    # of no registered kind is refused below.
    layers = [
        layer
        for layer in all_layers
        if found[id(layer)] is not None or not layer.weights or _builtin(layer)
    ]
    layer_map = dict(layer_map or {})
    variable_keys = {k for k in layer_map if _free_variable(keras_model, layers, k) is not None}
    unknown = set(layer_map) - {layer.name for layer in layers} - variable_keys
    if unknown:
        raise PairingError(
            f"layer_map names Keras layers the model does not have: {sorted(unknown)}. "
            f"Layers: {[layer.name for layer in layers]}"
        )
    leaves = torch_leaves(torch_module)
    for name, module in leaves:  # before the Keras side, whose stand-in is of no kind either
        topic = TORCH_WITHOUT_KERAS_LAYER.get(type(module).__name__)
        if topic is not None:
            raise PairingError(f"{_describe(name, module)} has no Keras layer: {note(topic)}")
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
    for spec in getattr(keras_model, "inputs", None) or ():
        if "float" in str(spec.dtype) and str(spec.dtype) != dtype:
            raise PairingError(
                f"Keras model {keras_model.name!r} takes {spec.dtype} input but computes in "
                f"{dtype}: Keras rounds every batch to {spec.dtype} before the first layer, torch "
                f"does not. Build the Input with dtype={dtype!r}."
            )
    sample = sample_input(keras_model, sample)
    in_shapes, out_shapes, model_outputs = _shapes(keras_model, layers, sample)
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
            name, module, position, count = stacked
            if entry.torch_layers is None or not isinstance(module, entry.torch_cls):
                raise PairingError(
                    f"{_describe(name, module)} computes {count} stacked layers but only "
                    f"{position} Keras layer(s) pair with it; the next is {_keras(layer)}"
                )
            candidate, ctx = (name, module), replace(ctx, torch_layer=(position, count))
            stacked = (name, module, position + 1, count) if position + 1 < count else None
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
                entry = _kind_of(layer_pairs_for(layer), candidate[1], entry)
                if not isinstance(candidate[1], entry.torch_cls[:1]):
                    raise pair_error(
                        layer, *candidate, f"layer_map pairs it with {type(candidate[1]).__name__}"
                    )
                end = index[target] + 1
                if entry.torch_group:  # the target is the group's first leaf
                    candidate, end = _group(layer, entry, leaves, index[target], used, torch_module)
                used.update(range(index[target], end))
        elif weighted:
            entry = _next_kind(layer_pairs_for(layer), leaves, j, entry)
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
            if entry.torch_group:  # consecutive leaves from j, checked part by part
                candidate, j = _group(layer, entry, leaves, j, used, torch_module)
            elif branch is not None:  # a parallel branch's layer: j stays on the main path
                candidate = leaves[branch]
                used.add(branch)
            else:
                candidate, j = leaves[j], j + 1
            if not entry.torch_group and not isinstance(candidate[1], entry.torch_cls):
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
        paired_name, paired = candidate if candidate is not None else (None, None)
        matches.append(LayerMatch(layer, paired_name, paired, entry, ctx, state))

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
        name, module, position, count = stacked
        raise PairingError(
            f"{_describe(name, module)} computes {count} stacked layers but only {position} Keras "
            "layer(s) pair with it"
        )
    for k, (name, module) in enumerate(leaves):
        if k >= j and k not in used and _holds_weights(module):
            raise PairingError(
                f"{_describe(name, module)} holds weights but no Keras layer is left to pair it "
                f"with (Keras layers: {[layer.name for layer in layers]})"
            )
    paired_modules = [m.torch_module for m in matches if m.torch_module is not None]
    free = free_parameters(
        keras_model, layers, torch_module, paired_modules, {k: layer_map[k] for k in variable_keys}
    )
    if isinstance(model_outputs, dict):
        return Pairing(tuple(matches), input_state, state, free, model_outputs)
    return Pairing(tuple(matches), input_state, state, free, output_shape=model_outputs)


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
