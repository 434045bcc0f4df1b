"""Forward / loss / gradient evaluation of a paired Keras model and torch module, layer by layer,
and the seed models built twice from one framework-neutral description.

Inputs are always given in Keras' layout (channels last); torch receives them channels first
when its first layers need it (see ``tfreg.parity.pairing.pair_layers``). Logits come out of
both models: no softmax inside. Every paired layer's output is recorded on both sides
(``tfreg.parity.capture``), so a comparison can name the first layer that diverges.

Dropout draws its masks from each framework's own RNG, which never agree even under the same
seed; a training-mode run injects one NumPy keep-mask per Dropout layer (``dropout_masks``, see
:func:`dropout_masks_for`) and each framework applies it with its own native formula.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tfreg import architecture as keras_architecture
from tfreg._compat import keras, tf
from tfreg.parity.capture import keras_watch, torch_watch
from tfreg.parity.devices import tf_device, torch_device
from tfreg.parity.pairing import LayerMatch, Pairing, keras_layers, pair_layers, sample_input
from tfreg.parity.transfer import ParameterPair, copy_weights, pairs_from, torch_to_numpy
from tfreg_core.validation import choice, positive_int
from tfreg_harness import architecture
from tfreg_harness.compare import Comparison, compare
from tfreg_harness.differences import note
from tfreg_harness.divergence import LayerRecord
from tfreg_harness.layouts import to_channels_first, to_channels_last
from tfreg_harness.tolerances import tolerance, zero_gradient_atol

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
    torch_input: str = "auto"
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
    from torchref import architecture as torch_architecture

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

# Loss names the harness knows, each with its Keras object and the torchref loss that computes
# the same per-example values (see torchref.training.LOSSES). Crossentropies take logits.
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


# --------------------------------------------------------------------------------------------
# Dropout masks
# --------------------------------------------------------------------------------------------


def _dropout_layers(keras_model: Any) -> list[Any]:
    return [layer for layer in keras_layers(keras_model) if isinstance(layer, keras.layers.Dropout)]


def dropout_masks_for(keras_model: Any, x: Any, rng: np.random.Generator) -> list[np.ndarray]:
    """One boolean keep-mask per Dropout layer of ``keras_model`` (definition order), each of
    that layer's input shape on batch ``x`` (Keras layout); kept with probability ``1 - rate``
    (TensorFlow's rule: ``uniform >= rate``)."""
    layers = _dropout_layers(keras_model)
    with keras_watch(layers) as trace:
        keras_model(sample_input(keras_model, x), training=False)
    return [rng.uniform(size=trace.input_shapes[id(layer)]) >= layer.rate for layer in layers]


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
    """One forward/backward pass: logits (Keras layout), the mean loss, each trainable
    parameter's gradient in Keras layout keyed by the Keras variable path, and each paired
    layer's output in Keras layout keyed by its position in ``pairing.matches``."""

    logits: np.ndarray
    loss: np.ndarray
    gradients: dict[str, np.ndarray]
    layers: dict[int, np.ndarray] = field(default_factory=dict)


def _split_activation(pairing: Pairing) -> frozenset[int]:
    from tfreg.parity.kinds import keras_activation

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
    import torch

    pairing = pair.pairing(x)
    _, torch_masks = _mask_maps(pair, training, dropout_masks)
    module = pair.torch
    module.train(training)
    batch = to_channels_first(x) if pairing.input_channels_first else np.asarray(x)
    batch = torch.as_tensor(batch, device=torch_device(pair.device))
    matched = [(i, m) for i, m in enumerate(pairing.matches) if m.torch_module is not None]
    with torch_watch([m.torch_module for _, m in matched], masks=torch_masks) as outputs:
        out = module(batch)
    # a paired module forward never called has no entry (compare_layers reports it)
    return out, {
        i: outputs[id(m.torch_module)] for i, m in matched if id(m.torch_module) in outputs
    }


def _host(output: Any) -> Any:
    """A module's output (a tensor, or nested tuples of them: LSTM's) as NumPy arrays; ``None``
    stays (nn.MultiheadAttention's weights with ``need_weights=False``)."""
    if isinstance(output, tuple):
        return tuple(_host(o) for o in output)
    return None if output is None else torch_to_numpy(output)


def torch_output_in_keras_layout(
    match: LayerMatch, output: Any, expected_shape: tuple
) -> np.ndarray:
    """A torch module's output as Keras lays out the paired layer's output."""
    if match.kind.output is not None and match.part == "layer":
        return np.asarray(match.kind.output(_host(output), match.keras_layer, match.context))
    return in_keras_layout(torch_to_numpy(output), match.torch_channels_first, expected_shape)


def in_keras_layout(array: np.ndarray, channels_first: bool, expected_shape: tuple) -> np.ndarray:
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
    loss: str = "sparse_categorical_crossentropy",
) -> Evaluation:
    """Logits, loss (in the model's dtype), gradients and per-layer outputs of ``pair.keras``."""
    model = pair.keras
    with tf.device(tf_device(pair.device)):
        with tf.GradientTape() as tape:
            logits, layers = forward_keras(pair, x, training=training, dropout_masks=dropout_masks)
            value = keras_loss(logits, y, dtype=pair.dtype, loss=loss)
        grads = tape.gradient(value, model.trainable_weights)
    return Evaluation(
        logits=np.asarray(logits),
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
    loss: str = "sparse_categorical_crossentropy",
) -> Evaluation:
    """Logits, loss, gradients and per-layer outputs of ``pair.torch``, all in Keras layout
    (gradients keyed by the paired Keras variable's path)."""
    pairing = pair.pairing(x)
    module = pair.torch
    module.zero_grad(set_to_none=True)
    logits, raw = forward_torch(pair, x, training=training, dropout_masks=dropout_masks)
    value = torch_loss(logits, y, loss=loss)
    value.backward()
    # the last layer's Keras shape stands in for the model output's (they are the same for the
    # sequential stacks where torch's forward might have moved the channels back)
    logits = in_keras_layout(
        torch_to_numpy(logits),
        pairing.output_channels_first,
        pairing.matches[-1].context.output_shape,
    )
    trainable = [p for p in pair.parameter_pairs() if p.trainable]
    shapes = {i: tuple(m.context.output_shape) for i, m in enumerate(pairing.matches)}
    return Evaluation(
        logits=logits,
        loss=torch_to_numpy(value),
        gradients={p.keras_variable.path: p.torch_grad() for p in trainable},
        layers={
            i: torch_output_in_keras_layout(pairing.matches[i], out, shapes[i])
            for i, out in raw.items()
        },
    )


def _record(comparison: Comparison, kind: str, stage: str, absolute: bool) -> LayerRecord:
    return LayerRecord(
        name=comparison.name,
        kind=kind,
        stage=stage,
        max_abs=comparison.max_abs,
        rel=None if absolute else comparison.max_rel,
        tolerance=comparison.atol if absolute else comparison.rtol,
        passed=comparison.passed,
    )


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
            _record(compare(match.name, actual, expected, rtol=rtol), kind, "output", False)
        )
    return records


def gradient_scale(keras_eval: Evaluation) -> float:
    return max(
        (float(np.max(np.abs(g), initial=0.0)) for g in keras_eval.gradients.values()), default=0.0
    )


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

    A gradient whose Keras value lies within ``zero_gradient_atol(dtype, G)`` of 0 (``G`` the
    model's largest gradient entry) is analytically zero -- a bias feeding a train-mode
    BatchNorm -- and both frameworks return round-off; it is compared with that absolute bound
    (rtol 0, named ``grad PATH == 0``), never relatively.
    """
    rtol = tolerance(claim, dtype).rtol if rtol is None else rtol
    out = [
        compare("logits", torch_eval.logits, keras_eval.logits, rtol=rtol),
        compare("loss", torch_eval.loss, keras_eval.loss, rtol=rtol),
    ]
    if keras_eval.gradients.keys() != torch_eval.gradients.keys():
        raise ValueError(
            f"Gradient sets differ: Keras {sorted(keras_eval.gradients)} vs torch "
            f"{sorted(torch_eval.gradients)}"
        )
    atol = zero_gradient_atol(dtype, gradient_scale(keras_eval))
    for path, expected in keras_eval.gradients.items():
        actual = torch_eval.gradients[path]
        if float(np.max(np.abs(expected), initial=0.0)) <= atol:
            out.append(
                compare(f"grad {path} == 0", actual, np.zeros_like(expected), rtol=0.0, atol=atol)
            )
        else:
            out.append(compare(f"grad {path}", actual, expected, rtol=rtol))
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
    kwargs = {"training": training, "dropout_masks": dropout_masks, "loss": loss}
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
    "ModelPair",
    "build_cnn",
    "build_mlp",
    "build_pair",
    "compare_evaluations",
    "compare_layers",
    "dropout_masks_for",
    "evaluate_keras",
    "evaluate_torch",
    "forward_keras",
    "forward_torch",
    "gradient_scale",
    "in_keras_layout",
    "keras_loss",
    "model_parity",
    "torch_loss",
    "torch_output_in_keras_layout",
]
