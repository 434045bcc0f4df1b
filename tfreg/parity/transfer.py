"""The one table of Keras <-> PyTorch differences, and weight transfer built on it.

Every other module asks this one how a tensor, a hyperparameter or a statistic maps between the
frameworks; none re-derives a mapping. :data:`FRAMEWORK_DIFFERENCES` holds the differences as data
and the functions below are the only code that applies them:

=====================  ==========================  ==========================================
what                   Keras 3                     PyTorch
=====================  ==========================  ==========================================
Dense / Linear         kernel ``(in, out)``        weight ``(out, in)``
Conv2D / Conv2d        kernel ``(kh, kw, in, out)``  weight ``(out, in, kh, kw)``
image batches          NHWC (channels_last)        NCHW
Flatten after conv     ``(H, W, C)`` order         ``(C, H, W)`` order
BatchNorm momentum     ``m`` (default 0.99)        ``1 - m`` (default 0.1)
BatchNorm epsilon      1e-3                        1e-5
BN moving variance     biased batch variance       unbiased: biased × n/(n-1)
Dropout masks          TF RNG stream               torch RNG stream (never equal: inject masks)
loss dtype             floatx (float32) unless     the logits' dtype
                       ``dtype=`` is given
=====================  ==========================  ==========================================

**Input convention.** The harness keeps data in Keras' layout: images are NHWC NumPy arrays.
Torch models are ordinary NCHW modules; :func:`to_torch_input` (used by every harness forward
pass) transposes a rank-4 batch to NCHW and leaves other ranks alone.

torch is imported inside the functions that need it, so importing this module never needs torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tfreg._compat import keras
from tfreg_core.validation import InvalidArgumentError, choice, positive_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

Direction = Literal["keras_to_torch", "torch_to_keras"]
DIRECTIONS: tuple[str, ...] = ("keras_to_torch", "torch_to_keras")


@dataclass(frozen=True)
class Layout:
    """How one kind of tensor is laid out in each framework.

    ``to_torch`` / ``to_keras`` are the ``np.transpose`` axes taking one layout to the other.
    """

    keras: str
    torch: str
    to_torch: tuple[int, ...]
    to_keras: tuple[int, ...]


@dataclass(frozen=True)
class BatchNormDifferences:
    """BatchNormalization (Keras) vs BatchNorm1d/2d (torch), the differences that change numbers.

    Both normalize a training batch with its *biased* variance ``mean((x - mean)**2)`` and compute
    ``gamma * (x - mean) / sqrt(var + eps) + beta``. They differ in the moving statistics:

    - Keras:  ``moving = m * moving + (1 - m) * batch_stat``
    - torch:  ``running = (1 - p) * running + p * batch_stat``, so ``p = 1 - m``;
    - torch feeds the *unbiased* variance (biased × n/(n-1), n = values per channel in the batch)
      into ``running_var``, Keras the biased one. Means agree; variances drift apart, and so do
      eval-mode outputs.
    """

    keras_momentum_default: float = 0.99
    torch_momentum_default: float = 0.1
    keras_epsilon_default: float = 1e-3
    torch_epsilon_default: float = 1e-5
    keras_moving_variance: str = "biased: sum((x - mean)**2) / n"
    torch_running_var: str = "unbiased: sum((x - mean)**2) / (n - 1)"

    @staticmethod
    def torch_momentum(keras_momentum: float) -> float:
        """torch's ``momentum`` (weight of the new batch) for Keras' ``momentum`` (weight of the
        old value)."""
        return 1.0 - keras_momentum

    @staticmethod
    def keras_momentum(torch_momentum: float) -> float:
        return 1.0 - torch_momentum

    @staticmethod
    def variance_correction(count: int) -> float:
        """torch's running-variance increment over Keras': ``n / (n - 1)`` for ``n`` values per
        channel in the batch (batch size for BatchNorm1d, batch × H × W for BatchNorm2d)."""
        n = positive_int(count, "count")
        if n < 2:
            raise InvalidArgumentError(
                f"Invalid value for argument count: torch's unbiased variance needs at least 2 "
                f"values per channel. Received: count={count!r}"
            )
        return n / (n - 1)


@dataclass(frozen=True)
class FrameworkDifferences:
    """Every Keras/torch difference the harness knows, as data (see the module docstring)."""

    layouts: MappingProxyType[str, Layout]
    batchnorm: BatchNormDifferences
    notes: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))


FRAMEWORK_DIFFERENCES = FrameworkDifferences(
    layouts=MappingProxyType(
        {
            "dense": Layout("(in, out)", "(out, in)", to_torch=(1, 0), to_keras=(1, 0)),
            "conv2d": Layout(
                "(kh, kw, in, out)",
                "(out, in, kh, kw)",
                to_torch=(3, 2, 0, 1),
                to_keras=(2, 3, 1, 0),
            ),
            "images": Layout(
                "(N, H, W, C)", "(N, C, H, W)", to_torch=(0, 3, 1, 2), to_keras=(0, 2, 3, 1)
            ),
            "vector": Layout("(n,)", "(n,)", to_torch=(0,), to_keras=(0,)),
        }
    ),
    batchnorm=BatchNormDifferences(),
    notes=MappingProxyType(
        {
            "flatten": "Keras flattens channels_last maps in (H, W, C) order, torch NCHW maps in "
            "(C, H, W) order: the first Dense/Linear after a Flatten needs its input rows "
            "permuted (flatten_permutation).",
            "dropout": "Keras draws masks from TensorFlow's RNG, torch from its own; seeding both "
            "with the same number gives different masks. Parity runs inject one NumPy mask into "
            "both (tfreg.parity.models.forward_keras/forward_torch, dropout_masks=). Both scale "
            "kept units by 1/(1 - rate).",
            "loss_dtype": "Keras losses cast predictions to floatx (float32) unless built with "
            "dtype=; a float64 model then reports a float32 loss. torch computes in the logits' "
            "dtype.",
            "weight_decay": "torch SGD/Adam weight_decay=wd is coupled and equals Keras L2(wd/2); "
            "AdamW and every Keras optimizer's weight_decay are decoupled "
            "(tfreg_core.conversions).",
            "adam_epsilon": "Keras adds epsilon to sqrt(v) and folds bias correction into the "
            "learning rate; torch adds epsilon to sqrt(v_hat). Same formula only as eps -> 0.",
            "optimizer_hyperparameters": "Keras keeps learning rate, betas etc. as float32 "
            "variables even in a float64 model; torch uses Python floats.",
        }
    ),
)


# --------------------------------------------------------------------------------------------
# Array conversions (NumPy in, NumPy out; no framework needed)
# --------------------------------------------------------------------------------------------


def _array(value: Any, name: str, rank: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != rank:
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: expected a rank-{rank} array. "
            f"Received: {name}.shape={array.shape}"
        )
    return array


def flatten_permutation(flatten_from: Sequence[int]) -> np.ndarray:
    """Index map between the two Flatten orders of one channels-last feature map.

    ``flatten_from`` is the shape (without batch) the Keras Flatten consumed, channels last:
    ``(H, W, C)`` -- or ``(H * W, C)``, since only the channel count and the total matter.
    Returns ``perm`` with ``torch_flat[..., j] == keras_flat[..., perm[j]]``.
    """
    dims = tuple(positive_int(d, "flatten_from") for d in flatten_from)
    if len(dims) < 2:
        raise InvalidArgumentError(
            f"Invalid value for argument flatten_from: expected a channels-last shape such as "
            f"(H, W, C). Received: flatten_from={tuple(flatten_from)!r}"
        )
    channels, spatial = dims[-1], math.prod(dims[:-1])
    return np.arange(spatial * channels).reshape(spatial, channels).T.reshape(-1)


def _check_flatten_rows(rows: int, flatten_from: Sequence[int], name: str) -> np.ndarray:
    perm = flatten_permutation(flatten_from)
    if perm.size != rows:
        raise InvalidArgumentError(
            f"Invalid value for argument flatten_from: {tuple(flatten_from)} flattens to "
            f"{perm.size} features but {name} has {rows}."
        )
    return perm


def dense_kernel_to_torch(kernel: Any, *, flatten_from: Sequence[int] | None = None) -> np.ndarray:
    """Keras Dense kernel ``(in, out)`` -> torch Linear weight ``(out, in)``.

    ``flatten_from``: for the first Dense after a Flatten of a channels-last map, that map's
    shape ``(H, W, C)``; the kernel's rows are reordered from (H, W, C) to (C, H, W) order so the
    Linear sees torch's NCHW flatten order.
    """
    kernel = _array(kernel, "kernel", 2)
    if flatten_from is not None:
        kernel = kernel[_check_flatten_rows(kernel.shape[0], flatten_from, "kernel")]
    return np.ascontiguousarray(kernel.transpose(FRAMEWORK_DIFFERENCES.layouts["dense"].to_torch))


def dense_kernel_to_keras(weight: Any, *, flatten_from: Sequence[int] | None = None) -> np.ndarray:
    """torch Linear weight ``(out, in)`` -> Keras Dense kernel ``(in, out)``; inverse of
    :func:`dense_kernel_to_torch` (same ``flatten_from``)."""
    weight = _array(weight, "weight", 2)
    kernel = weight.transpose(FRAMEWORK_DIFFERENCES.layouts["dense"].to_keras)
    if flatten_from is not None:
        perm = _check_flatten_rows(kernel.shape[0], flatten_from, "weight")
        kernel = kernel[np.argsort(perm)]
    return np.ascontiguousarray(kernel)


def conv2d_kernel_to_torch(kernel: Any) -> np.ndarray:
    """Keras Conv2D kernel ``(kh, kw, in, out)`` -> torch Conv2d weight ``(out, in, kh, kw)``."""
    kernel = _array(kernel, "kernel", 4)
    return np.ascontiguousarray(kernel.transpose(FRAMEWORK_DIFFERENCES.layouts["conv2d"].to_torch))


def conv2d_kernel_to_keras(weight: Any) -> np.ndarray:
    """torch Conv2d weight ``(out, in, kh, kw)`` -> Keras Conv2D kernel ``(kh, kw, in, out)``."""
    weight = _array(weight, "weight", 4)
    return np.ascontiguousarray(weight.transpose(FRAMEWORK_DIFFERENCES.layouts["conv2d"].to_keras))


def to_torch_input(x: Any) -> np.ndarray:
    """A harness batch (Keras layout) as torch expects it: NHWC -> NCHW for rank 4, else as is."""
    x = np.asarray(x)
    if x.ndim == 4:
        return np.ascontiguousarray(x.transpose(FRAMEWORK_DIFFERENCES.layouts["images"].to_torch))
    return x


def to_keras_output(y: Any) -> np.ndarray:
    """A torch activation in the harness' (Keras) layout: NCHW -> NHWC for rank 4, else as is."""
    y = np.asarray(y)
    if y.ndim == 4:
        return np.ascontiguousarray(y.transpose(FRAMEWORK_DIFFERENCES.layouts["images"].to_keras))
    return y


def torch_batchnorm_kwargs(*, momentum: float, epsilon: float) -> dict[str, float]:
    """``torch.nn.BatchNorm{1d,2d}`` keyword arguments computing the same function as Keras'
    ``BatchNormalization(momentum=momentum, epsilon=epsilon)`` (running variance aside)."""
    return {
        "momentum": FRAMEWORK_DIFFERENCES.batchnorm.torch_momentum(float(momentum)),
        "eps": float(epsilon),
    }


def keras_batchnorm_kwargs(*, momentum: float, eps: float) -> dict[str, float]:
    """Keras ``BatchNormalization`` keyword arguments matching ``torch.nn.BatchNorm*(momentum,
    eps)`` (moving variance aside)."""
    return {
        "momentum": FRAMEWORK_DIFFERENCES.batchnorm.keras_momentum(float(momentum)),
        "epsilon": float(eps),
    }


def _bn_closed_form(
    value: Any, *, initial: Any, momentum: float, count: int, steps: int, factor_power: int
) -> np.ndarray:
    value = np.asarray(value)
    decay = float(momentum) ** positive_int(steps, "steps")
    carried = decay * np.asarray(initial, dtype=value.dtype)
    factor = FRAMEWORK_DIFFERENCES.batchnorm.variance_correction(count) ** factor_power
    return carried + factor * (value - carried)


def torch_running_var_from_keras(
    moving_variance: Any, *, initial: Any, momentum: float, count: int, steps: int
) -> np.ndarray:
    """The ``running_var`` torch holds after the same ``steps`` train-mode batches that left
    Keras with ``moving_variance``.

    Both start from ``initial``; ``momentum`` is Keras' ``m``; every batch has ``count`` values per
    channel. Keras: ``v_N = m**N v0 + (1 - m) sum_i m**(N - i) b_i`` (b_i biased batch variances);
    torch adds ``b_i * n/(n-1)`` instead, so ``r_N = m**N v0 + n/(n-1) (v_N - m**N v0)``.
    """
    return _bn_closed_form(
        moving_variance,
        initial=initial,
        momentum=momentum,
        count=count,
        steps=steps,
        factor_power=1,
    )


def keras_moving_variance_from_torch(
    running_var: Any, *, initial: Any, momentum: float, count: int, steps: int
) -> np.ndarray:
    """Inverse of :func:`torch_running_var_from_keras` (``momentum`` is Keras' ``m``)."""
    return _bn_closed_form(
        running_var,
        initial=initial,
        momentum=momentum,
        count=count,
        steps=steps,
        factor_power=-1,
    )


# --------------------------------------------------------------------------------------------
# Walking a Keras model and a torch module side by side
# --------------------------------------------------------------------------------------------

_KERAS_SKIPPED = (
    "InputLayer",
    "Flatten",
    "MaxPooling2D",
    "AveragePooling2D",
    "Dropout",
    "ReLU",
    "Activation",
    "Softmax",
    "Identity",
)
_TORCH_SKIPPED = (
    "Flatten",
    "MaxPool2d",
    "AvgPool2d",
    "Dropout",
    "ReLU",
    "Tanh",
    "Sigmoid",
    "Softmax",
    "Identity",
)
_KERAS_WEIGHTED = ("Dense", "Conv2D", "BatchNormalization")
_TORCH_WEIGHTED = ("Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d")


@dataclass(frozen=True)
class ParameterPair:
    """One tensor that exists in both models, and the maps between its two layouts.

    ``keras_variable`` is a ``keras.Variable``; ``torch_tensor`` the matching parameter or buffer
    (``torch_name`` is its ``state_dict`` key). ``to_torch``/``to_keras`` convert NumPy arrays,
    values and gradients alike (the layout maps are linear, so a gradient maps as its tensor).
    """

    layer: str
    keras_variable: Any
    torch_name: str
    torch_tensor: Any
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_keras: Callable[[np.ndarray], np.ndarray]

    @property
    def trainable(self) -> bool:
        return bool(self.keras_variable.trainable)


def _keras_layers(model: Any) -> list[Any]:
    """Leaf layers in call order (nested Sequential/functional models flattened)."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(_keras_layers(layer))
        else:
            out.append(layer)
    return out


def _torch_leaves(module: Any) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in module.named_modules() if next(m.children(), None) is None]


def _unsupported(side: str, index: int, kind: str, name: str, supported: Sequence[str]) -> str:
    return (
        f"transfer_weights does not support {side} layer #{index} {name!r} of type {kind}. "
        f"Supported: {', '.join(supported)} (weights transferred), "
        f"{', '.join(_KERAS_SKIPPED if side == 'Keras' else _TORCH_SKIPPED)} (no weights)."
    )


def _keras_input_channels(model: Any) -> int | None:
    try:
        shape = model.inputs[0].shape
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(
            f"Keras model {model.name!r} is not built on an Input; build it with keras.Input(...) "
            "so layer shapes are known before transferring weights."
        ) from exc
    return int(shape[-1]) if len(shape) == 4 else None


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def _pair_error(k_layer: Any, t_name: str, t_module: Any, problem: str) -> ValueError:
    return ValueError(
        f"Keras layer {k_layer.name!r} ({type(k_layer).__name__}) and torch module {t_name!r} "
        f"({type(t_module).__name__}) do not compute the same function: {problem}"
    )


def _check_conv(k: Any, t_name: str, t: Any) -> None:
    if k.data_format != "channels_last":
        raise _pair_error(
            k,
            t_name,
            t,
            f"Keras data_format={k.data_format!r}; the harness keeps images channels_last (NHWC)",
        )
    checks = [
        ("strides", tuple(k.strides), tuple(t.stride)),
        ("dilation", tuple(k.dilation_rate), tuple(t.dilation)),
        ("groups", k.groups, t.groups),
        ("use_bias", k.use_bias, t.bias is not None),
        ("padding_mode", "zeros", t.padding_mode),
    ]
    kernel = tuple(k.kernel_size)
    if k.padding == "valid":
        same_padding = t.padding in ("valid", (0, 0))
    else:
        # Keras "same" pads (k - 1) // 2 before and the rest after; a symmetric torch padding
        # matches it exactly only for odd kernels at stride 1.
        symmetric = tuple((size - 1) // 2 for size in kernel)
        odd = all(size % 2 == 1 for size in kernel) and tuple(k.strides) == (1, 1)
        same_padding = t.padding == "same" or (odd and tuple(t.padding) == symmetric)
    if not same_padding:
        checks.append(("padding", k.padding, t.padding))
    for what, keras_value, torch_value in checks:
        if keras_value != torch_value:
            raise _pair_error(
                k, t_name, t, f"{what}: Keras {keras_value!r} vs torch {torch_value!r}"
            )


def _check_batchnorm(k: Any, t_name: str, t: Any, rank: int) -> None:
    if k.axis not in (-1, rank - 1):
        raise _pair_error(k, t_name, t, f"Keras axis={k.axis}; only the channels (last) axis maps")
    if getattr(k, "renorm", False):
        raise _pair_error(k, t_name, t, "Keras renorm=True has no torch counterpart")
    if not t.track_running_stats or t.momentum is None:
        raise _pair_error(
            k,
            t_name,
            t,
            "torch module must track running stats with a float momentum "
            f"(track_running_stats={t.track_running_stats}, momentum={t.momentum})",
        )
    if k.center != t.affine or k.scale != t.affine:
        raise _pair_error(
            k, t_name, t, f"Keras center={k.center}, scale={k.scale} vs torch affine={t.affine}"
        )
    expected = torch_batchnorm_kwargs(momentum=k.momentum, epsilon=k.epsilon)
    if not (_same(t.momentum, expected["momentum"]) and _same(t.eps, expected["eps"])):
        raise _pair_error(
            k,
            t_name,
            t,
            f"Keras momentum={k.momentum}, epsilon={k.epsilon} needs torch {expected} "
            f"(momentum 1 - m, eps passed explicitly); torch has momentum={t.momentum}, "
            f"eps={t.eps}. Build it with torch_batchnorm_kwargs(momentum=..., epsilon=...).",
        )


def _transposer(axes: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: np.ascontiguousarray(np.transpose(a, axes))


def _identity(a: np.ndarray) -> np.ndarray:
    return np.asarray(a)


def parameter_pairs(keras_model: Any, torch_module: Any) -> list[ParameterPair]:
    """Pair every Keras variable with its torch parameter/buffer, walking both models in order.

    Weighted layers pair up in call order: Dense <-> Linear, Conv2D <-> Conv2d,
    BatchNormalization <-> BatchNorm1d (flat inputs) / BatchNorm2d (feature maps). Pools,
    Flatten, Dropout and activations carry no weights and are skipped on both sides; any other
    layer raises ``ValueError`` naming its type, name and index. Hyperparameters that change the
    function (conv strides/padding/dilation/groups, bias presence, BN axis/momentum/epsilon) must
    agree, otherwise ``ValueError`` names the pair and the field. The first Dense after a Flatten
    of a feature map gets the (H, W, C) <-> (C, H, W) row permutation.

    Leaves of ``torch_module`` are taken in definition order, which must be call order (as in
    ``nn.Sequential``).
    """
    keras_side: list[tuple[Any, dict[str, Any]]] = []
    channels = _keras_input_channels(keras_model)  # not None while the tensor is a feature map
    flattened_channels: int | None = None
    for index, layer in enumerate(_keras_layers(keras_model)):
        kind = type(layer).__name__
        if kind in _KERAS_SKIPPED:
            if kind == "Flatten" and channels is not None:
                flattened_channels, channels = channels, None
            continue
        if kind not in _KERAS_WEIGHTED:
            raise ValueError(_unsupported("Keras", index, kind, layer.name, _KERAS_WEIGHTED))
        info: dict[str, Any] = {"index": index}
        if kind == "Dense":
            if channels is not None:
                raise ValueError(
                    f"Keras Dense layer #{index} {layer.name!r} is applied to a feature map "
                    "(no Flatten before it): it mixes channels, a torch Linear would mix widths."
                )
            if flattened_channels is not None:
                info["flatten_channels"] = flattened_channels
                flattened_channels = None
        elif kind == "Conv2D":
            channels = int(layer.filters)
        else:
            info["rank"] = 4 if channels is not None else 2
        keras_side.append((layer, info))

    torch_side: list[tuple[str, Any]] = []
    for index, (name, module) in enumerate(_torch_leaves(torch_module)):
        kind = type(module).__name__
        if kind in _TORCH_SKIPPED:
            continue
        if kind not in _TORCH_WEIGHTED:
            raise ValueError(_unsupported("torch", index, kind, name, _TORCH_WEIGHTED))
        torch_side.append((name, module))

    if len(keras_side) != len(torch_side):
        raise ValueError(
            "The models have different numbers of weighted layers: Keras "
            f"{[type(k).__name__ for k, _ in keras_side]} vs torch "
            f"{[type(t).__name__ for _, t in torch_side]}"
        )

    pairs: list[ParameterPair] = []
    for (k, info), (t_name, t) in zip(keras_side, torch_side, strict=True):
        pairs.extend(_layer_pairs(k, info, t_name, t))
    return pairs


def _layer_pairs(k: Any, info: dict[str, Any], t_name: str, t: Any) -> list[ParameterPair]:
    k_kind, t_kind = type(k).__name__, type(t).__name__
    expected = {
        "Dense": ("Linear",),
        "Conv2D": ("Conv2d",),
        "BatchNormalization": ("BatchNorm2d",) if info.get("rank") == 4 else ("BatchNorm1d",),
    }[k_kind]
    if t_kind not in expected:
        raise _pair_error(
            k,
            t_name,
            t,
            f"Keras layer #{info['index']} pairs with torch {expected[0]}, found {t_kind}",
        )
    label = f"{k.name} <-> {t_name or '<root>'}"
    prefix = f"{t_name}." if t_name else ""
    vector = _transposer(FRAMEWORK_DIFFERENCES.layouts["vector"].to_torch)
    entries: list[tuple[Any, str, Any, Callable, Callable]] = []
    if k_kind == "Dense":
        if k.use_bias != (t.bias is not None):
            raise _pair_error(
                k, t_name, t, f"use_bias: Keras {k.use_bias} vs torch {t.bias is not None}"
            )
        channels = info.get("flatten_channels")
        rows = int(k.kernel.shape[0])
        hint = (rows // channels, channels) if channels else None
        if hint is not None and rows % channels:
            raise _pair_error(
                k,
                t_name,
                t,
                f"{rows} inputs are not a multiple of the {channels} channels flattened before it",
            )
        entries.append(
            (
                k.kernel,
                "weight",
                t.weight,
                lambda a, h=hint: dense_kernel_to_torch(a, flatten_from=h),
                lambda a, h=hint: dense_kernel_to_keras(a, flatten_from=h),
            )
        )
        if k.use_bias:
            entries.append((k.bias, "bias", t.bias, vector, _identity))
    elif k_kind == "Conv2D":
        _check_conv(k, t_name, t)
        entries.append(
            (k.kernel, "weight", t.weight, conv2d_kernel_to_torch, conv2d_kernel_to_keras)
        )
        if k.use_bias:
            entries.append((k.bias, "bias", t.bias, vector, _identity))
    else:
        _check_batchnorm(k, t_name, t, info["rank"])
        if k.scale:
            entries.append((k.gamma, "weight", t.weight, vector, _identity))
        if k.center:
            entries.append((k.beta, "bias", t.bias, vector, _identity))
        entries.append((k.moving_mean, "running_mean", t.running_mean, vector, _identity))
        entries.append((k.moving_variance, "running_var", t.running_var, vector, _identity))

    pairs = []
    for variable, attr, tensor, to_torch, to_keras in entries:
        pair = ParameterPair(label, variable, prefix + attr, tensor, to_torch, to_keras)
        keras_shape = tuple(int(d) for d in variable.shape)
        torch_shape = tuple(tensor.shape)
        converted = to_torch(np.zeros(keras_shape)).shape
        if converted != torch_shape:
            raise _pair_error(
                k,
                t_name,
                t,
                f"{variable.path} has shape {keras_shape}, which maps to "
                f"{converted}, but {pair.torch_name} has shape {torch_shape}",
            )
        if np.dtype(variable.dtype) != _torch_numpy_dtype(tensor):
            raise _pair_error(
                k,
                t_name,
                t,
                f"{variable.path} is {variable.dtype} but {pair.torch_name} is "
                f"{tensor.dtype}; build both models with the same dtype",
            )
        pairs.append(pair)
    return pairs


def _torch_numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    import torch

    return torch.empty((), dtype=tensor.dtype).numpy().dtype


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A detached host copy of a torch tensor."""
    return tensor.detach().cpu().numpy()


def transfer_weights(
    keras_model: Any, torch_module: Any, *, direction: Direction = "keras_to_torch"
) -> list[ParameterPair]:
    """Copy every weight (and BN moving statistic) from one model into the other.

    ``direction`` is ``"keras_to_torch"`` or ``"torch_to_keras"``. Layouts are converted through
    :data:`FRAMEWORK_DIFFERENCES`; see :func:`parameter_pairs` for which layers pair and what
    raises. All checks happen before the first copy, so a failure leaves both models untouched.
    Returns the pairs used (handy for mapping gradients afterwards).
    """
    choice(direction, "direction", DIRECTIONS)
    import torch

    pairs = parameter_pairs(keras_model, torch_module)
    if direction == "keras_to_torch":
        values = [p.to_torch(np.asarray(p.keras_variable.numpy())) for p in pairs]
        with torch.no_grad():
            for pair, value in zip(pairs, values, strict=True):
                pair.torch_tensor.copy_(torch.as_tensor(value, device=pair.torch_tensor.device))
    else:
        values = [p.to_keras(torch_to_numpy(p.torch_tensor)) for p in pairs]
        for pair, value in zip(pairs, values, strict=True):
            pair.keras_variable.assign(value)
    return pairs


def torch_gradients_in_keras_layout(pairs: Sequence[ParameterPair]) -> list[np.ndarray]:
    """``.grad`` of every trainable torch parameter, in Keras layout and in ``pairs`` order
    (which is Keras' ``model.trainable_weights`` order for pairs from one model)."""
    out = []
    for pair in pairs:
        if not pair.trainable:
            continue
        grad = pair.torch_tensor.grad
        if grad is None:
            raise ValueError(f"{pair.torch_name} has no gradient; run backward() first")
        out.append(pair.to_keras(torch_to_numpy(grad)))
    return out


def numpy_weights_for(keras_model: Any, rng: np.random.Generator) -> list[np.ndarray]:
    """Initial weights drawn from ``rng``, one array per ``keras_model.weights`` entry (Keras
    layout, ``get_weights()`` order), for loading into both frameworks with :func:`load_weights`.

    Never the frameworks' own initializers, which differ. Kernels ~ U(±sqrt(3 / fan_in)) (unit
    output variance for unit inputs); biases ~ N(0, 0.1²) (non-zero, so bias paths are
    exercised); BN gamma ~ 1 + N(0, 0.1²), beta ~ N(0, 0.1²), moving mean ~ N(0, 0.1²), moving
    variance ~ U(0.5, 1.5) (non-trivial statistics, so eval mode is a real test).
    """
    out = []
    for variable in keras_model.weights:
        shape = tuple(int(d) for d in variable.shape)
        leaf = variable.path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            bound = math.sqrt(3.0 / math.prod(shape[:-1]))
            value = rng.uniform(-bound, bound, size=shape)
        elif leaf == "gamma":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "moving_variance":
            value = rng.uniform(0.5, 1.5, size=shape)
        elif leaf in ("bias", "beta", "moving_mean"):
            value = 0.1 * rng.standard_normal(shape)
        else:
            raise ValueError(
                f"numpy_weights_for does not know how to draw variable {variable.path!r}"
            )
        out.append(value.astype(variable.dtype))
    return out


def load_weights(keras_model: Any, torch_module: Any, weights: Sequence[np.ndarray]) -> None:
    """Load Keras-layout ``weights`` (``get_weights()`` order) into the Keras model, then the same
    values into the torch module through :func:`transfer_weights`."""
    parameter_pairs(keras_model, torch_module)  # fail before touching either model
    weights = [np.asarray(w) for w in weights]
    expected = [tuple(int(d) for d in v.shape) for v in keras_model.weights]
    if [w.shape for w in weights] != expected:
        raise ValueError(
            f"weights must match keras_model.weights in order and shape: expected {expected}. "
            f"Received: {[w.shape for w in weights]}"
        )
    keras_model.set_weights(weights)
    transfer_weights(keras_model, torch_module, direction="keras_to_torch")
