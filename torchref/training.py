"""Training with exact gradient accumulation for PyTorch: ``Trainer``, the twin of
``tfreg.Trainer`` (same signature, same window plan, same update rule -- see
:mod:`tfreg_core.training`). ``KerasAdamW``, a torch optimizer with Keras' Adam/AdamW
arithmetic, lives in :mod:`torchref.optimizers`.

Differences from TensorFlow (``tfreg.training``): ``optimizer`` is a ``torch.optim`` optimizer
built on the model's parameters, and ``loss`` is a torch loss -- a name from ``LOSSES``, a
``torch.nn`` loss module as users build it, a ``torch.nn.functional`` loss (``F.cross_entropy``,
``F.mse_loss``... or a ``functools.partial`` of one with ``weight``, ``ignore_index``,
``label_smoothing``, ``reduction``...: read as its module twin built with those keyword
arguments), or a callable declared with :func:`per_element` (per-element values and which of
them count). Any other callable is refused when the trainer is built: its denominator is
invisible (``F.cross_entropy`` behind a lambda returns a batch mean; averaging those per
micro-batch is not the window's mean). ``jit_compile`` must be False (torchref runs eagerly).
Checkpoints are ``state_dict()`` / ``load_state_dict()``.

Loss modules. ``reduction="mean"`` (torch's default) is translated to the module's
``reduction="none"`` values (a copy; the user's module is untouched, its other arguments --
``weight``, ``ignore_index``, ``label_smoothing``, ``pos_weight``, ``delta``, ``beta`` -- kept)
divided by the window's count, so an update equals ``loss(model(X_W), Y_W).backward();
optimizer.step()`` on the concatenated window ``W``. The count is torch's own denominator:
the element count for ``MSELoss``, ``L1Loss``, ``HuberLoss``, ``SmoothL1Loss``,
``BCEWithLogitsLoss``, ``BCELoss``, ``SoftMarginLoss``, ``KLDivLoss`` (``"batchmean"``: the
example count), and class-probability targets of ``CrossEntropyLoss``; for class indices
(``CrossEntropyLoss``, ``NLLLoss``, also per timestep: ``(N, C, T)`` logits, ``(N, T)``
targets) ``sum(weight[y_i])`` over the targets that are not ``ignore_index`` (1 per target
without ``weight``). ``reduction="none"`` modules get the same denominator. Differences from
torch: a window whose every target is ignored has a zero data gradient and ``elements`` 0 in
its ``History`` record (torch's mean is 0/0 = NaN; each record's ``elements`` is the window's
denominator), and ``reduction="sum"`` is refused (the contract is the window's mean). The
name ``"cross_entropy"`` is ``nn.CrossEntropyLoss()``: labels ``-100`` are ignored, and Keras'
``(N, 1)`` label arrays are accepted.

Refused before any update, naming the argument: floating targets for class indices (torch's
``.long()`` would truncate them), targets whose shape differs from the predictions' for
element-wise losses (torch would broadcast them; the Keras-named losses accept ``(N,)``
targets for ``(N, 1)`` predictions, as Keras does), negative class weights, and an optimizer
over parameters that are not the model's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np

from tfreg_core.batchnorm import check_mode as _check_batchnorm_mode
from tfreg_core.labels import check_class_labels
from tfreg_core.training import (
    NONFINITE_MESSAGE,
    ArrayData,
    Position,
    TrainerSpec,
    fit_data,
    leading_dim,
    leaves,
    map_structure,
    object_config,
    resolve_proximal,
    run_fit,
    validation_batches,
)
from tfreg_core.training import History as History
from tfreg_core.validation import InvalidArgumentError
from torchref import accumulation, checkpoint
from torchref._compat import torch
from torchref.batchnorm import WindowMoments, batchnorm_modules
from torchref.distributed import loader_samplers, process_group
from torchref.penalties import penalty as _penalty
from torchref.proximal import PROXIMAL_CLASSES, Proximal
from torchref.regularizers import get as _get_regularizer

__all__ = [
    "LOSSES",
    "History",
    "LossScale",
    "PerElementLoss",
    "Trainer",
    "per_element",
    "per_example_loss",
]

F = torch.nn.functional


def _mse(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    # Keras' MeanSquaredError: mean over the last axis, one value per example.
    return torch.mean(torch.square(y_pred - y_true), dim=-1)


def _mae(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return torch.mean(torch.abs(y_pred - y_true), dim=-1)


def _cross_entropy(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(y_pred, y_true, reduction="none")


def _bce_with_logits(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return torch.mean(F.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none"), -1)


# Crossentropies take logits (torch's convention); their Keras twins are
# SparseCategoricalCrossentropy(from_logits=True) and BinaryCrossentropy(from_logits=True).
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean_squared_error": _mse,
    "mse": _mse,
    "mean_absolute_error": _mae,
    "mae": _mae,
    "cross_entropy": _cross_entropy,
    "binary_cross_entropy_with_logits": _bce_with_logits,
}

nn = torch.nn
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The torch losses whose denominator the trainer knows, each added here once: the module class,
# its functional twin (understood as the module built with the call's keyword arguments) and
# the targets it takes. "elements": reduction="mean" is sum(values) / values.numel() on the
# "none" values. "index"/"index_or_probabilities": class indices divide by sum(weight[y_i]) over
# i with y_i != ignore_index (class probabilities of CrossEntropyLoss: the element count).
_KNOWN_LOSSES: dict[type[nn.Module], tuple[Callable[..., torch.Tensor], str]] = {
    nn.MSELoss: (F.mse_loss, "elements"),
    nn.L1Loss: (F.l1_loss, "elements"),
    nn.HuberLoss: (F.huber_loss, "elements"),
    nn.SmoothL1Loss: (F.smooth_l1_loss, "elements"),
    nn.BCEWithLogitsLoss: (F.binary_cross_entropy_with_logits, "elements"),
    nn.BCELoss: (F.binary_cross_entropy, "elements"),
    nn.SoftMarginLoss: (F.soft_margin_loss, "elements"),
    nn.KLDivLoss: (F.kl_div, "elements"),
    nn.CrossEntropyLoss: (F.cross_entropy, "index_or_probabilities"),
    nn.NLLLoss: (F.nll_loss, "index"),
}
_FUNCTIONAL_TWINS = {fn: module for module, (fn, _) in _KNOWN_LOSSES.items()}
_ELEMENTWISE_MODULES = tuple(m for m, (_, kind) in _KNOWN_LOSSES.items() if kind == "elements")
_INDEX_MODULES = tuple(m for m, (_, kind) in _KNOWN_LOSSES.items() if kind != "elements")


class PerElementLoss:
    """A loss callable that states what it returns: see :func:`per_element`."""

    def __init__(
        self,
        fn: Callable[[Any, Any], torch.Tensor],
        *,
        ignore_index: int | None = None,
        mask: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> None:
        if not callable(fn):
            raise InvalidArgumentError(f"per_element needs a callable. Received: fn={fn!r}")
        if ignore_index is not None and mask is not None:
            raise InvalidArgumentError(
                "per_element takes ignore_index or mask, not both. Received: "
                f"ignore_index={ignore_index!r}, mask={mask!r}"
            )
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise InvalidArgumentError(
                f"ignore_index must be an int. Received: ignore_index={ignore_index!r}"
            )
        if mask is not None and not callable(mask):
            raise InvalidArgumentError(
                f"mask must be a callable (y_pred, y_true) -> mask. Received: mask={mask!r}"
            )
        self.fn, self.ignore_index, self.mask = fn, ignore_index, mask

    def __call__(self, y_pred: Any, y_true: Any) -> torch.Tensor:
        return self.fn(y_pred, y_true)

    def __repr__(self) -> str:
        counted = (
            f"ignore_index={self.ignore_index}"
            if self.ignore_index is not None
            else ("mask=" + repr(self.mask) if self.mask is not None else "every element")
        )
        return f"per_element({self.fn!r}, {counted})"


def per_element(
    fn: Callable[[Any, Any], torch.Tensor],
    *,
    ignore_index: int | None = None,
    mask: Callable[[Any, Any], torch.Tensor] | None = None,
) -> PerElementLoss:
    """Declare what a custom loss callable returns, so that ``Trainer`` can divide exactly.

    ``fn(y_pred, y_true)`` must return per-element losses (``reduction="none"`` values: at least
    one value per example, the batch axis first), never a batch mean. The window's loss is
    ``sum(w * values over the elements that count) / (number of elements that count)``, summed
    and counted over the whole window -- what ``fn`` followed by a mean over the counted
    elements gives on the concatenated window (HF's ``num_items_in_batch``, done by the trainer).
    Which elements count:

    - default: every value ``fn`` returns;
    - ``ignore_index=i``: ``values`` has the targets' shape (or is them flattened to 1-D, as
      ``F.cross_entropy(logits.view(-1, V), labels.view(-1), reduction="none")``); elements
      whose target is ``i`` count neither in the sum nor in the denominator (``-100``:
      ``F.cross_entropy``'s padding);
    - ``mask=m``: ``m(y_pred, y_true)`` gives a boolean (or 0/1) tensor of ``values``' shape
      (or of the shape 1-D ``values`` were flattened from); the elements where it is true count.

    Example: ``torchref.per_element(lambda logits, y: F.cross_entropy(logits, y,
    reduction="none"), ignore_index=-100)`` trains as ``nn.CrossEntropyLoss()`` on the window.
    ``torch.nn.functional`` losses themselves (``F.cross_entropy``, ``functools.partial`` of
    them) need no wrapper: ``Trainer`` reads them like their module twins. Keras needs no
    declaration: its losses return per-example values and Keras 3 divides a masked loss by
    the count of unmasked elements itself -- ``per_element(fn, mask=m)`` is that contract.

    Several outputs (a model returning a tuple or dict, targets ``y`` of the same kind): ``fn``
    receives both structures as they are and returns one per-element tensor combining the
    heads, e.g. ``ce_i + 0.5 * mse_i`` per example, which trains ``mean(ce) + 0.5 * mean(mse)``
    over the window (Keras' ``loss_weights={...: 1, ...: 0.5}`` on two per-example losses).
    ``ignore_index``, the built-in losses and ``metrics`` read single tensors: with structures
    they are refused before the first backward.
    """
    return PerElementLoss(fn, ignore_index=ignore_index, mask=mask)


def _functional_module(loss: Any) -> nn.Module | None:
    """A ``torch.nn.functional`` loss (or a ``functools.partial`` of one) as its module twin,
    built with the call's keyword arguments; None for anything else."""
    fn, args, keywords = loss, (), {}
    if isinstance(loss, functools.partial):
        fn, args, keywords = loss.func, loss.args, dict(loss.keywords)
    module = _FUNCTIONAL_TWINS.get(fn) if callable(fn) else None
    if module is None:
        return None
    if args:
        raise InvalidArgumentError(
            f"A functools.partial of {fn.__name__} must bind keyword arguments only (the "
            f"trainer passes (y_pred, y_true)). Received: loss={loss!r}"
        )
    try:
        return module(**keywords)
    except TypeError as error:
        raise InvalidArgumentError(
            f"torchref.Trainer reads {fn.__name__} as nn.{module.__name__}, which does not take "
            f"these arguments ({error}). Use a reduction='none' callable wrapped in "
            f"torchref.per_element instead. Received: loss={loss!r}"
        ) from None


class _WindowLoss:
    """``(y_pred, y_true) -> (values, count)``: per-element losses (the trainer differentiates
    ``sum(w * values)``) and the number of loss elements that count in the window's denominator,
    so that ``sum over the window / sum of counts`` is the loss module's reduction on the
    concatenated window. Targets are checked before anything runs (see ``Trainer``)."""

    def __init__(self, loss: Any, device: torch.device | None) -> None:
        self.ignore_index: int | None = None
        self.sparse_labels = False  # the "cross_entropy" name also takes Keras' (N, 1) labels
        self.class_weight: torch.Tensor | None = None
        self.per_batch = False  # KLDivLoss(reduction="batchmean"): one count per example
        self.mask: Callable[[Any, Any], torch.Tensor] | None = None  # per_element(mask=...)
        self.masked = False  # per_element(ignore_index=...): values of the targets' shape
        functional = None if isinstance(loss, (str, nn.Module)) else _functional_module(loss)
        if functional is not None:
            loss = functional
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise InvalidArgumentError(
                    f"Unknown loss name. Expected one of {sorted(LOSSES)}. Received: loss={loss!r}"
                )
            self.fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = LOSSES[loss]
            self.targets = "index" if loss == "cross_entropy" else "keras"
            if loss == "cross_entropy":
                self.sparse_labels = True
                self.ignore_index = -100  # F.cross_entropy's default, as nn.CrossEntropyLoss()
        elif isinstance(loss, nn.modules.loss._Loss):
            self.fn = self._per_element_module(loss, device)
        elif isinstance(loss, PerElementLoss):
            self.fn, self.targets, self.mask = loss.fn, "free", loss.mask
            if loss.ignore_index is not None:
                self.ignore_index, self.masked = loss.ignore_index, True
        elif callable(loss):
            raise InvalidArgumentError(
                "torchref.Trainer cannot see the denominator of a loss callable (a batch mean "
                "averaged per micro-batch is not the window's mean). Pass a torch loss module "
                "or a torch.nn.functional loss (or a functools.partial of one), or wrap a "
                "callable returning per-element losses: torchref.per_element(fn) (every value "
                "counts), per_element(fn, ignore_index=-100) or per_element(fn, mask=m). "
                f"Received: loss={loss!r}"
            )
        else:
            raise InvalidArgumentError(
                "loss must be a name, a torch loss module, a torch.nn.functional loss or "
                f"torchref.per_element(fn). Received: loss={loss!r}"
            )

    def _per_element_module(self, loss: Any, device: torch.device | None) -> nn.Module:
        known = isinstance(loss, (*_ELEMENTWISE_MODULES, *_INDEX_MODULES))
        allowed = ("none", "mean", "batchmean") if isinstance(loss, nn.KLDivLoss) else ("none",)
        if loss.reduction not in allowed + (("mean",) if known else ()):
            raise InvalidArgumentError(
                "torchref.Trainer reduces each window itself: a loss module needs "
                "reduction='mean' (translated for "
                f"{', '.join(c.__name__ for c in (*_ELEMENTWISE_MODULES, *_INDEX_MODULES))}) or "
                "reduction='none' (values divided by their count). reduction='sum' is not "
                f"supported: the contract is the window's mean. Received: loss={loss!r} with "
                f"loss.reduction={loss.reduction!r}"
            )
        self.per_batch = loss.reduction == "batchmean"
        self.targets = "same_shape"
        if isinstance(loss, _INDEX_MODULES):
            self.targets = (
                "index_or_probabilities" if isinstance(loss, nn.CrossEntropyLoss) else "index"
            )
            self.ignore_index = int(cast(int, loss.ignore_index))
            class_weight = cast("torch.Tensor | None", loss.weight)
            if class_weight is not None:
                weight = class_weight.detach().to("cpu", torch.float64)
                if weight.ndim != 1 or not bool(((weight >= 0) & weight.isfinite()).all()):
                    raise InvalidArgumentError(
                        "loss.weight must be one finite weight >= 0 per class (the window's "
                        f"denominator sums them). Received: loss.weight={loss.weight!r}"
                    )
                self.class_weight = weight
        elif not known:
            self.targets = "free"
        per_element = copy.deepcopy(loss)  # the user's module keeps its reduction
        per_element.reduction = "none"
        return per_element if device is None else per_element.to(device)

    def __call__(
        self, y_pred: torch.Tensor, y_true: torch.Tensor
    ) -> tuple[torch.Tensor, int | float | torch.Tensor]:
        if not (isinstance(y_pred, torch.Tensor) and isinstance(y_true, torch.Tensor)):
            y_pred, y_true = self._structures(y_pred, y_true)
            count = None
        else:
            if y_pred.dtype in _LOW_PRECISION:
                y_pred = y_pred.float()  # float16/bfloat16 predictions: the loss in float32
            y_true, index = self._check_targets(y_pred, y_true)
            count = self._count(y_pred, y_true) if index or self.masked else None
            if y_true.device != y_pred.device:
                y_true = y_true.to(y_pred.device)
        values = self.fn(y_pred, y_true)
        if not isinstance(values, torch.Tensor) or values.ndim == 0:
            raise InvalidArgumentError(
                "The loss must return per-element values (reduction='none'), the batch axis "
                "first; a scalar (a batch mean or sum) cannot be divided by the window's count. "
                f"Received: {type(values).__name__} of shape "
                f"{tuple(getattr(values, 'shape', ()))} from loss={self.fn!r}"
            )
        if self.masked or self.mask is not None:
            return self._counted(values, y_pred, y_true, count)
        if count is None:
            count = y_pred.shape[0] if self.per_batch else values.numel()
        return values, count

    def _structures(self, y_pred: Any, y_true: Any) -> tuple[Any, Any]:
        """Several outputs or targets (tuples/lists/dicts, a multi-output model): handed as they
        are to a ``per_element`` loss, which combines them into per-element values (every value
        counts, or ``mask``'s); the targets moved to the predictions' device, low-precision
        predictions to float32. Other losses read one tensor of each: refused."""
        if self.targets != "free" or self.masked:
            raise InvalidArgumentError(
                "This loss takes one prediction tensor and one target tensor (with "
                "ignore_index, the targets tell which elements count). For several outputs or "
                "targets, return per-element values combining them from one callable: "
                "torchref.per_element(fn) or per_element(fn, mask=m). Received: model output of "
                f"type {type(y_pred).__name__} and y of type {type(y_true).__name__} for "
                f"loss={self.fn!r}"
            )
        y_pred = map_structure(lambda t: t.float() if t.dtype in _LOW_PRECISION else t, y_pred)
        device = leaves(y_pred)[0].device
        return y_pred, map_structure(lambda t: t.to(device), y_true)

    def _counted(
        self,
        values: torch.Tensor,
        y_pred: torch.Tensor,
        y_true: torch.Tensor,
        count: int | float | torch.Tensor | None,
    ) -> tuple[torch.Tensor, int | float | torch.Tensor]:
        """``per_element`` values where they count (elsewhere 0, NaN-safe) and their number
        (``count``: already counted on the host for ``ignore_index``)."""
        if self.mask is not None:
            counted = torch.as_tensor(self.mask(y_pred, y_true), device=values.device)
            what = "mask(y_pred, y_true)"
        else:
            assert self.ignore_index is not None  # masked without a mask: by ignore_index
            counted, what = torch.ne(y_true, self.ignore_index), "the targets (ignore_index)"
        if values.ndim == 1 and counted.ndim > 1 and counted.numel() == values.numel():
            # Flattened values, F.cross_entropy(logits.view(-1, V), labels.view(-1)): read back
            # in the targets' row-major layout, so that sample weights meet their examples'
            # rows. Only 1-D: a (T, N) tensor of the same size would pair each value with
            # another element's target.
            values = values.reshape(counted.shape)
        if tuple(counted.shape) != tuple(values.shape):
            raise InvalidArgumentError(
                f"per_element: the loss values have shape {tuple(values.shape)} but "
                f"{what} has shape {tuple(counted.shape)}; they must match (one value per "
                "element that may count), or the values be them flattened (row-major)"
            )
        counted = counted.to(torch.bool)
        return torch.where(counted, values, 0), counted.sum() if count is None else count

    def _check_targets(
        self, y_pred: torch.Tensor, y_true: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        """Targets in the form the loss takes, and whether they are class indices. Shapes are
        host metadata: checking them costs no synchronisation."""
        kind, pred, true = self.targets, tuple(y_pred.shape), tuple(y_true.shape)
        if kind == "free":
            return y_true, False
        if kind == "index_or_probabilities" and y_true.is_floating_point() and true == pred:
            return y_true.to(y_pred.dtype), False  # class probabilities, as torch reads them
        if kind in ("index", "index_or_probabilities"):
            if y_true.is_floating_point() or y_true.dtype == torch.bool or y_true.is_complex():
                raise InvalidArgumentError(
                    "Class-index targets must be integers (floats would be truncated; "
                    "nn.CrossEntropyLoss reads float targets of the predictions' shape as class "
                    f"probabilities). Received: y.dtype={y_true.dtype} with y.shape={true} for "
                    f"predictions of shape {pred}"
                )
            expected = pred[:1] + pred[2:]
            if self.sparse_labels and len(pred) == 2 and true == (pred[0], 1):
                y_true, true = y_true.reshape(-1), expected  # Keras' sparse labels (N, 1)
            if true != expected:
                raise InvalidArgumentError(
                    f"Class-index targets for predictions of shape {pred} (batch, classes, ...) "
                    f"must have shape {expected}. Received: y.shape={true}"
                )
            return (y_true if y_true.dtype == torch.int64 else y_true.long()), True
        if kind == "keras" and len(true) == len(pred) - 1 and pred[-1:] == (1,):
            y_true, true = y_true.unsqueeze(-1), (*true, 1)  # as Keras expands (N,) to (N, 1)
        if true != pred:
            raise InvalidArgumentError(
                f"Targets must have the predictions' shape {pred}; torch would broadcast them "
                f"and train on the wrong loss. Received: y.shape={true}"
            )
        return y_true.to(y_pred.dtype), False

    def check_labels(self, labels: Any, y_pred: torch.Tensor, where: str) -> None:
        """Class-index labels (host arrays/tensors) in ``[0, classes)`` or ``ignore_index``,
        refused naming ``where`` before the micro-batch is added."""
        if not isinstance(y_pred, torch.Tensor):  # several outputs: `_targets` reads or refuses
            return
        if self.targets not in ("index", "index_or_probabilities") or y_pred.ndim < 2:
            return
        if isinstance(labels, torch.Tensor):
            if labels.device.type != "cpu" or labels.is_floating_point():
                return  # a device tensor: not read here (no sync); floats are refused anyway
            labels = labels.numpy()
        if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu":
            check_class_labels(labels, int(y_pred.shape[1]), ignore=self.ignore_index, where=where)

    def _count(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> int | float | torch.Tensor:
        # Counted where the targets live: host targets (the usual case) give a Python number,
        # so the accumulator never waits for the device.
        assert self.ignore_index is not None  # class-index targets: every index loss sets it
        if self.class_weight is None and y_true.device.type == "cpu":
            # NumPy on the tensor's memory: a few microseconds against three torch dispatches.
            return int(np.count_nonzero(y_true.numpy() != self.ignore_index))
        counted = y_true.ne(self.ignore_index)
        if self.class_weight is None:
            total = counted.sum()
        else:
            weight = self.class_weight.to(y_true.device)
            total = (weight[torch.where(counted, y_true, 0)] * counted).sum()
        return total.item() if total.device.type == "cpu" else total


def per_example_loss(loss: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(y_pred, y_true) -> per-element losses``, in the predictions' dtype promoted to at least
    float32 (as ``tfreg.training.per_example_loss``). A loss module built with
    ``reduction="mean"`` gives its ``reduction="none"`` values (ignored entries are 0)."""
    window_loss = _WindowLoss(loss, None)

    def values(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return window_loss(y_pred, y_true)[0]

    return values


def _sparse_categorical_accuracy(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return (y_pred.argmax(-1) == y_true.reshape(-1).long()).double()


def _categorical_accuracy(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return (y_pred.argmax(-1) == y_true.argmax(-1)).double()


def _binary_accuracy(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return ((y_pred > 0.5).double() == y_true.double()).double().mean(-1)


_METRIC_FNS = {
    "sparse_categorical_accuracy": _sparse_categorical_accuracy,
    "categorical_accuracy": _categorical_accuracy,
    "binary_accuracy": _binary_accuracy,
}


def _clip(grads: list[torch.Tensor], spec: TrainerSpec) -> list[torch.Tensor]:
    # Keras' formula g * c / max(||g||, c); torch's clip_grad_norm_ uses ||g|| + 1e-6 instead.
    if spec.clipnorm is not None:
        return [
            g * spec.clipnorm / torch.clamp(torch.linalg.vector_norm(g), min=spec.clipnorm)
            for g in grads
        ]
    if spec.global_clipnorm is not None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = spec.global_clipnorm / torch.clamp(norm, min=spec.global_clipnorm)
        return [g * scale.to(g.dtype) for g in grads]
    return grads


def call_module(module: torch.nn.Module, x: Any) -> Any:
    """``module(x)``; a tuple/list of inputs is passed as positional arguments and a dict as
    keyword arguments (``forward(self, a, b)``), where Keras hands the structure over whole."""
    if isinstance(x, dict):
        return module(**x)
    if isinstance(x, (list, tuple)):
        return module(*x)
    return module(x)


def _host_arrays(structure: Any) -> Any:
    # Tensors given as arrays: NumPy views for the window plan's indexing (`.cpu()` copies a
    # device tensor once, not once per micro-batch).
    return map_structure(
        lambda v: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, structure
    )


def _check_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    # An optimizer built on another module steps parameters the loss never reaches: every
    # "update" would leave the model unchanged.
    own = {id(p) for p in model.parameters()}
    foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]
    if foreign:
        total = sum(len(group["params"]) for group in optimizer.param_groups)
        raise InvalidArgumentError(
            f"optimizer must be built on the model's parameters: {len(foreign)} of its {total} "
            "parameters are not the model's (training would step nothing the loss reaches). "
            f"Received: optimizer={type(optimizer).__name__} over parameters of shapes "
            f"{[tuple(p.shape) for p in foreign][:4]}"
        )


def _per_example(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sample weights ``(N,)`` shaped to multiply per-element ``values`` ``(N, ...)``: one
    weight per example, broadcast over the example's elements (Keras' rule)."""
    if values.shape[0] != w.shape[0]:
        raise InvalidArgumentError(
            f"sample_weight holds one weight per example ({w.shape[0]}), but the loss values "
            f"have shape {tuple(values.shape)}: their first axis must be the batch (values "
            "flattened over the batch, e.g. logits.view(-1, V), are read back in the targets' "
            "layout only with per_element(fn, ignore_index=...) or mask=...)"
        )
    return w.reshape([-1] + [1] * (values.ndim - 1))


def _all_ones(sample_weight: Any) -> bool:
    # Host arrays only: reading a device tensor here would synchronise every micro-batch.
    return isinstance(sample_weight, np.ndarray) and bool(np.all(sample_weight == 1.0))


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient element is finite; one host sync per update (torch has no
    graph-side conditional to keep the decision on the device). A sum is NaN or inf when an
    element is, and only overflows for finite elements near the dtype's maximum: the
    elementwise check runs only then, so the answer is exact and usually costs one reduction
    per parameter (an elementwise isfinite pass over every gradient cost ~1 ms per update on
    the 200k-parameter seed CNN, ~3% of an epoch)."""
    with torch.no_grad():
        if bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all()):
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


@contextlib.contextmanager
def _training_mode(model: torch.nn.Module) -> Iterator[None]:
    """Training mode for one ``fit``, set once: ``model.train()`` when the model is in eval
    mode; a model already in training mode keeps the modes of its submodules (a BatchNorm
    frozen with ``.eval()`` stays frozen). Every submodule's mode is restored on exit."""
    modes = [(module, module.training) for module in model.modules()]
    if not model.training:
        model.train()
    try:
        yield
    finally:
        for module, mode in modes:  # parents first: each child then resets its own subtree
            module.train(mode)


_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _own_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The global RNG state of the CPU and of ``device``'s accelerator, restored on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def _autocast_dtype(autocast: Any) -> torch.dtype | None:
    if autocast is None:
        return None
    dtype = _AUTOCAST_DTYPES.get(autocast) if isinstance(autocast, str) else autocast
    if dtype not in _AUTOCAST_DTYPES.values():
        raise InvalidArgumentError(
            "autocast must be None, 'bfloat16', 'float16', torch.bfloat16 or torch.float16. "
            f"Received: autocast={autocast!r}"
        )
    return dtype


class LossScale:
    """Loss scaling under ``autocast``, once per window. ``autocast="float16"``: dynamic,
    torch.amp.GradScaler's rule (``init_scale``, ``growth_factor``, ``backoff_factor``,
    ``growth_interval``, read from a ``torch.amp.GradScaler`` when one is given) applied to
    the accumulated window::

        backward(scale / u * sum(w * l))  per micro-batch   (u: see ``unit``)
        g = sums / (N_W * scale / u)      once per window (unscale)
        non-finite g: the window is skipped (weights and optimizer state untouched),
                      scale *= backoff_factor, tracker = 0
        else: step; tracker += 1; tracker == growth_interval: scale *= growth_factor, tracker = 0

    ``u`` (``unit``) is fixed at a window's first micro-batch: its loss-element count times
    ``accumulation_steps``, i.e. ``N_W`` for equal micro-batches. It makes each micro-batch's
    float16 backward carry the values a GradScaler loop's ``backward(scale * mean over W)``
    carries, so the two overflow on the same windows (the micro-batch's *sum* times ``scale``
    would overflow ``log2(N_W)`` halvings earlier). The scale and tracker live on the host:
    no synchronisation beyond the finiteness check every update already has.

    ``autocast="bfloat16"`` (``dynamic=False``): ``scale`` stays 1 and only ``u`` applies, so
    each micro-batch's bf16 backward carries the values of the plain loop's ``backward(mean)``
    and every bf16 rounding falls where the loop's does (one micro-batch per window with a
    host count: bitwise, whatever the count; back-propagating the sum and dividing afterwards
    was 8e-3 off). Where the count is a device tensor (a ``mask``, class weights on the GPU),
    ``u`` is the micro-batch size times ``accumulation_steps``: no host sync, one rounding."""

    def __init__(self, scaler: Any = None, *, dynamic: bool = True) -> None:
        self.dynamic = dynamic
        if not dynamic:  # bfloat16: float32's range, no scaling, only the unit
            self.scale, self.growth_factor, self.backoff_factor = 1.0, 1.0, 1.0
            self.growth_interval, self.growth_tracker, self.unit = 1, 0, 1.0
            return
        if scaler is None:
            scaler = torch.amp.GradScaler("cpu")  # its defaults; only its settings are read
        if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
            raise InvalidArgumentError(
                "grad_scaler must be an enabled torch.amp.GradScaler (its init_scale, "
                "growth_factor, backoff_factor and growth_interval are used once per window). "
                f"Received: grad_scaler={scaler!r}"
            )
        self.scale = float(scaler.get_scale())
        self.growth_factor = float(scaler.get_growth_factor())
        self.backoff_factor = float(scaler.get_backoff_factor())
        self.growth_interval = int(scaler.get_growth_interval())
        self.growth_tracker = 0
        self.unit = 1.0

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "unit": self.unit}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.unit = float(state["unit"])


class _Engine:
    """The PyTorch half of ``Trainer``: one micro-batch into the accumulator, one update from it.

    Where a parameter and its accumulator sum share a dtype, the sum *is* the parameter's
    ``.grad`` during ``fit``: ``backward()`` adds each micro-batch's gradient into it in place,
    as a hand-written accumulation loop does. Only a window's first gradient of a parameter is
    copied into the sum (``.grad`` is None until then, so that backward tells which
    parameters it reaches: see ``touched``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: Any,
        optimizer: torch.optim.Optimizer,
        spec: TrainerSpec,
        regularizer: Any,
        proximal: Proximal | None,
        autocast: torch.dtype | None = None,
        loss_scale: LossScale | None = None,
        moments: WindowMoments | None = None,
    ) -> None:
        self.model, self.optimizer, self.spec = model, optimizer, spec
        self.moments = moments  # batchnorm="per_window": the window's BatchNorm moments
        self.autocast, self.loss_scale = autocast, loss_scale
        self.regularizer, self.proximal = regularizer, proximal
        # Every parameter the optimizer steps or that is trainable now: one frozen now may be
        # unfrozen between updates. Which of them take part is read per window (`touched`).
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.params = [p for p in model.parameters() if p.requires_grad or id(p) in stepped]
        if not any(p.requires_grad for p in self.params):
            raise InvalidArgumentError("The model has no trainable parameters.")
        self.acc = accumulation.init(self.params)
        self.in_grad = all(
            s.dtype == p.dtype for s, p in zip(self.acc.sums, self.params, strict=True)
        )
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.loss = _WindowLoss(loss, self.device)
        # torch.distributed initialised: this rank's share, DDP's no_sync, one reduction/update.
        self.group = process_group(model, self.params, accumulates_in_grad=self.in_grad)
        # Set by the driver before each micro-batch. Left True (a driver that never says),
        # DDP syncs every micro-batch: still exact (it averages the accumulated .grad, whose
        # already-reduced part is equal on every rank), only k all-reduces instead of one.
        self.closes = True
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_sum = zero.clone()
        self.weight_sum = zero.clone()
        self.metric_sums = [zero.clone() for _ in spec.metrics]
        # On a process group: this rank's examples in the window, all-reduced with the stats so
        # that History's `examples` is the global window's for a DataLoader shard too.
        self.examples = zero.clone()
        self.position = Position().as_tuple()
        # Per parameter: whether the open window gave it a gradient (host flags, no sync). One
        # that none reached keeps `.grad` None at the step, so the optimizer skips it as in a
        # plain loop (a zero gradient would still move it by momentum or decoupled decay).
        self.touched = [False] * len(self.params)
        # Set by Trainer.fit: the array labels to check at the first micro-batch (when the
        # model's class count is known), and whether the data are arrays (else a stream).
        self.labels: Any = None
        self.array_data = False

    def _tensors(self, structure: Any, dtype: torch.dtype | None = None) -> Any:
        # Floating inputs are cast to `dtype` (as Keras casts inputs to the layer's dtype).
        def convert(value: Any) -> torch.Tensor:
            tensor = torch.as_tensor(value, device=self.device)
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

        return map_structure(convert, structure)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Around one ``fit``: training mode, and the parameters' ``.grad`` released after."""
        attached = contextlib.nullcontext() if self.moments is None else self.moments.attached()
        try:
            with _training_mode(self.model), attached:
                yield
        finally:
            for p in self.params:
                p.grad = None

    def begin_micro_batch(self, closes: bool) -> None:
        """Told by the driver before each micro-batch: whether it closes its window (under DDP
        only the closing micro-batch's backward synchronises)."""
        self.closes = closes

    def micro_step(self, x: Any, y: Any, sample_weight: Any) -> None:
        if self.proximal is not None and self.acc.micro_batches == 0:
            # A scheduler's negative/NaN rate, refused before the window holds anything.
            self.proximal.check_rates(self.optimizer)
        if self.group is None:
            return self._micro_step(x, y, sample_weight)
        x, y, sample_weight = self.group.local(x, y, sample_weight)
        self.examples.add_(leading_dim(y))
        with self.group.micro_batch(self.closes):
            return self._micro_step(x, y, sample_weight)

    def _micro_step(self, x: Any, y: Any, sample_weight: Any) -> None:
        y_pred = self._forward(x)
        if self.labels is not None:  # arrays: the whole y once per fit, before any update
            labels, self.labels = self.labels, None
            self.loss.check_labels(labels, y_pred, "y")
        elif not self.array_data:  # a stream: each micro-batch before its window is applied
            epoch, micro_batch = self.position[:2]
            self.loss.check_labels(y, y_pred, f"micro-batch {micro_batch} of epoch {epoch}: y")
        y_host = self._targets(y_pred, y)
        values, count = self.loss(y_pred, y_host)
        if sample_weight is None or _all_ones(sample_weight):
            sample_weight = None  # unweighted: no weight tensor, no product to differentiate
            loss_sum = values.sum()
        else:
            w = torch.as_tensor(sample_weight, device=self.device)
            loss_sum = torch.sum(values * _per_example(w.to(values.dtype), values))
        scaled = loss_sum
        if self.loss_scale is not None:
            if self.acc.micro_batches == 0:
                # Ranks must agree on the unit: on a process group it is 1 per micro-batch.
                unit = count if isinstance(count, (int, float)) else leading_dim(y_host)
                unit = 1.0 if self.group is not None else max(float(unit), 1.0)
                self.loss_scale.unit = unit * self.spec.accumulation_steps
            scaled = loss_sum * (self.loss_scale.scale / self.loss_scale.unit)
        if self.in_grad:
            self._expose_sums()
            scaled.backward()
            for i, (p, total) in enumerate(zip(self.params, self.acc.sums, strict=True)):
                if p.grad is not None and p.grad is not total:
                    # The window's first gradient (backward created .grad), or torch replaced
                    # .grad by .grad + g instead of adding in place: into the sum.
                    total.copy_(p.grad)
                    p.grad = total
                    self.touched[i] = True
            # The gradients are in the sums already; what add() would do with no gradients,
            # without re-checking shapes the sums have by construction (count >= 0 is
            # guaranteed by _WindowLoss: element counts or sums of weights validated >= 0).
            self.acc.count.add_(count)
            self.acc.micro_batches += 1
        else:
            grads = self._grads(scaled)
            accumulation.add(self.acc, grads, count)
            for i, g in enumerate(grads):
                self.touched[i] = self.touched[i] or g is not None
        self.loss_sum.add_(loss_sum.detach())
        if self.metric_sums:
            with torch.no_grad():
                w = torch.ones(len(values), device=self.device) if sample_weight is None else w
                self.weight_sum.add_(w.sum())
                for name, total in zip(self.spec.metrics, self.metric_sums, strict=True):
                    total.add_(torch.sum(_METRIC_FNS[name](y_pred, y_host.to(self.device)) * w))

    def _targets(self, y_pred: Any, y: Any) -> Any:
        """``y`` as host tensors (a structure of them for a multi-output ``per_element``
        loss); metrics read one prediction and one target tensor, so structures with metrics
        are refused here, before the micro-batch's backward."""
        y_host = map_structure(torch.as_tensor, y)
        if self.spec.metrics and not (
            isinstance(y_pred, torch.Tensor) and isinstance(y_host, torch.Tensor)
        ):
            raise InvalidArgumentError(
                f"metrics={list(self.spec.metrics)} read one prediction tensor and one target "
                "tensor; with several outputs or targets compute them in a callback. Received: "
                f"model output of type {type(y_pred).__name__} and y of type {type(y).__name__}"
            )
        return y_host

    def _forward(self, x: Any) -> Any:
        xb = self._tensors(x, self.dtype)
        if self.autocast is None:
            return call_module(self.model, xb)
        # Entered per micro-batch: leaving it clears autocast's cache of low-precision weight
        # copies, which would otherwise go stale once the optimizer steps.
        with torch.autocast(self.device.type, dtype=self.autocast):
            return call_module(self.model, xb)

    @torch.no_grad()
    def evaluate(self, batches: Callable[[], Iterable[tuple[Any, Any, Any]]]) -> dict[str, float]:
        """``val_loss`` (the data loss over the batches ``batches()`` yields -- ``sum(w * l) / N``
        with the training loss's count -- plus the penalty at the current weights, as Keras'
        val_loss includes the regularization losses), ``val_data_loss`` and ``val_<metric>``, in
        eval mode (Dropout off, BatchNorm's running statistics), as Keras evaluates with
        ``training=False``; every submodule's mode is restored after. One host read.

        ``batches()`` is called, and the pass runs, on a fork of the global RNG (:func:`_own_rng`):
        iterating a ``DataLoader`` draws its base seed (a shuffled one also its permutation) from
        torch's default generator, which training's shuffle and Dropout read; without the fork,
        adding ``validation_data`` would change the training run and a resumed run would differ
        from the uninterrupted one (Keras' validation leaves training's numbers alone too)."""
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_sum, count, weight_sum = zero.clone(), zero.clone(), zero.clone()
        metric_sums = [zero.clone() for _ in self.spec.metrics]
        seen = 0
        with _own_rng(self.device):
            try:
                for x, y, sample_weight in batches():
                    seen += 1
                    y_pred = self._forward(x)
                    y_host = self._targets(y_pred, y)
                    values, n = self.loss(y_pred, y_host)
                    w = torch.ones(len(values), device=self.device, dtype=torch.float64)
                    if sample_weight is not None:
                        w = torch.as_tensor(sample_weight, device=self.device).to(torch.float64)
                    loss_sum.add_(torch.sum(values.double() * _per_example(w, values)))
                    count.add_(n)
                    weight_sum.add_(w.sum())
                    for name, total in zip(self.spec.metrics, metric_sums, strict=True):
                        total.add_(torch.sum(_METRIC_FNS[name](y_pred, y_host.to(self.device)) * w))
            finally:
                for module, mode in modes:
                    module.train(mode)
        if not seen:
            raise InvalidArgumentError(
                "validation_data yielded no batch (an exhausted iterator?): pass arrays or a "
                "re-iterable (a list, a DataLoader). Received: an empty validation pass"
            )
        data_loss = torch.where(count > 0, loss_sum / torch.where(count > 0, count, 1.0), 0.0)
        penalty = zero
        if self.regularizer is not None:
            penalty = _penalty(self.model, self.regularizer, include_bias=self.spec.include_bias)
        results = [data_loss + penalty.double(), data_loss]
        results += [total / weight_sum for total in metric_sums]
        fetched = torch.stack(results).tolist()
        logs = {"val_loss": fetched[0], "val_data_loss": fetched[1]}
        logs.update({f"val_{m}": v for m, v in zip(self.spec.metrics, fetched[2:], strict=True)})
        return logs

    def _expose_sums(self) -> None:
        """Each sum as its parameter's ``.grad`` for ``backward()`` to add into -- only where
        the window has reached the parameter: elsewhere ``.grad`` is None, so that backward
        reports which parameters it reaches. On a process group every trainable parameter
        takes part (DDP reduces each one's ``.grad``; the ranks must agree on the set)."""
        for i, (p, total) in enumerate(zip(self.params, self.acc.sums, strict=True)):
            if self.group is not None and p.requires_grad:
                self.touched[i] = True
            p.grad = total if self.touched[i] else None

    def _grads(self, value: torch.Tensor) -> list[torch.Tensor | None]:
        """``d value / d p`` for each parameter trainable now; None where it is frozen or not
        reached (on a process group, zeros for every trainable one, as ``_expose_sums``)."""
        trainable = [p for p in self.params if p.requires_grad]
        found = iter(
            torch.autograd.grad(value, trainable, allow_unused=True) if value.requires_grad else ()
        )
        grads = [next(found, None) if p.requires_grad else None for p in self.params]
        if self.group is not None:
            grads = [
                torch.zeros_like(p) if g is None and p.requires_grad else g
                for g, p in zip(grads, self.params, strict=True)
            ]
        return grads

    @torch.no_grad()
    def _window_gradient(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        # sums / count, in place. A window whose every loss element is ignored has count 0 and
        # zero sums: its data gradient is 0 (torch's mean would be 0/0 = NaN).
        divisor = torch.where(self.acc.count > 0, self.acc.count, 1.0)
        unscale = divisor
        if self.loss_scale is not None:  # the sums hold scale / unit times the gradient
            unscale = divisor * (self.loss_scale.scale / self.loss_scale.unit)
        if self.in_grad:
            by_dtype = {total.dtype: unscale.to(total.dtype) for total in self.acc.sums}
            for total in self.acc.sums:
                total.div_(by_dtype[total.dtype])
            return list(self.acc.sums), divisor
        grads = [
            (s / unscale.to(s.dtype)).to(p.dtype)
            for s, p in zip(self.acc.sums, self.params, strict=True)
        ]
        return grads, divisor

    def apply_step(self) -> dict[str, Any]:
        if self.group is not None:  # the global window: before the division and the penalty
            stats = [self.acc.count, self.loss_sum, self.weight_sum, self.examples]
            self.group.reduce(self.acc.sums, [*stats, *self.metric_sums])
        grads, divisor = self._window_gradient()
        if self.regularizer is not None:
            pen = _penalty(self.model, self.regularizer, include_bias=self.spec.include_bias)
            with torch.no_grad():
                for i, (g, p) in enumerate(zip(grads, self._grads(pen), strict=True)):
                    if p is not None:
                        g.add_(p)
                        self.touched[i] = True
            pen = pen.detach().double()
        else:
            pen = torch.zeros((), dtype=torch.float64, device=self.device)
        stepped = [i for i, reached in enumerate(self.touched) if reached]
        finite = _all_finite([grads[i] for i in stepped]) if stepped else True
        if finite and self.proximal is not None:
            try:  # a rate changed mid-window: refused before the step, the window consumed
                self.proximal.check_rates(self.optimizer)
            except InvalidArgumentError:
                self._reset_window()
                raise
        if finite:
            for p in self.params:
                p.grad = None  # not reached in this window: skipped by the optimizer
            clipped = _clip([grads[i] for i in stepped], self.spec)
            for i, g in zip(stepped, clipped, strict=True):
                self.params[i].grad = g
            self.optimizer.step()
            if self.proximal is not None:  # the rate of the step just taken, once per update
                self.proximal.apply(self.model, self.optimizer)
        if self.loss_scale is not None:  # once per window, as GradScaler.update per step
            self.loss_scale.update(finite)
        if self.moments is not None:  # the forward passes happened, finite or not
            self.moments.close()
        data_loss = self.loss_sum / divisor
        values = {
            "loss": data_loss + pen,
            "data_loss": data_loss,
            "penalty": pen,
            # N_W, the denominator (sum of class weights for weighted class indices); the
            # record key tfreg's History uses too.
            "elements": self.acc.count.clone(),
            "skipped": not finite,
        }
        for name, total in zip(self.spec.metrics, self.metric_sums, strict=True):
            values[name] = total / self.weight_sum
        if self.group is not None:  # the global window's (a shard's host count is its own)
            values["examples"] = self.examples.clone()
        self._reset_window()
        # Raised only now, with the window consumed (as tfreg does): a later fit() must not
        # re-apply the non-finite window.
        if not finite and self.spec.on_nonfinite == "raise":
            raise FloatingPointError(NONFINITE_MESSAGE)
        return values

    def discard_window(self) -> None:
        """``drop_remainder`` on a stream: the short window's sums are thrown away."""
        self._reset_window()

    def _reset_window(self) -> None:
        # After the update that consumed the window (in place: checkpoints hold copies).
        accumulation.reset(self.acc)
        if self.moments is not None:
            self.moments.reset()
        self.touched = [False] * len(self.params)
        for total in [self.loss_sum, self.weight_sum, self.examples, *self.metric_sums]:
            total.zero_()

    def fetch(self, values: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        if "examples" in out:  # reduced as float64 (exact): the record's integer
            out["examples"] = int(out["examples"])
        return out

    def get_position(self) -> tuple[int, ...]:
        return self.position

    def set_position(self, position: tuple[int, ...]) -> None:
        self.position = tuple(int(v) for v in position)


class Trainer:
    """A PyTorch training loop with exact gradient accumulation; ``tfreg.Trainer``'s twin.

    Formula per update (window ``W`` of ``accumulation_steps`` micro-batches)::

        g = sum_{i in W} grad(w_i * l_i) / N_W + grad(penalty(model, regularizer))
        g = clip(g);  optimizer.step()                # once per window

    ``proximal=torchref.ProximalL1(l1=...)`` soft-thresholds once per applied update, right after
    ``optimizer.step()`` (run any LR scheduler after ``fit``'s update, i.e. in a callback).
    Coupled ``weight_decay`` of a torch optimizer equals ``L2.from_torch_weight_decay(wd)`` on the
    TensorFlow side; decoupled decay (``AdamW``) happens in ``optimizer.step`` once per update.
    Checkpoint/resume: ``trainer.state_dict()`` holds model, optimizer, accumulator and position;
    ``load_state_dict`` on a fresh trainer continues ``fit`` where it stopped, mid-window included;
    ``epochs`` is the total to train up to, as in ``tfreg.Trainer``. The checkpoint also holds
    the torch RNG state Dropout draws from (the CPU generator, and the CUDA generators when the
    model is on CUDA), which ``load_state_dict`` restores: a resumed Dropout model is
    bit-identical to an uninterrupted run. Floating inputs are cast to the parameters' dtype
    (Keras casts inputs to its layers' dtype; torch would raise).

    Parameters as torch sees them: the candidates are the model's trainable parameters and
    those the optimizer holds; ``requires_grad`` is read each window. A parameter no gradient
    reached in a window (frozen, an unused head) has ``.grad`` None at the step, so the
    optimizer skips it (no momentum, no decoupled decay), as a plain loop with
    ``zero_grad(set_to_none=True)`` does; one unfrozen later trains from then on. On a process
    group every parameter trainable in the window takes part (DDP reduces each one's
    ``.grad``; an unused one is stepped with a zero gradient there).

    Mixed precision: ``autocast=torch.bfloat16`` (or ``"bfloat16"``) runs each micro-batch's
    forward under ``torch.autocast`` on the parameters' device (entered per micro-batch, so its
    cache of low-precision weight copies never outlives an update); the parameters (master
    weights), accumulators and the loss stay float32 (the model must be float32).
    ``autocast="float16"`` adds dynamic loss scaling once per window (see :class:`LossScale`:
    torch.amp.GradScaler's rule; ``grad_scaler=torch.amp.GradScaler(...)`` sets its
    ``init_scale``/``growth_factor``/``backoff_factor``/``growth_interval``): an overflowing
    window is skipped (``skipped`` in its record; weights and optimizer state unchanged) and
    the scale halves; the scale is in ``state_dict()``. ``fit`` inside a user's
    ``torch.autocast`` is refused (its weight cache would go stale after the first step).
    Differences from a plain autocast loop on the concatenated window: each micro-batch's
    weight gradient is rounded to the low precision before the float32 sum (≤ (k+1)·2^-9 of
    an update for bfloat16, (k+1)·2^-11 for float16; bitwise equal for k=1 when the count is
    read on the host -- targets on the CPU, no per_element ``mask`` -- since each micro-batch's
    backward is then scaled by exactly ``1 / N``, see :class:`LossScale`). Differences from
    Keras' ``mixed_float16`` (``LossScaleOptimizer``): Keras starts at ``initial_scale=2**15``,
    GradScaler at ``init_scale=2**16`` (both double after 2000 finite steps and halve on an
    overflow): ``grad_scaler=torch.amp.GradScaler(init_scale=2.0**15)`` starts where Keras does.

    Modes: ``fit`` calls ``model.train()`` once when the model is in eval mode; a model already
    in training mode keeps its submodules' modes (a BatchNorm frozen with ``.eval()`` keeps its
    running statistics). Every submodule's mode is restored when ``fit`` returns or raises.
    BatchNorm: each micro-batch is normalised with its own statistics; by default
    (``batchnorm="per_micro_batch"``, warned at construction) the running statistics are
    updated per micro-batch; ``batchnorm="per_window"`` updates them once per window with the
    window's pooled moments (torch's momentum and unbiased variance, ``num_batches_tracked``
    +1 per window), as one training-mode forward on the concatenated window does
    (:mod:`torchref.batchnorm`; refused on a process group). Gradients are the same in both.
    During ``fit`` each parameter's ``.grad`` is its accumulator sum once the window has
    reached it (``backward()`` adds into it, as in a hand-written loop), None before;
    ``fit`` leaves ``.grad`` at None. See the module docstring
    for losses, counts and the set-ups refused before any update.

    On a ``torch.distributed`` process group initialised before the trainer is built (module
    optionally wrapped in ``DistributedDataParallel``) ``batch_size`` is per rank and an update
    is one step on the concatenated window of all ranks: see :mod:`torchref.distributed`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: Any,
        optimizer: torch.optim.Optimizer,
        *,
        accumulation_steps: int = 1,
        regularizer: Any = None,
        include_bias: bool = False,
        clipnorm: float | None = None,
        global_clipnorm: float | None = None,
        on_nonfinite: str = "skip",
        drop_remainder: bool = False,
        jit_compile: bool = False,
        metrics: Sequence[str] = (),
        seed: int = 0,
        proximal: Proximal | dict[str, Any] | Sequence[Any] | None = None,
        autocast: str | torch.dtype | None = None,
        grad_scaler: Any = None,
        batchnorm: str = "per_micro_batch",
    ) -> None:
        self.spec = TrainerSpec(
            accumulation_steps=accumulation_steps,
            include_bias=include_bias,
            clipnorm=clipnorm,
            global_clipnorm=global_clipnorm,
            on_nonfinite=on_nonfinite,
            drop_remainder=drop_remainder,
            jit_compile=jit_compile,
            metrics=metrics,
            seed=seed,
        )
        if self.spec.jit_compile:
            raise InvalidArgumentError(
                "torchref.Trainer runs eagerly; jit_compile must be False. Received: "
                "jit_compile=True"
            )
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgumentError(
                f"model must be a torch.nn.Module. Received: model={model!r}"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(
                f"optimizer must be a torch.optim.Optimizer. Received: optimizer={optimizer!r}"
            )
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.regularizer = None if regularizer is None else _get_regularizer(regularizer)
        self.proximal = resolve_proximal(proximal, PROXIMAL_CLASSES, optimizer)
        if self.proximal is not None:  # an axis out of range, before the first step
            self.proximal.check_model(model)
        _check_optimizer(optimizer, model)
        if self.regularizer is not None and any(g.get("maximize") for g in optimizer.param_groups):
            raise InvalidArgumentError(
                "A regularizer is a penalty added to the loss; an optimizer with maximize=True "
                "would maximize it too and grow the weights (coupled weight_decay, which "
                "L2.from_torch_weight_decay mirrors, still shrinks them under maximize: torch "
                "adds wd * w after negating the gradient). Keep weight_decay in the optimizer, "
                f"or minimize the negated objective. Received: regularizer={self.regularizer!r} "
                f"with {type(optimizer).__name__}(maximize=True)"
            )
        self.autocast = _autocast_dtype(autocast)
        loss_scale = _check_mixed_precision(model, self.autocast, grad_scaler, self.spec)
        self.batchnorm = _check_batchnorm_mode(batchnorm)
        moments = _window_moments(model, self.batchnorm, self.spec.accumulation_steps)
        self._engine = _Engine(
            model,
            loss,
            optimizer,
            self.spec,
            self.regularizer,
            self.proximal,
            self.autocast,
            loss_scale,
            moments,
        )
        if moments is not None and self._engine.group is not None:
            raise InvalidArgumentError(
                'batchnorm="per_window" is not available on a process group (each rank\'s '
                "BatchNorm sees its own share; use SyncBatchNorm). Received: "
                'batchnorm="per_window" with torch.distributed initialised'
            )
        self.stop_training = False
        # The digest of the arrays the last fit trained on ("": none, or a stream), recorded in
        # state_dict()["run"]: a mid-epoch resume on other data is refused (run_fit).
        self.data_digest = ""
        # The digest a restored state recorded, checked by the next fit (run_fit) only.
        self.resumed_data_digest = ""

    @property
    def accumulator(self) -> accumulation.AccumulatorState:
        return self._engine.acc

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed ``fit`` needs, mid-window included (tensors are copies)."""
        e = self._engine
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": _clone(self.optimizer.state_dict()),
            "accumulator": e.acc.state_dict(),
            "metrics": list(self.spec.metrics),
            "window": {
                "loss_sum": e.loss_sum.clone(),
                "weight_sum": e.weight_sum.clone(),
                "examples": e.examples.clone(),
                "metric_sums": [m.clone() for m in e.metric_sums],
                "position": list(e.position),
                "touched": list(e.touched),
            },
            "rng": _rng_state(e.device),
            **({} if e.loss_scale is None else {"loss_scale": e.loss_scale.state_dict()}),
            **({} if e.moments is None else {"batchnorm": e.moments.state_dict()}),
            "run": checkpoint.run_fingerprint(
                self, "1/0" if e.group is None else f"{e.group.world_size}/{e.group.rank}"
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``. The whole state is checked first
        (:func:`torchref.checkpoint.check_state`): a state of another run (accumulation steps,
        seed, optimizer class, model structure, metrics, world size), an incomplete one, or one
        with a tensor of another shape/dtype, a position outside the plan or a negative count
        is refused before anything is restored."""
        checkpoint.check_state(self, state)
        e = self._engine
        if e.moments is not None:
            e.moments.check_state(state["batchnorm"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        e.acc.load_state_dict(state["accumulator"])
        window = state["window"]
        e.loss_sum = window["loss_sum"].clone()
        e.weight_sum = window["weight_sum"].clone()
        e.examples = window["examples"].clone()  # this rank's, in the open window
        e.metric_sums = [m.clone() for m in window["metric_sums"]]
        # Which parameters the open window reached; a state written before it was saved: the
        # trainable ones, when the window holds micro-batches.
        open_window = e.acc.micro_batches > 0
        e.touched = [bool(t) for t in window.get("touched", [])] or [
            open_window and p.requires_grad for p in e.params
        ]
        e.set_position(tuple(window["position"]))
        _set_rng_state(state["rng"])
        if e.loss_scale is not None:
            e.loss_scale.load_state_dict(state["loss_scale"])
        if e.moments is not None:
            e.moments.load_state_dict(state["batchnorm"])
        self.data_digest = state["run"].get("data", "")  # "" (a record without it): unknown
        self.resumed_data_digest = self.data_digest

    def fit(
        self,
        x: Any,
        y: Any = None,
        *,
        batch_size: int | None = None,
        epochs: int = 1,
        shuffle: bool = True,
        sample_weight: Any = None,
        steps_per_epoch: int | None = None,
        validation_data: Any = None,
        callbacks: Sequence[Any] | None = None,
        verbose: int = 1,
    ) -> History:
        """Train; returns one :class:`History` record per update (see ``tfreg_core.training``).

        ``x``/``y``: arrays or tensors (dicts/tuples of them for multi-input models: a tuple is
        passed to ``forward`` as positional arguments, a dict as keyword arguments), cut into
        micro-batches of ``batch_size``; a ``TensorDataset`` of ``(x, y)`` or ``(x, y, w)``
        is the same arrays. Or ``y=None`` and ``x`` a ``DataLoader`` / any iterable of
        ``(x, y)`` or ``(x, y, w)`` micro-batches (``batch_size``/``sample_weight`` None,
        ``steps_per_epoch`` for infinite ones; the loader's own order, so ``shuffle`` does
        not apply; a sampler with ``set_epoch``, e.g. ``DistributedSampler``, gets
        ``set_epoch(epoch)`` before each epoch, as in a torch loop), as in ``tfreg.Trainer.fit``.

        ``validation_data``: ``(x, y)`` / ``(x, y, sample_weight)`` arrays or tensors (in
        batches of ``batch_size``, 32 for streams) or an iterable of such micro-batches (a
        ``DataLoader``), checked before the first update and evaluated after each epoch's last
        update (:meth:`_Engine.evaluate`: eval mode, no gradient); ``history.epochs`` gets
        ``val_loss``, ``val_data_loss`` and ``val_<metric>``, so early stopping is a callback
        reading them in ``on_epoch_end(trainer, epoch, history)`` and setting
        ``trainer.stop_training``, as Keras' ``EarlyStopping`` does. ``val_data_loss`` is the
        whole validation set's ``sum(w * l) / N`` (one division, the training loss's count);
        differences from Keras' ``fit``: no ``validation_split``, ``validation_steps`` or
        ``validation_freq`` (validation runs after every epoch, on all the data given), and
        the pass never draws from the global RNG (see :meth:`_Engine.evaluate`).
        """
        _refuse_outer_autocast(self._engine.device)
        if isinstance(x, torch.utils.data.TensorDataset) and y is None and sample_weight is None:
            x, y, sample_weight = _tensor_dataset(x)
        elif isinstance(x, torch.utils.data.Dataset) and not isinstance(
            x, torch.utils.data.IterableDataset
        ):
            raise InvalidArgumentError(
                "A map-style Dataset yields single examples: pass DataLoader(dataset, "
                f"batch_size=...) (its micro-batches) instead. Received: x={type(x).__name__}"
            )
        arrays = (_host_arrays(x) if y is not None else x, _host_arrays(y))
        weights = _host_arrays(sample_weight)
        options = dict(epochs=epochs, shuffle=shuffle, verbose=verbose)
        data = fit_data(
            *arrays, weights, batch_size=batch_size, steps_per_epoch=steps_per_epoch, **options
        )
        group = self._engine.group
        if group is not None and isinstance(data, ArrayData):
            # batch_size is per rank: plan the epoch in global micro-batches of R*b, each rank
            # then trains on its share (a DataLoader is already the rank's own shard).
            global_batch = group.global_batch(
                data.batch_size,
                self.spec.accumulation_steps,
                data.plan[0],
                (data.x, data.y, data.sample_weight),
            )
            data = fit_data(*arrays, weights, batch_size=global_batch, **options)
        elif group is not None:
            group.check_shards(x, steps_per_epoch)
        if isinstance(validation_data, torch.utils.data.TensorDataset):
            validation_data = tuple(v for v in _tensor_dataset(validation_data) if v is not None)
        elif isinstance(validation_data, torch.utils.data.Dataset) and not isinstance(
            validation_data, torch.utils.data.IterableDataset
        ):
            raise InvalidArgumentError(
                "A map-style Dataset yields single examples: pass validation_data="
                "DataLoader(dataset, batch_size=...) instead. Received: validation_data="
                f"{type(validation_data).__name__}"
            )
        if isinstance(validation_data, tuple):
            validation_data = _host_arrays(validation_data)
        validation = validation_batches(validation_data, batch_size)
        if validation is not None:
            self._check_validation(validation_data, validation, epochs)
        if not isinstance(data, ArrayData):
            callbacks = [*_sampler_epochs(x), *(callbacks or [])]
        engine = self._engine
        engine.array_data = isinstance(data, ArrayData)
        engine.labels = data.y if isinstance(data, ArrayData) else None
        with engine.session():
            return run_fit(
                engine,
                self,
                self.spec,
                data,
                epochs=epochs,
                callbacks=callbacks,
                verbose=verbose,
                validate=None if validation is None else lambda: engine.evaluate(validation),
            )

    def _check_validation(
        self, validation_data: Any, validation: Callable[[], Iterable[Any]], epochs: int
    ) -> None:
        """Before the first update: an iterator (one pass) is refused when more than one epoch
        is left, and the first validation batch goes through the model (eval mode, no
        gradient: nothing changes) and the loss's target checks."""
        left = epochs - Position(*self._engine.get_position()).epoch
        if isinstance(validation_data, Iterator):  # iter() on a DataLoader would draw RNG
            if left > 1:
                raise InvalidArgumentError(
                    "validation_data is evaluated after every epoch, but an iterator yields "
                    f"one pass and {left} epochs are left: pass arrays or a re-iterable (a "
                    f"list, a DataLoader). Received: validation_data="
                    f"{type(validation_data).__name__}"
                )
            return  # one pass, kept for the one validation
        self._engine.evaluate(lambda: itertools.islice(validation(), 1))

    def get_config(self) -> dict[str, Any]:
        """The keyword arguments (model, loss and optimizer are positional and not included)."""
        config = self.spec.get_config()
        config["regularizer"] = object_config(self.regularizer)
        config["proximal"] = object_config(self.proximal)
        config["autocast"] = None if self.autocast is None else str(self.autocast).split(".")[-1]
        config["batchnorm"] = self.batchnorm
        return config


def _check_mixed_precision(
    model: torch.nn.Module, autocast: torch.dtype | None, grad_scaler: Any, spec: TrainerSpec
) -> LossScale | None:
    """The loss scale ``autocast`` trains with (None without autocast), after checking that
    the master weights are float32 and the options fit together."""
    if grad_scaler is not None and autocast != torch.float16:
        raise InvalidArgumentError(
            "grad_scaler configures the loss scaling of autocast='float16' (bfloat16 has "
            f"float32's range and needs none). Received: grad_scaler={grad_scaler!r} with "
            f"autocast={autocast}"
        )
    if autocast is None:
        return None
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    if dtypes != ["torch.float32"]:
        raise InvalidArgumentError(
            "autocast trains float32 master weights (and float32 accumulators) with "
            f"{autocast} forward ops: the model's parameters must be float32. Received: "
            f"parameter dtypes {dtypes}"
        )
    if autocast != torch.float16:
        return LossScale(dynamic=False)
    if spec.on_nonfinite == "raise":
        raise InvalidArgumentError(
            "autocast='float16' skips each window whose scaled gradient overflows and lowers "
            "the loss scale (as torch.amp.GradScaler); on_nonfinite='raise' would stop at the "
            "first overflow. Received: on_nonfinite='raise' with autocast=torch.float16"
        )
    return LossScale(grad_scaler)


def _window_moments(model: Any, batchnorm: str, steps: int) -> WindowMoments | None:
    """``batchnorm="per_window"``: the BatchNorm modules' window moments. The default mode
    warns when BatchNorm modules would see micro-batches (``accumulation_steps > 1``)."""
    if batchnorm == "per_window":
        return WindowMoments(model)
    names = [name for name, _ in batchnorm_modules(model)]
    if names and steps > 1:
        warnings.warn(
            f"BatchNorm modules {names} normalise each micro-batch with its own statistics "
            "and update their running mean/variance once per micro-batch: the gradient is "
            f"exact for that model, not for one step on {steps} concatenated micro-batches. "
            'batchnorm="per_window" updates the running statistics once per window with the '
            "window's pooled moments (the big batch's update; normalisation stays per "
            "micro-batch).",
            UserWarning,
            stacklevel=3,
        )
    return None


def _refuse_outer_autocast(device: torch.device) -> None:
    # Autocast around fit caches low-precision copies of the weights for the whole context:
    # after the first step every forward would read stale copies (silently wrong updates).
    for device_type in dict.fromkeys(("cpu", "cuda", device.type)):
        if torch.is_autocast_enabled(device_type):
            raise InvalidArgumentError(
                "fit() was called inside torch.autocast: its weight cache would go stale after "
                "the first update. Call fit outside it and pass Trainer(..., "
                "autocast=torch.bfloat16) or autocast='float16' (with loss scaling) instead. "
                f"Received: autocast enabled on {device_type!r}"
            )


class _SamplerEpoch:
    """``sampler.set_epoch(epoch)`` before each epoch's iterator, as a torch loop does: a
    ``DistributedSampler`` shuffles by ``seed + epoch``, so without it every epoch -- and a
    resumed one -- repeats epoch 0's order (the trainer owns the epoch loop)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def _sampler_epochs(loader: Any) -> list[_SamplerEpoch]:
    samplers = loader_samplers(loader)
    return [_SamplerEpoch(s) for s in samplers if callable(getattr(s, "set_epoch", None))]


def _tensor_dataset(dataset: Any) -> tuple[Any, Any, Any]:
    tensors = dataset.tensors
    if len(tensors) not in (2, 3):
        raise InvalidArgumentError(
            "A TensorDataset must hold (x, y) or (x, y, sample_weight). Received: a "
            f"TensorDataset of {len(tensors)} tensors"
        )
    return tensors[0], tensors[1], tensors[2] if len(tensors) == 3 else None


def _rng_state(device: torch.device) -> dict[str, Any]:
    # The generators Dropout draws from: the CPU one, and each CUDA device's when on CUDA.
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj
