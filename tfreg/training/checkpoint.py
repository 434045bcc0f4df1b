"""The ``Trainer`` checkpoint format: what :meth:`tfreg.Trainer.checkpoint` saves beside model and
optimizer (the open window's sums and position, the model's ``SeedGenerator`` states, under a
strategy each replica's partial sums and the replica layout) and the checks a read runs before
anything is restored (metric names, replica layout, :func:`tfreg.checkpoint.check_file`). The
object paths (``window/position``, ``window/metric_names``, ``accumulator/<i>/...``,
``replicas/count``) are the format: :mod:`tfreg.checkpoint` reads them too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tfreg._compat import keras, tf
from tfreg.checkpoint import check_file
from tfreg.distributed import Replicas
from tfreg_core import checkpoint as core_checkpoint
from tfreg_core.validation import InvalidArgumentError


class Text(tf.train.experimental.PythonState):
    """A string saved in the checkpoint (metric names, the replica count) -- not a variable,
    which ``MultiWorkerMirroredStrategy`` would have to broadcast (it cannot broadcast
    strings). ``TrainerCheckpoint`` reads it back before anything is restored; restoring
    leaves it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def serialize(self) -> str:
        return self.text

    def deserialize(self, string_value: Any) -> None:
        pass  # checked equal before the restore


class WindowHeader(tf.Module):
    """The window's position and metric names, without its replica-local sums (a strategy
    saves those per replica, see ``ReplicaLocal``)."""

    def __init__(self, window: Any) -> None:
        super().__init__(name="window")
        self.position = window.position
        self.metric_names = window.metric_names


class SeedStates(tf.Module):
    """The model's ``SeedGenerator`` states (Dropout, GaussianNoise, ...): in the checkpoint,
    so a resumed run draws the masks the uninterrupted run drew. ``model.variables`` is
    ``model.weights`` plus these (Keras 3's documented split)."""

    def __init__(self, model: keras.layers.Layer) -> None:
        super().__init__(name="rng")
        weights = {id(w) for w in model.weights}
        self.states = [v for v in model.variables if id(v) not in weights]


_NAMES_KEY = "window/metric_names/.ATTRIBUTES/py_state"
_REPLICAS_KEY = "replicas/count/.ATTRIBUTES/py_state"
ONE_DEVICE = (1, 1, 0)  # the layout of a checkpoint without per-replica sums


def layout_text(layout: tuple[int, int, int]) -> str:
    return "/".join(str(n) for n in layout)


def _describe_layout(layout: tuple[int, ...]) -> str:
    if len(layout) != 3:  # written before the layout was recorded: the replica count alone
        return f"{layout[0]} replica(s), replicas per worker not recorded"
    total, local, worker = layout
    return f"{total} replica(s), {local} of them on worker {worker}"


class ReplicaLocal(tf.Module):
    """Under a strategy: every local replica's own copy of the open window's partial sums
    (accumulator and statistics), saved component by component. Saving the ``ON_READ``
    variables themselves would store their sum over replicas and restore ``sum / R`` on each:
    the same total, but not the uninterrupted run's summation order, so not bitwise."""

    def __init__(self, replicas: Replicas, variables: Sequence[Any]) -> None:
        super().__init__(name="replicas")
        self.count = Text(layout_text(replicas.layout()))
        per_variable = [replicas.strategy.experimental_local_results(v) for v in variables]
        self.local = [list(copies) for copies in zip(*per_variable, strict=True)]


class TrainerCheckpoint(tf.train.Checkpoint):
    """``tf.train.Checkpoint`` that refuses, before restoring anything, a checkpoint whose
    window sums belong to other ``metrics`` (they would be reported under the wrong names), to
    another number of replicas (the partial sums are per replica) or to another run
    (:func:`tfreg.checkpoint.check_file`: its run record, position and counters). Once read,
    the record's data digest goes to ``on_data`` (the trainer's ``data_digest``)."""

    def __init__(
        self,
        metrics: Sequence[str],
        layout: tuple[int, int, int],
        run: dict[str, Any],
        counters: tuple[int, int],
        on_data: Callable[[str], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(run=Text(core_checkpoint.to_text(run)), **kwargs)
        self._metrics = ",".join(metrics)
        self._layout = layout
        self._run = core_checkpoint.to_text(run)  # text: tracking would wrap a dict's lists
        self._counters = counters  # (accumulators saved with their counters, window size)
        self._on_data = on_data

    def _check(self, path: str) -> str:
        reader = tf.train.load_checkpoint(path)
        if reader.has_tensor(_NAMES_KEY):
            saved = reader.get_tensor(_NAMES_KEY).decode()
            if saved != self._metrics:
                raise InvalidArgumentError(
                    "The checkpoint was saved by a Trainer with other metrics: "
                    f"metrics={saved.split(',') if saved else []}. Build the Trainer with them. "
                    f"Received: metrics={self._metrics.split(',') if self._metrics else []}"
                )
        # The replicas in sync alone do not say whose partial sums the file holds: 2 devices
        # of one process save both replicas', each of 2 workers its own replica's (restored
        # across, one replica's sums would count twice or not at all, silently).
        saved = (
            tuple(int(n) for n in reader.get_tensor(_REPLICAS_KEY).decode().split("/"))
            if reader.has_tensor(_REPLICAS_KEY)
            else ONE_DEVICE
        )
        if saved != self._layout:
            raise InvalidArgumentError(
                f"The checkpoint was saved by a Trainer on {_describe_layout(saved)}: its open "
                "window's partial sums are per replica. Resume under the same strategy and "
                "devices, each worker from its own checkpoint. Received: "
                f"{_describe_layout(self._layout)}"
            )
        accumulators, steps = self._counters
        run = core_checkpoint.from_text(self._run)
        return check_file(path, run, accumulators=accumulators, accumulation_steps=steps)

    def _check_readable(self, path: str) -> str:
        # A missing, truncated or foreign file fails in TF's reader (NotFoundError, DataLoss,
        # IndexError "Read less bytes than requested"): reported as the library's error naming
        # the path, and before anything is restored (check_file reads every tensor once).
        try:
            return self._check(path)
        except InvalidArgumentError:
            raise
        except (tf.errors.OpError, IndexError, UnicodeDecodeError, ValueError) as err:
            raise InvalidArgumentError(
                f"The checkpoint {path!r} cannot be read (missing, truncated, corrupt or not a "
                f"tfreg.Trainer checkpoint). Received: {type(err).__name__}: {err}"
            ) from err

    def read(self, save_path: str, options: Any = None) -> Any:
        data = self._check_readable(save_path)
        status = super().read(save_path, options=options)
        self._on_data(data)
        return status

    def restore(self, save_path: str, options: Any = None) -> Any:
        data = self._check_readable(save_path)
        status = super().restore(save_path, options=options)
        self._on_data(data)
        return status
