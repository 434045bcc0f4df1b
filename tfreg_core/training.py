"""The framework-free half of ``tfreg.Trainer`` and ``torchref.Trainer``.

Both trainers are a *step engine* (framework code: one micro-batch's gradient into the
accumulator; one update from the accumulator) driven by :func:`run_fit`, which owns everything
that must not differ between the frameworks: option validation (:class:`TrainerSpec`), the window
plan (:mod:`tfreg_core.windows`), the resumable position, callbacks, progress output and the
per-update :class:`History`.

The update rule both engines implement, for a window ``W`` of micro-batches::

    g = (sum_{i in W} grad(w_i * l_i)) / N_W  +  grad(penalty)        N_W = loss elements in W
    g = clip(g)          per variable (clipnorm) or globally (global_clipnorm), Keras' formula
    optimizer.step(g)    once, unless g is non-finite (skip or raise, see ``on_nonfinite``)

which is the gradient Keras' ``"sum_over_batch_size"`` reduction gives on the concatenated
window: ``sum(w_i * l_i) / N`` with ``N`` the number of loss elements (examples, for losses with
one value per example), *not* ``sum(w_i)``, and not the mean of per-micro-batch means.
Clipping is ``g * c / max(||g||, c)`` (Keras); ``torch.nn.utils.clip_grad_norm_`` divides by
``||g|| + 1e-6`` instead, so both trainers use Keras' formula.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass
from typing import Any, Protocol

import numpy as np

from tfreg_core import proximal as proximal_core
from tfreg_core import validation
from tfreg_core.validation import InvalidArgumentError
from tfreg_core.windows import epoch_order, plan_epoch

__all__ = [
    "METRICS",
    "NONFINITE_MESSAGE",
    "NONFINITE_MODES",
    "History",
    "Position",
    "StepEngine",
    "TrainerSpec",
    "check_fit_data",
    "object_config",
    "resolve_proximal",
    "run_fit",
]

NONFINITE_MODES = ("skip", "raise")
NONFINITE_MESSAGE = (
    "Non-finite gradient in the accumulated window (on_nonfinite='raise'); the update was not "
    "applied: weights and optimizer state are untouched. The window is consumed: a later fit() "
    "continues with the next window."
)
# Per-example metrics both frameworks implement identically; reported as sum(w*m) / sum(w) over
# the window, which is what a Keras MeanMetricWrapper reports on the concatenated batch.
METRICS = ("sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy")


def _optional_positive_float(value: Any, name: str) -> float | None:
    if value is None:
        return None
    as_float = validation.non_negative_float(value, name)
    if as_float == 0:
        raise InvalidArgumentError(
            f"Invalid value for argument {name}: expected None or a positive float. "
            f"Received: {name}={value!r}"
        )
    return as_float


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a bool. Received: {name}={value!r}")
    return value


class TrainerSpec:
    """Validated keyword options shared by both ``Trainer`` classes; ``get_config`` returns
    exactly these keyword arguments."""

    def __init__(
        self,
        *,
        accumulation_steps: int = 1,
        include_bias: bool = False,
        clipnorm: float | None = None,
        global_clipnorm: float | None = None,
        on_nonfinite: str = "skip",
        drop_remainder: bool = False,
        jit_compile: bool = False,
        metrics: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        self.accumulation_steps = validation.positive_int(accumulation_steps, "accumulation_steps")
        self.include_bias = _bool(include_bias, "include_bias")
        self.clipnorm = _optional_positive_float(clipnorm, "clipnorm")
        self.global_clipnorm = _optional_positive_float(global_clipnorm, "global_clipnorm")
        if self.clipnorm is not None and self.global_clipnorm is not None:
            raise InvalidArgumentError(
                "Only one of clipnorm and global_clipnorm can be set. "
                f"Received: clipnorm={clipnorm!r}, global_clipnorm={global_clipnorm!r}"
            )
        self.on_nonfinite = validation.choice(on_nonfinite, "on_nonfinite", NONFINITE_MODES)
        self.drop_remainder = _bool(drop_remainder, "drop_remainder")
        self.jit_compile = _bool(jit_compile, "jit_compile")
        if isinstance(metrics, str) or not isinstance(metrics, Sequence):
            raise InvalidArgumentError(
                f"metrics must be a sequence of names from {METRICS}. Received: metrics={metrics!r}"
            )
        for name in metrics:
            validation.choice(name, "metrics", METRICS)
        self.metrics = list(metrics)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise InvalidArgumentError(f"seed must be a non-negative int. Received: seed={seed!r}")
        self.seed = int(seed)

    def get_config(self) -> dict[str, Any]:
        return {
            "accumulation_steps": self.accumulation_steps,
            "include_bias": self.include_bias,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "on_nonfinite": self.on_nonfinite,
            "drop_remainder": self.drop_remainder,
            "jit_compile": self.jit_compile,
            "metrics": list(self.metrics),
            "seed": self.seed,
        }


def object_config(obj: Any) -> Any:
    """A ``regularizer``/``proximal`` for ``get_config``: ``{"class_name", "config"}``, which
    both frameworks' trainers accept back (a plain callable is returned as is)."""
    if obj is None or not hasattr(obj, "get_config"):
        return obj
    return {"class_name": type(obj).__name__, "config": obj.get_config()}


def resolve_proximal(proximal: Any, classes: Sequence[type], optimizer: Any = None) -> Any:
    """``None``, a framework proximal operator (``classes``: ``PROXIMAL_CLASSES`` of
    ``tfreg.proximal`` / ``torchref.proximal``), its ``object_config`` dict or a list of them
    (composed by ``ProximalChain``); with ``optimizer``, an operator that cannot serve it (e.g.
    ``threshold="preconditioned"`` with SGD) is refused now, before training changes anything."""
    resolved = proximal_core.resolve(proximal, classes)
    if resolved is not None and optimizer is not None:
        resolved.check(optimizer)
    return resolved


class History:
    """Per-update records of one ``fit`` call.

    Each record: ``epoch``, ``update`` (index within the epoch), ``examples``,
    ``micro_batches``, ``loss`` (= ``data_loss + penalty``, what the step minimised),
    ``data_loss`` (``sum(w*l)/N`` over the window), ``penalty`` (at the pre-update weights),
    one entry per metric, and ``skipped`` (True when a non-finite gradient skipped the update).
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    @property
    def history(self) -> dict[str, list[Any]]:
        """Column view, like ``keras.callbacks.History.history`` but one entry per update."""
        keys = self.records[0].keys() if self.records else ()
        return {key: [r[key] for r in self.records] for key in keys}

    @property
    def skipped_updates(self) -> int:
        return sum(bool(r["skipped"]) for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"History({len(self.records)} updates, {self.skipped_updates} skipped)"


@dataclass(frozen=True)
class Position:
    """Where training stands: the next micro-batch of an epoch, and the plan it belongs to
    (engines store it as a tuple of ints, in checkpoints)."""

    epoch: int = 0
    micro_batch: int = 0
    num_examples: int = 0
    batch_size: int = 0
    shuffle: int = 0

    def as_tuple(self) -> tuple[int, ...]:
        return astuple(self)


class StepEngine(Protocol):
    """What a framework provides to :func:`run_fit`."""

    def micro_step(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray) -> None: ...

    def apply_step(self) -> Mapping[str, Any]: ...

    def fetch(self, values: Mapping[str, Any]) -> dict[str, float]: ...

    def get_position(self) -> tuple[int, ...]: ...

    def set_position(self, position: tuple[int, ...]) -> None: ...


def check_fit_data(
    x: Any, y: Any, sample_weight: Any, *, batch_size: Any, epochs: Any, shuffle: Any, verbose: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Validate ``fit``'s arguments; return x, y, weights (ones when None) and the example count."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y) or len(x) == 0:
        raise InvalidArgumentError(
            "x and y must be non-empty arrays with the same first dimension. "
            f"Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    n = len(x)
    if sample_weight is None:
        weights = np.ones(n)
    else:
        weights = np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != (n,):
            raise InvalidArgumentError(
                f"sample_weight must have shape ({n},), one weight per example. "
                f"Received: sample_weight.shape={weights.shape}"
            )
    validation.positive_int(batch_size, "batch_size")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise InvalidArgumentError(f"epochs must be an int >= 0. Received: epochs={epochs!r}")
    _bool(shuffle, "shuffle")
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise InvalidArgumentError(f"verbose must be 0, 1 or 2. Received: verbose={verbose!r}")
    return x, y, weights, n


def run_fit(
    engine: StepEngine,
    trainer: Any,
    spec: TrainerSpec,
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    shuffle: bool,
    callbacks: Sequence[Any] | None,
    verbose: int,
) -> History:
    """Train from the engine's position (epoch, micro-batch) up to ``epochs`` epochs in total.

    A checkpoint saved mid-window holds the accumulator and the position; resuming replays
    nothing and re-plans nothing, so the remaining micro-batches land exactly where the
    uninterrupted run put them. Callbacks may define ``on_micro_batch_end(trainer, epoch,
    micro_batch)``, ``on_update_end(trainer, record)``, ``on_epoch_end(trainer, epoch, history)``
    and stop training by setting ``trainer.stop_training = True``.
    """
    callbacks = list(callbacks or ())
    history = History()
    saved = Position(*engine.get_position())
    n = len(x)
    plan = (n, batch_size, int(shuffle))
    if saved.micro_batch and plan != (saved.num_examples, saved.batch_size, saved.shuffle):
        raise InvalidArgumentError(
            "Resuming mid-epoch needs the plan the checkpoint was saved with: num_examples="
            f"{saved.num_examples}, batch_size={saved.batch_size}, shuffle="
            f"{bool(saved.shuffle)}. Received: num_examples={n}, batch_size={batch_size}, "
            f"shuffle={shuffle}"
        )
    start_epoch, start_micro = saved.epoch, saved.micro_batch
    trainer.stop_training = False
    progress = _Progress(verbose)
    wants_records = progress.live or any(hasattr(c, "on_update_end") for c in callbacks)
    if verbose and start_epoch >= epochs:
        print(f"Nothing to train: the trainer is at epoch {start_epoch} and epochs={epochs} is the")
        print("total to train up to (pass a larger epochs to continue).")
    # Optional engine hook (torchref on a process group: DDP synchronises the closing backward).
    begin_micro_batch = getattr(engine, "begin_micro_batch", None)
    for epoch in range(start_epoch, epochs):
        order = epoch_order(n, shuffle=shuffle, seed=spec.seed, epoch=epoch)
        windows = plan_epoch(
            n,
            batch_size=batch_size,
            accumulation_steps=spec.accumulation_steps,
            drop_remainder=spec.drop_remainder,
        )
        first_micro = start_micro if epoch == start_epoch else 0
        pending: list[tuple[dict[str, Any], Mapping[str, Any]]] = []
        progress.start_epoch(epoch, epochs, len(windows))
        for window in windows:
            for offset, (start, stop) in enumerate(window.micro_batches):
                micro_batch = window.first_micro_batch + offset
                if micro_batch < first_micro:
                    continue
                idx = order[start:stop]
                is_last = offset == len(window.micro_batches) - 1
                if begin_micro_batch is not None:
                    begin_micro_batch(is_last)
                engine.micro_step(x[idx], y[idx], weights[idx])
                if is_last:
                    record = {
                        "epoch": epoch,
                        "update": window.index,
                        "examples": window.examples,
                        "micro_batches": len(window.micro_batches),
                    }
                    try:
                        values = engine.apply_step()
                    except FloatingPointError:
                        # on_nonfinite="raise": the engine reset the window before raising, so
                        # the position moves past it too; a later fit() starts cleanly after it.
                        engine.set_position(Position(epoch, micro_batch + 1, *plan).as_tuple())
                        raise
                    pending.append((record, values))
                    if wants_records:
                        _resolve(engine, pending, history)
                        progress.update(history.records[-1])
                        for c in callbacks:
                            if hasattr(c, "on_update_end"):
                                c.on_update_end(trainer, history.records[-1])
                engine.set_position(Position(epoch, micro_batch + 1, *plan).as_tuple())
                for c in callbacks:
                    if hasattr(c, "on_micro_batch_end"):
                        c.on_micro_batch_end(trainer, epoch, micro_batch)
                if trainer.stop_training:
                    _resolve(engine, pending, history)
                    progress.close(history)
                    return history
        _resolve(engine, pending, history)
        engine.set_position(Position(epoch + 1, 0, *plan).as_tuple())
        progress.end_epoch(history, epoch)
        for c in callbacks:
            if hasattr(c, "on_epoch_end"):
                c.on_epoch_end(trainer, epoch, history)
        if trainer.stop_training:
            break
    progress.close(history)
    return history


def _resolve(
    engine: StepEngine,
    pending: list[tuple[dict[str, Any], Mapping[str, Any]]],
    history: History,
) -> None:
    # Device values are read once per epoch (or per update only when someone needs them): no
    # host synchronisation per micro-batch.
    for record, values in pending:
        fetched = engine.fetch(values)
        fetched["skipped"] = bool(fetched["skipped"])
        record.update(fetched)
        history.records.append(record)
    pending.clear()


class _Progress:
    """verbose=1: a rich progress bar per epoch (plain lines without rich); 2: a line per epoch."""

    def __init__(self, verbose: int) -> None:
        self.verbose = verbose
        self.bar: Any = None
        self.task: Any = None
        self.started = 0.0
        try:
            import rich.progress  # noqa: F401
        except ImportError:
            self.live = False
        else:
            self.live = verbose == 1  # a live bar shows each update's loss: read per update

    def start_epoch(self, epoch: int, epochs: int, updates: int) -> None:
        self.started = time.perf_counter()
        self.label = f"Epoch {epoch + 1}/{epochs}"
        if not self.live:
            return
        from rich.progress import Progress

        if self.bar is None:
            self.bar = Progress(transient=False)
            self.bar.start()
        self.task = self.bar.add_task(self.label, total=updates)

    def update(self, record: Mapping[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task, advance=1, description=f"{self.label} loss {record['loss']:.4f}"
            )

    def end_epoch(self, history: History, epoch: int) -> None:
        if self.verbose == 0 or self.live:
            return
        rows = [r for r in history.records if r["epoch"] == epoch]
        losses = [r["loss"] for r in rows if not r["skipped"]]
        mean = sum(losses) / len(losses) if losses else math.nan
        print(
            f"{self.label}: {len(rows)} updates, mean loss {mean:.4f}, "
            f"{time.perf_counter() - self.started:.1f}s",
            file=sys.stdout,
        )

    def close(self, history: History) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.verbose and history.skipped_updates:
            print(
                f"{history.skipped_updates} of {len(history)} updates skipped: non-finite "
                "gradients (see History.records[i]['skipped'])",
                file=sys.stdout,
            )
