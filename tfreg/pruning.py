"""``prune(model)``: the smaller Keras model without its zero neurons, filters and input features.

Train with a sparsifying prox (``ProximalL1``, group lasso), then ``prune`` to get a model whose
Dense/Conv layers are actually narrower. Supported: a Keras ``Sequential`` or functional model
that is a single chain of ``Dense``, ``Conv1D``, ``Conv2D`` (``groups=1``, channels_last), with
elementwise activations (layer or ``activation=`` argument), ``BatchNormalization`` (last axis),
``Dropout``/``SpatialDropout``, max/average/global pooling and ``Flatten`` in between. The rules
(which units are dead, how a constant unit's value is folded into the next bias, where that fold
would not be exact) are in :mod:`tfreg_core.pruning`; this module reads the Keras model into
them and builds the new one.

Outputs equal the original's to round-off in inference mode (``training=False``: Dropout is the
identity, BatchNorm uses its moving statistics; in training mode BatchNorm's batch statistics and
Dropout's masks of a removed constant unit differ). Anything else is refused with a
``ValueError`` naming the layer: branches and residual connections, shared layers, layers it does
not know (RNNs, depthwise/separable/grouped convolutions, ``Reshape``, ...), softmax between
layers (it mixes units), BatchNorm after ``Flatten``.

torch twin: ``torchref.pruning.prune`` on ``nn.Sequential``, same rules and result; Keras
flattens NHWC (row ``s * C + c``), torch NCHW (row ``c * S + s``), which only changes which Dense
rows a removed filter takes with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tfreg._compat import keras
from tfreg_core.pruning import Boundary, LinearLayer, PruneResult, plan_pruning
from tfreg_core.validation import strict_bool

__all__ = ["PruneResult", "prune"]

_L = keras.layers
_LINEAR = (_L.Dense, _L.Conv1D, _L.Conv2D)
_ACTIVATION_LAYERS = (_L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU)
_DROPOUT = (_L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D)
_POOLING = (
    _L.MaxPooling1D,
    _L.MaxPooling2D,
    _L.AveragePooling1D,
    _L.AveragePooling2D,
)
_GLOBAL_POOLING = (
    _L.GlobalAveragePooling1D,
    _L.GlobalAveragePooling2D,
    _L.GlobalMaxPooling1D,
    _L.GlobalMaxPooling2D,
)
# Activations that act on each unit alone (softmax and friends mix units: not prunable between).
_ELEMENTWISE = frozenset(
    {
        "celu",
        "elu",
        "exponential",
        "gelu",
        "hard_shrink",
        "hard_sigmoid",
        "hard_silu",
        "hard_tanh",
        "leaky_relu",
        "linear",
        "log_sigmoid",
        "mish",
        "relu",
        "relu6",
        "selu",
        "sigmoid",
        "silu",
        "soft_shrink",
        "softplus",
        "softsign",
        "sparse_plus",
        "sparse_sigmoid",
        "squareplus",
        "tanh",
        "tanh_shrink",
    }
)
# Known layers that cannot be pruned here, and why (checked before "unknown layer").
_REFUSED = (
    ((_L.RNN, _L.LSTM, _L.GRU, _L.SimpleRNN), "recurrent layers are not supported"),
    (
        (_L.DepthwiseConv1D, _L.DepthwiseConv2D, _L.SeparableConv1D, _L.SeparableConv2D),
        "depthwise/separable convolutions tie filters to input channels",
    ),
    ((_L.Add, _L.Concatenate, _L.Multiply, _L.Subtract, _L.Average), "a merge (branching) layer"),
)


@dataclass
class _Chain:
    """The model as a chain: its layers, and the indices of the Dense/Conv ones."""

    layers: list[Any]
    linear: list[int]


def _fail(layer: Any, why: str) -> ValueError:
    return ValueError(f"prune: cannot prune layer {layer.name!r} ({type(layer).__name__}): {why}")


def _activation_name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _chain(model: Any) -> _Chain:
    """The model's layers as one chain, or a ValueError naming the layer that breaks it."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"prune: expected a keras.Model, got {type(model).__name__}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"prune: model {model.name!r} has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs; only single-input, single-output chains are supported"
        )
    layers = [layer for layer in model.layers if not isinstance(layer, _L.InputLayer)]
    previous = model.inputs[0]
    for layer in layers:
        for types, why in _REFUSED:
            if isinstance(layer, types):
                raise _fail(layer, why)
        if layer.input is not previous:
            raise _fail(
                layer,
                "the model is not a single chain here (a branch, a residual connection or a "
                "layer shared with another call or model)",
            )
        previous = layer.output
    if previous is not model.outputs[0]:
        raise _fail(layers[-1], "the model's output is not this layer's only output (shared?)")
    linear = [i for i, layer in enumerate(layers) if type(layer) in _LINEAR]
    if not linear:
        raise ValueError(f"prune: model {model.name!r} has no Dense/Conv layer to prune")
    for i in linear:
        _check_linear(layers[i])
    for position, layer in enumerate(layers):
        if position not in linear:
            _check_other(layer, hidden=linear[0] < position < linear[-1])
    return _Chain(layers, linear)


def _check_linear(layer: Any) -> None:
    config = layer.get_config()
    if config.get("groups", 1) != 1:
        raise _fail(layer, f"grouped convolution (groups={config['groups']})")
    if config.get("data_format", "channels_last") != "channels_last":
        raise _fail(layer, f"data_format={config['data_format']!r} (only channels_last)")


def _check_other(layer: Any, *, hidden: bool) -> None:
    """Known non-linear layers; between two Dense/Conv layers only elementwise ones."""
    kind = type(layer)
    if kind is _L.Activation:
        name = _activation_name(layer.activation)
        if hidden and name not in _ELEMENTWISE:
            raise _fail(layer, f"activation {name!r} mixes units, so none can be removed")
    elif kind is _L.BatchNormalization:
        if layer.axis not in (-1, len(layer.input.shape) - 1):
            raise _fail(layer, f"BatchNormalization over axis={layer.axis} (only the last axis)")
    elif kind in _POOLING or kind in _GLOBAL_POOLING or kind is _L.Flatten:
        fmt = layer.get_config().get("data_format") or "channels_last"
        if fmt != "channels_last":
            raise _fail(layer, f"data_format={fmt!r} (only channels_last)")
    elif kind not in _ACTIVATION_LAYERS and kind not in _DROPOUT:
        raise _fail(layer, "layer type not known to prune")


def _boundary(chain: _Chain, i: int) -> Boundary:
    """Boundary between linear layers ``chain.linear[i]`` and ``chain.linear[i + 1]``."""
    start, stop = chain.linear[i], chain.linear[i + 1]
    first, between, nxt = chain.layers[start], chain.layers[start + 1 : stop], chain.layers[stop]
    hidden_activation = _activation_name(first.activation)
    if hidden_activation not in _ELEMENTWISE:
        raise _fail(first, f"activation {hidden_activation!r} mixes units, so none can be removed")
    flattened = False
    positions = 1
    for layer in between:
        if type(layer) in (_L.Flatten, *_GLOBAL_POOLING):
            if type(layer) is _L.Flatten:
                positions *= int(np.prod(layer.input.shape[1:-1], dtype=np.int64))
            flattened = True
        elif type(layer) is _L.BatchNormalization and flattened:
            raise _fail(layer, "BatchNormalization after Flatten (per position, not per channel)")
    padding = nxt.get_config().get("padding", "valid")
    fold_refused = (
        None
        if padding == "valid"
        else f"{nxt.name!r} pads with zeros (padding={padding!r}): a constant input is not "
        "constant at its borders"
    )
    rank = len(first.output.shape)
    dtype = first.compute_dtype
    stages = [first.activation] + [
        layer for layer in between if type(layer) in (*_ACTIVATION_LAYERS, _L.BatchNormalization)
    ]

    def constant(pre: np.ndarray) -> np.ndarray:
        # The model's own layers on a (1, ..., 1, C) tensor of constants: the exact numbers it
        # computes (pooling, Dropout at inference and Flatten leave a constant unchanged).
        x = keras.ops.convert_to_tensor(pre.reshape((1,) * (rank - 1) + (-1,)), dtype=dtype)
        for stage in stages:
            x = stage(x, training=False) if isinstance(stage, _L.Layer) else stage(x)
        return keras.ops.convert_to_numpy(x).reshape(-1)

    return Boundary(positions, True, fold_refused, constant)


def _linear_layer(layer: Any) -> LinearLayer:
    weights = layer.get_weights()
    return LinearLayer(layer.name, weights[0], weights[1] if layer.use_bias else None)


def _rebuilt(layer: Any, **changes: Any) -> Any:
    config = layer.get_config()
    config.update(changes)
    return type(layer).from_config(config)


def prune(model: Any, *, inputs: bool = False) -> PruneResult:
    """A new, smaller Keras model without ``model``'s dead neurons / filters (``model`` untouched).

    Removed: units whose outgoing weights are all zero, and units whose incoming weights are all
    zero, their constant output ``act(b)`` folded into the next layer's bias (kept, and listed in
    ``notes``, where the next convolution pads with zeros and the constant is not zero). With
    ``inputs=True`` also the input features whose first-layer rows are all zero: the new model
    takes ``x[..., result.inputs]``. Returns a :class:`PruneResult` (model, kept indices per
    layer, parameter counts before/after, notes). Raises ``ValueError`` naming the layer for
    what it cannot prune exactly (see the module docstring).
    """
    inputs = strict_bool(inputs, "inputs")
    chain = _chain(model)
    layers = chain.layers
    if inputs:
        for layer in layers[: chain.linear[0]]:
            if type(layer) in (_L.Flatten, *_POOLING, *_GLOBAL_POOLING):
                raise _fail(layer, "inputs=True needs the first Dense/Conv to see the raw features")
    plan = plan_pruning(
        [_linear_layer(layers[i]) for i in chain.linear],
        [_boundary(chain, i) for i in range(len(chain.linear) - 1)],
        inputs=inputs,
    )
    current = plan.inputs  # the kept channels of the tensor the next layer reads
    linear_at = {position: j for j, position in enumerate(chain.linear)}
    new_layers = []
    for position, layer in enumerate(layers):
        if position in linear_at:
            j = linear_at[position]
            size = {"units": len(plan.kept[j])} if type(layer) is _L.Dense else None
            size = size or {"filters": len(plan.kept[j])}
            new = _rebuilt(layer, use_bias=plan.biases[j] is not None, **size)
            weights = [plan.kernels[j]] + ([] if plan.biases[j] is None else [plan.biases[j]])
            new_layers.append((new, weights))
            current = plan.kept[j]
        elif type(layer) is _L.BatchNormalization:
            new_layers.append((_rebuilt(layer), [w[current] for w in layer.get_weights()]))
        else:
            new_layers.append((_rebuilt(layer), []))
    shape = (*model.inputs[0].shape[1:-1], len(plan.inputs))
    x = start = keras.Input(shape, dtype=model.inputs[0].dtype, name=model.inputs[0].name)
    if isinstance(model, keras.Sequential):
        pruned = keras.Sequential([start, *(new for new, _ in new_layers)], name=model.name)
    else:
        for new, _ in new_layers:
            x = new(x)
        pruned = keras.Model(start, x, name=model.name)
    for new, weights in new_layers:
        if weights:
            pairs = zip(weights, new.weights, strict=True)
            new.set_weights([np.asarray(w, dtype=v.dtype) for w, v in pairs])
    return PruneResult(
        model=pruned,
        kept={layers[p].name: plan.kept[j] for p, j in linear_at.items()},
        inputs=plan.inputs,
        params_before=int(model.count_params()),
        params_after=int(pruned.count_params()),
        notes=plan.notes,
    )
