"""The PyTorch half of ``torchref.Trainer`` (the :class:`tfreg_core.training.StepEngine` that
:func:`tfreg_core.training.run_fit` drives): one micro-batch into the :class:`Window`, one
update from it, and validation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from tfreg_core.training import (
    NONFINITE_MESSAGE,
    Position,
    TrainerSpec,
    leading_dim,
    map_structure,
)
from tfreg_core.validation import InvalidArgumentError
from torchref._compat import torch
from torchref.batchnorm import WindowMoments
from torchref.distributed import process_group
from torchref.penalties import penalty as _penalty
from torchref.proximal import Proximal
from torchref.training.amp import LossScale
from torchref.training.losses import _WindowLoss
from torchref.training.window import Totals, Window

__all__ = ["call_module"]


def call_module(module: torch.nn.Module, x: Any) -> Any:
    """``module(x)``; a tuple/list of inputs is passed as positional arguments and a dict as
    keyword arguments (``forward(self, a, b)``), where Keras hands the structure over whole."""
    if isinstance(x, dict):
        return module(**x)
    if isinstance(x, (list, tuple)):
        return module(*x)
    return module(x)


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


def _own_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The global RNG state of the CPU and of ``device``'s accelerator, restored on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


class _Engine:
    """The PyTorch half of ``Trainer``: one micro-batch into the :class:`Window`, one update
    from it (:meth:`Window.close`, then the optimizer, the proximal step and the loss scale)."""

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
        self.window = Window(self.params, spec.metrics)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.loss = _WindowLoss(loss, self.device)
        # torch.distributed initialised: this rank's share, DDP's no_sync, one reduction/update.
        self.group = process_group(model, self.params, accumulates_in_grad=self.window.in_grad)
        self.window.takes_all = self.group is not None
        # Set by the driver before each micro-batch. Left True (a driver that never says),
        # DDP syncs every micro-batch: still exact (it averages the accumulated .grad, whose
        # already-reduced part is equal on every rank), only k all-reduces instead of one.
        self.closes = True
        self._zero = torch.zeros((), dtype=torch.float64, device=self.device)  # no penalty
        self.position = Position().as_tuple()
        self.use_data(None)

    def use_data(self, labels: Any) -> None:
        """Before ``fit``: the labels of array data (None: a stream)."""
        # The array labels to check at the first micro-batch (when the model's class count is
        # known), and whether the data are arrays (else each micro-batch is checked).
        self.labels = labels
        self.array_data = labels is not None
        # Checked once here rather than by a scan of each micro-batch's targets.
        self.every_label_counts = self.array_data and self.loss.every_label_counts(labels)

    def _tensors(self, structure: Any, dtype: torch.dtype | None = None) -> Any:
        # Floating inputs are cast to `dtype` (as Keras casts inputs to the layer's dtype).
        def convert(value: Any) -> torch.Tensor:
            tensor = torch.as_tensor(value, device=self.device)
            if dtype is None or tensor.dtype == dtype or not tensor.is_floating_point():
                return tensor
            return tensor.to(dtype)

        return map_structure(convert, structure)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Around one ``fit``: training mode, and the parameters' ``.grad`` released after."""
        attached = contextlib.nullcontext() if self.moments is None else self.moments.attached()
        try:
            with _training_mode(self.model), attached:
                yield
        finally:
            self.window.release()

    def begin_micro_batch(self, closes: bool) -> None:
        """Told by the driver before each micro-batch: whether it closes its window (under DDP
        only the closing micro-batch's backward synchronises)."""
        self.closes = closes

    def micro_step(self, x: Any, y: Any, sample_weight: Any) -> None:
        if self.proximal is not None and self.window.micro_batches == 0:
            # A scheduler's negative/NaN rate, refused before the window holds anything.
            self.proximal.check_rates(self.optimizer)
        if self.group is None:
            return self._micro_step(x, y, sample_weight)
        x, y, sample_weight = self.group.local(x, y, sample_weight)
        self.window.totals.examples.add_(leading_dim(y))
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
        values, count = self.loss(y_pred, y_host, every_label_counts=self.every_label_counts)
        if sample_weight is None or _all_ones(sample_weight):
            sample_weight = None  # unweighted: no weight tensor, no product to differentiate
            loss_sum = values.sum()
        else:
            w = torch.as_tensor(sample_weight, device=self.device)
            loss_sum = torch.sum(values * _per_example(w.to(values.dtype), values))
        scaled = loss_sum
        if self.loss_scale is not None:
            if self.window.micro_batches == 0:
                # Ranks must agree on the unit: on a process group it is 1 per micro-batch.
                unit = count if isinstance(count, (int, float)) else leading_dim(y_host)
                unit = 1.0 if self.group is not None else max(float(unit), 1.0)
                self.loss_scale.unit = unit * self.spec.accumulation_steps
            scaled = loss_sum * (self.loss_scale.scale / self.loss_scale.unit)
        self.window.micro(scaled)
        totals = self.window.totals
        totals.add(loss_sum, count)
        if totals.metrics:
            if sample_weight is None:
                w = torch.ones(len(values), device=self.device)
            totals.add_metrics(y_pred, y_host, w)

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

    def _penalty(self) -> torch.Tensor:
        if self.regularizer is None:
            return self._zero
        return _penalty(self.model, self.regularizer, include_bias=self.spec.include_bias)

    @torch.no_grad()
    def evaluate(self, batches: Callable[[], Iterable[tuple[Any, Any, Any]]]) -> dict[str, float]:
        """``val_loss`` (the data loss over the batches ``batches()`` yields -- ``sum(w * l) / N``
        with the training loss's count -- plus the penalty at the current weights, as Keras'
        val_loss includes the regularization losses), ``val_data_loss`` and ``val_<metric>``
        (:func:`tfreg_core.update.window_record` over the whole pass), in eval mode (Dropout
        off, BatchNorm's running statistics), as Keras evaluates with ``training=False``; every
        submodule's mode is restored after. One host read.

        ``batches()`` is called, and the pass runs, on a fork of the global RNG (:func:`_own_rng`):
        iterating a ``DataLoader`` draws its base seed (a shuffled one also its permutation) from
        torch's default generator, which training's shuffle and Dropout read; without the fork,
        adding ``validation_data`` would change the training run and a resumed run would differ
        from the uninterrupted one (Keras' validation leaves training's numbers alone too)."""
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        totals = Totals(self.spec.metrics, self.device)
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
                    totals.add(torch.sum(values.double() * _per_example(w, values)), n)
                    totals.add_metrics(y_pred, y_host, w)
            finally:
                for module, mode in modes:
                    module.train(mode)
        if not seen:
            raise InvalidArgumentError(
                "validation_data yielded no batch (an exhausted iterator?): pass arrays or a "
                "re-iterable (a list, a DataLoader). Received: an empty validation pass"
            )
        record = totals.record(totals.take_count(), self._penalty().double())
        names = ["loss", "data_loss", *self.spec.metrics]
        fetched = self.fetch({name: record[name] for name in names})
        return {f"val_{name}": value for name, value in fetched.items()}

    def apply_step(self) -> dict[str, Any]:
        window = self.window
        pen = self._penalty()
        penalty_grads = None if self.regularizer is None else window.gradients(pen)
        grads, finite, values = window.close(
            penalty=pen.detach().double(),
            penalty_grads=penalty_grads,
            clipnorm=self.spec.clipnorm,
            global_clipnorm=self.spec.global_clipnorm,
            unscale=(
                None if self.loss_scale is None else self.loss_scale.scale / self.loss_scale.unit
            ),
            # the global window: before the division and the penalty
            reduce=None if self.group is None else self.group.reduce,
        )
        if finite and self.proximal is not None:
            try:  # a rate changed mid-window: refused before the step, the window consumed
                self.proximal.check_rates(self.optimizer)
            except InvalidArgumentError:
                self._reset_window()
                raise
        if finite:
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g  # None: not reached in this window, skipped by the optimizer
            self.optimizer.step()
            if self.proximal is not None:  # the rate of the step just taken, once per update
                self.proximal.apply(self.model, self.optimizer)
        if self.loss_scale is not None:  # once per window, as GradScaler.update per step
            self.loss_scale.update(finite)
        if self.moments is not None:  # the forward passes happened, finite or not
            self.moments.close()
        values["skipped"] = not finite
        if self.group is not None:  # the global window's (a shard's host count is its own)
            values["examples"] = window.totals.examples.clone()
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
        self.window.reset()
        if self.moments is not None:
            self.moments.reset()

    def fetch(self, values: Mapping[str, Any]) -> dict[str, Any]:
        # The record's float64 scalars in one host read.
        out = dict(values)
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        if tensors:
            out.update(zip(tensors, torch.stack(list(tensors.values())).tolist(), strict=True))
        if "examples" in out:  # reduced as float64 (exact): the record's integer
            out["examples"] = int(out["examples"])
        return out

    def get_position(self) -> tuple[int, ...]:
        return self.position

    def set_position(self, position: tuple[int, ...]) -> None:
        self.position = tuple(map(int, position))
