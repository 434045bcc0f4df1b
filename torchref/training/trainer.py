"""``torchref.Trainer``, the twin of ``tfreg.Trainer`` (same signature, same window plan, same
update rule -- see :mod:`tfreg_core.training` and :mod:`torchref.training`)."""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from tfreg_core.batchnorm import check_mode as _check_batchnorm_mode
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
from torchref.training.amp import (
    LossScale,
    _autocast_dtype,
    _check_mixed_precision,
    _refuse_outer_autocast,
)
from torchref.training.losses import _all_ones, _per_example, _WindowLoss

__all__ = ["History", "Trainer"]


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


def _own_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The global RNG state of the CPU and of ``device``'s accelerator, restored on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


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
