"""The layer-kind registry: per Keras layer class, which torch modules compute the same function,
how its weights map, what configuration must agree and how torch lays out its output.

A kind is data, added in one place::

    from tfreg.parity import Weight, register_layer_pair

    register_layer_pair(
        MyKerasScale, MyTorchScale,
        transfer=[Weight("scale", "weight")],                  # same layout both sides
        check=lambda k, t, ctx: None if k.axis == -1 else f"axis {k.axis} is not supported",
    )

The built-in kinds (``kinds``) are registered the same way. The layout maps are the
NumPy functions of ``tfreg_harness.layouts``, which read ``FRAMEWORK_DIFFERENCES``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

TorchLayout = Literal["channels_first", "channels_last", "input"]
TORCH_LAYOUTS: tuple[str, ...] = ("channels_first", "channels_last", "input")


def _identity(a: Any) -> Any:
    return a


@dataclass(frozen=True)
class Weight:
    """One Keras variable and the torch tensor(s) holding the same numbers.

    ``keras`` / ``torch`` are attribute paths on the layer / module (``"kernel"``,
    ``"cell.bias"``; ``"weight"``, ``"bias_ih_l0"``). ``torch`` may name several tensors (a tuple)
    when torch splits one Keras variable; then ``to_torch`` returns a tuple and ``to_keras`` takes
    one. ``grad_to_keras`` maps torch gradients to the Keras variable's gradient: the adjoint of
    ``to_torch``, which equals ``to_keras`` for the permutations and transposes of most kinds
    (default); it differs where torch holds a redundant copy (LSTM's second bias).
    ``torch_frozen``: those of ``torch`` with no Keras variable of their own (LSTM's ``bias_hh``,
    zeroed by the transfer): they must not train, or torch moves the sum Keras holds as one
    variable twice per step; a trajectory run refuses them while they require gradients. A torch
    path may end in ``[start:stop]``: rows of a packed tensor (``in_proj_weight[0:8]``).
    """

    keras: str
    torch: str | tuple[str, ...]
    to_torch: Callable[[Any], Any] = _identity
    to_keras: Callable[[Any], Any] = _identity
    grad_to_keras: Callable[[Any], Any] | None = None
    torch_frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class Context:
    """What a kind's ``transfer`` / ``check`` may need beyond the two layer objects.

    ``input_shape`` / ``output_shape``: the Keras layer's activation shapes (batch included) seen
    on the harness' sample batch. ``torch_before``: weightless torch leaves (name, module) that
    run between the previous pair and this module without a Keras counterpart (a ``ZeroPad2d``
    before a "same" convolution). ``flatten_from``: the channels-last shape a Keras Flatten
    consumed right before this layer while torch held the map channels first (the next Dense
    needs its rows permuted). ``torch_channels_first``: whether torch's input to this layer is
    channels first. ``dtype``: the model's float dtype. ``torch_layer``: ``(index, count)`` when
    one torch module computes ``count`` consecutive Keras layers (``nn.LSTM(num_layers=2)`` for
    two stacked Keras LSTMs) and this pair is layer ``index`` of it.
    """

    dtype: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    torch_before: tuple[tuple[str, Any], ...] = ()
    flatten_from: tuple[int, ...] | None = None
    torch_channels_first: bool = False
    torch_layer: tuple[int, int] = (0, 1)


TransferSpec = Sequence[Weight] | Callable[[Any, Any, Context], Sequence[Weight]]
CheckFn = Callable[[Any, Any, Context], "str | None"]
OutputFn = Callable[[Any, Any, Context], np.ndarray]


@dataclass(frozen=True)
class LayerPair:
    """One registered layer kind (see :func:`register_layer_pair`)."""

    keras_cls: type
    torch_cls: tuple[type, ...]
    transfer: TransferSpec = ()
    check: CheckFn | None = None
    torch_layout: TorchLayout = "input"
    output: OutputFn | None = None
    fused_activation: bool = False
    torch_optional: bool = False
    torch_layers: Callable[[Any], int] | None = None
    torch_group: tuple[str, ...] = ()

    def weights(self, keras_layer: Any, torch_module: Any, ctx: Context) -> list[Weight]:
        spec = self.transfer
        return list(spec(keras_layer, torch_module, ctx) if callable(spec) else spec)

    def problem(self, keras_layer: Any, torch_module: Any, ctx: Context) -> str | None:
        return None if self.check is None else self.check(keras_layer, torch_module, ctx)


_REGISTRY: dict[type, LayerPair] = {}
# A Keras class may also have one kind over a group of torch leaves (``torch_group``): Keras
# MultiHeadAttention <-> nn.MultiheadAttention, or <-> four nn.Linear (q, k, v, out) and the
# attention in forward code. The walk takes the group kind when the next torch leaf starts it.
_GROUPS: dict[type, LayerPair] = {}


def register_layer_pair(
    keras_cls: type,
    torch_cls: type | Sequence[type],
    *,
    transfer: TransferSpec = (),
    check: CheckFn | None = None,
    torch_layout: TorchLayout = "input",
    output: OutputFn | None = None,
    fused_activation: bool = False,
    torch_optional: bool = False,
    torch_layers: Callable[[Any], int] | None = None,
    torch_group: Sequence[str] = (),
) -> LayerPair:
    """Register (or replace) how a Keras layer class pairs with torch module class(es).

    - ``transfer``: the weight layout map, a list of :class:`Weight` or a function
      ``(keras_layer, torch_module, ctx) -> list[Weight]`` when it depends on configuration.
    - ``check(keras_layer, torch_module, ctx)``: returns a description of why the two do not
      compute the same function (``None`` when they do). The harness turns it into a failure
      naming both layers -- never a skip.
    - ``torch_layout``: how torch lays out this layer's output: ``"channels_first"`` (conv,
      pooling, padding), ``"channels_last"`` (Dense, LSTM, Flatten: same as Keras) or
      ``"input"`` (as its input: activations, Dropout).
    - ``output(torch_output, keras_layer, ctx)``: torch's output as Keras lays it out, for the
      per-layer comparison (default: move channels last when ``torch_layout`` says so).
    - ``fused_activation``: the Keras layer has an ``activation=`` argument (Dense, Conv); the
      per-layer comparison then takes its pre-activation output, and a torch activation module
      right after its counterpart pairs with the activation.
    - ``torch_optional``: a weightless Keras layer that torch usually computes in ``forward``
      (``x.flatten(1)``, ``F.relu``): with no matching torch leaf next, it stays unpaired.
      Layers holding weights always need a counterpart.
    - ``torch_layers(torch_module)``: how many consecutive Keras layers of this family one
      torch module computes (``nn.LSTM(num_layers=2)``: 2); the walk pairs them all with it,
      each told its ``Context.torch_layer``. Only the last one's output is compared directly.
    - ``torch_group``: the Keras layer pairs with that many *consecutive* torch leaves, one
      name per leaf, ``torch_cls`` then giving each leaf's class in order
      (``SeparableConv2D`` <-> ``(nn.Conv2d, nn.Conv2d)``, ``("depthwise", "pointwise")``).
      ``transfer`` / ``check`` receive the group as one module whose children are those names
      (``Weight("pointwise_kernel", "pointwise.weight")``); its output is the last leaf's.
    """
    classes = tuple(torch_cls) if isinstance(torch_cls, (tuple, list)) else (torch_cls,)
    if not isinstance(keras_cls, type) or not all(isinstance(c, type) for c in classes):
        raise TypeError(
            f"register_layer_pair needs classes. Received: keras_cls={keras_cls!r}, "
            f"torch_cls={torch_cls!r}"
        )
    if torch_layout not in TORCH_LAYOUTS:
        raise ValueError(
            f"torch_layout must be one of {TORCH_LAYOUTS}. Received: torch_layout={torch_layout!r}"
        )
    group = tuple(torch_group)
    if group and (
        len(group) != len(classes)
        or len(set(group)) != len(group)
        or not all(isinstance(n, str) and n.isidentifier() for n in group)
    ):
        raise ValueError(
            "torch_group must name each class of torch_cls once, in order, with distinct "
            f"identifiers. Received: torch_group={torch_group!r}, torch_cls={torch_cls!r}"
        )
    if not callable(transfer) and not all(isinstance(w, Weight) for w in transfer):
        raise TypeError(f"transfer must be Weight entries or a function. Received: {transfer!r}")
    entry = LayerPair(
        keras_cls=keras_cls,
        torch_cls=classes,
        transfer=transfer if callable(transfer) else tuple(transfer),
        check=check,
        torch_layout=torch_layout,
        output=output,
        fused_activation=fused_activation,
        torch_optional=torch_optional,
        torch_layers=torch_layers,
        torch_group=group,
    )
    (_GROUPS if group else _REGISTRY)[keras_cls] = entry
    return entry


def _load_builtin_kinds() -> None:
    # Importing the module runs its register_layer_pair calls (once; Python caches modules).
    from tfreg_harness.keras_side import kinds  # noqa: F401


def layer_pair_for(keras_layer: Any) -> LayerPair | None:
    """The registered kind of ``keras_layer`` (its class, else the nearest registered base): the
    single-module kind where there is one, else the group kind."""
    kinds = layer_pairs_for(keras_layer)
    return kinds[0] if kinds else None


def layer_pairs_for(keras_layer: Any) -> tuple[LayerPair, ...]:
    """Every kind ``keras_layer`` may pair as: its single-module kind, then its group kind."""
    _load_builtin_kinds()
    for cls in type(keras_layer).__mro__:
        found = tuple(table[cls] for table in (_REGISTRY, _GROUPS) if cls in table)
        if found:
            return found
    return ()


TORCH_WITHOUT_KERAS_LAYER: dict[str, str] = {
    "PixelShuffle": "pixel_shuffle",
    "PixelUnshuffle": "pixel_shuffle",
}
"""torch classes with no Keras layer to pair (class name -> the ``tfreg_harness.differences``
note that says why): a torch module holding one is refused with that reason."""


KERAS_WITHOUT_TORCH_LAYER: dict[str, str] = {"Normalization": "keras_normalization"}
"""Keras classes with no torch layer to pair (class name -> the note that says why)."""


def registered() -> dict[type, LayerPair]:
    """A copy of the registry: Keras class -> :class:`LayerPair` (the single-module kind where a
    class has both; :func:`registered_kinds` lists every kind)."""
    _load_builtin_kinds()
    return {**_GROUPS, **_REGISTRY}


def registered_kinds() -> list[tuple[type, LayerPair]]:
    """Every registered kind as ``(Keras class, kind)``, group kinds included."""
    _load_builtin_kinds()
    return [*_REGISTRY.items(), *_GROUPS.items()]


def torch_classes() -> tuple[type, ...]:
    """Every torch class some registered kind pairs with."""
    return tuple({c for _, entry in registered_kinds() for c in entry.torch_cls})


def kind_list(builtin_only: bool = True) -> str:
    """The registered kinds as a Markdown list: one line per set of torch classes, naming the
    Keras classes that pair with it (``- `Conv2D`, `DepthwiseConv2D` ↔ `Conv2d` ``), with
    "or forward code" where torch may compute the layer in ``forward`` without a module. The
    README's list is this function's output (a test keeps them equal). ``builtin_only``: leave
    out kinds registered by users or tests."""
    groups: dict[tuple[tuple[str, ...], bool, tuple[str, ...]], list[str]] = {}
    for keras_cls, entry in registered_kinds():
        if builtin_only and not entry_is_builtin(entry):
            continue
        names = tuple(c.__name__ for c in entry.torch_cls)
        key = (names, entry.torch_optional, entry.torch_group)
        groups.setdefault(key, []).append(keras_cls.__name__)
    lines = []
    for (torch_names, optional, group), keras_names in groups.items():
        if group:  # consecutive leaves: `Conv2d` (depthwise) + `Conv2d` (pointwise)
            torch = " + ".join(f"`{n}` ({p})" for n, p in zip(torch_names, group, strict=True))
        else:
            torch = " / ".join(f"`{n}`" for n in torch_names)
        if optional:
            torch = f"{torch} or forward code" if torch else "forward code"
        keras = ", ".join(f"`{n}`" for n in sorted(keras_names, key=str.lower))
        lines.append(f"- {keras} ↔ {torch}")
    return "\n".join(sorted(lines, key=str.lower))


def entry_is_builtin(entry: LayerPair) -> bool:
    """Whether ``entry`` was registered by ``tfreg_harness.keras_side.kinds`` (not by a user)."""
    return entry in _BUILTIN


_BUILTIN: list[LayerPair] = []  # filled by tfreg_harness.keras_side.kinds after its registrations


__all__ = [
    "TORCH_LAYOUTS",
    "Context",
    "LayerPair",
    "TorchLayout",
    "Weight",
    "kind_list",
    "layer_pair_for",
    "layer_pairs_for",
    "register_layer_pair",
    "registered",
    "registered_kinds",
    "torch_classes",
]
