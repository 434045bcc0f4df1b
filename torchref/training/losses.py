"""The losses ``torchref.Trainer`` divides exactly: names (``LOSSES``), torch loss modules and
their ``torch.nn.functional`` twins, and callables declared with :func:`per_element`, each read
as ``(y_pred, y_true) -> (per-element values, count)`` (:class:`_WindowLoss`).

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

import copy
import functools
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from tfreg_core.labels import check_class_labels
from tfreg_core.training import leaves, map_structure
from tfreg_core.validation import InvalidArgumentError
from torchref._compat import torch

__all__ = ["LOSSES", "PerElementLoss", "per_element", "per_example_loss"]

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
        self, y_pred: torch.Tensor, y_true: torch.Tensor, *, every_label_counts: bool = False
    ) -> tuple[torch.Tensor, int | float | torch.Tensor]:
        """Per-element values and their count; ``every_label_counts``: the targets are known to
        hold no ``ignore_index`` and there are no class weights (:meth:`every_label_counts`,
        once per fit for arrays), so class indices count one each without a scan."""
        if not (isinstance(y_pred, torch.Tensor) and isinstance(y_true, torch.Tensor)):
            y_pred, y_true = self._structures(y_pred, y_true)
            count = None
        else:
            if y_pred.dtype in _LOW_PRECISION:
                y_pred = y_pred.float()  # float16/bfloat16 predictions: the loss in float32
            y_true, index = self._check_targets(y_pred, y_true)
            scan = (index and not every_label_counts) or self.masked
            count = self._count(y_pred, y_true) if scan else None
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

    def every_label_counts(self, labels: Any) -> bool:
        """Whether every class-index target in ``labels`` (host arrays) counts once: no class
        weights, and no target is ``ignore_index``."""
        return (
            self.targets in ("index", "index_or_probabilities")
            and self.class_weight is None
            and not self.masked
            and isinstance(labels, np.ndarray)
            and labels.dtype.kind in "iu"
            and not np.any(labels == self.ignore_index)
        )

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
