"""Training with exact gradient accumulation for PyTorch: ``Trainer``, the twin of
``tfreg.Trainer`` (same signature, same window plan, same update rule -- see
:mod:`tfreg_core.training`), plus ``KerasAdamW``, a torch optimizer with Keras' Adam/AdamW
arithmetic.

Differences from TensorFlow (``tfreg.training``): ``optimizer`` is a ``torch.optim`` optimizer
built on the model's parameters, and ``loss`` is a torch loss -- a name from ``LOSSES``, a
``torch.nn`` loss module built with ``reduction="none"``, or ``fn(y_pred, y_true)`` returning
per-example losses (torch's argument order). ``jit_compile`` must be False (torchref runs
eagerly). Checkpoints are ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tfreg_core.specs import float32_rounded
from tfreg_core.training import (
    NONFINITE_MESSAGE,
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
from torchref import accumulation
from torchref._compat import torch
from torchref.penalties import penalty as _penalty
from torchref.regularizers import get as _get_regularizer
from torchref.sparsity import ProximalL1

__all__ = ["LOSSES", "History", "KerasAdamW", "Trainer", "per_example_loss"]

F = torch.nn.functional


def _mse(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    # Keras' MeanSquaredError: mean over the last axis, one value per example.
    return torch.mean(torch.square(y_pred - y_true), dim=-1)


def _mae(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return torch.mean(torch.abs(y_pred - y_true), dim=-1)


def _cross_entropy(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(y_pred, y_true.reshape(-1).long(), reduction="none")


def _bce_with_logits(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    per_element = F.binary_cross_entropy_with_logits(
        y_pred, y_true.to(y_pred.dtype), reduction="none"
    )
    return torch.mean(per_element, dim=-1)


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


def per_example_loss(loss: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(y_pred, y_true) -> per-element losses``, in the predictions' dtype promoted to at least
    float32 (as ``tfreg.training.per_example_loss``)."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise InvalidArgumentError(
                f"Unknown loss name. Expected one of {sorted(LOSSES)}. Received: loss={loss!r}"
            )
        fn = LOSSES[loss]
    elif isinstance(loss, torch.nn.modules.loss._Loss):
        if loss.reduction != "none":
            raise InvalidArgumentError(
                "A torch loss module must be built with reduction='none' (the trainer reduces "
                f"over each window). Received: loss.reduction={loss.reduction!r}"
            )
        fn = loss
    elif callable(loss):
        fn = loss
    else:
        raise InvalidArgumentError(
            f"loss must be a name, a torch loss module or a callable. Received: loss={loss!r}"
        )

    def values(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        if y_pred.dtype != torch.float64:
            y_pred = y_pred.float()
        return fn(y_pred, y_true)

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


class _Engine:
    """The PyTorch half of ``Trainer``."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        if not self.params:
            raise InvalidArgumentError("The model has no trainable parameters.")
        self.acc = accumulation.init(self.params)
        self.device = self.params[0].device
        self.zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_sum = self.zero.clone()
        self.weight_sum = self.zero.clone()
        self.metric_sums = [self.zero.clone() for _ in trainer.spec.metrics]
        self.position = Position().as_tuple()

    def _tensors(self, structure: Any, dtype: torch.dtype | None = None) -> Any:
        # Floating inputs are cast to `dtype` (as Keras casts inputs to the layer's dtype).
        def convert(value: Any) -> torch.Tensor:
            tensor = torch.as_tensor(value, device=self.device)
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

        return map_structure(convert, structure)

    def micro_step(self, x: Any, y: Any, sample_weight: Any) -> None:
        xb = self._tensors(x, self.params[0].dtype)
        yb = self._tensors(y)
        if sample_weight is None:  # every example weighs 1
            sample_weight = torch.ones(leading_dim(y), dtype=torch.float64)
        w = map_structure(
            lambda v: torch.as_tensor(v, device=self.device).to(torch.float64), sample_weight
        )
        self.t.model.train()
        y_pred = call_module(self.t.model, xb)
        values = self.t._loss_fn(y_pred, yb)
        weights = w.to(values.dtype).reshape([-1] + [1] * (values.ndim - 1))
        loss_sum = torch.sum(values * weights)
        grads = torch.autograd.grad(loss_sum, self.params, allow_unused=True)
        accumulation.add(self.acc, grads, values.numel())
        with torch.no_grad():
            self.loss_sum += loss_sum.double()
            self.weight_sum += w.sum()
            for name, total in zip(self.t.spec.metrics, self.metric_sums, strict=True):
                total += torch.sum(_METRIC_FNS[name](y_pred, yb) * w)

    def apply_step(self) -> dict[str, torch.Tensor]:
        grads = [
            g.to(p.dtype) for g, p in zip(accumulation.result(self.acc), self.params, strict=True)
        ]
        if self.t.regularizer is not None:
            pen = _penalty(self.t.model, self.t.regularizer, include_bias=self.t.spec.include_bias)
            pen_grads = torch.autograd.grad(pen, self.params, allow_unused=True)
            grads = [g if p is None else g + p for g, p in zip(grads, pen_grads, strict=True)]
            pen = pen.detach().double()
        else:
            pen = self.zero.clone()
        # One host sync per update: torch has no graph-side conditional to keep it on device.
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if finite:
            for p, g in zip(self.params, _clip(grads, self.t.spec), strict=True):
                p.grad = g
            self.t.optimizer.step()
            for p in self.params:
                p.grad = None
            if self.t.proximal is not None:  # the rate of the step just taken, once per update
                self.t.proximal.apply(self.t.model, self.t.optimizer)
        data_loss = self.loss_sum / self.acc.count
        values = {
            "loss": data_loss + pen,
            "data_loss": data_loss,
            "penalty": pen,
            "skipped": torch.tensor(not finite),
        }
        for name, total in zip(self.t.spec.metrics, self.metric_sums, strict=True):
            values[name] = total / self.weight_sum
        accumulation.reset(self.acc)
        self.loss_sum = self.zero.clone()
        self.weight_sum = self.zero.clone()
        self.metric_sums = [self.zero.clone() for _ in self.metric_sums]
        # Raised only now, with the window consumed (as tfreg does): a later fit() must not
        # re-apply the non-finite window.
        if not finite and self.t.spec.on_nonfinite == "raise":
            raise FloatingPointError(NONFINITE_MESSAGE)
        return values

    def discard_window(self) -> None:
        """``drop_remainder`` on a stream: the short window's sums are thrown away."""
        accumulation.reset(self.acc)
        self.loss_sum = self.zero.clone()
        self.weight_sum = self.zero.clone()
        self.metric_sums = [self.zero.clone() for _ in self.metric_sums]

    def fetch(self, values: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {k: v.item() for k, v in values.items()}

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
    ``epochs`` is the total to train up to, as in ``tfreg.Trainer``. Floating inputs are cast to
    the parameters' dtype (Keras casts inputs to its layers' dtype; torch would raise).
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
        proximal: ProximalL1 | dict[str, Any] | None = None,
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
        self.proximal = resolve_proximal(proximal, ProximalL1)
        self._loss_fn = per_example_loss(loss)
        self._engine = _Engine(self)
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
                "metric_sums": [m.clone() for m in e.metric_sums],
                "position": list(e.position),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; a state saved with other ``metrics`` is refused before
        anything is restored (its window sums would be reported under the wrong names)."""
        saved = state.get("metrics", [])
        if list(saved) != self.spec.metrics:
            raise InvalidArgumentError(
                f"The state was saved by a Trainer with other metrics: metrics={list(saved)}. "
                f"Build the Trainer with them. Received: metrics={self.spec.metrics}"
            )
        e = self._engine
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        e.acc.load_state_dict(state["accumulator"])
        window = state["window"]
        e.loss_sum = window["loss_sum"].clone()
        e.weight_sum = window["weight_sum"].clone()
        e.metric_sums = [m.clone() for m in window["metric_sums"]]
        e.set_position(tuple(window["position"]))

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
        not apply), as in ``tfreg.Trainer.fit``.
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
        data = fit_data(
            _host_arrays(x) if y is not None else x,
            _host_arrays(y),
            _host_arrays(sample_weight),
            batch_size=batch_size,
            epochs=epochs,
            shuffle=shuffle,
            verbose=verbose,
            steps_per_epoch=steps_per_epoch,
        )
        return run_fit(
            self._engine, self, self.spec, data, epochs=epochs, callbacks=callbacks, verbose=verbose
        )

    def get_config(self) -> dict[str, Any]:
        """The keyword arguments (model, loss and optimizer are positional and not included)."""
        config = self.spec.get_config()
        config["regularizer"] = object_config(self.regularizer)
        config["proximal"] = object_config(self.proximal)
        return config


def _tensor_dataset(dataset: Any) -> tuple[Any, Any, Any]:
    tensors = dataset.tensors
    if len(tensors) not in (2, 3):
        raise InvalidArgumentError(
            "A TensorDataset must hold (x, y) or (x, y, sample_weight). Received: a "
            f"TensorDataset of {len(tensors)} tensors"
        )
    return tensors[0], tensors[1], tensors[2] if len(tensors) == 3 else None


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
