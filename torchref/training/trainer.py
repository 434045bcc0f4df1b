"""``torchref.Trainer``, the twin of ``tfreg.Trainer`` (same signature, same window plan, same
update rule -- see :mod:`tfreg_core.training` and :mod:`torchref.training`)."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tfreg_core.batchnorm import check_mode as _check_batchnorm_mode
from tfreg_core.training import (
    ArrayData,
    Position,
    TrainerSpec,
    fit_data,
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
from torchref.distributed import loader_samplers
from torchref.proximal import PROXIMAL_CLASSES, Proximal
from torchref.regularizers import get as _get_regularizer
from torchref.training.amp import (
    _autocast_dtype,
    _check_mixed_precision,
    _refuse_outer_autocast,
)
from torchref.training.engine import _Engine

__all__ = ["History", "Trainer"]


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
        """The open window's gradient sums, count and micro-batches (:mod:`torchref.accumulation`;
        the count read on the host joins ``count`` here)."""
        return self._engine.window.settle()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed ``fit`` needs, mid-window included (tensors are copies)."""
        e = self._engine
        accumulator, window = e.window.state()
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": _clone(self.optimizer.state_dict()),
            "accumulator": accumulator,
            "metrics": list(self.spec.metrics),
            "window": {**window, "position": list(e.position)},
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
        window = state["window"]
        e.window.load(state["accumulator"], window)
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
        engine.use_data(data.y if isinstance(data, ArrayData) else None)
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
