"""Training with exact gradient accumulation for PyTorch: ``Trainer``, the twin of
``tfreg.Trainer`` (same signature, same window plan, same update rule -- see
:mod:`tfreg_core.training`), plus ``KerasAdamW``, a torch optimizer with Keras' Adam/AdamW
arithmetic.

Differences from TensorFlow (``tfreg.training``): ``optimizer`` is a ``torch.optim`` optimizer
built on the model's parameters, and ``loss`` is a torch loss -- a name from ``LOSSES``, a
``torch.nn`` loss module as users build it, or ``fn(y_pred, y_true)`` returning per-example
losses (torch's argument order). ``jit_compile`` must be False (torchref runs eagerly).
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
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from tfreg_core.labels import check_class_labels
from tfreg_core.specs import float32_rounded
from tfreg_core.training import (
    NONFINITE_MESSAGE,
    ArrayData,
    Position,
    TrainerSpec,
    fit_data,
    leading_dim,
    map_structure,
    object_config,
    resolve_proximal,
    run_fit,
)
from tfreg_core.training import History as History
from tfreg_core.validation import InvalidArgumentError, non_negative_float, strict_bool
from torchref import accumulation, checkpoint
from torchref._compat import torch
from torchref.distributed import loader_samplers, process_group
from torchref.penalties import penalty as _penalty
from torchref.proximal import PROXIMAL_CLASSES, Proximal
from torchref.regularizers import get as _get_regularizer

__all__ = ["LOSSES", "History", "KerasAdamW", "Trainer", "per_example_loss"]

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
# Loss modules whose reduction="mean" is sum(values) / values.numel() on the "none" values.
_ELEMENTWISE_MODULES = (
    nn.MSELoss,
    nn.L1Loss,
    nn.HuberLoss,
    nn.SmoothL1Loss,
    nn.BCEWithLogitsLoss,
    nn.BCELoss,
    nn.SoftMarginLoss,
    nn.KLDivLoss,
)
# Class-index losses: reduction="mean" divides by sum(weight[y_i]) over i with y_i != ignore_index.
_INDEX_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)


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
        elif callable(loss):
            self.fn, self.targets = loss, "free"
        else:
            raise InvalidArgumentError(
                f"loss must be a name, a torch loss module or a callable. Received: loss={loss!r}"
            )

    def _per_element_module(self, loss: nn.Module, device: torch.device) -> nn.Module:
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
            self.ignore_index = int(loss.ignore_index)
            if loss.weight is not None:
                weight = loss.weight.detach().to("cpu", torch.float64)
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
        if y_pred.dtype in _LOW_PRECISION:
            y_pred = y_pred.float()  # float16/bfloat16 predictions: the loss in float32
        y_true, index = self._check_targets(y_pred, y_true)
        count = self._count(y_pred, y_true) if index else None
        if y_true.device != y_pred.device:
            y_true = y_true.to(y_pred.device)
        values = self.fn(y_pred, y_true)
        if count is None:
            count = y_pred.shape[0] if self.per_batch else values.numel()
        return values, count

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
        if self.class_weight is None and y_true.device.type == "cpu":
            # NumPy on the tensor's memory: a few microseconds against three torch dispatches.
            return int(np.count_nonzero(y_true.numpy() != self.ignore_index))
        counted = y_true != self.ignore_index
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


class _Engine:
    """The PyTorch half of ``Trainer``: one micro-batch into the accumulator, one update from it.

    Where a parameter and its accumulator sum share a dtype, the sum *is* the parameter's
    ``.grad`` during ``fit``: ``backward()`` adds each micro-batch's gradient into it in place,
    as a hand-written accumulation loop does, with no per-micro-batch gradient copies.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: Any,
        optimizer: torch.optim.Optimizer,
        spec: TrainerSpec,
        regularizer: Any,
        proximal: Proximal | None,
    ) -> None:
        self.model, self.optimizer, self.spec = model, optimizer, spec
        self.regularizer, self.proximal = regularizer, proximal
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
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
        try:
            with _training_mode(self.model):
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
        xb = self._tensors(x, self.dtype)
        y_pred = call_module(self.model, xb)
        if self.labels is not None:  # arrays: the whole y once per fit, before any update
            labels, self.labels = self.labels, None
            self.loss.check_labels(labels, y_pred, "y")
        elif not self.array_data:  # a stream: each micro-batch before its window is applied
            epoch, micro_batch = self.position[:2]
            self.loss.check_labels(y, y_pred, f"micro-batch {micro_batch} of epoch {epoch}: y")
        y_host = torch.as_tensor(y)
        values, count = self.loss(y_pred, y_host)
        if sample_weight is None or _all_ones(sample_weight):
            sample_weight = None  # unweighted: no weight tensor, no product to differentiate
            loss_sum = values.sum()
        else:
            w = torch.as_tensor(sample_weight, device=self.device)
            loss_sum = torch.sum(
                values * w.to(values.dtype).reshape([-1] + [1] * (values.ndim - 1))
            )
        if self.in_grad:
            for p, total in zip(self.params, self.acc.sums, strict=True):
                if p.grad is not total:
                    p.grad = total
            loss_sum.backward()
            for p, total in zip(self.params, self.acc.sums, strict=True):
                if p.grad is not total:  # torch replaced .grad by .grad + g instead of adding
                    total.copy_(p.grad)
            # The gradients are in the sums already; what add() would do with no gradients,
            # without re-checking shapes the sums have by construction (count >= 0 is
            # guaranteed by _WindowLoss: element counts or sums of weights validated >= 0).
            self.acc.count.add_(count)
            self.acc.micro_batches += 1
        else:
            grads = torch.autograd.grad(loss_sum, self.params, allow_unused=True)
            accumulation.add(self.acc, grads, count)
        self.loss_sum.add_(loss_sum.detach())
        if self.metric_sums:
            with torch.no_grad():
                w = torch.ones(len(values), device=self.device) if sample_weight is None else w
                self.weight_sum.add_(w.sum())
                for name, total in zip(self.spec.metrics, self.metric_sums, strict=True):
                    total.add_(torch.sum(_METRIC_FNS[name](y_pred, y_host.to(self.device)) * w))

    @torch.no_grad()
    def _window_gradient(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        # sums / count, in place. A window whose every loss element is ignored has count 0 and
        # zero sums: its data gradient is 0 (torch's mean would be 0/0 = NaN).
        divisor = torch.where(self.acc.count > 0, self.acc.count, 1.0)
        if self.in_grad:
            by_dtype = {total.dtype: divisor.to(total.dtype) for total in self.acc.sums}
            for total in self.acc.sums:
                total.div_(by_dtype[total.dtype])
            return list(self.acc.sums), divisor
        grads = [
            (s / divisor.to(s.dtype)).to(p.dtype)
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
            pen_grads = torch.autograd.grad(pen, self.params, allow_unused=True)
            with torch.no_grad():
                for g, p in zip(grads, pen_grads, strict=True):
                    if p is not None:
                        g.add_(p)
            pen = pen.detach().double()
        else:
            pen = torch.zeros((), dtype=torch.float64, device=self.device)
        finite = _all_finite(grads)
        if finite and self.proximal is not None:
            try:  # a rate changed mid-window: refused before the step, the window consumed
                self.proximal.check_rates(self.optimizer)
            except InvalidArgumentError:
                self._reset_window()
                raise
        if finite:
            for p, g in zip(self.params, _clip(grads, self.spec), strict=True):
                p.grad = g
            self.optimizer.step()
            if self.proximal is not None:  # the rate of the step just taken, once per update
                self.proximal.apply(self.model, self.optimizer)
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
        for total in [self.loss_sum, self.weight_sum, self.examples, *self.metric_sums]:
            total.zero_()

    def fetch(self, values: dict[str, Any]) -> dict[str, Any]:
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

    Modes: ``fit`` calls ``model.train()`` once when the model is in eval mode; a model already
    in training mode keeps its submodules' modes (a BatchNorm frozen with ``.eval()`` keeps its
    running statistics). Every submodule's mode is restored when ``fit`` returns or raises.
    During ``fit`` each parameter's ``.grad`` is its accumulator sum (``backward()`` adds into
    it, as in a hand-written loop); ``fit`` leaves ``.grad`` at None. See the module docstring
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
        self._engine = _Engine(
            model,
            loss,
            optimizer,
            self.spec,
            self.regularizer,
            self.proximal,
        )
        self.stop_training = False

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
            },
            "rng": _rng_state(e.device),
            "run": checkpoint.run_fingerprint(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``. The whole state is checked first
        (:func:`torchref.checkpoint.check_state`): a state of another run (accumulation steps,
        seed, optimizer class, model structure, metrics, world size), an incomplete one, or one
        with a tensor of another shape/dtype, a position outside the plan or a negative count
        is refused before anything is restored."""
        checkpoint.check_state(self, state)
        e = self._engine
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        e.acc.load_state_dict(state["accumulator"])
        window = state["window"]
        e.loss_sum = window["loss_sum"].clone()
        e.weight_sum = window["weight_sum"].clone()
        e.examples = window["examples"].clone()  # this rank's, in the open window
        e.metric_sums = [m.clone() for m in window["metric_sums"]]
        e.set_position(tuple(window["position"]))
        _set_rng_state(state["rng"])

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
        """
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
                batch_size,
                self.spec.accumulation_steps,
                data.plan[0],
                (data.x, data.y, data.sample_weight),
            )
            data = fit_data(*arrays, weights, batch_size=global_batch, **options)
        elif group is not None:
            group.check_shards(x, steps_per_epoch)
        if not isinstance(data, ArrayData):
            callbacks = [*_sampler_epochs(x), *(callbacks or [])]
        self._engine.array_data = isinstance(data, ArrayData)
        self._engine.labels = data.y if isinstance(data, ArrayData) else None
        with self._engine.session():
            return run_fit(
                self._engine,
                self,
                self.spec,
                data,
                epochs=epochs,
                callbacks=callbacks,
                verbose=verbose,
            )

    def get_config(self) -> dict[str, Any]:
        """The keyword arguments (model, loss and optimizer are positional and not included)."""
        config = self.spec.get_config()
        config["regularizer"] = object_config(self.regularizer)
        config["proximal"] = object_config(self.proximal)
        return config


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


class KerasAdamW(torch.optim.Optimizer):
    """Adam/AdamW with Keras 3's arithmetic, for exact cross-framework trajectories.

    Keras (``keras/src/optimizers/adam.py`` and ``base_optimizer._apply_weight_decay``)::

        w <- w - w * wd * lr                                   (decoupled decay, AdamW)
        m <- m + (g - m)(1 - b1);  v <- v + (g^2 - v)(1 - b2)
        w <- w - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    ``torch.optim.AdamW`` divides by ``sqrt(v) / sqrt(1 - b2^t) + eps`` instead: the two agree
    only with torch's epsilon equal to ``eps / sqrt(1 - b2^t)``, which changes every step, so no
    constant conversion exists. Keras also rounds some hyperparameters through float32 even for
    float64 variables: ``lr`` (a float32 variable), and every value passed through
    ``ops.cast`` -- ``wd`` and the ``b1``/``b2`` inside ``b^t`` -- while ``1 - b1``, ``1 - b2``
    and ``eps`` stay exact. ``float32_hyperparameters=True`` (default) reproduces that rounding.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.001,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        float32_hyperparameters: bool = True,
    ) -> None:
        as_float32 = strict_bool(float32_hyperparameters, "float32_hyperparameters")
        defaults = {
            "lr": non_negative_float(lr, "lr"),
            "betas": _betas(betas, as_float32),
            "eps": non_negative_float(eps, "eps"),
            "weight_decay": non_negative_float(weight_decay, "weight_decay"),
            "float32_hyperparameters": as_float32,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            rounded = float32_rounded if group["float32_hyperparameters"] else float
            lr, wd = rounded(group["lr"]), rounded(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                if wd:
                    p.sub_(p * wd * lr)
                alpha = lr * math.sqrt(1 - rounded(b2) ** t) / (1 - rounded(b1) ** t)
                state["m"].add_((p.grad - state["m"]) * (1 - b1))
                state["v"].add_((p.grad.square() - state["v"]) * (1 - b2))
                p.sub_(state["m"] * alpha / (state["v"].sqrt() + group["eps"]))
        return loss


def _betas(betas: Any, as_float32: bool) -> tuple[float, float]:
    # beta = 1 (or a beta that float32 rounds to 1) divides by 1 - beta^t = 0 at step 1.
    message = (
        "betas must be a pair (b1, b2) of floats in [0, 1)"
        + (", also after float32 rounding" if as_float32 else "")
        + f". Received: betas={betas!r}"
    )
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise InvalidArgumentError(message)
    checked = []
    for beta in betas:
        try:
            value = non_negative_float(beta, "betas")
        except InvalidArgumentError:
            raise InvalidArgumentError(message) from None
        if value >= 1.0 or (as_float32 and float32_rounded(value) >= 1.0):
            raise InvalidArgumentError(message)
        checked.append(value)
    return checked[0], checked[1]
