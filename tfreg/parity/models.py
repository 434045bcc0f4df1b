"""The seed models built twice -- Keras and torch -- from one architecture spec, and the harness'
forward / loss / gradient evaluation of such a pair.

Architectures are framework-free tuples (:data:`LayerSpec`), so the two builders cannot drift
apart. Inputs are always given in Keras' layout (NHWC images, ``(batch, features)`` vectors); the
torch models are ordinary NCHW modules and :func:`forward_torch` transposes the batch through
:func:`tfreg.parity.transfer.to_torch_input`. Logits come out of both models: no softmax inside
(the seed notebook applied softmax *and* ``from_logits=True``).

Dropout draws its masks from each framework's own RNG, which never agree even under the same
seed; a parity run passes ``dropout_masks`` (one NumPy keep-mask per Dropout layer, see
:func:`dropout_masks_for`) and each framework applies it with its own native formula.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from tfreg._compat import keras, tf
from tfreg.parity.devices import tf_device, torch_device
from tfreg.parity.transfer import (
    FRAMEWORK_DIFFERENCES,
    load_weights,
    numpy_weights_for,
    parameter_pairs,
    to_torch_input,
    torch_batchnorm_kwargs,
    torch_gradients_in_keras_layout,
    torch_to_numpy,
)
from tfreg_core.validation import InvalidArgumentError, choice, positive_int
from tfreg_harness.compare import Comparison, compare
from tfreg_harness.tolerances import tolerance

LayerSpec = tuple[Any, ...]
"""One layer: ``("conv2d", filters, kernel_size)`` (stride 1, "same" padding), ``("maxpool",
size)``, ``("flatten",)``, ``("dense", units)``, ``("relu",)``, ``("batchnorm",)``,
``("dropout", rate)``."""

DTYPES: tuple[str, ...] = ("float32", "float64")
_BN = FRAMEWORK_DIFFERENCES.batchnorm  # BN defaults follow Keras' convention (momentum m)


def mlp_spec(
    *,
    hidden: Sequence[int] = (32, 32),
    classes: int = 10,
    batchnorm: bool = False,
    dropout: float = 0.0,
) -> tuple[LayerSpec, ...]:
    """The MLP of the dropout/BatchNorm notebook: per hidden layer Dense -> [BN] -> ReLU ->
    [Dropout], then Dense(classes) logits."""
    if not 0.0 <= dropout < 1.0:
        raise InvalidArgumentError(
            f"Invalid value for argument dropout: expected a rate in [0, 1). "
            f"Received: dropout={dropout!r}"
        )
    spec: list[LayerSpec] = []
    for units in hidden:
        spec.append(("dense", positive_int(units, "hidden")))
        if batchnorm:
            spec.append(("batchnorm",))
        spec.append(("relu",))
        if dropout:
            spec.append(("dropout", float(dropout)))
    spec.append(("dense", positive_int(classes, "classes")))
    return tuple(spec)


def cnn_spec(
    *, filters: Sequence[int] = (8, 16), dense: int = 64, classes: int = 10
) -> tuple[LayerSpec, ...]:
    """The seed CNN of the TF accumulation notebook, sized for 8x8 digits: Conv2D(f1, 3x3) ReLU
    -> MaxPool 2 -> Conv2D(f2, 3x3) ReLU -> Flatten -> Dense(dense) ReLU -> Dense(classes).
    "same" padding keeps 8x8 -> 8x8 -> 4x4 -> 4x4 (the notebook's "valid" would shrink 8x8 to
    nothing). Ends in logits, not softmax."""
    if len(filters) != 2:
        raise InvalidArgumentError(
            f"Invalid value for argument filters: expected two filter counts (one per Conv2D). "
            f"Received: filters={filters!r}"
        )
    f1, f2 = (positive_int(f, "filters") for f in filters)
    return (
        ("conv2d", f1, 3),
        ("relu",),
        ("maxpool", 2),
        ("conv2d", f2, 3),
        ("relu",),
        ("flatten",),
        ("dense", positive_int(dense, "dense")),
        ("relu",),
        ("dense", positive_int(classes, "classes")),
    )


def build_keras(
    spec: Sequence[LayerSpec],
    input_shape: Sequence[int],
    *,
    dtype: str,
    bn_momentum: float = _BN.keras_momentum_default,
    bn_epsilon: float = _BN.keras_epsilon_default,
    device: str = "cpu",
) -> Any:
    """A ``keras.Sequential`` for ``spec``; every layer and the Input carry ``dtype``.

    ``bn_momentum``/``bn_epsilon`` use Keras' convention; :func:`build_torch` translates them."""
    choice(dtype, "dtype", DTYPES)
    layers = keras.layers
    out: list[Any] = [keras.Input(tuple(input_shape), dtype=dtype)]
    for item in spec:
        kind = item[0]
        if kind == "conv2d":
            out.append(layers.Conv2D(item[1], item[2], padding="same", dtype=dtype))
        elif kind == "maxpool":
            out.append(layers.MaxPooling2D(item[1], dtype=dtype))
        elif kind == "flatten":
            out.append(layers.Flatten(dtype=dtype))
        elif kind == "dense":
            out.append(layers.Dense(item[1], dtype=dtype))
        elif kind == "relu":
            out.append(layers.ReLU(dtype=dtype))
        elif kind == "batchnorm":
            out.append(
                layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype)
            )
        elif kind == "dropout":
            out.append(layers.Dropout(item[1], dtype=dtype))
        else:
            raise InvalidArgumentError(f"Unknown layer kind {kind!r} in spec. Received: {item!r}")
    with tf.device(tf_device(device)):
        return keras.Sequential(out)


def build_torch(
    spec: Sequence[LayerSpec],
    input_shape: Sequence[int],
    *,
    dtype: str,
    bn_momentum: float = _BN.keras_momentum_default,
    bn_epsilon: float = _BN.keras_epsilon_default,
    device: str = "cpu",
) -> Any:
    """A ``torch.nn.Sequential`` for ``spec``, taking NCHW input (``input_shape`` is Keras'
    channels-last shape; see :func:`forward_torch`). BatchNorm gets ``momentum = 1 -
    bn_momentum`` and ``eps = bn_epsilon`` explicitly (torch's own defaults differ)."""
    import torch
    from torch import nn

    choice(dtype, "dtype", DTYPES)
    shape = tuple(int(d) for d in input_shape)  # channels-last, tracked to size Linear inputs
    bn = torch_batchnorm_kwargs(momentum=bn_momentum, epsilon=bn_epsilon)
    modules: list[Any] = []
    for item in spec:
        kind = item[0]
        if kind == "conv2d":
            modules.append(nn.Conv2d(shape[-1], item[1], item[2], padding="same"))
            shape = (*shape[:-1], item[1])
        elif kind == "maxpool":
            modules.append(nn.MaxPool2d(item[1]))
            shape = (shape[0] // item[1], shape[1] // item[1], shape[2])
        elif kind == "flatten":
            modules.append(nn.Flatten())
            shape = (int(np.prod(shape)),)
        elif kind == "dense":
            modules.append(nn.Linear(shape[-1], item[1]))
            shape = (item[1],)
        elif kind == "relu":
            modules.append(nn.ReLU())
        elif kind == "batchnorm":
            norm = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
            modules.append(norm(shape[-1], **bn))
        elif kind == "dropout":
            modules.append(nn.Dropout(item[1]))
        else:
            raise InvalidArgumentError(f"Unknown layer kind {kind!r} in spec. Received: {item!r}")
    return nn.Sequential(*modules).to(device=torch_device(device), dtype=getattr(torch, dtype))


@dataclass
class ModelPair:
    """The same architecture in both frameworks, with identical weights once loaded."""

    keras: Any
    torch: Any
    spec: tuple[LayerSpec, ...]
    input_shape: tuple[int, ...]
    dtype: str
    device: str


def build_pair(
    spec: Sequence[LayerSpec],
    input_shape: Sequence[int],
    *,
    dtype: str,
    rng: np.random.Generator | None = None,
    device: str = "cpu",
    bn_momentum: float = _BN.keras_momentum_default,
    bn_epsilon: float = _BN.keras_epsilon_default,
) -> ModelPair:
    """Both models for ``spec``; with ``rng``, weights drawn from it (``numpy_weights_for``) are
    loaded into both, so they compute the same function."""
    kwargs = {"dtype": dtype, "bn_momentum": bn_momentum, "bn_epsilon": bn_epsilon}
    pair = ModelPair(
        keras=build_keras(spec, input_shape, device=device, **kwargs),
        torch=build_torch(spec, input_shape, device=device, **kwargs),
        spec=tuple(spec),
        input_shape=tuple(input_shape),
        dtype=dtype,
        device=device,
    )
    if rng is not None:
        load_weights(pair.keras, pair.torch, numpy_weights_for(pair.keras, rng))
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
    bn_momentum: float = _BN.keras_momentum_default,
    bn_epsilon: float = _BN.keras_epsilon_default,
) -> ModelPair:
    """MLP pair ``input_dim -> hidden... -> classes`` (see :func:`mlp_spec`); 64 inputs fit the
    flattened 8x8 digits."""
    spec = mlp_spec(hidden=hidden, classes=classes, batchnorm=batchnorm, dropout=dropout)
    return build_pair(
        spec,
        (positive_int(input_dim, "input_dim"),),
        dtype=dtype,
        rng=rng,
        device=device,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
    )


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
    """Seed-CNN pair for NHWC ``input_shape`` images (see :func:`cnn_spec`)."""
    spec = cnn_spec(filters=filters, dense=dense, classes=classes)
    return build_pair(spec, input_shape, dtype=dtype, rng=rng, device=device)


# --------------------------------------------------------------------------------------------
# Forward passes with injected dropout masks
# --------------------------------------------------------------------------------------------


def _dropout_layers(keras_model: Any) -> list[Any]:
    return [layer for layer in keras_model.layers if isinstance(layer, keras.layers.Dropout)]


def dropout_masks_for(
    keras_model: Any, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One boolean keep-mask per Dropout layer of ``keras_model`` (in call order), each of that
    layer's activation shape for ``batch_size`` examples; kept with probability ``1 - rate``
    (TensorFlow's rule: ``uniform >= rate``). The same masks serve the torch twin, whose
    activations have the same shapes (Dropout sits in the flat part of the models)."""
    n = positive_int(batch_size, "batch_size")
    return [
        rng.uniform(size=(n, *layer.output.shape[1:])) >= layer.rate
        for layer in _dropout_layers(keras_model)
    ]


def _check_masks(count: int, dropout_masks: Sequence[Any] | None, training: bool) -> None:
    if not training or count == 0:
        return
    if dropout_masks is None:
        raise ValueError(
            f"The model has {count} Dropout layer(s) and training=True, but dropout_masks is "
            "None: TensorFlow and torch draw different masks from their own RNGs, so a parity "
            "run must inject one mask per layer (dropout_masks_for)."
        )
    if len(dropout_masks) != count:
        raise ValueError(
            f"dropout_masks must hold one mask per Dropout layer ({count}). "
            f"Received: {len(dropout_masks)} masks"
        )


def _mask(masks: Iterator[Any], shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(next(masks), dtype=bool)
    if mask.shape != shape:
        raise ValueError(
            f"A dropout mask has shape {mask.shape} but the activation it masks has shape "
            f"{shape} (Keras layout)."
        )
    return mask


def forward_keras(
    model: Any,
    x: Any,
    *,
    training: bool = False,
    dropout_masks: Sequence[Any] | None = None,
) -> Any:
    """``model(x, training=training)`` for a ``keras.Sequential``, layer by layer so Dropout can
    apply a given keep-mask the way Keras does: ``where(mask, x * (1 / (1 - rate)), 0)`` with the
    scale rounded to the tensor's dtype (``tf.nn.dropout``'s formula)."""
    if not isinstance(model, keras.Sequential):
        raise TypeError(f"forward_keras needs a keras.Sequential. Received: {type(model)}")
    dropouts = [isinstance(layer, keras.layers.Dropout) for layer in model.layers]
    _check_masks(sum(dropouts), dropout_masks, training)
    out = tf.convert_to_tensor(x)
    masks = iter(dropout_masks or ())
    for layer, is_dropout in zip(model.layers, dropouts, strict=True):
        if is_dropout and training:
            keep = tf.constant(_mask(masks, tuple(out.shape)))
            scale = tf.constant(1.0 / (1.0 - layer.rate), dtype=out.dtype)
            out = tf.where(keep, out * scale, tf.zeros_like(out))
        else:
            out = layer(out, training=training)
    return out


def forward_torch(
    module: Any,
    x: Any,
    *,
    training: bool = False,
    dropout_masks: Sequence[Any] | None = None,
) -> Any:
    """``module(to_torch_input(x))`` for an ``nn.Sequential`` in train or eval mode (the mode is
    left set), applying a given keep-mask (Keras layout) at each Dropout the way torch's CPU
    kernel does: ``x * (mask / (1 - p))``."""
    import torch
    from torch import nn

    if not isinstance(module, nn.Sequential):
        raise TypeError(f"forward_torch needs a torch.nn.Sequential. Received: {type(module)}")
    dropouts = [isinstance(m, nn.Dropout) for m in module]
    _check_masks(sum(dropouts), dropout_masks, training)
    module.train(training)
    param = next(module.parameters(), None)
    out = torch.as_tensor(to_torch_input(x), device=param.device if param is not None else None)
    masks = iter(dropout_masks or ())
    for layer, is_dropout in zip(module, dropouts, strict=True):
        if is_dropout and training:
            shape = tuple(out.shape)
            if len(shape) == 4:
                shape = tuple(shape[i] for i in FRAMEWORK_DIFFERENCES.layouts["images"].to_keras)
            keep = to_torch_input(_mask(masks, shape))
            noise = torch.as_tensor(keep, device=out.device).to(out.dtype)
            out = out * noise.div_(1.0 - layer.p)
        else:
            out = layer(out)
    return out


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
    return per_example_loss(LOSS_PAIRS[_loss_name(loss)][1])(logits, target).mean()


@dataclass(frozen=True)
class Evaluation:
    """One forward/backward pass: logits ``(batch, classes)``, the mean loss, and each trainable
    parameter's gradient in Keras layout, keyed by the Keras variable path."""

    logits: np.ndarray
    loss: np.ndarray
    gradients: dict[str, np.ndarray]


def evaluate_keras(
    pair: ModelPair,
    x: Any,
    y: Any,
    *,
    training: bool = False,
    dropout_masks: Sequence[Any] | None = None,
    loss: str = "sparse_categorical_crossentropy",
) -> Evaluation:
    """Logits, loss (in the model's dtype) and gradients of ``pair.keras`` on ``(x, y)``."""
    model = pair.keras
    with tf.device(tf_device(pair.device)):
        with tf.GradientTape() as tape:
            logits = forward_keras(model, x, training=training, dropout_masks=dropout_masks)
            value = keras_loss(logits, y, dtype=pair.dtype, loss=loss)
        grads = tape.gradient(value, model.trainable_weights)
    return Evaluation(
        logits=logits.numpy(),
        loss=value.numpy(),
        gradients={v.path: g.numpy() for v, g in zip(model.trainable_weights, grads, strict=True)},
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
    """Logits, loss and gradients of ``pair.torch``, gradients mapped to Keras layout and names
    through :func:`tfreg.parity.transfer.parameter_pairs`."""
    module = pair.torch
    params = parameter_pairs(pair.keras, module)
    module.zero_grad(set_to_none=True)
    logits = forward_torch(module, x, training=training, dropout_masks=dropout_masks)
    value = torch_loss(logits, y, loss=loss)
    value.backward()
    trainable = [p for p in params if p.trainable]
    return Evaluation(
        logits=torch_to_numpy(logits),
        loss=torch_to_numpy(value),
        gradients={
            p.keras_variable.path: g
            for p, g in zip(trainable, torch_gradients_in_keras_layout(params), strict=True)
        },
    )


def batchnorm_cancelled_biases(keras_model: Any) -> list[str]:
    """Paths of Dense/Conv2D biases feeding straight into a BatchNormalization.

    In training mode BN subtracts the batch mean, which removes any per-channel constant: such a
    bias has gradient exactly 0 and both frameworks return round-off (~1e-17), whose relative
    difference is meaningless. :func:`compare_evaluations` checks these against zero instead.
    """
    layers = keras_model.layers
    return [
        layer.bias.path
        for layer, following in pairwise(layers)
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
        and layer.use_bias
        and isinstance(following, keras.layers.BatchNormalization)
    ]


def compare_evaluations(
    keras_eval: Evaluation,
    torch_eval: Evaluation,
    *,
    dtype: str,
    claim: str = "model_cross",
    zero_gradients: Sequence[str] = (),
    rtol: float | None = None,
) -> list[Comparison]:
    """Logits, loss and every gradient, torch (actual) against Keras (expected), each at
    ``tolerance(claim, dtype)`` (or ``rtol`` when given).

    Gradients named in ``zero_gradients`` are analytically zero (see
    :func:`batchnorm_cancelled_biases`); for them the bound is absolute, ``rtol`` times the
    largest gradient entry of the model -- the scale their round-off comes from.
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
    unknown = set(zero_gradients) - keras_eval.gradients.keys()
    if unknown:
        raise ValueError(f"zero_gradients names unknown parameters: {sorted(unknown)}")
    scale = max(float(np.max(np.abs(g), initial=0.0)) for g in keras_eval.gradients.values())
    for path, expected in keras_eval.gradients.items():
        actual = torch_eval.gradients[path]
        if path in zero_gradients:
            zero = np.zeros_like(expected)
            out.append(
                compare(f"grad {path} == 0 (Keras)", expected, zero, rtol=0.0, atol=rtol * scale)
            )
            out.append(
                compare(f"grad {path} == 0 (torch)", actual, zero, rtol=0.0, atol=rtol * scale)
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
    :data:`LOSS_PAIRS` name) expects it. In training mode, biases cancelled by a following
    BatchNorm are checked to be zero."""
    kwargs = {"training": training, "dropout_masks": dropout_masks, "loss": loss}
    return compare_evaluations(
        evaluate_keras(pair, x, y, **kwargs),
        evaluate_torch(pair, x, y, **kwargs),
        dtype=pair.dtype,
        claim=claim,
        zero_gradients=batchnorm_cancelled_biases(pair.keras) if training else (),
    )
