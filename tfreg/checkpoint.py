"""Checkpoints of ``tfreg.Trainer``: the run's fingerprint, the checks ``trainer.checkpoint()``'s
``read``/``restore`` run on the file before anything is restored, and :class:`CheckpointManager`,
crash-safe saving and restoring (the twin of :mod:`torchref.checkpoint`; the protocol and the
checks are :mod:`tfreg_core.checkpoint`'s).

A checkpoint is refused, naming the field and both values, when it was saved by another run
(accumulation steps, seed, ``drop_remainder``, loss, optimizer class and slots, model weights'
names, shapes and dtypes, replica layout) or lacks the run record, or when its position lies
outside its plan or its accumulator counters contradict the position; nothing is restored then.
"""

from __future__ import annotations

import os
from typing import Any

from tfreg._compat import tf
from tfreg_core import checkpoint as core

__all__ = ["RUN_KEY", "CheckpointManager", "check_file", "run_fingerprint"]

RUN_KEY = "run/.ATTRIBUTES/py_state"
_POSITION_KEY = "window/position/.ATTRIBUTES/VARIABLE_VALUE"
_ACC_KEY = "accumulator/{}/{}/.ATTRIBUTES/VARIABLE_VALUE"
_PREFIX = "trainer"


def _rows(variables: Any) -> list[tuple[str, tuple[int, ...], str]]:
    # Short names (`kernel`): Keras uniquifies layer paths per process (dense, dense_1, ...).
    return [(v.name, tuple(v.shape), tf.as_dtype(v.dtype).name) for v in variables]


def run_fingerprint(trainer: Any, layout: str) -> dict[str, Any]:
    """What defines ``trainer``'s (built) run (see :func:`tfreg_core.checkpoint.fingerprint`)."""
    optimizer = trainer.optimizer
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
    return core.fingerprint(
        accumulation_steps=trainer.spec.accumulation_steps,
        seed=trainer.spec.seed,
        drop_remainder=trainer.spec.drop_remainder,
        loss=core.describe(trainer.loss),
        optimizer=f"{type(optimizer).__name__}({type(inner).__name__})"
        if inner is not optimizer
        else type(optimizer).__name__,
        model=_rows(trainer.model.weights),
        slots=[("", shape, dtype) for _, shape, dtype in _rows(optimizer.variables)],
        replicas=layout,
        batchnorm=trainer.batchnorm,
        data=trainer.data_digest,
    )


def check_file(
    path: str, run: dict[str, Any], *, accumulators: int, accumulation_steps: int
) -> str:
    """Refuse the checkpoint at ``path`` unless every tensor in it reads back whole, it is
    ``run``'s, its position is within its plan and (one device) each accumulator's counters
    agree with the position. Returns the run record's data digest (``""``: unknown)."""
    reader = tf.train.load_checkpoint(path)
    for key in reader.get_variable_to_shape_map():  # each read verifies the tensor's checksum
        reader.get_tensor(key)
    if not reader.has_tensor(RUN_KEY):
        core.check_same_run(None, run)
    saved = core.from_text(reader.get_tensor(RUN_KEY).decode())
    core.check_same_run(saved, run)
    position = core.check_position([int(v) for v in reader.get_tensor(_POSITION_KEY)])
    for i in range(accumulators):
        if not reader.has_tensor(_ACC_KEY.format(i, "count")):
            continue  # under a strategy the counters are saved per replica
        core.check_window(
            position,
            int(reader.get_tensor(_ACC_KEY.format(i, "micro_batches"))),
            float(reader.get_tensor(_ACC_KEY.format(i, "count"))),
            accumulation_steps,
        )
    return str(saved.get("data", ""))


class CheckpointManager(core.TrainerCheckpoints):
    """Crash-safe checkpoints of a ``tfreg.Trainer`` in ``directory``: ``save()`` writes
    ``trainer.checkpoint()`` into ``ckpt-<n>/`` (a temporary directory renamed into place, then
    the ``latest`` pointer replaced atomically: a process killed mid-save leaves the previous
    checkpoint intact; a ``tf.train.Checkpoint`` is several files, which no single rename could
    replace); ``restore()`` restores the latest one (every check of ``trainer.checkpoint()``
    first) and returns its path, or None when the directory holds none. Keeps the
    ``max_to_keep`` most recent. ``torchref.CheckpointManager`` is the PyTorch twin."""

    TRAINER = "tfreg.training.Trainer"

    def write(self, path: str) -> None:
        self.trainer.checkpoint().write(os.path.join(path, _PREFIX))

    def read(self, path: str) -> None:
        status = self.trainer.checkpoint().read(os.path.join(path, _PREFIX))
        status.assert_existing_objects_matched()
