"""Weight transfer between a paired Keras model and torch module.

:func:`parameter_pairs` turns a layer pairing (``tfreg_harness.keras_side.pairing``) into one
:class:`ParameterPair` per Keras variable, using each kind's weight layout map
(``registry.Weight``); :func:`transfer_weights` copies through them, in either
direction, after every check has passed -- a refusal leaves both models untouched.
torch is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tfreg_core.validation import choice
from tfreg_harness.keras_side.pairing import Pairing, PairingError, pair_error, pair_layers

Direction = Literal["keras_to_torch", "torch_to_keras"]
DIRECTIONS: tuple[str, ...] = ("keras_to_torch", "torch_to_keras")


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A detached host copy of a torch tensor."""
    return tensor.detach().cpu().numpy()


class TensorRows:
    """Rows ``start:stop`` of a torch parameter, standing in for a tensor of its own: torch packs
    several Keras variables into one (``nn.MultiheadAttention.in_proj_weight`` holds the q, k and
    v projections). Reads, gradients and copies go to those rows of ``base``."""

    def __init__(self, base: Any, start: int, stop: int) -> None:
        self.base, self.start, self.stop = base, start, stop

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base[self.start : self.stop].shape)

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    @property
    def device(self) -> Any:
        return self.base.device

    @property
    def requires_grad(self) -> bool:
        return bool(self.base.requires_grad)

    @property
    def grad(self) -> Any:
        grad = self.base.grad
        return None if grad is None else grad[self.start : self.stop]

    def detach(self) -> Any:
        return self.base.detach()[self.start : self.stop]

    def copy_(self, value: Any) -> Any:
        return self.base[self.start : self.stop].copy_(value)


def _resolve(obj: Any, path: str) -> Any:
    """``obj.a.b``; a torch path may end in ``[start:stop]`` (rows of a packed tensor)."""
    path, _, rows = path.partition("[")
    for part in path.split("."):
        obj = getattr(obj, part)
    if rows:
        start, stop = (int(n) for n in rows.rstrip("]").split(":"))
        return TensorRows(obj, start, stop)
    return obj


@dataclass(frozen=True)
class ParameterPair:
    """One Keras variable and the torch tensor(s) holding the same numbers.

    ``torch_tensors`` are parameters or buffers (``torch_names`` their ``state_dict`` keys);
    ``torch_tensor`` / ``torch_name`` are the first of them (the only one for most kinds).
    ``to_torch`` maps a Keras-layout array to torch's layout (a tuple of arrays when torch holds
    several tensors); ``to_keras`` maps back. :meth:`torch_value` / :meth:`torch_grad` read
    torch's current value / gradient in Keras layout.
    """

    layer: str
    keras_variable: Any
    torch_names: tuple[str, ...]
    torch_tensors: tuple[Any, ...]
    to_torch: Callable[[np.ndarray], Any]
    to_keras: Callable[[Any], np.ndarray]
    grad_to_keras: Callable[[Any], np.ndarray]
    torch_frozen: tuple[str, ...] = ()

    def trained_frozen(self) -> list[str]:
        """The ``torch_frozen`` tensors (see ``registry.Weight``) that still require gradients."""
        return [
            name
            for name, tensor in zip(self.torch_names, self.torch_tensors, strict=True)
            if name in self.torch_frozen and tensor.requires_grad
        ]

    @property
    def trainable(self) -> bool:
        return bool(self.keras_variable.trainable)

    @property
    def torch_name(self) -> str:
        return "+".join(self.torch_names)

    @property
    def torch_tensor(self) -> Any:
        return self.torch_tensors[0]

    def _pack(self, arrays: list[np.ndarray]) -> Any:
        return arrays[0] if len(arrays) == 1 else tuple(arrays)

    def torch_arrays(self, keras_value: np.ndarray) -> list[np.ndarray]:
        out = self.to_torch(keras_value)
        return list(out) if isinstance(out, tuple) else [out]

    def torch_value(self) -> np.ndarray:
        return np.asarray(
            self.to_keras(self._pack([torch_to_numpy(t) for t in self.torch_tensors]))
        )

    def torch_grad(self) -> np.ndarray:
        """torch's gradient in Keras layout; a frozen tensor (``.grad is None`` and
        ``requires_grad`` off, e.g. LSTM's ``bias_hh``) contributes zeros."""
        grads = []
        for name, tensor in zip(self.torch_names, self.torch_tensors, strict=True):
            if tensor.grad is None:
                if tensor.requires_grad:
                    raise ValueError(f"{name} has no gradient; run backward() first")
                grads.append(np.zeros(tuple(tensor.shape), dtype=torch_numpy_dtype(tensor)))
            else:
                grads.append(torch_to_numpy(tensor.grad))
        return np.asarray(self.grad_to_keras(self._pack(grads)))


def torch_numpy_dtype(tensor: Any) -> np.dtype:
    import torch

    return torch.empty((), dtype=tensor.dtype).numpy().dtype


def model_dtype(keras_model: Any) -> str:
    """The one float dtype of ``keras_model``'s variables (mixed precision is refused)."""
    dtypes = {str(v.dtype) for v in keras_model.weights if "float" in str(v.dtype)}
    if len(dtypes) > 1:
        raise ValueError(
            f"keras_model must have one float variable dtype (mixed precision is not compared). "
            f"Received variable dtypes: {sorted(dtypes)}"
        )
    return dtypes.pop() if dtypes else "float32"


def _qualifier(name: str | None, module: Any) -> Callable[[str], str]:
    """A kind's tensor path -> the user's ``state_dict`` key (a group maps its part names)."""
    from tfreg_harness.keras_side.group import TorchGroup

    if isinstance(module, TorchGroup):
        return module.qualified
    prefix = f"{name}." if name else ""
    return lambda path: prefix + path


def pairs_from(pairing: Pairing) -> list[ParameterPair]:
    """Every Keras variable of the paired layers with its torch tensor(s), shapes and dtypes
    checked; raises :class:`PairingError` naming the pair on any mismatch."""
    out: list[ParameterPair] = []
    for match in pairing.paired:
        if match.part == "activation":
            continue
        layer, t_name, module = match.keras_layer, match.torch_name, match.torch_module
        weights = match.kind.weights(layer, module, match.context)
        covered = set()
        qualify = _qualifier(t_name, module)
        for weight in weights:
            variable = _resolve(layer, weight.keras)
            covered.add(id(variable))
            names = (weight.torch,) if isinstance(weight.torch, str) else tuple(weight.torch)
            tensors = tuple(_resolve(module, n) for n in names)
            pair = ParameterPair(
                label_for(match),
                variable,
                tuple(qualify(n) for n in names),
                tensors,
                weight.to_torch,
                weight.to_keras,
                weight.grad_to_keras or weight.to_keras,
                tuple(qualify(n) for n in weight.torch_frozen),
            )
            keras_shape = tuple(int(d) for d in variable.shape)
            converted = [a.shape for a in pair.torch_arrays(np.zeros(keras_shape))]
            torch_shapes = [tuple(t.shape) for t in tensors]
            if converted != torch_shapes:
                raise pair_error(
                    layer,
                    t_name,
                    module,
                    f"{variable.path} has shape {keras_shape}, which maps to "
                    f"{converted[0] if len(converted) == 1 else converted}, but {pair.torch_name} "
                    f"has shape {torch_shapes[0] if len(torch_shapes) == 1 else torch_shapes}",
                )
            for n, t in zip(pair.torch_names, tensors, strict=True):
                if np.dtype(variable.dtype) != torch_numpy_dtype(t):
                    raise pair_error(
                        layer,
                        t_name,
                        module,
                        f"{variable.path} is {variable.dtype} but {n} is {t.dtype}; build both "
                        "models with the same dtype",
                    )
            out.append(pair)
        missing = [v.path for v in layer.weights if id(v) not in covered]
        if missing:
            raise pair_error(layer, t_name, module, f"its kind maps no torch tensor to {missing}")
    for free in pairing.free:
        variable, tensor = free.keras_variable, free.torch_tensor
        pair = ParameterPair(
            f"{variable.path} <-> {free.torch_name}",
            variable,
            (free.torch_name,),
            (tensor,),
            _identity,
            _identity,
            _identity,
        )
        keras_shape = tuple(int(d) for d in variable.shape)
        if keras_shape != tuple(tensor.shape) or np.dtype(variable.dtype) != torch_numpy_dtype(
            tensor
        ):
            raise PairingError(
                f"Keras variable {variable.path!r} ({keras_shape}, {variable.dtype}) and torch "
                f"parameter {free.torch_name!r} ({tuple(tensor.shape)}, {tensor.dtype}) pair by "
                "name or layer_map but differ in shape or dtype"
            )
        out.append(pair)
    return out


def _identity(a: Any) -> Any:
    return a


def trainable_mismatches(pairs: Sequence[ParameterPair]) -> list[tuple[str, str]]:
    """``(check name, cause)`` of every pair that one side trains and the other does not:
    Keras ``trainable`` against torch's ``requires_grad`` (any of the pair's tensors: torch may
    freeze a redundant copy, LSTM's ``bias_hh``). Such a pair passes a one-pass comparison while
    the two trainings part ways."""
    out = []
    for p in pairs:
        torch_trains = any(bool(getattr(t, "requires_grad", False)) for t in p.torch_tensors)
        if p.trainable != torch_trains:
            out.append(
                (
                    f"trainable {p.keras_variable.path} <-> {p.torch_name}",
                    f"Keras trainable={p.trainable} but torch requires_grad={torch_trains}: "
                    "one side trains this weight and the other does not",
                )
            )
    return out


def label_for(match: Any) -> str:
    return f"{match.keras_layer.name} <-> {match.torch_name or '<root>'}"


def parameter_pairs(
    keras_model: Any,
    torch_module: Any,
    *,
    sample: Any | None = None,
    layer_map: Mapping[str, str | None] | None = None,
) -> list[ParameterPair]:
    """Pair every Keras variable with its torch parameter/buffer (see ``pairing`` for the
    walk and ``kinds`` for the kinds). ``sample``: a batch for the shape
    pass, needed for subclassed models (others use a zero batch of their Input's shape)."""
    pairing = pair_layers(
        keras_model,
        torch_module,
        dtype=model_dtype(keras_model),
        sample=sample,
        layer_map=layer_map,
    )
    return pairs_from(pairing)


def copy_weights(pairs: Sequence[ParameterPair], *, direction: Direction) -> None:
    """Copy through already-checked ``pairs`` (all values converted before the first copy)."""
    choice(direction, "direction", DIRECTIONS)
    import torch

    if direction == "keras_to_torch":
        values = [p.torch_arrays(np.asarray(p.keras_variable.numpy())) for p in pairs]
        with torch.no_grad():
            for pair, arrays in zip(pairs, values, strict=True):
                for tensor, value in zip(pair.torch_tensors, arrays, strict=True):
                    tensor.copy_(torch.as_tensor(value, device=tensor.device))
    else:
        keras_values = [p.torch_value() for p in pairs]
        for pair, value in zip(pairs, keras_values, strict=True):
            pair.keras_variable.assign(value)


def transfer_weights(
    keras_model: Any,
    torch_module: Any,
    *,
    direction: Direction = "keras_to_torch",
    sample: Any | None = None,
    layer_map: Mapping[str, str | None] | None = None,
) -> list[ParameterPair]:
    """Copy every weight (and BN moving statistic) from one model into the other.

    ``direction`` is ``"keras_to_torch"`` or ``"torch_to_keras"``. Layouts are converted by each
    kind's weight map; see :func:`parameter_pairs` for which layers pair and what raises. All
    checks happen before the first copy, so a failure leaves both models untouched. Returns the
    pairs used (handy for mapping gradients afterwards).
    """
    choice(direction, "direction", DIRECTIONS)
    pairs = parameter_pairs(keras_model, torch_module, sample=sample, layer_map=layer_map)
    copy_weights(pairs, direction=direction)
    return pairs


def torch_gradients_in_keras_layout(pairs: Sequence[ParameterPair]) -> list[np.ndarray]:
    """torch's gradient of every trainable pair, in Keras layout and in ``pairs`` order
    (which is Keras' ``model.trainable_weights`` order for pairs from one model)."""
    return [pair.torch_grad() for pair in pairs if pair.trainable]


def load_weights(keras_model: Any, torch_module: Any, weights: Sequence[np.ndarray]) -> None:
    """Load Keras-layout ``weights`` (``get_weights()`` order) into the Keras model, then the same
    values into the torch module through :func:`transfer_weights`."""
    pairs = parameter_pairs(keras_model, torch_module)  # fail before touching either model
    weights = [np.asarray(w) for w in weights]
    expected = [tuple(int(d) for d in v.shape) for v in keras_model.weights]
    if [w.shape for w in weights] != expected:
        raise ValueError(
            f"weights must match keras_model.weights in order and shape: expected {expected}. "
            f"Received: {[w.shape for w in weights]}"
        )
    keras_model.set_weights(weights)
    copy_weights(pairs, direction="keras_to_torch")


__all__ = [
    "DIRECTIONS",
    "Direction",
    "PairingError",
    "ParameterPair",
    "copy_weights",
    "load_weights",
    "model_dtype",
    "pairs_from",
    "parameter_pairs",
    "torch_gradients_in_keras_layout",
    "torch_numpy_dtype",
    "torch_to_numpy",
    "trainable_mismatches",
    "transfer_weights",
]
