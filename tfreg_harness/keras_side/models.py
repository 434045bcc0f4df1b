"""Forward / loss / gradient evaluation of a paired Keras model and torch module, layer by layer,
and the seed models built twice from one framework-neutral description.

Inputs are always given in Keras' layout (channels last); torch receives them channels first
when its first layers need it (see ``pairing.pair_layers``). Logits come out of
both models: no softmax inside. Every paired layer's output is recorded on both sides
(``tfreg_harness.keras_side.capture``), so a comparison can name the first layer that diverges.

Dropout draws its masks from each framework's own RNG, which never agree even under the same
seed; a training-mode run injects one NumPy keep-mask per Dropout layer (``dropout_masks``, see
:func:`dropout_masks_for`) and each framework applies it with its own native formula.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tfreg._compat import keras, tf
from tfreg_core.validation import InvalidArgumentError, choice, positive_int
from tfreg_harness import architecture
from tfreg_harness.compare import Comparison, compare, compare_floored
from tfreg_harness.differences import note
from tfreg_harness.divergence import LayerRecord
from tfreg_harness.keras_side import architecture as keras_architecture
from tfreg_harness.keras_side.capture import keras_watch, torch_inputs, torch_watch
from tfreg_harness.keras_side.devices import tf_device, torch_device
from tfreg_harness.keras_side.pairing import (
    LayerMatch,
    Pairing,
    TorchInput,
    keras_layers,
    named_outputs,
    pair_layers,
    sample_input,
)
from tfreg_harness.keras_side.transfer import (
    ParameterPair,
    copy_weights,
    pairs_from,
    torch_to_numpy,
)
from tfreg_harness.layouts import to_channels_first, to_channels_last
from tfreg_harness.tolerances import (
    gradient_scales,
    resolve_rtol,
    zero_atol,
)

DTYPES: tuple[str, ...] = ("float32", "float64")


@dataclass
class ModelPair:
    """A Keras model and a torch module computing the same function once weights agree.

    ``layer_map`` overrides the definition-order pairing (``{keras_name: torch_name}``);
    ``torch_input`` the layout torch's input has (see ``pairing.pair_layers``).
    :meth:`pairing` pairs the layers on first use (with ``sample`` for the shape pass) and
    caches the result.
    """

    keras: Any
    torch: Any
    dtype: str
    device: str = "cpu"
    layer_map: Mapping[str, str | None] | None = None
    torch_input: TorchInput = "auto"
    _pairing: Pairing | None = field(default=None, repr=False)

    def pairing(self, sample: Any | None = None) -> Pairing:
        if self._pairing is None:
            self._pairing = pair_layers(
                self.keras,
                self.torch,
                dtype=self.dtype,
                sample=sample,
                layer_map=self.layer_map,
                torch_input=self.torch_input,
            )
        return self._pairing

    def replace_matches(self, matches: tuple[LayerMatch, ...]) -> None:
        """Replace the cached pairing's matches (after a probe settled a Flatten order)."""
        self._pairing = replace(self.pairing(), matches=matches)

    def parameter_pairs(self, sample: Any | None = None) -> list[ParameterPair]:
        return pairs_from(self.pairing(sample))


def build_pair(
    spec: Sequence[architecture.Layer],
    input_shape: Sequence[int],
    *,
    dtype: str,
    rng: np.random.Generator | None = None,
    device: str = "cpu",
) -> ModelPair:
    """Both models for ``spec`` (a ``tfreg_harness.architecture`` description); with ``rng``,
    weights drawn from it (``architecture.initial_weights``) are loaded into both, so they
    compute the same function."""
    from tfreg_harness.torch_side import architecture as torch_architecture

    choice(dtype, "dtype", DTYPES)
    with tf.device(tf_device(device)):
        keras_model = keras_architecture.build_model(spec, input_shape, dtype=dtype)
    torch_module = torch_architecture.build_model(
        spec, input_shape, dtype=dtype, device=torch_device(device)
    )
    pair = ModelPair(keras_model, torch_module, dtype, device)
    if rng is not None:
        keras_model.set_weights(
            architecture.initial_weights(spec, input_shape, rng=rng, dtype=dtype)
        )
        copy_weights(pair.parameter_pairs(), direction="keras_to_torch")
    return pair


def build_mlp(
    *,
    dtype: str,
    rng: np.random.Generator | None = None,
    input_dim: int = 64,
    hidden: Sequence[int] = (32, 32),
    classes: int = 10,
    batchnorm: bool = False,
    dropout: float = 0.0,
    device: str = "cpu",
    bn_momentum: float = architecture.BatchNorm.momentum,
    bn_epsilon: float = architecture.BatchNorm.epsilon,
) -> ModelPair:
    """MLP pair ``input_dim -> hidden... -> classes`` (see ``architecture.mlp_spec``); 64
    inputs fit flattened 8x8 images."""
    spec = architecture.mlp_spec(
        hidden=hidden,
        classes=classes,
        batchnorm=batchnorm,
        dropout=dropout,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
    )
    shape = (positive_int(input_dim, "input_dim"),)
    return build_pair(spec, shape, dtype=dtype, rng=rng, device=device)


def build_cnn(
    *,
    dtype: str,
    rng: np.random.Generator | None = None,
    input_shape: Sequence[int] = (8, 8, 1),
    filters: Sequence[int] = (8, 16),
    dense: int = 64,
    classes: int = 10,
    device: str = "cpu",
) -> ModelPair:
    """Seed-CNN pair for NHWC ``input_shape`` images (see ``architecture.cnn_spec``)."""
    spec = architecture.cnn_spec(filters=filters, dense=dense, classes=classes)
    return build_pair(spec, input_shape, dtype=dtype, rng=rng, device=device)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

LOSS_PAIRS: dict[str, tuple[Any, str]] = {
    "sparse_categorical_crossentropy": (
        lambda dtype: keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype),
        "cross_entropy",
    ),
    "binary_crossentropy": (
        lambda dtype: keras.losses.BinaryCrossentropy(from_logits=True, dtype=dtype),
        "binary_cross_entropy_with_logits",
    ),
    "mean_squared_error": (lambda dtype: keras.losses.MeanSquaredError(dtype=dtype), "mse"),
}
"""Loss names the harness knows (``check_parity(loss=...)``), each with a factory of its Keras loss
(called with the dtype) and the name of the torchref loss that computes the same per-example values
(see ``torchref.training.LOSSES``). Crossentropies take logits."""


def _loss_name(loss: str) -> str:
    return choice(loss, "loss", tuple(LOSS_PAIRS))


def keras_loss(
    logits: Any, labels: Any, *, dtype: str | None, loss: str = "sparse_categorical_crossentropy"
) -> Any:
    """Mean ``loss`` (a :data:`LOSS_PAIRS` name) of ``logits``. ``dtype=None`` is Keras' default,
    which computes in floatx (float32) whatever the logits' dtype; pass the model's dtype."""
    return LOSS_PAIRS[_loss_name(loss)][0](dtype)(labels, logits)


def torch_loss(logits: Any, labels: Any, *, loss: str = "sparse_categorical_crossentropy") -> Any:
    """Mean ``loss`` of ``logits`` with torchref's per-example loss (in the logits' dtype)."""
    import torch

    from torchref.training import per_example_loss

    target = torch.as_tensor(np.asarray(labels), device=logits.device)
    if target.is_floating_point():
        target = target.to(logits.dtype)
    shape, per_step = tuple(target.shape), tuple(logits.shape)
    if (
        not target.is_floating_point()
        and logits.ndim > 2
        and shape == per_step[:-1]
        and shape != per_step[:1] + per_step[2:]
    ):
        # per-step logits (batch, steps, classes), a tagger's: torch's losses take classes at
        # dim 1 (an image map (batch, classes, H, W) already has them there)
        logits = logits.movedim(-1, 1)
    return per_example_loss(LOSS_PAIRS[_loss_name(loss)][1])(logits, target).mean()


LossSpec = str | Mapping[str, str]
"""A :data:`LOSS_PAIRS` name, or ``{output name: LOSS_PAIRS name}`` for a structured output."""


def loss_terms(
    outputs: Mapping[str, Any] | None,
    loss: LossSpec,
    loss_weights: Mapping[str, float] | None = None,
) -> dict[str, tuple[str, float]] | None:
    """``{output name: (loss name, weight)}`` for a structured model output (``outputs``: its
    names, see ``pairing.named_outputs``), ``None`` for a single tensor. The total loss is
    ``sum_o weight_o * mean loss_o`` (Keras' ``compile(loss={...}, loss_weights={...})``); one
    loss name applies to every output, a missing weight is 1. Raises ``InvalidArgumentError``
    naming the argument on any mismatch."""
    names = tuple(LOSS_PAIRS)
    if outputs is None:
        if not isinstance(loss, str) or loss_weights is not None:
            raise InvalidArgumentError(
                "The model has a single output: loss must be one loss name and loss_weights "
                f"None. Received: loss={loss!r}, loss_weights={loss_weights!r}"
            )
        _loss_name(loss)
        return None
    per_output = {k: loss for k in outputs} if isinstance(loss, str) else dict(loss)
    weights = dict(loss_weights or {})
    for argument, keys in (("loss", set(per_output)), ("loss_weights", set(weights))):
        if keys - set(outputs) or (argument == "loss" and keys != set(outputs)):
            raise InvalidArgumentError(
                f"{argument} must be keyed by the model's outputs {sorted(outputs)}. "
                f"Received: {argument}={(loss if argument == 'loss' else loss_weights)!r}"
            )
    for key, name in per_output.items():
        choice(name, f"loss[{key!r}]", names)
    for key, weight in weights.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not np.isfinite(weight)
        ):
            raise InvalidArgumentError(
                f"loss_weights[{key!r}] must be a finite number. Received: {weight!r}"
            )
    return {k: (per_output[k], float(weights.get(k, 1.0))) for k in outputs}


def _labels(y: Any, key: str) -> Any:
    if isinstance(y, Mapping):
        if key not in y:
            raise InvalidArgumentError(
                f"y has no labels for output {key!r}. Received keys: {sorted(y)}"
            )
        return y[key]
    if isinstance(y, (list, tuple)) and key.isdigit():
        return y[int(key)]
    raise InvalidArgumentError(
        f"The model has several outputs: y must be a dict by output name (or a list by "
        f"position). Received: {type(y).__name__}"
    )


def _total_loss(outputs: Any, y: Any, terms: dict[str, tuple[str, float]] | None, one: Any) -> Any:
    """``one(output, labels, loss name)`` for a single output, else the weighted sum over the
    outputs (a weight of 1 multiplies nothing, so one-weight sums are exact)."""
    if terms is None:
        return one(outputs, y, None)
    named = named_outputs(outputs) or {}
    total = None
    for key, (name, weight) in terms.items():
        if key not in named:
            raise InvalidArgumentError(
                f"The model returns outputs {sorted(named)}, which lack {key!r}"
            )
        value = one(named[key], _labels(y, key), name)
        value = value if weight == 1.0 else value * weight
        total = value if total is None else total + value
    return total


# --------------------------------------------------------------------------------------------
# Dropout masks
# --------------------------------------------------------------------------------------------


def _dropout_layers(keras_model: Any) -> list[Any]:
    return [layer for layer in keras_layers(keras_model) if isinstance(layer, keras.layers.Dropout)]


def dropout_masks_for(keras_model: Any, x: Any, rng: np.random.Generator) -> list[np.ndarray]:
    """One boolean keep-mask per Dropout layer of ``keras_model`` (definition order), each of
    that layer's input shape on batch ``x`` (Keras layout); kept with probability ``1 - rate``
    (TensorFlow's rule: ``uniform >= rate``). A SpatialDropout layer's mask is a channel mask:
    drawn per (example, channel) and repeated over the spatial axes, as Keras' noise shape
    ``(N, 1.., C)`` and torch's ``DropoutNd`` drop whole channels."""
    layers = _dropout_layers(keras_model)
    with keras_watch(layers) as trace:
        keras_model(sample_input(keras_model, x), training=False)
    masks = []
    for layer in layers:
        shape = trace.input_shapes[id(layer)]
        noise = _noise_shape(layer, shape)
        masks.append(np.broadcast_to(rng.uniform(size=noise) >= layer.rate, shape).copy())
    return masks


def _noise_shape(layer: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    from tfreg_harness.keras_side.kinds import CHANNEL_DROPOUT

    if isinstance(layer, tuple(CHANNEL_DROPOUT)):
        return (shape[0], *([1] * (len(shape) - 2)), shape[-1])
    return shape


def _mask_maps(
    pair: ModelPair, training: bool, dropout_masks: Sequence[Any] | None
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Keras-side and torch-side masks by layer/module id (empty outside training)."""
    layers = _dropout_layers(pair.keras)
    if not training or not layers:
        return {}, {}
    if dropout_masks is None:
        raise ValueError(
            f"The model has {len(layers)} Dropout layer(s) and training=True, but dropout_masks "
            f"is None. {note('dropout')}"
        )
    if len(dropout_masks) != len(layers):
        raise ValueError(
            f"dropout_masks must hold one mask per Dropout layer ({len(layers)}). "
            f"Received: {len(dropout_masks)} masks"
        )
    matches = {id(m.keras_layer): m for m in pair.pairing().matches}
    keras_masks, torch_masks = {}, {}
    for layer, mask in zip(layers, dropout_masks, strict=True):
        match = matches[id(layer)]
        if match.torch_module is None:
            raise ValueError(
                f"Keras Dropout {layer.name!r} pairs with no torch nn.Dropout module (the torch "
                "forward code applies dropout itself), so no mask can be injected there. Use an "
                "nn.Dropout module, or compare with training=False."
            )
        mask = np.asarray(mask, dtype=bool)
        channels = mask.reshape(mask.shape[0], -1, mask.shape[-1])
        if _noise_shape(layer, mask.shape) != mask.shape and np.any(channels != channels[:, :1]):
            raise ValueError(
                f"Keras {type(layer).__name__} {layer.name!r} drops whole channels, but its "
                "dropout mask varies over the spatial axes; pass a channel mask repeated over "
                "them (dropout_masks_for draws one)."
            )
        keras_masks[id(layer)] = mask
        torch_masks[id(match.torch_module)] = (
            to_channels_first(mask) if match.context.torch_channels_first else mask
        )
    return keras_masks, torch_masks


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One forward/backward pass: logits (Keras layout; ``{name: array}`` for a structured
    output), the mean loss (the weighted sum of the outputs' means), each trainable
    parameter's gradient in Keras layout keyed by the Keras variable path, and each paired
    layer's output in Keras layout keyed by its position in ``pairing.matches``.
    ``ungraded``: Keras path -> the torch tensors that got no gradient although they require
    one (their module was never used in ``forward``)."""

    logits: np.ndarray | dict[str, np.ndarray]
    loss: np.ndarray
    gradients: dict[str, np.ndarray]
    layers: dict[int, np.ndarray] = field(default_factory=dict)
    ungraded: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _split_activation(pairing: Pairing) -> frozenset[int]:
    from tfreg_harness.keras_side.kinds import keras_activation

    return frozenset(
        id(m.keras_layer)
        for m in pairing.matches
        if m.kind.fused_activation and keras_activation(m.keras_layer.activation) != ("linear",)
    )


def forward_keras(
    pair: ModelPair, x: Any, *, training: bool = False, dropout_masks: Sequence[Any] | None = None
) -> tuple[Any, dict[int, Any]]:
    """``pair.keras(x, training=training)`` with dropout masks injected; returns the output and
    each paired layer's output (by match position; pre-activation for a fused activation)."""
    pairing = pair.pairing(x)
    keras_masks, _ = _mask_maps(pair, training, dropout_masks)
    layers = list({id(m.keras_layer): m.keras_layer for m in pairing.matches}.values())
    split = _split_activation(pairing)
    with keras_watch(layers, split_activation=split, masks=keras_masks) as trace:
        out = pair.keras(tf.convert_to_tensor(x), training=training)
    recorded = {}
    for i, m in enumerate(pairing.matches):
        key = id(m.keras_layer)
        use_pre = m.part == "layer" and key in split
        recorded[i] = trace.pre_activation[key] if use_pre else trace.outputs[key]
    return out, recorded


def forward_torch(
    pair: ModelPair, x: Any, *, training: bool = False, dropout_masks: Sequence[Any] | None = None
) -> tuple[Any, dict[int, Any]]:
    """``pair.torch`` on ``x`` (Keras layout, moved channels first when the pairing says so) in
    train or eval mode (the mode is left set), with dropout masks injected; returns the output
    and each paired module's raw output (by match position)."""

    pairing = pair.pairing(x)
    _, torch_masks = _mask_maps(pair, training, dropout_masks)
    pair.torch.train(training)
    matched = [(i, m) for i, m in enumerate(pairing.matches) if m.torch_module is not None]
    with torch_watch([m.torch_module for _, m in matched], masks=torch_masks) as outputs:
        out = _call_torch(pair, x)
    # a paired module forward never called has no entry (compare_layers reports it)
    return out, {
        i: outputs[id(m.torch_module)] for i, m in matched if id(m.torch_module) in outputs
    }


def _call_torch(pair: ModelPair, x: Any) -> Any:
    """``pair.torch`` on ``x`` (Keras layout) moved to the layout the pairing decided. When
    ``torch_input="auto"`` moved it channels first and torch rejects it, the error says so: a
    module that transposes its own input needs ``torch_input="channels_last"``."""
    import torch

    pairing = pair.pairing(x)
    batch = to_channels_first(x) if pairing.input_channels_first else np.asarray(x)
    try:
        return pair.torch(torch.as_tensor(batch, device=torch_device(pair.device)))
    except RuntimeError as exc:
        if pair.torch_input != "auto" or not pairing.input_channels_first:
            raise
        raise InvalidArgumentError(
            f"torch_input='auto' fed the torch module channels first (shape {batch.shape}, "
            f"Keras' {np.shape(x)} moved channels first, because the model starts with a "
            f"convolution, pooling or padding), and the module failed: {exc}. A module that "
            "takes channels-last input (and transposes it itself) needs "
            "torch_input='channels_last'."
        ) from exc


def settle_flatten_orders(pair: ModelPair, x: Any, *, rtol: float) -> list[tuple[str, str]]:
    """Decide, from one eval-mode pass on ``x``, the order in which torch flattened each map
    that a Keras Flatten consumed channels last while torch held it channels first.

    The pairing assumes torch's own order, ``(C, H, W)`` (``nn.Flatten`` / ``torch.flatten`` of
    an NCHW map), and permutes the next Dense's kernel rows. A port may permute to NHWC first
    and flatten Keras' order ``(H, W, C)``: when the ``nn.Linear``'s input equals Keras' Dense
    input as it is, that Dense is re-paired without the permutation (the caller transfers
    again). When it equals neither order but holds the same values, the port flattens in some
    third order: returned as ``(check name, cause)`` for a failure row. When the values differ,
    a layer before diverged, and its own record names it. Needs the earlier layers' weights
    equal (transferred) to decide."""
    import torch

    from tfreg_harness.layouts import flatten_permutation

    pairing = pair.pairing(x)
    flattened = [
        (i, m)
        for i, m in enumerate(pairing.matches)
        if m.context.flatten_from is not None and m.torch_module is not None
    ]
    if not flattened:
        return []
    layers = [m.keras_layer for _, m in flattened]
    with tf.device(tf_device(pair.device)), keras_watch(layers) as trace:
        pair.keras(tf.convert_to_tensor(x), training=False)
    pair.torch.train(False)
    with torch.no_grad(), torch_inputs([m.torch_module for _, m in flattened]) as seen:
        _call_torch(pair, x)
    matches, problems = list(pairing.matches), []
    for i, match in flattened:
        if id(match.torch_module) not in seen:
            continue  # forward never called it: compare_layers reports that
        keras_in = np.asarray(trace.inputs[id(match.keras_layer)])
        torch_in = torch_to_numpy(seen[id(match.torch_module)])
        if keras_in.shape != torch_in.shape:
            continue
        perm = flatten_permutation(match.context.flatten_from or ())
        if compare("", torch_in, keras_in[:, perm], rtol=rtol).passed:
            continue
        if compare("", torch_in, keras_in, rtol=rtol).passed:
            matches[i] = replace(match, context=replace(match.context, flatten_from=None))
            for k in range(i - 1, -1, -1):  # the Flatten torch ran in Keras' order too
                if isinstance(matches[k].keras_layer, keras.layers.Flatten):
                    flat = matches[k]
                    matches[k] = replace(
                        flat, context=replace(flat.context, torch_channels_first=False)
                    )
                    break
        elif compare("", np.sort(torch_in, 1), np.sort(keras_in, 1), rtol=rtol).passed:
            problems.append(
                (
                    f"flatten order {match.name}",
                    f"torch's {type(match.torch_module).__name__} receives the flattened map "
                    f"{match.context.flatten_from} (H, W, C) in neither Keras' (H, W, C) order "
                    "nor torch's (C, H, W) order (the same values, other positions): the port "
                    f"flattens in another order. {note('flatten')}",
                )
            )
    pair.replace_matches(tuple(matches))
    return problems


def _host(output: Any) -> Any:
    """A module's output (a tensor, or nested tuples of them: LSTM's) as NumPy arrays; ``None``
    stays (nn.MultiheadAttention's weights with ``need_weights=False``)."""
    if isinstance(output, tuple):
        return tuple(_host(o) for o in output)
    return None if output is None else torch_to_numpy(output)


def torch_output_in_keras_layout(
    match: LayerMatch, output: Any, expected_shape: tuple[int, ...]
) -> np.ndarray:
    """A torch module's output as Keras lays out the paired layer's output."""
    if match.kind.output is not None and match.part == "layer":
        return np.asarray(match.kind.output(_host(output), match.keras_layer, match.context))
    return in_keras_layout(torch_to_numpy(output), match.torch_channels_first, expected_shape)


def in_keras_layout(
    array: np.ndarray, channels_first: bool, expected_shape: tuple[int, ...]
) -> np.ndarray:
    """``array`` moved channels last when torch holds it channels first -- unless the shapes say
    torch's forward code already moved it back (``expected_shape``: Keras' shape)."""
    converted = to_channels_last(array) if channels_first else array
    if converted.shape != tuple(expected_shape) and array.shape == tuple(expected_shape):
        return array
    return converted


def evaluate_keras(
    pair: ModelPair,
    x: Any,
    y: Any,
    *,
    training: bool = False,
    dropout_masks: Sequence[Any] | None = None,
    loss: LossSpec = "sparse_categorical_crossentropy",
    loss_weights: Mapping[str, float] | None = None,
) -> Evaluation:
    """Logits, loss (in the model's dtype), gradients and per-layer outputs of ``pair.keras``
    (``loss`` / ``loss_weights``: see :func:`loss_terms`)."""
    model = pair.keras
    terms = loss_terms(pair.pairing(x).outputs, loss, loss_weights)
    with tf.device(tf_device(pair.device)):
        with tf.GradientTape() as tape:
            logits, layers = forward_keras(pair, x, training=training, dropout_masks=dropout_masks)
            value = _total_loss(
                logits,
                y,
                terms,
                lambda o, t, name: keras_loss(o, t, dtype=pair.dtype, loss=name or str(loss)),
            )
        grads = tape.gradient(value, model.trainable_weights)
    return Evaluation(
        logits=keras_outputs(logits),
        loss=np.asarray(value),
        gradients={
            # an Embedding's gradient is IndexedSlices: densify it
            v.path: np.zeros(tuple(v.shape), v.dtype)
            if g is None
            else tf.convert_to_tensor(g).numpy()
            for v, g in zip(model.trainable_weights, grads, strict=True)
        },
        layers={i: np.asarray(out) for i, out in layers.items()},
    )


def evaluate_torch(
    pair: ModelPair,
    x: Any,
    y: Any,
    *,
    training: bool = False,
    dropout_masks: Sequence[Any] | None = None,
    loss: LossSpec = "sparse_categorical_crossentropy",
    loss_weights: Mapping[str, float] | None = None,
) -> Evaluation:
    """Logits, loss, gradients and per-layer outputs of ``pair.torch``, all in Keras layout
    (gradients keyed by the paired Keras variable's path). A trainable tensor that got no
    gradient (its module never ran in ``forward``) is listed in ``ungraded``, not raised."""
    pairing = pair.pairing(x)
    terms = loss_terms(pairing.outputs, loss, loss_weights)
    module = pair.torch
    module.zero_grad(set_to_none=True)
    logits, raw = forward_torch(pair, x, training=training, dropout_masks=dropout_masks)
    value = _total_loss(
        logits, y, terms, lambda o, t, name: torch_loss(o, t, loss=name or str(loss))
    )
    value.backward()
    gradients, ungraded = {}, {}
    for p in pair.parameter_pairs():
        if not p.trainable:
            continue
        missing = tuple(
            n
            for n, t in zip(p.torch_names, p.torch_tensors, strict=True)
            if t.grad is None and t.requires_grad
        )
        if missing:
            ungraded[p.keras_variable.path] = missing
        else:
            gradients[p.keras_variable.path] = p.torch_grad()
    shapes = {i: tuple(m.context.output_shape) for i, m in enumerate(pairing.matches)}
    return Evaluation(
        logits=torch_outputs_in_keras_layout(pairing, logits),
        loss=torch_to_numpy(value),
        gradients=gradients,
        layers={
            i: torch_output_in_keras_layout(pairing.matches[i], out, shapes[i])
            for i, out in raw.items()
        },
        ungraded=ungraded,
    )


def keras_outputs(output: Any) -> np.ndarray | dict[str, np.ndarray]:
    """A Keras model's output as a NumPy array, or ``{name: array}`` when structured."""
    named = named_outputs(output)
    if named is None:
        return np.asarray(output)
    return {k: np.asarray(v) for k, v in named.items()}


def torch_outputs_in_keras_layout(
    pairing: Pairing, output: Any
) -> np.ndarray | dict[str, np.ndarray]:
    """A torch module's output (a tensor, a dict or a list of them) as Keras lays it out. The
    Keras output's shape (seen on the pairing's sample batch) decides whether torch already
    moved channels back."""

    def convert(value: Any, shape: tuple[int, ...] | None) -> np.ndarray:
        array = torch_to_numpy(value)
        expected = array.shape if shape is None else (array.shape[0], *shape[1:])
        return in_keras_layout(array, pairing.output_channels_first, expected)

    named = named_outputs(output)
    if named is None:
        return convert(output, pairing.output_shape)
    return {k: convert(v, (pairing.outputs or {}).get(k)) for k, v in named.items()}


def compare_outputs(name: str, actual: Any, expected: Any, *, rtol: float) -> list[Comparison]:
    """One comparison per output (``name`` or ``"name KEY"``), torch against Keras; outputs
    one side lacks raise ``ValueError`` naming both sets."""
    if not isinstance(expected, dict):
        return [compare(name, actual, expected, rtol=rtol)]
    if not isinstance(actual, dict) or actual.keys() != expected.keys():
        keys = sorted(actual) if isinstance(actual, dict) else type(actual).__name__
        raise ValueError(f"{name}: torch returns outputs {keys}, Keras {sorted(expected)}")
    return [compare(f"{name} {k}", actual[k], expected[k], rtol=rtol) for k in expected]


def compare_layers(
    pairing: Pairing, keras_eval: Evaluation, torch_eval: Evaluation, *, rtol: float
) -> list[LayerRecord]:
    """Every paired layer's output, torch against Keras, in model order, at ``rtol``. A shape
    disagreement, or a paired torch module that ``forward`` never called, is a failed record
    (the pair is not what computes)."""
    records = []
    for i, match in enumerate(pairing.matches):
        index, count = match.context.torch_layer
        if match.torch_module is None or index < count - 1:
            continue  # forward code, or an inner layer of a stacked torch RNN (seen by the last)
        kind = type(match.keras_layer).__name__
        if i not in torch_eval.layers:
            # The paired module exists but forward never called it: torch computed this layer
            # some other way (a functional call with other arguments), so the pair is not what
            # runs.
            name = f"{match.name} (torch forward never called this module)"
            records.append(LayerRecord(name, kind, "output", float("inf"), None, rtol, False))
            continue
        expected, actual = keras_eval.layers[i], torch_eval.layers[i]
        if actual.shape != expected.shape:
            records.append(
                LayerRecord(
                    f"{match.name} (shape: torch {actual.shape} vs Keras {expected.shape})",
                    kind,
                    "output",
                    float("inf"),
                    None,
                    rtol,
                    False,
                )
            )
            continue
        records.append(
            LayerRecord.of(compare(match.name, actual, expected, rtol=rtol), kind, "output")
        )
    return records


def compare_evaluations(
    keras_eval: Evaluation,
    torch_eval: Evaluation,
    *,
    dtype: str,
    claim: str = "model_cross",
    rtol: float | None = None,
) -> list[Comparison]:
    """Logits, loss and every gradient, torch (actual) against Keras (expected), each at
    ``tolerance(claim, dtype)`` (or ``rtol`` when given).

    A gradient's relative error is measured against its layer's largest gradient entry
    (``tfreg_harness.tolerances.GRADIENT_SCALE_RULE``: a bias gradient that cancels to a small
    value carries the round-off of its large terms). A gradient whose Keras value lies within
    ``zero_atol(dtype, gradients)`` of 0 (64 ulps of the model's largest gradient entry) is
    analytically zero -- a bias feeding a train-mode BatchNorm -- and both frameworks return
    round-off; it is compared with that absolute bound (rtol 0, named ``grad PATH == 0``),
    never relatively (:func:`compare_floored`).
    """
    rtol = resolve_rtol(claim, dtype, rtol)
    out = compare_outputs("logits", torch_eval.logits, keras_eval.logits, rtol=rtol)
    out.append(compare("loss", torch_eval.loss, keras_eval.loss, rtol=rtol))
    if keras_eval.gradients.keys() != torch_eval.gradients.keys() | torch_eval.ungraded.keys():
        raise ValueError(
            f"Gradient sets differ: Keras {sorted(keras_eval.gradients)} vs torch "
            f"{sorted(torch_eval.gradients)}"
        )
    for path, names in torch_eval.ungraded.items():
        # the module holding them never ran in forward: a failure, whatever Keras' value
        out.append(
            Comparison(
                f"grad {path} (torch {', '.join(names)}: no gradient, the module was never "
                "called in forward)",
                dtype,
                float("inf"),
                float("inf"),
                (),
                float("nan"),
                float("nan"),
                rtol,
                0.0,
                False,
            )
        )
    atol = zero_atol(dtype, keras_eval.gradients.values())
    scales = gradient_scales(keras_eval.gradients)
    for path, expected in keras_eval.gradients.items():
        if path not in torch_eval.ungraded:
            actual = torch_eval.gradients[path]
            out.append(
                compare_floored(
                    f"grad {path}", actual, expected, rtol=rtol, atol=atol, scale=scales[path]
                )
            )
    return out


def gradient_records(
    comparisons: Sequence[Comparison], kinds: Mapping[str, str]
) -> list[LayerRecord]:
    """The gradient comparisons of :func:`compare_evaluations` (``grad PATH``, ``grad PATH ==
    0``) as records named by the Keras variable ``PATH``; ``kinds`` maps a path to its layer's
    kind."""
    out = []
    for c in comparisons:
        if c.name.startswith("grad "):
            path = c.name.removeprefix("grad ").removesuffix(" == 0")
            out.append(replace(LayerRecord.of(c, kinds.get(path, ""), "gradient"), name=path))
    return out


def model_parity(
    pair: ModelPair,
    x: Any,
    y: Any,
    *,
    training: bool = False,
    dropout_masks: Sequence[Any] | None = None,
    claim: str = "model_cross",
    loss: str = "sparse_categorical_crossentropy",
) -> list[Comparison]:
    """Forward output, loss and per-parameter gradients of both models on ``(x, y)``, compared at
    ``tolerance(claim, pair.dtype)``. ``x`` in Keras layout; ``y`` as ``loss`` (a
    :data:`LOSS_PAIRS` name) expects it."""
    kwargs: dict[str, Any] = {"training": training, "dropout_masks": dropout_masks, "loss": loss}
    return compare_evaluations(
        evaluate_keras(pair, x, y, **kwargs),
        evaluate_torch(pair, x, y, **kwargs),
        dtype=pair.dtype,
        claim=claim,
    )


__all__ = [
    "DTYPES",
    "LOSS_PAIRS",
    "Evaluation",
    "LossSpec",
    "ModelPair",
    "build_cnn",
    "build_mlp",
    "build_pair",
    "compare_evaluations",
    "compare_layers",
    "compare_outputs",
    "dropout_masks_for",
    "evaluate_keras",
    "evaluate_torch",
    "forward_keras",
    "forward_torch",
    "gradient_records",
    "in_keras_layout",
    "keras_loss",
    "keras_outputs",
    "loss_terms",
    "model_parity",
    "settle_flatten_orders",
    "torch_loss",
    "torch_output_in_keras_layout",
    "torch_outputs_in_keras_layout",
]
