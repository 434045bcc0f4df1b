"""The framework-free half of ``tfreg.Trainer`` and ``torchref.Trainer``.

Both trainers are a *step engine* (framework code: one micro-batch's gradient into the
accumulator; one update from the accumulator) driven by :func:`run_fit`, which owns everything
that must not differ between the frameworks: option validation (:class:`TrainerSpec`), the data
(:func:`fit_data`: in-memory arrays, :class:`ArrayData`, or an iterable of micro-batches,
:class:`StreamData`, each yielding :class:`tfreg_core.windows.Step` s), the resumable position,
callbacks (checked before training), validation after each epoch's last update, progress
output and the per-update :class:`History`. The loop reads top to bottom: for each step,
micro-batch into the engine; when the step closes its window, apply it (or discard it).

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

import hashlib
import inspect
import math
import numbers
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np

from tfreg_core import proximal as proximal_core
from tfreg_core import validation
from tfreg_core.validation import InvalidArgumentError
from tfreg_core.windows import Step, array_steps, epoch_order, plan_epoch, skip, stream_steps

__all__ = [
    "HOOKS",
    "METRICS",
    "NONFINITE_MESSAGE",
    "NONFINITE_MODES",
    "RECORD_FIELDS",
    "ArrayData",
    "History",
    "Position",
    "StepEngine",
    "StreamData",
    "TrainerSpec",
    "check_callbacks",
    "epoch_logs",
    "fit_data",
    "leading_dim",
    "leaves",
    "map_structure",
    "object_config",
    "resolve_proximal",
    "run_fit",
    "unpack_micro_batch",
    "validation_batches",
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
        self.include_bias = validation.strict_bool(include_bias, "include_bias")
        self.clipnorm = _optional_positive_float(clipnorm, "clipnorm")
        self.global_clipnorm = _optional_positive_float(global_clipnorm, "global_clipnorm")
        if self.clipnorm is not None and self.global_clipnorm is not None:
            raise InvalidArgumentError(
                "Only one of clipnorm and global_clipnorm can be set. "
                f"Received: clipnorm={clipnorm!r}, global_clipnorm={global_clipnorm!r}"
            )
        self.on_nonfinite = validation.choice(on_nonfinite, "on_nonfinite", NONFINITE_MODES)
        self.drop_remainder = validation.strict_bool(drop_remainder, "drop_remainder")
        self.jit_compile = validation.strict_bool(jit_compile, "jit_compile")
        if isinstance(metrics, str) or not isinstance(metrics, Sequence):
            raise InvalidArgumentError(
                f"metrics must be a sequence of names from {METRICS}. Received: metrics={metrics!r}"
            )
        for name in metrics:
            validation.choice(name, "metrics", METRICS)
        self.metrics = list(metrics)
        if isinstance(seed, bool) or not isinstance(seed, (int, numbers.Integral)) or seed < 0:
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


def resolve_proximal(proximal: Any, classes: Sequence[type[Any]], optimizer: Any = None) -> Any:
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
    ``epochs`` holds one dict per completed epoch: :func:`epoch_logs` and, with
    ``validation_data``, the ``val_`` values (Keras' ``History.history`` rows).
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.epochs: list[dict[str, float]] = []  # per epoch: epoch_logs + validation values

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
    window_examples: int = 0  # examples the open window holds (its History record's count)

    def as_tuple(self) -> tuple[int, ...]:
        # Not dataclasses.astuple: it deep-copies each field (12 us; run_fit calls this once per
        # micro-batch).
        return tuple(getattr(self, f.name) for f in fields(self))

    def _replace_window(self, window_examples: int) -> Position:
        return replace(self, window_examples=window_examples)


class StepEngine(Protocol):
    """What a framework provides to :func:`run_fit`. ``x``/``y`` may be nested (dicts, tuples);
    ``sample_weight`` is ``None`` (every loss element weighs 1) or what the data gave.

    Optional attributes: ``begin_micro_batch(closes)``, called before each micro-batch, and
    ``micro_update(x, y, sample_weight, position)`` (or ``None``), which does for a window of
    one micro-batch what ``micro_step``, ``apply_step`` and ``set_position(position)`` do, in
    one call, and returns ``apply_step``'s values."""

    def micro_step(self, x: Any, y: Any, sample_weight: Any) -> None: ...

    def apply_step(self) -> Mapping[str, Any]: ...

    def discard_window(self) -> None: ...

    def fetch(self, values: Mapping[str, Any]) -> dict[str, float]: ...

    def get_position(self) -> tuple[int, ...]: ...

    def set_position(self, position: tuple[int, ...]) -> None: ...


def _is_structure(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple))


def map_structure(fn: Any, structure: Any) -> Any:
    """``fn`` on every leaf of nested dicts/lists/tuples (the structure is kept)."""
    if isinstance(structure, dict):
        return {k: map_structure(fn, v) for k, v in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(map_structure(fn, v) for v in structure)
    return fn(structure)


def leaves(structure: Any) -> list[Any]:
    """The leaves of nested dicts/lists/tuples, in order (dicts by insertion order)."""
    if isinstance(structure, dict):
        return [leaf for v in structure.values() for leaf in leaves(v)]
    if isinstance(structure, (list, tuple)):
        return [leaf for v in structure for leaf in leaves(v)]
    return [structure]


def digest(structure: Any, *texts: str) -> list[int]:
    """Four 16-bit integers digesting the arrays of ``structure`` (nested dicts/lists/tuples of
    arrays or tensors, ``None`` left out: their dtypes, shapes and values) and ``texts``: what
    workers or ranks compare with one small collective to check they hold the same data
    (byte-level: values one ulp apart differ). A string array (numpy's object array of a
    ``tf.string`` tensor, whose own buffer holds pointers, different in every process) is
    digested by its strings."""
    hasher = hashlib.blake2b(digest_size=8)
    for text in texts:
        hasher.update(len(text).to_bytes(8, "little") + text.encode())
    for array in (np.asarray(v) for v in leaves(structure) if v is not None):
        hasher.update(f"{array.dtype}{array.shape}".encode())
        if array.dtype != object:
            hasher.update(array.tobytes())
            continue
        for item in array.ravel():
            item = item if isinstance(item, bytes) else str(item).encode()
            hasher.update(len(item).to_bytes(8, "little") + item)
    value = hasher.digest()
    return [int.from_bytes(value[i : i + 2], "little") for i in range(0, 8, 2)]


def leading_dim(structure: Any) -> int:
    """The micro-batch size: the first dimension of the first leaf (a static shape, no sync)."""
    shape = getattr(leaves(structure)[0], "shape", None)
    if not shape:
        raise InvalidArgumentError(
            "Every micro-batch leaf must be an array or tensor with a batch dimension. "
            f"Received: a leaf of shape {shape!r}"
        )
    return int(shape[0])


class ArrayData:
    """In-memory arrays (nested dicts/tuples of them for multi-input/-output models), cut by
    :func:`tfreg_core.windows.plan_epoch` in the order :func:`epoch_order` gives."""

    def __init__(self, x: Any, y: Any, sample_weight: Any, *, batch_size: int, shuffle: bool):
        self.x = map_structure(np.asarray, x)
        self.y = map_structure(np.asarray, y)
        self.sample_weight = (
            None if sample_weight is None else map_structure(np.asarray, sample_weight)
        )
        shapes = {
            name: [np.shape(leaf) for leaf in leaves(value)]
            for name, value in (("x", self.x), ("y", self.y))
        }
        # A scalar leaf (shape ()) counts as an empty first dimension: refused with the rest.
        firsts = {s[0] if s else 0 for shape_list in shapes.values() for s in shape_list}
        if len(firsts) != 1 or 0 in firsts:
            raise InvalidArgumentError(
                "x and y must be non-empty arrays (or dicts/tuples of arrays) with the same "
                f"first dimension. Received: x.shape={_shapes(self.x)}, y.shape={_shapes(self.y)}"
            )
        self.num_examples = firsts.pop()
        if self.sample_weight is not None:
            for leaf in leaves(self.sample_weight):
                if leaf.ndim == 0 or leaf.shape[0] != self.num_examples:
                    raise InvalidArgumentError(
                        f"sample_weight must have first dimension {self.num_examples}, one "
                        "weight (or one per loss element) per example. Received: "
                        f"sample_weight.shape={_shapes(self.sample_weight)}"
                    )
        self.batch_size = validation.positive_int(batch_size, "batch_size")
        self.shuffle = validation.strict_bool(shuffle, "shuffle")
        self.plan = (self.num_examples, self.batch_size, int(self.shuffle))
        # How an epoch's rows of one array are taken: NumPy indexing, or a framework's (tfreg,
        # full batch: the whole array as a tensor, without NumPy's indexing copy).
        self.take_rows: Callable[[np.ndarray, np.ndarray], Any] = _numpy_rows

    def digest(self) -> str:
        """A digest of ``x``, ``y`` and ``sample_weight`` (dtypes, shapes, values: blake2b via
        :func:`digest`, measured 0.2 s per 100 MB on the host), as hex: what a mid-epoch
        resume compares with the checkpoint's run record (:func:`run_fit`)."""
        return "".join(f"{limb:04x}" for limb in digest((self.x, self.y, self.sample_weight)))

    def updates(self, spec: TrainerSpec) -> int | None:
        return len(self._windows(spec))

    def _windows(self, spec: TrainerSpec) -> tuple[Any, ...]:
        return plan_epoch(
            self.num_examples,
            batch_size=self.batch_size,
            accumulation_steps=spec.accumulation_steps,
            drop_remainder=spec.drop_remainder,
        )

    def steps(self, spec: TrainerSpec, epoch: int, start: int) -> Iterator[tuple[Step, Any]]:
        order = epoch_order(self.num_examples, shuffle=self.shuffle, seed=spec.seed, epoch=epoch)
        for step in array_steps(self._windows(spec), start=start):
            idx = order[step.item[0] : step.item[1]]

            def take(a: np.ndarray, idx: np.ndarray = idx) -> Any:
                return self.take_rows(a, idx)

            weights = self.sample_weight
            if weights is not None:
                weights = map_structure(take, weights)
            yield step, (map_structure(take, self.x), map_structure(take, self.y), weights)


def _numpy_rows(array: np.ndarray, idx: np.ndarray) -> np.ndarray:
    rows: np.ndarray = array[idx]
    return rows


def _shapes(structure: Any) -> Any:
    return map_structure(np.shape, structure) if _is_structure(structure) else np.shape(structure)


class StreamData:
    """An iterable of micro-batches ``(x, y)`` or ``(x, y, sample_weight)``: windows of
    ``accumulation_steps`` consecutive ones (:func:`tfreg_core.windows.stream_steps`).

    Without ``steps_per_epoch`` an epoch is one pass (``iter(data)`` afresh each epoch); a
    resumed epoch skips the micro-batches the checkpoint already consumed, which reproduces the
    uninterrupted run when each pass yields the same micro-batches (unshuffled data, or a
    shuffle that depends on the epoch only). With ``steps_per_epoch`` the data is one stream
    read on across epochs (``steps_per_epoch`` micro-batches each; an infinite iterable
    needs it) and a resumed run reads on from the iterable it is given -- pass one positioned
    where the checkpointed run stopped. Micro-batch sizes may vary.
    """

    plan = (0, 0, 0)  # no array plan: a checkpoint saved on a stream resumes only on a stream

    def __init__(self, data: Any, *, steps_per_epoch: int | None) -> None:
        if not hasattr(data, "__iter__") or isinstance(data, (str, bytes, dict, np.ndarray)):
            raise InvalidArgumentError(
                "x must be arrays (with y) or an iterable of (x, y) / (x, y, sample_weight) "
                f"micro-batches (with y=None). Received: x={type(data).__name__}"
            )
        self.data = data
        self.steps_per_epoch = (
            None
            if steps_per_epoch is None
            else validation.positive_int(steps_per_epoch, "steps_per_epoch")
        )
        self._stream: Iterator[Any] | None = None

    def updates(self, spec: TrainerSpec) -> int | None:
        if self.steps_per_epoch is None:
            return None
        return -(-self.steps_per_epoch // spec.accumulation_steps)

    def steps(self, spec: TrainerSpec, epoch: int, start: int) -> Iterator[tuple[Step, Any]]:
        if self.steps_per_epoch is None:
            iterator = iter(self.data)
            skip(iterator, start)
        else:
            if self._stream is None:
                self._stream = iter(self.data)
            iterator = self._stream
        consumed = start
        for step in stream_steps(
            iterator,
            accumulation_steps=spec.accumulation_steps,
            drop_remainder=spec.drop_remainder,
            start=start,
            limit=self.steps_per_epoch,
        ):
            consumed = step.micro_batch + 1
            yield step, unpack_micro_batch(step.item)
        if consumed == 0:
            raise InvalidArgumentError(
                f"The data yielded no micro-batch in epoch {epoch}. Received: an empty iterable"
                + (" (an exhausted iterator?)" if epoch else "")
            )
        if self.steps_per_epoch is not None and consumed < self.steps_per_epoch:
            self._stream = None  # ran out before steps_per_epoch: the next epoch starts afresh

    def check_epochs(self, epochs_left: int) -> None:
        """An iterator (not re-iterable) is used up by one pass: refuse before training."""
        if self.steps_per_epoch is None and epochs_left > 1 and iter(self.data) is self.data:
            raise InvalidArgumentError(
                "An iterator (a generator, iter(dataset)) yields one pass only, but "
                f"{epochs_left} epochs are left: pass a re-iterable (a tf.data.Dataset, a "
                "DataLoader, a list) or steps_per_epoch. Received: x="
                f"{type(self.data).__name__}"
            )


def unpack_micro_batch(element: Any) -> tuple[Any, Any, Any]:
    """``(x, y)`` or ``(x, y, sample_weight)``, as Keras' ``unpack_x_y_sample_weight``."""
    if isinstance(element, (list, tuple)) and len(element) in (2, 3):
        x, y, *rest = element
        return x, y, rest[0] if rest else None
    raise InvalidArgumentError(
        "Each element of the data must be a tuple (x, y) or (x, y, sample_weight); x and y may "
        f"be tensors, tuples or dicts. Received: an element of type {type(element).__name__}"
        + (f" and length {len(element)}" if isinstance(element, (list, tuple)) else "")
    )


def fit_data(
    x: Any,
    y: Any,
    sample_weight: Any,
    *,
    batch_size: Any,
    epochs: Any,
    shuffle: Any,
    verbose: Any,
    steps_per_epoch: Any = None,
) -> ArrayData | StreamData:
    """Validate ``fit``'s arguments: arrays (``y`` given) or an iterable of micro-batches
    (``y=None``, ``batch_size=None``, ``sample_weight=None``: the elements carry them)."""
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise InvalidArgumentError(f"epochs must be an int >= 0. Received: epochs={epochs!r}")
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise InvalidArgumentError(f"verbose must be 0, 1 or 2. Received: verbose={verbose!r}")
    validation.strict_bool(shuffle, "shuffle")
    if y is not None:
        if steps_per_epoch is not None:
            raise InvalidArgumentError(
                "steps_per_epoch is for an iterable of micro-batches; arrays are cut by "
                f"batch_size. Received: steps_per_epoch={steps_per_epoch!r}"
            )
        return ArrayData(x, y, sample_weight, batch_size=batch_size, shuffle=shuffle)
    for name, value in (("batch_size", batch_size), ("sample_weight", sample_weight)):
        if value is not None:
            raise InvalidArgumentError(
                f"With an iterable of micro-batches (y=None), {name} comes from the data and "
                f"must be None. Received: {name}={value!r}"
            )
    return StreamData(x, steps_per_epoch=steps_per_epoch)


def validation_batches(
    validation_data: Any, batch_size: int | None
) -> Callable[[], Iterable[tuple[Any, Any, Any]]] | None:
    """``fit``'s ``validation_data`` checked now, before training: ``(x, y)`` /
    ``(x, y, sample_weight)`` arrays (in batches of ``batch_size``, 32 when None) or an
    iterable of such micro-batches. Returns a function giving a fresh pass of
    ``(x, y, sample_weight)`` batches per call (None without validation data)."""
    if validation_data is None:
        return None
    if isinstance(validation_data, tuple):
        vx, vy, vw = unpack_micro_batch(validation_data)
        arrays = ArrayData(vx, vy, vw, batch_size=batch_size or 32, shuffle=False)
        spec = TrainerSpec()
        return lambda: (batch for _, batch in arrays.steps(spec, 0, 0))
    stream = StreamData(validation_data, steps_per_epoch=None)
    return lambda: (unpack_micro_batch(element) for element in stream.data)


def check_callbacks(callbacks: Sequence[Any] | None) -> list[Any]:
    """The project's callbacks, checked before any training: each defines at least one of
    ``HOOKS`` and each defined hook accepts the arguments ``run_fit`` passes."""
    checked = list(callbacks or ())
    for callback in checked:
        defined = [name for name in HOOKS if callable(getattr(callback, name, None))]
        if not defined:
            raise InvalidArgumentError(
                f"A callback must define one of {list(HOOKS)} (or be a keras.callbacks.Callback "
                f"where Keras callbacks are supported). Received: {callback!r}"
            )
        for name in defined:
            try:
                inspect.signature(getattr(callback, name)).bind(*(None,) * HOOKS[name])
            except TypeError:
                received = inspect.signature(getattr(callback, name))
                raise InvalidArgumentError(
                    f"Callback hook {type(callback).__name__}.{name} must accept "
                    f"{HOOK_ARGS[name]}. Received: {name}{received}"
                ) from None
            except ValueError:  # no signature to inspect (a builtin): trust it
                continue
    return checked


HOOK_ARGS = {
    "on_train_begin": "(trainer)",
    "on_epoch_begin": "(trainer, epoch)",
    "on_micro_batch_end": "(trainer, epoch, micro_batch)",
    "on_update_end": "(trainer, record)",
    "on_epoch_end": "(trainer, epoch, history)",
    "on_train_end": "(trainer, history)",
}
HOOKS = {name: args.count(",") + 1 for name, args in HOOK_ARGS.items()}


ALL_SKIPPED_MESSAGE = (
    "Epoch {epoch}: every update was skipped (non-finite gradients); the weights did not "
    "change and the logged loss is nan."
)


def epoch_logs(history: History, epoch: int) -> dict[str, float]:
    """One epoch's logs (as Keras' ``on_epoch_end`` gets them): each value averaged over the
    epoch's applied updates, weighted by their example counts (Keras' running mean over
    batches weighs each batch by its size). An epoch whose every update was skipped logs NaN
    (what Keras logs for non-finite losses) and warns (``RuntimeWarning``)."""
    epoch_rows = [r for r in history.records if r["epoch"] == epoch]
    rows = [r for r in epoch_rows if not r["skipped"]]
    if epoch_rows and not rows:
        warnings.warn(
            ALL_SKIPPED_MESSAGE.format(epoch=epoch + 1),
            RuntimeWarning,
            stacklevel=4,  # the user's fit() call (epoch_logs <- run_fit <- Trainer.fit)
        )
        return {k: math.nan for k in epoch_rows[0] if k not in RECORD_FIELDS}
    total = sum(r["examples"] for r in rows)
    keys = [k for k in (rows[0] if rows else {}) if k not in RECORD_FIELDS]
    return {k: sum(r[k] * r["examples"] for r in rows) / total for k in keys}


# Bookkeeping entries of a History record (not averaged into the epoch logs).
RECORD_FIELDS = ("epoch", "update", "examples", "micro_batches", "elements", "skipped")


def run_fit(
    engine: StepEngine,
    trainer: Any,
    spec: TrainerSpec,
    data: ArrayData | StreamData,
    *,
    epochs: int,
    callbacks: Sequence[Any] | None,
    verbose: int,
    validate: Callable[[], Mapping[str, float]] | None = None,
) -> History:
    """Train from the engine's position (epoch, micro-batch) up to ``epochs`` epochs in total.

    ``epochs`` is the final epoch index, as Keras' ``fit(epochs=..., initial_epoch=...)`` with
    ``initial_epoch`` taken from the position: a trainer already at ``epochs`` trains nothing
    and warns (``UserWarning``) at every verbosity. A checkpoint saved mid-window holds the
    accumulator and the position; resuming replays nothing and re-plans nothing, so the
    remaining micro-batches land exactly where the uninterrupted run put them. Callbacks
    (checked by :func:`check_callbacks` before anything runs) may define the ``HOOKS``; they
    stop training by setting ``trainer.stop_training = True``. ``validate()`` runs after the
    epoch's last update (its weights are the epoch's final ones) and before ``on_epoch_end``;
    its values and :func:`epoch_logs` go into ``history.epochs``.

    A mid-epoch resume needs the data the checkpoint was saved with: the same plan
    (``num_examples``, ``batch_size``, ``shuffle``) and, for arrays, the same
    :meth:`ArrayData.digest` as ``trainer.resumed_data_digest`` (the restored run record's;
    ``""``: nothing restored, or unknown -- not checked). At an epoch boundary new data is
    allowed, and so is the same trainer continuing an epoch on arrays changed in-process.
    ``trainer.data_digest`` becomes this data's digest (``""`` for a stream) once the checks
    pass.
    """
    callbacks = check_callbacks(callbacks)
    history = History()
    saved = Position(*engine.get_position())
    if saved.micro_batch and data.plan != (saved.num_examples, saved.batch_size, saved.shuffle):
        raise InvalidArgumentError(
            "Resuming mid-epoch needs the data the checkpoint was saved with: "
            f"{_describe_plan(saved.as_tuple()[2:5])}. Received: {_describe_plan(data.plan)}"
        )
    # Hashed once per fit, arrays only (a stream is not digested: its position is all a
    # checkpoint knows of it). "" recorded = unknown (a stream, or a record without it).
    data_digest = data.digest() if isinstance(data, ArrayData) else ""
    # Against a restored checkpoint's record only: the same trainer continuing an epoch on
    # arrays the user changed in this process (after fixing a non-finite window, say) is theirs.
    recorded = getattr(trainer, "resumed_data_digest", "")
    if saved.micro_batch and recorded and data_digest != recorded:
        raise InvalidArgumentError(
            "The checkpoint was saved while training on other data: resuming mid-epoch would "
            "train the rest of the epoch on arrays it did not start with. Pass the same arrays, "
            f"or start a new epoch. Received: data digest {data_digest}, the checkpoint's "
            f"{recorded}"
        )
    start_epoch = saved.epoch
    trainer.stop_training = False
    progress = _Progress(verbose)
    if start_epoch >= epochs:
        warnings.warn(
            f"Nothing to train: the trainer is at epoch {start_epoch} and epochs={epochs} is the "
            "final epoch index to train up to (Keras' epochs with initial_epoch at the trainer's "
            "position); pass a larger epochs to continue.",
            UserWarning,
            stacklevel=3,
        )
    if isinstance(data, StreamData):
        data.check_epochs(epochs - start_epoch)
    if start_epoch < epochs:  # what the run record says the trainer last trained on
        trainer.data_digest = data_digest
        trainer.resumed_data_digest = ""
    hooks = _Hooks(callbacks, trainer)
    wants_records = progress.live or hooks.has("on_update_end")
    # Optional engine hook (torchref on a process group: DDP synchronises the closing backward).
    begin_micro_batch = getattr(engine, "begin_micro_batch", None)
    # Optional: a window of one micro-batch in one call -- micro-batch, update and the position
    # after it (tfreg: one graph instead of two calls and an eager assign).
    micro_update = getattr(engine, "micro_update", None)
    hooks.call("on_train_begin")
    for epoch in range(start_epoch, epochs):
        resumed = epoch == start_epoch
        examples = saved.window_examples if resumed else 0
        pending: list[tuple[dict[str, Any], Mapping[str, Any]]] = []
        progress.start_epoch(epoch, epochs, data.updates(spec))
        hooks.call("on_epoch_begin", epoch)
        for step, (x, y, weights) in data.steps(spec, epoch, saved.micro_batch if resumed else 0):
            if begin_micro_batch is not None:
                begin_micro_batch(step.closes)
            fused = (
                micro_update is not None
                and step.closes
                and not step.drop
                and step.window_micro_batches == 1
            )
            if not fused:
                engine.micro_step(x, y, weights)
            examples += leading_dim(y)
            next_position = Position(epoch, step.micro_batch + 1, *data.plan, examples)
            if step.closes and step.drop:
                engine.discard_window()
            elif step.closes:
                record = {
                    "epoch": epoch,
                    "update": step.window,
                    "examples": examples,
                    "micro_batches": step.window_micro_batches,
                }
                try:
                    if fused and micro_update is not None:  # (checked above; for mypy)
                        after = next_position._replace_window(0).as_tuple()
                        values = micro_update(x, y, weights, after)
                    else:
                        values = engine.apply_step()
                except FloatingPointError:
                    # on_nonfinite="raise": the engine reset the window before raising, so
                    # the position moves past it too; a later fit() starts cleanly after it.
                    engine.set_position(next_position._replace_window(0).as_tuple())
                    raise
                pending.append((record, values))
            if step.closes:
                examples = 0
                next_position = next_position._replace_window(0)
            if not fused:  # the fused call assigned it
                # Before on_update_end: a checkpoint written there resumes after this update.
                engine.set_position(next_position.as_tuple())
            if step.closes and not step.drop and wants_records:
                _resolve(engine, pending, history)
                progress.update(history.records[-1])
                hooks.call("on_update_end", history.records[-1])
            hooks.call("on_micro_batch_end", epoch, step.micro_batch)
            if trainer.stop_training:
                _resolve(engine, pending, history)
                progress.close(history)
                hooks.call("on_train_end", history)
                return history
        _resolve(engine, pending, history)
        engine.set_position(Position(epoch + 1, 0, *data.plan).as_tuple())
        logs = epoch_logs(history, epoch)
        if validate is not None:
            logs.update(validate())
        history.epochs.append(logs)
        progress.end_epoch(history, epoch)
        hooks.call("on_epoch_end", epoch, history)
        if trainer.stop_training:
            break
    progress.close(history)
    hooks.call("on_train_end", history)
    return history


def _describe_plan(plan: Sequence[int]) -> str:
    if tuple(plan) == StreamData.plan:
        return "an iterable of micro-batches"
    n, batch_size, shuffle = plan
    return f"num_examples={n}, batch_size={batch_size}, shuffle={bool(shuffle)}"


class _Hooks:
    def __init__(self, callbacks: list[Any], trainer: Any) -> None:
        self.callbacks = callbacks
        self.trainer = trainer

    def has(self, name: str) -> bool:
        return any(callable(getattr(c, name, None)) for c in self.callbacks)

    def call(self, name: str, *args: Any) -> None:
        for c in self.callbacks:
            hook = getattr(c, name, None)
            if callable(hook):
                hook(self.trainer, *args)


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

    def start_epoch(self, epoch: int, epochs: int, updates: int | None) -> None:
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
