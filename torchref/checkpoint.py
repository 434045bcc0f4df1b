"""Checkpoints of ``torchref.Trainer``: the run's fingerprint, the whole-state check
``Trainer.load_state_dict`` runs before it applies anything, and :class:`CheckpointManager`,
crash-safe saving and restoring (the twin of :mod:`tfreg.checkpoint`; the protocol and the
checks are :mod:`tfreg_core.checkpoint`'s).

A state is refused, naming the part and the value, when it lacks a part (model, optimizer,
accumulator, window, RNG, run record), was saved by another run (accumulation steps, seed,
``drop_remainder``, loss, optimizer class, model structure, world size), or holds a tensor of
another shape/dtype, a position outside the plan, negative or non-finite counts, or values of
the wrong type. Nothing is restored unless everything passes.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from tfreg_core import checkpoint as core
from tfreg_core.validation import InvalidArgumentError
from torchref._compat import torch

__all__ = ["CheckpointManager", "check_state", "run_fingerprint"]

_FILE = "trainer.pt"


def run_fingerprint(trainer: Any, layout: str) -> dict[str, Any]:
    """What defines ``trainer``'s run (see :func:`tfreg_core.checkpoint.fingerprint`);
    ``layout``: ``"world_size/rank"`` (``"1/0"`` without a process group)."""
    spec = trainer.spec
    return core.fingerprint(
        accumulation_steps=spec.accumulation_steps,
        seed=spec.seed,
        drop_remainder=spec.drop_remainder,
        loss=core.describe(trainer.loss),
        optimizer=type(trainer.optimizer).__name__,
        model=[
            (name, tuple(t.shape), str(t.dtype).replace("torch.", ""))
            for name, t in trainer.model.state_dict().items()
        ],
        replicas=layout,
        batchnorm=trainer.batchnorm,
        data=trainer.data_digest,
    )


def _mapping(value: Any, name: str, keys: tuple[str, ...] | None = None) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(
            f"The state's {name} must be a dict. Received: {name}={type(value).__name__}"
        )
    if keys is not None:
        missing = [k for k in keys if k not in value]
        unknown = [k for k in value if k not in keys]
        if missing or unknown:
            raise InvalidArgumentError(
                f"The state's {name} must hold exactly {list(keys)}. Received: missing "
                f"{missing}, unknown {unknown}"
            )
    return value


def _tensor_like(value: Any, like: torch.Tensor, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(
            f"The state's {name} must be a tensor. Received: {name}={type(value).__name__}"
        )
    if value.shape != like.shape or value.dtype != like.dtype:
        raise InvalidArgumentError(
            f"The state's {name} must have shape {tuple(like.shape)} and dtype {like.dtype}. "
            f"Received: shape {tuple(value.shape)}, dtype {value.dtype}"
        )


def _scalar(value: Any, name: str) -> float:
    if not isinstance(value, torch.Tensor) or value.ndim != 0 or value.dtype != torch.float64:
        raise InvalidArgumentError(
            f"The state's {name} must be a float64 0-d tensor. Received: {name}={value!r:.200}"
        )
    return float(value)


def _kind(value: Any) -> str:
    """A hyperparameter's kind, for comparing a saved param group with this optimizer's: a
    number may be saved as a float, an int or a 0-d tensor (a tensor learning rate)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.ndim == 0):
        return "number"
    if isinstance(value, (tuple, list)):
        return f"sequence of {len(value)} " + "/".join(sorted({_kind(v) for v in value}))
    return "None" if value is None else type(value).__name__


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    mine = optimizer.state_dict()
    saved = _mapping(saved, "optimizer", ("state", "param_groups"))
    groups, state = saved["param_groups"], saved["state"]
    if not isinstance(groups, list) or len(groups) != len(mine["param_groups"]):
        raise InvalidArgumentError(
            f"The state's optimizer must hold {len(mine['param_groups'])} param group(s). "
            f"Received: {groups!r:.200}"
        )
    for i, (theirs, ours) in enumerate(zip(groups, mine["param_groups"], strict=True)):
        theirs = _mapping(theirs, f"optimizer.param_groups[{i}]")
        missing = sorted(set(ours) - set(theirs))
        params = theirs.get("params")
        if missing or not isinstance(params, list) or params != list(ours["params"]):
            raise InvalidArgumentError(
                f"The state's optimizer.param_groups[{i}] must hold the keys {sorted(ours)} and "
                f"params {ours['params']} ({type(optimizer).__name__}). Received: missing keys "
                f"{missing}, params {params!r:.200}"
            )
        for key, value in ours.items():  # a numeric hyperparameter stays one (lr, betas)
            if _kind(value) not in ("bool", "None") and _kind(theirs[key]) != _kind(value):
                raise InvalidArgumentError(
                    f"The state's optimizer.param_groups[{i}][{key!r}] must be a "
                    f"{_kind(value)} as this optimizer's is. Received: {key}={theirs[key]!r:.200}"
                )
    params = {
        index: p
        for ours, group in zip(mine["param_groups"], optimizer.param_groups, strict=True)
        for index, p in zip(ours["params"], group["params"], strict=True)
    }
    for key, slots in _mapping(state, "optimizer.state").items():
        if key not in params:
            raise InvalidArgumentError(
                f"The state's optimizer.state has an entry for parameter {key!r}, which the "
                f"optimizer does not have. Received: keys {list(state)!r:.200}"
            )
        for slot, value in _mapping(slots, f"optimizer.state[{key}]").items():
            name = f"optimizer.state[{key}][{slot!r}]"
            if value is not None and not isinstance(value, (torch.Tensor, numbers.Real)):
                raise InvalidArgumentError(
                    f"The state's {name} must be a tensor, a number or None. Received: "
                    f"{name}={value!r:.200}"
                )
            # Another floating dtype is fine: Optimizer.load_state_dict casts slots to the
            # parameter's dtype.
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != params[key].shape:
                raise InvalidArgumentError(
                    f"The state's {name} must have the parameter's shape "
                    f"{tuple(params[key].shape)}. Received: shape {tuple(value.shape)}"
                )


def check_state(trainer: Any, state: Any) -> None:
    """Raise :class:`InvalidArgumentError` unless ``state`` is a complete ``state_dict()`` of
    this run that ``trainer`` can restore (see the module docstring). Changes nothing."""
    # The parts are those this trainer's own state_dict() writes: a part missing or unknown is
    # refused whichever parts a trainer's options add.
    own = trainer.state_dict()
    if isinstance(state, Mapping) and "run" in state:  # another run's: said before its parts
        core.check_same_run(state["run"], own["run"])
    state = _mapping(state, "state", tuple(own))
    core.check_same_run(state["run"], own["run"])
    metrics = state["metrics"]
    if not isinstance(metrics, list) or metrics != trainer.spec.metrics:
        raise InvalidArgumentError(
            f"The state was saved by a Trainer with other metrics: metrics={metrics!r}. "
            f"Build the Trainer with them. Received: metrics={trainer.spec.metrics}"
        )
    sums_like = trainer.accumulator.sums  # one per parameter the trainer steps
    model = _mapping(state["model"], "model")
    mine = own["model"]
    if list(model) != list(mine):
        raise InvalidArgumentError(
            f"The state's model must hold the entries {list(mine)[:8]}... Received: "
            f"{list(model)[:8]}"
        )
    for name, tensor in mine.items():
        _tensor_like(model[name], tensor, f"model[{name!r}]")
    _check_optimizer(state["optimizer"], trainer.optimizer)
    acc = _mapping(state["accumulator"], "accumulator", ("sums", "count", "micro_batches"))
    sums = acc["sums"]
    if not isinstance(sums, list) or len(sums) != len(sums_like):
        raise InvalidArgumentError(
            f"The state's accumulator must hold {len(sums_like)} sums. Received: "
            f"{type(sums).__name__} of {len(sums) if isinstance(sums, list) else '?'}"
        )
    for i, (saved, like) in enumerate(zip(sums, sums_like, strict=True)):
        _tensor_like(saved, like, f"accumulator.sums[{i}]")
    window = _mapping(state["window"], "window", tuple(own["window"]))
    position = core.check_position(window["position"])
    count = _scalar(acc["count"], "accumulator.count")
    core.check_window(position, acc["micro_batches"], count, trainer.spec.accumulation_steps)
    for name in ("loss_sum", "weight_sum", "examples"):
        _scalar(window[name], f"window.{name}")
    metric_sums = window["metric_sums"]
    if not isinstance(metric_sums, list) or len(metric_sums) != len(trainer.spec.metrics):
        raise InvalidArgumentError(
            f"The state's window.metric_sums must hold one 0-d tensor per metric "
            f"({len(trainer.spec.metrics)}). Received: {metric_sums!r:.200}"
        )
    for i, total in enumerate(metric_sums):
        _scalar(total, f"window.metric_sums[{i}]")
    touched = window["touched"]
    if (
        not isinstance(touched, list)
        or len(touched) != len(sums_like)
        or not all(isinstance(t, bool) for t in touched)
    ):
        raise InvalidArgumentError(
            f"The state's window.touched must be a list of {len(sums_like)} bools (one per "
            f"parameter: whether the open window reached it). Received: {touched!r:.200}"
        )
    rng = _mapping(state["rng"], "rng")
    if "cpu" not in rng:
        raise InvalidArgumentError(
            f"The state's rng must hold 'cpu' (torch.get_rng_state()). Received: keys {list(rng)}"
        )
    _tensor_like(rng["cpu"], own["rng"]["cpu"], "rng['cpu']")  # its size is the generator's
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list) or not all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1 for t in cuda
    ):
        raise InvalidArgumentError(
            "The state's rng['cuda'] must be a list of CUDA RNG states (uint8 tensors). "
            f"Received: {cuda!r:.200}"
        )
    # A trainer on the CPU has no CUDA states to compare a saved one with.
    for i, (theirs, ours) in enumerate(zip(cuda, own["rng"].get("cuda", []), strict=False)):
        _tensor_like(theirs, ours, f"rng['cuda'][{i}]")
    if "loss_scale" in own:
        scale = _mapping(state["loss_scale"], "loss_scale", tuple(own["loss_scale"]))
        for name in ("scale", "unit"):
            value = scale[name]
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise InvalidArgumentError(
                    f"The state's loss_scale[{name!r}] must be a finite number > 0. Received: "
                    f"{name}={value!r:.200}"
                )
        tracker = scale["growth_tracker"]
        if isinstance(tracker, bool) or not isinstance(tracker, int) or tracker < 0:
            raise InvalidArgumentError(
                "The state's loss_scale['growth_tracker'] must be an int >= 0. Received: "
                f"growth_tracker={tracker!r:.200}"
            )


class CheckpointManager(core.TrainerCheckpoints):
    """Crash-safe checkpoints of a ``torchref.Trainer`` in ``directory``: ``save()`` writes
    ``trainer.state_dict()`` as ``ckpt-<n>/trainer.pt`` (a temporary directory renamed into
    place, then the ``latest`` pointer replaced atomically: a process killed mid-save leaves the
    previous checkpoint intact); ``restore()`` loads the latest one (``torch.load`` with
    ``weights_only=True``: nothing is unpickled) and returns its path, or None when the
    directory holds none. Keeps the ``max_to_keep`` most recent. ``tfreg.CheckpointManager``
    is the TensorFlow twin."""

    TRAINER = "torchref.training.Trainer"

    def write(self, path: str) -> None:
        torch.save(self.trainer.state_dict(), os.path.join(path, _FILE))

    def read(self, path: str) -> None:
        file = os.path.join(path, _FILE)
        try:
            state = torch.load(file, weights_only=True)
        except Exception as err:  # torch.load's many failure modes: a zip, pickle or OS error
            # (its own message suggests weights_only=False, which would unpickle a hostile file)
            raise InvalidArgumentError(
                f"The checkpoint {file!r} cannot be read (missing, truncated, corrupt or not a "
                f"torchref.Trainer checkpoint). Received: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from err
        self.trainer.load_state_dict(state)
