"""Checkpoints that survive: what defines a run, the checks a saved state passes before anything
is restored, and crash-safe writes. Framework-free, shared by :mod:`tfreg.checkpoint` and
:mod:`torchref.checkpoint`.

*A resume is the same run or it is refused.* A checkpoint records the run's
:func:`fingerprint` -- accumulation steps, seed, ``drop_remainder``, the loss (:func:`describe`),
the optimizer's class, the model's structure (names, shapes, dtypes) and the replica count -- and
:func:`check_same_run` refuses a trainer that differs, naming the field and both values, before
anything is restored. Not recorded, on purpose: the learning rate and the optimizer's other
hyperparameters, the regularizer, ``proximal``, ``clipnorm``/``global_clipnorm`` and
``on_nonfinite``. Each acts once per update, when a window closes, outside the accumulator (the
saved partial sums hold the data loss's gradients only), so changing one on resume changes the
updates from then on, as a learning-rate schedule does, and never mixes with saved state.
(A mid-epoch resume also needs the data the run was saved with: the position records the
epoch's plan, ``num_examples``/``batch_size``/``shuffle``, and the run record's ``data`` the
digest of the arrays the last ``fit`` trained on, which ``run_fit`` checks -- not
:func:`check_same_run`: a restoring trainer has seen no data yet. At an epoch boundary new data
is allowed.)

*All or nothing.* :func:`check_position` and :func:`check_window` validate the resumable
position and the open window's counters against the plan and the accumulator before the caller
applies any of the state.

*Crash-safe writes.* :class:`CheckpointDirectory` writes each checkpoint into a temporary
directory next to the others, fsyncs it, renames it into place (a rename within one directory
is atomic on POSIX) and only then points the ``latest`` file at it (written to a temporary file,
fsynced, atomically renamed). A process killed at any moment leaves the previous checkpoint and
the pointer to it intact; an unfinished temporary directory is ignored and removed by the next
save. Each checkpoint carries a manifest of its files' SHA-256 digests, verified before a
restore reads them: a damaged file is refused, never loaded altered.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tfreg_core.validation import InvalidArgumentError

__all__ = [
    "POSITION_FIELDS",
    "CheckpointDirectory",
    "TrainerCheckpoints",
    "atomic_write_text",
    "check_position",
    "check_same_run",
    "check_window",
    "describe",
    "fingerprint",
    "fsync",
]

# The fields of tfreg_core.training.Position, in order (a saved position is a tuple of them).
POSITION_FIELDS = (
    "epoch",
    "micro_batch",
    "num_examples",
    "batch_size",
    "shuffle",
    "window_examples",
)
_INT64_MAX = 2**63 - 1

_FIX = {
    "accumulation_steps": "the partial window would be merged into windows of another size",
    "seed": "the rest of the epoch would be drawn from another permutation",
    "drop_remainder": "the epoch's windows would be planned differently",
    "loss": "the open window's sums and count are the saved loss's, and the loss defines what "
    "the run minimises",
    "optimizer": "its slots (momenta, moments) would be lost or misread",
    "optimizer_slots": "its slots (momenta, moments) would be lost or misread",
    "model": "parameters would be restored into another architecture",
    "replicas": "the open window's partial sums are per replica",
    "batchnorm": "the moving statistics would be updated in another way mid-window",
}


_SCALARS = (bool, int, float, str, type(None))


def describe(loss: Any) -> str:
    """A loss as a checkpoint records it: a name as given (``"mse"``); a function or class by
    its ``__qualname__`` (not its module: a framework moving its private modules between
    versions must not refuse a resume); a ``functools.partial`` by its function and arguments;
    a loss object by its class and its settings -- ``get_config()`` where it has one (Keras:
    ``from_logits``, ``reduction``, ...), else its public attributes (a torch loss module:
    ``reduction``, ``ignore_index``, ``label_smoothing``, ...; its ``training`` flag is a mode,
    not a setting) -- of which plain values and callables (by name) count. Tensors (a
    class-weight buffer) and a lambda's body are not described: two lambdas read alike."""
    if isinstance(loss, str):
        return loss
    if isinstance(loss, functools.partial):
        args = ", ".join([describe(a) if callable(a) else repr(a) for a in loss.args])
        kwargs = ", ".join(
            f"{k}={describe(v) if callable(v) else repr(v)}"
            for k, v in sorted(loss.keywords.items())
        )
        return f"partial({describe(loss.func)}; {args}; {kwargs})"
    plain = inspect.isroutine(loss) or inspect.isclass(loss)
    kind = loss if plain else type(loss)
    name = str(getattr(kind, "__qualname__", repr(kind)))
    if plain:
        return name
    get_config = getattr(loss, "get_config", None)
    try:
        settings = dict(get_config()) if callable(get_config) else dict(vars(loss))
    except (TypeError, NotImplementedError):  # an object without __dict__ or config
        settings = {}
    parts = [
        f"{key}={describe(value) if callable(value) else repr(value)}"
        for key, value in sorted(settings.items())
        if not key.startswith("_")
        and key != "training"
        and (isinstance(value, _SCALARS) or callable(value))
    ]
    return f"{name}({', '.join(parts)})"


def fingerprint(
    *,
    accumulation_steps: int,
    seed: int,
    drop_remainder: bool,
    loss: str,
    optimizer: str,
    model: Sequence[tuple[str, Sequence[int], str]],
    replicas: str,
    slots: Sequence[tuple[str, Sequence[int], str]] = (),
    batchnorm: str = "per_micro_batch",
    data: str = "",
) -> dict[str, Any]:
    """What defines a run, as JSON-serialisable values (``model``: one ``[name, shape, dtype]``
    per parameter/weight; ``loss``: :func:`describe`'s text; ``optimizer``: its class name;
    ``slots``: its variables where the framework creates them up front (Keras; a torch
    optimizer's state describes itself); ``replicas``: the replica layout; ``batchnorm``: the
    trainer's BatchNorm mode, whose open-window moments only a ``"per_window"`` checkpoint
    holds); ``data``: :meth:`tfreg_core.training.ArrayData.digest` of the arrays the last
    ``fit`` trained on, ``""`` before any fit or for a stream (not digested) -- checked by
    ``run_fit`` on a mid-epoch resume, not by :func:`check_same_run`)."""

    def table(rows: Sequence[tuple[str, Sequence[int], str]]) -> list[list[Any]]:
        return [[str(n), [int(d) for d in shape], str(dtype)] for n, shape, dtype in rows]

    return {
        "accumulation_steps": int(accumulation_steps),
        "seed": int(seed),
        "drop_remainder": bool(drop_remainder),
        "loss": str(loss),
        "model": table(model),
        "optimizer": str(optimizer),
        "optimizer_slots": table(slots),
        "replicas": str(replicas),
        "batchnorm": str(batchnorm),
        "data": str(data),
    }


# Fields added to the run record later: a record written before holds their default.
_ADDED = {"batchnorm": "per_micro_batch"}
# Fields check_same_run does not compare: the restoring trainer has not seen its data yet
# (run_fit compares it on a mid-epoch resume; a record without it: unknown, not checked).
_NOT_COMPARED = ("data",)


def to_text(run: Mapping[str, Any]) -> str:
    """The fingerprint as the string a checkpoint stores."""
    return json.dumps(run, sort_keys=True)


def from_text(text: str) -> dict[str, Any]:
    """The fingerprint a checkpoint stored; a malformed one is refused."""
    try:
        run = json.loads(text)
    except ValueError:
        run = None
    if not isinstance(run, dict):
        raise InvalidArgumentError(
            f"The checkpoint's run record is malformed. Received: {text[:200]!r}"
        )
    return run


def check_same_run(saved: Any, current: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidArgumentError` naming the first field of ``current`` (a
    :func:`fingerprint`) that ``saved`` (the checkpoint's) lacks or holds with another value;
    ``data`` is only checked to be a string (see :func:`fingerprint`)."""
    if not isinstance(saved, Mapping):
        raise InvalidArgumentError(
            "The checkpoint has no valid run record (accumulation steps, seed, optimizer, model "
            f"structure, replicas): it cannot be checked to be this run. Received: {saved!r:.200}"
        )
    recorded = saved.get("data", "")
    if not isinstance(recorded, str):
        raise InvalidArgumentError(
            'The checkpoint\'s run record holds a malformed data digest (a hex string or "" '
            f"expected). Received: data={recorded!r:.200}"
        )
    for field, value in current.items():
        if field in _NOT_COMPARED:
            continue
        if field not in saved and _ADDED.get(field, ...) == value:
            continue
        if field not in saved:
            raise InvalidArgumentError(
                f"The checkpoint's run record lacks {field!r}: it cannot be checked to be this "
                f"run. Received: {field}={value!r:.200}"
            )
        theirs = saved[field]
        if theirs == value:
            continue
        if field in ("model", "optimizer_slots"):
            theirs, value = _first_difference(theirs, value)
        raise InvalidArgumentError(
            f"The checkpoint was saved by another run: {field}={theirs!r} there, "
            f"{field}={value!r} here ({_FIX.get(field, 'not the same run')}). Resume with the "
            "trainer that saved it, or start a new run."
        )


def _first_difference(saved: Any, current: list[Any]) -> tuple[Any, Any]:
    if not isinstance(saved, list) or len(saved) != len(current):
        count = len(saved) if isinstance(saved, list) else saved
        return f"{count} entries", f"{len(current)} entries"
    for theirs, mine in zip(saved, current, strict=True):
        if theirs != mine:
            return theirs, mine
    return saved, current  # unreachable when they differ


def _plain_int(value: Any, name: str, *, low: int = 0, high: int = _INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(
            f"The checkpoint's {name} must be an int. Received: {name}={value!r}"
        )
    if not low <= int(value) <= high:
        raise InvalidArgumentError(
            f"The checkpoint's {name} must be in [{low}, {high}]. Received: {name}={value!r}"
        )
    return int(value)


def check_position(position: Any) -> tuple[int, ...]:
    """A saved position: one int per :data:`POSITION_FIELDS`, all >= 0, its plan either an
    array plan (``num_examples``, ``batch_size`` > 0, ``shuffle`` 0/1) or the stream plan
    (0, 0, 0), the micro-batch within the plan's micro-batches and the window's examples within
    the epoch's. Returns it as a tuple of ints."""
    if isinstance(position, (str, bytes)) or not isinstance(position, Sequence):
        raise InvalidArgumentError(
            f"The checkpoint's position must be a sequence of {len(POSITION_FIELDS)} ints "
            f"{POSITION_FIELDS}. Received: position={position!r:.200}"
        )
    if len(position) != len(POSITION_FIELDS):
        raise InvalidArgumentError(
            f"The checkpoint's position must hold {len(POSITION_FIELDS)} ints "
            f"{POSITION_FIELDS}. Received: position={list(position)!r:.200}"
        )
    values = {
        f: _plain_int(v, f"position.{f}") for f, v in zip(POSITION_FIELDS, position, strict=True)
    }
    n, b, shuffle = values["num_examples"], values["batch_size"], values["shuffle"]
    if (n, b, shuffle) != (0, 0, 0):
        if n == 0 or b == 0 or shuffle > 1:
            raise InvalidArgumentError(
                "The checkpoint's position holds an invalid plan (num_examples, batch_size, "
                f"shuffle). Received: ({n}, {b}, {shuffle})"
            )
        _plain_int(values["micro_batch"], "position.micro_batch", high=-(-n // b))
        _plain_int(values["window_examples"], "position.window_examples", high=n)
    return tuple(values[f] for f in POSITION_FIELDS)


def check_window(
    position: Sequence[int], micro_batches: Any, count: Any, accumulation_steps: int
) -> None:
    """The open window's accumulator against the position: ``micro_batches`` in
    ``[0, accumulation_steps)`` and equal to ``micro_batch mod accumulation_steps`` (windows
    never span epochs and start every ``accumulation_steps`` micro-batches), ``count`` a finite
    number >= 0."""
    held = _plain_int(
        micro_batches, "accumulator micro_batches", high=max(accumulation_steps - 1, 0)
    )
    expected = position[1] % accumulation_steps
    if held != expected:
        raise InvalidArgumentError(
            f"The checkpoint's accumulator holds {held} micro-batch(es) but its position "
            f"(micro-batch {position[1]}, windows of {accumulation_steps}) says {expected}. "
            f"Received: micro_batches={held}, position={list(position)}"
        )
    if (
        isinstance(count, bool)
        or not isinstance(count, numbers.Real)
        or not math.isfinite(float(count))
        or float(count) < 0
    ):
        raise InvalidArgumentError(
            f"The checkpoint's accumulator count must be a finite number >= 0 (loss elements "
            f"in the open window). Received: count={count!r}"
        )


def fsync(path: str) -> None:
    """Flush ``path`` (a file, or a directory: its entries, e.g. a rename) to the disk. A
    rename is atomic, but only durable once its directory is fsynced, and the renamed file's
    data only once the file itself was."""
    directory = os.path.isdir(path)
    if directory and not hasattr(os, "O_DIRECTORY"):  # Windows: a folder cannot be opened
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digests(directory: str) -> dict[str, str]:
    """The SHA-256 digest of each file below ``directory`` (but the manifest), by relative path."""
    found = {}
    for root, _, files in os.walk(directory):
        for file in files:
            full = os.path.join(root, file)
            name = os.path.relpath(full, directory)
            if name == CheckpointDirectory.MANIFEST:
                continue
            digest = hashlib.sha256()
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            found[name] = digest.hexdigest()
    return found


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text``: a temporary file in the same directory, fsynced, renamed
    over ``path`` (atomic), the directory fsynced. A reader sees the old or the new text."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync(directory)


class CheckpointDirectory:
    """Numbered checkpoints ``ckpt-<n>`` in ``directory`` and a ``latest`` pointer (see the
    module docstring for the protocol). ``max_to_keep`` most recent ones are kept (>= 1).

    One writer per directory: writers saving into one directory at the same time (measured:
    3 threads x 15 saves) make most saves fail (another's cleanup removes a temporary
    directory, two take one number) and may leave ``latest`` naming a checkpoint another
    pruned, which ``latest()`` refuses -- a checkpoint is never mixed or silently replaced.
    Give each run (each worker under a multi-worker strategy) its own directory."""

    POINTER = "latest"
    PREFIX = "ckpt-"
    MANIFEST = "manifest.json"  # {file name: SHA-256 hex digest} of the checkpoint's files

    def __init__(self, directory: Any, *, max_to_keep: int = 2) -> None:
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise InvalidArgumentError(
                f"directory must be a non-empty path. Received: directory={directory!r}"
            )
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise InvalidArgumentError(
                f"max_to_keep must be an int >= 1. Received: max_to_keep={max_to_keep!r}"
            )
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = max_to_keep

    def _numbers(self) -> list[int]:
        found = []
        for name in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
            suffix = name[len(self.PREFIX) :]
            if name.startswith(self.PREFIX) and suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def latest(self) -> str | None:
        """The path of the last checkpoint completely written, or None when there is none."""
        pointer = os.path.join(self.directory, self.POINTER)
        try:
            with open(pointer) as f:
                name = f.read().strip()
        except FileNotFoundError:
            return None
        path = os.path.join(self.directory, name)
        if not name.startswith(self.PREFIX) or os.sep in name or not os.path.isdir(path):
            raise InvalidArgumentError(
                f"The checkpoint pointer {pointer} names no checkpoint of this directory. "
                f"Received: {name!r:.200}"
            )
        return path

    def verify(self, path: str) -> None:
        """Refuse the checkpoint directory ``path`` unless its files are those its manifest
        lists, each with the SHA-256 digest recorded when it was saved (a flipped byte in a
        torch zip is not noticed by ``torch.load``: the tensor would load altered)."""
        manifest = os.path.join(path, self.MANIFEST)
        try:
            with open(manifest) as f:
                recorded = json.load(f)
        except (OSError, ValueError) as err:
            raise InvalidArgumentError(
                f"The checkpoint {path!r} cannot be read (missing, truncated, corrupt or not "
                f"written by a CheckpointManager): its manifest is unreadable. Received: "
                f"{type(err).__name__}: {err}"
            ) from err
        found = _digests(path)
        if found != recorded:
            differ = sorted(
                name for name in set(found) | set(recorded) if found.get(name) != recorded.get(name)
            )
            raise InvalidArgumentError(
                f"The checkpoint {path!r} cannot be read (missing, truncated, corrupt or not "
                f"written by a CheckpointManager): files missing or changed since it was saved. "
                f"Received: {differ[:8]}"
            )

    def save(self, write: Callable[[str], None]) -> str:
        """``write(path)`` fills a fresh directory ``path``; it becomes the next ``ckpt-<n>``
        and the latest one only once completely on disk. Returns its path."""
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):  # left by a writer killed mid-save
            if name.startswith(".tmp-"):
                leftover = os.path.join(self.directory, name)
                if os.path.isdir(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(leftover)
        taken = self._numbers()
        name = f"{self.PREFIX}{(taken[-1] + 1) if taken else 0}"
        tmp = tempfile.mkdtemp(dir=self.directory, prefix=".tmp-")
        try:
            write(tmp)
            digests = _digests(tmp)
            with open(os.path.join(tmp, self.MANIFEST), "w") as f:
                json.dump(digests, f, sort_keys=True)
            for root, _, files in os.walk(tmp):
                for file in files:
                    fsync(os.path.join(root, file))
            fsync(tmp)
            final = os.path.join(self.directory, name)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync(self.directory)
        atomic_write_text(os.path.join(self.directory, self.POINTER), name)
        for old in taken[: max(len(taken) + 1 - self.max_to_keep, 0)]:
            shutil.rmtree(os.path.join(self.directory, f"{self.PREFIX}{old}"), ignore_errors=True)
        return final


def _packages(module: str) -> list[str]:
    # "a.b.c" -> ["a", "a.b", "a.b.c"]
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


class TrainerCheckpoints:
    """What both twins' ``CheckpointManager`` share: a :class:`CheckpointDirectory` of one
    trainer's checkpoints, ``save()`` and ``restore()`` (the latest checkpoint, its manifest
    verified first; None when there is none). A twin says how a checkpoint is written into a
    fresh directory (:meth:`write`) and read back into the trainer (:meth:`read`)."""

    TRAINER = ""  # the twin's trainer class, "package.training.Trainer"

    def __init__(self, trainer: Any, directory: Any, *, max_to_keep: int = 2) -> None:
        # By name, through the MRO (subclasses pass): the twin's training module imports its
        # checkpoint module, which therefore cannot import the Trainer class. A class defined
        # in a submodule matches under each package above it (tfreg.training.trainer.Trainer
        # is tfreg.training.Trainer).
        names = {
            f"{package}.{c.__qualname__}"
            for c in type(trainer).__mro__
            for package in _packages(c.__module__)
        }
        if self.TRAINER not in names:  # an nn.Module has a state_dict() too
            package, _, name = self.TRAINER.partition(".training.")
            raise InvalidArgumentError(
                f"trainer must be a {package}.{name}. Received: trainer={trainer!r:.200}"
            )
        self.trainer: Any = trainer
        self._directory = CheckpointDirectory(directory, max_to_keep=max_to_keep)
        self.directory = self._directory.directory

    @property
    def latest(self) -> str | None:
        """The path of the latest complete checkpoint, or None."""
        return self._directory.latest()

    def write(self, path: str) -> None:
        """Write the trainer's state into the fresh directory ``path``."""
        raise NotImplementedError

    def read(self, path: str) -> None:
        """Restore the checkpoint directory ``path`` (verified) into the trainer."""
        raise NotImplementedError

    def save(self) -> str:
        """Write the trainer's state as the next checkpoint; returns its path."""
        return self._directory.save(self.write)

    def restore(self) -> str | None:
        """Restore the latest checkpoint; returns its path, or None when there is none."""
        path = self._directory.latest()
        if path is None:
            return None
        self._directory.verify(path)
        self.read(path)
        return path
