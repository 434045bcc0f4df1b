"""``tfreg.Trainer`` and ``tfreg.AccumulatingModel`` under ``tf.distribute``: exact accumulation
across replicas -- ``MirroredStrategy`` (the devices of one machine) for both, and
``MultiWorkerMirroredStrategy`` (several processes or machines, configured by ``TF_CONFIG``)
for ``Trainer`` (Keras' own ``fit``, which ``AccumulatingModel`` runs in, fails under it in
Keras 3.15: refused at ``compile``).

Build the model, and then the trainer or wrapper (and ``compile``), inside ``strategy.scope()``;
the trainer runs distributed by itself. Per update, over ``R`` replicas each accumulating its
share of ``k`` micro-batches (``batch_size`` is the **global** micro-batch, as in Keras ``fit``
under a strategy)::

    g = (sum_{replicas} sum_{micro-batches} grad(w_i * l_i)) / N_global  +  grad(penalty)
    N_global = all-reduced count of the loss elements that count (masks, ignore_class)

which is one step on the concatenated window. ``Trainer`` with arrays or an iterable of
micro-batches: every worker passes the same data and replica ``r`` (of all workers) trains on
its share of each global micro-batch of ``n`` examples -- positions ``[r*b, (r+1)*b)`` clipped
to ``n``, with ``b = ceil(n/R)`` (as ``tf.data`` splits a global batch; torch's
``tfreg_core.distributed.rank_share`` keeps ``b`` per rank fixed instead) -- so no example is
repeated or dropped; a short micro-batch may leave a replica few examples, or none (it still
joins the all-reduce, with zero gradients).
``AccumulatingModel`` leaves the input to Keras ``fit`` (its distributed dataset splits each
global batch across the replicas); the counts are all-reduced the same way.

Communication per update: every replica adds its micro-batches into its own (``ON_READ``)
accumulator, with no collective; the update all-reduces the local gradient sums, counts and
loss/metric sums **once** -- one flattened vector per dtype -- in cross-replica context. The
penalty, clipping (the global norm of the reduced gradient), the non-finite check and the
optimizer step then run once, in cross-replica context, on values identical on every worker:
the optimizer is handed the reduced gradient (no second all-reduce) and every copy of a
variable receives the same update, so the replicas stay bit-identical. A non-finite gradient
on any replica is non-finite in the reduced sum, so every replica skips (or raises) together.
The penalty is counted once, not ``R`` times.

Checkpoints (``Trainer.checkpoint()``) hold each replica's partial window sums, so a resume
mid-window is bitwise; they resume under the same strategy, replica count and replicas per
worker, and under ``MultiWorkerMirroredStrategy`` every worker writes and reads its own (the
checkpoint records the layout and worker index; anything else is refused before restoring).

Differences from ``torch.distributed`` (``torchref.distributed``): ``batch_size`` is global here
(Keras' convention) and per rank there (torch's); here the strategy owns the collectives and
the optimizer receives the reduced gradient, there DDP's bucketed all-reduce runs on the
window's closing backward and is rescaled from its average to the sum. Both reduce once per
update and both give the same numbers (``parity_tests/test_distributed_parity.py``).

Refused before training: a model whose variables were not created under the trainer's strategy
(or the reverse), an optimizer created outside the scope, strategies other than the two
above, ``jit_compile=True`` (XLA does not compile ``strategy.run``), float16 loss scaling
(untested under a strategy), a distributed dataset passed to ``Trainer.fit`` (pass the
``tf.data.Dataset`` of global micro-batches), and -- ``Trainer`` under
``MultiWorkerMirroredStrategy`` -- workers passing different arrays (sizes or values, e.g.
each its own shard: compared by a digest, once per ``fit``) or a different ``batch_size``,
``shuffle``, ``seed``, ``accumulation_steps`` or ``drop_remainder`` (a ``tf.data`` pipeline or
iterable is compared at its first micro-batch and its length, once per ``fit``: each worker
must pass the same one, unsharded), and
workers starting ``fit`` from different weights, optimizer state or position (set or loaded
on some workers only: the strategy broadcasts initial values, not later assignments).
``AccumulatingModel`` needs ``steps_per_execution=1`` under a strategy (the window closes
between Keras steps), and ``batch_size``/``validation_batch_size`` of at least the replica
count (Keras' ``fit``/``evaluate`` fail on an empty share in the first batch).
A worker that raises leaves the others in a collective. One whose process exits is noticed at
once (its socket closes: ``UnavailableError``, ~1 s); one that stays alive (stuck elsewhere, or
catching the error) holds the others until the collective times out
(``tf.distribute.experimental.CommunicationOptions(timeout_seconds=)`` on the strategy:
``DeadlineExceededError``; without it they wait for ever). Either way ``Trainer`` re-raises
TensorFlow's error, same class, with a message naming the worker and the likely cause (as
``torchref.distributed`` does for a process group); the process cannot train again (TensorFlow:
"Restart your program to reset").

Inputs: each replica slices its share of the global micro-batch on its device, so the whole
micro-batch is copied to every device; on GPUs feed ``AccumulatingModel`` a ``tf.data``
pipeline (Keras distributes it) when that copy matters. Validation (``Trainer``) runs on each
worker's first device on the full validation data. BatchNorm normalises each replica's share
(Keras' ``synchronized=True`` for global statistics): not an exactness claim of this module.
Random layers (``Dropout``, ``GaussianNoise``) draw from one ``SeedGenerator`` state that every
replica holds a copy of, so every replica draws the same mask for its share (one device draws
one mask for the whole micro-batch): the noise repeats across replicas, and a run with a
Dropout model is not the one-device run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tfreg._compat import keras, tf
from tfreg_core.distributed import digest
from tfreg_core.training import TrainerSpec
from tfreg_core.validation import InvalidArgumentError

__all__ = [
    "Replicas",
    "local_variable",
    "replicas",
    "scatter_add",
    "update_function",
    "zero",
]

_SUPPORTED = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
_COLLECTIVE_FAILED = (
    "A collective of tfreg.Trainer failed on worker {worker} of MultiWorkerMirroredStrategy: "
    "another worker raised, exited, stopped early (stop_training or a callback on some workers "
    "only) or timed out (CommunicationOptions(timeout_seconds=...) on the strategy bounds the "
    "wait). Original error: {error}"
)
# What a collective raises when a peer is gone: its socket closed (Unavailable), the strategy's
# timeout (DeadlineExceeded), or a collective aborted by an earlier failure (Cancelled/Aborted).
_PEER_FAILURES = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)


def local_variable(initial_value: Any, *, name: str | None = None, first: bool = False) -> Any:
    """A non-trainable variable each replica updates on its own (``ON_READ``): the accumulator
    sums and window statistics. Read in cross-replica context it is the sum over replicas
    (``first=True``: replica 0's value, for counters every replica advances alike, so reading
    it needs no collective). Without a strategy it is a plain variable."""
    aggregation = tf.VariableAggregation.ONLY_FIRST_REPLICA if first else tf.VariableAggregation.SUM
    return tf.Variable(
        initial_value,
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=aggregation,
    )


def zero(variable: Any) -> None:
    """Assign zeros to ``variable`` without reading it. Reading a replica-local (``ON_READ``)
    sum in cross-replica context is a reduction over the replicas, and both
    ``zeros_like(v)`` and ``assign``'s default ``read_value=True`` read it: under
    ``MultiWorkerMirroredStrategy`` one more all-reduce per variable and update (8 besides the
    update's one for a 2-layer model), in eager code a collective every worker must join."""
    variable.assign(tf.zeros(variable.shape, variable.dtype), read_value=False)


def scatter_add(variable: Any, slices: tf.IndexedSlices) -> None:
    """``variable.scatter_add(slices)`` (an embedding's sparse gradient into its accumulator).
    A replica-local (``ON_READ``) variable has no ``scatter_add``: there the slices are summed
    into a dense tensor first and added (the same sum, reassociated where rows repeat)."""
    if not _distributed(variable):
        variable.scatter_add(slices)
        return
    rows = tf.TensorShape(variable.shape)[0]
    variable.assign_add(tf.math.unsorted_segment_sum(slices.values, slices.indices, rows))


def update_function(fn: Callable[[], Any], replicas: Replicas | None, **kwargs: Any) -> Any:
    """``tf.function(fn, **kwargs)`` for an update (cross-replica graph code); under a strategy
    traced as when ``fit`` is called outside ``strategy.scope()``, also when the user calls it
    inside (the usual Keras pattern). Inside the scope, in cross-replica context, Keras' code
    fails: its TensorFlow optimizer applies through ``maybe_merge_call``, which asks the replica
    context -- ``None`` there -- for a ``merge_call`` (``AttributeError: 'NoneType' object has
    no attribute 'merge_call'``), and the penalty's gradient reads a mirrored variable's
    ``handle``, refused there. Outside it the optimizer calls ``strategy.extended.update``
    directly (which enters the variables' strategy itself), and the collectives go through
    ``strategy.run`` either way: the tested path. Only the traced graph's copy of the
    distribution stack is emptied (a ``tf.function`` traces with its own copy)."""
    if replicas is None:
        return tf.function(fn, **kwargs)

    def outside_scope() -> Any:
        graph = tf.compat.v1.get_default_graph()
        stack = graph._distribution_strategy_stack  # no public way to leave a scope
        graph._distribution_strategy_stack = []
        try:
            return fn()
        finally:
            graph._distribution_strategy_stack = stack

    return tf.function(outside_scope, **kwargs)


def _distributed(variable: Any) -> bool:
    # A Keras variable wraps the tf.Variable in `.value` (a tf.Variable's `value` is a method).
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return isinstance(value, tf.distribute.DistributedValues)


class Replicas:
    """What the engines ask a ``tf.distribute`` strategy: run a micro-batch on every replica
    (each on its share), and the one reduction per update. Built by :func:`replicas`."""

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self.strategy = strategy
        self.num_replicas = int(strategy.num_replicas_in_sync)
        # Several processes: what the cross-worker checks and error messages are about (the
        # replicas of one process share their data, plan and weights by construction).
        self.multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)

    def check_options(self, optimizer: Any, *, jit_compile: bool) -> None:
        """Refuse what the distributed path does not support, before any variable exists."""
        if jit_compile:
            raise InvalidArgumentError(
                "jit_compile=True is not supported under a tf.distribute strategy (XLA does "
                "not compile strategy.run). Received: jit_compile=True"
            )
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise InvalidArgumentError(
                "float16 loss scaling (LossScaleOptimizer) is not supported under a "
                "tf.distribute strategy yet; train in float32 or mixed_bfloat16. Received: "
                f"optimizer={type(optimizer).__name__}"
            )
        if not _distributed(optimizer.iterations):
            raise InvalidArgumentError(
                "The optimizer was created outside strategy.scope(): create it (or pass its "
                "name) inside the scope, with the model. Received: optimizer="
                f"{type(optimizer).__name__} built outside {type(self.strategy).__name__}"
            )

    def check_keras_fit(self) -> None:
        """``AccumulatingModel`` trains inside Keras ``fit``, which (Keras 3.15, TF 2.21) fails
        under ``MultiWorkerMirroredStrategy`` before its first step -- ``fit``'s symbolic build
        reduces a ``PerReplica`` batch it cannot convert -- for a plain model too
        (``tests/test_distributed_tf_multiworker.py`` pins it). Refuse it at ``compile``, naming the
        engine that works."""
        if self.multi_worker:
            raise InvalidArgumentError(
                "AccumulatingModel runs inside Keras fit(), which fails under "
                "MultiWorkerMirroredStrategy in this Keras version even without accumulation; "
                "use tfreg.Trainer (exact under MultiWorkerMirroredStrategy) instead. "
                "Received: strategy=MultiWorkerMirroredStrategy"
            )

    def check_keras_batch_sizes(self, method: str, arguments: dict[str, Any]) -> None:
        """``AccumulatingModel.fit``/``evaluate``'s ``batch_size`` and ``validation_batch_size``
        (global) must give every replica an example: Keras 3.15's ``fit`` and ``evaluate`` build
        their step on the first global batch summed across the replicas, which fails in
        TensorFlow (``AddN`` of shapes ``[1, d]`` and ``[0, d]``) when a replica's share is
        empty -- for a plain model too; in ``fit``'s validation only after the epoch's updates.
        Later short batches are fine (the step is built once). ``Trainer`` has no such limit."""
        for name in ("batch_size", "validation_batch_size"):
            size = arguments.get(name)
            if size is not None and size < self.num_replicas:
                raise InvalidArgumentError(
                    f"Under a tf.distribute strategy {name} is the global batch, split across "
                    f"the replicas, and Keras {method} needs at least one example per replica "
                    f"in it: use {name} >= {self.num_replicas} (or tfreg.Trainer, which has no "
                    f"such limit). Received: {name}={size} on {self.num_replicas} replicas"
                )

    # -- per micro-batch (graph code) ----------------------------------------------------

    def run(self, fn: Callable[..., Any], args: Sequence[Any]) -> Any:
        """``fn(*share)`` on every replica, ``share`` its part of ``args`` = ``(x, y,
        sample_weight)``, one global micro-batch (the same on every worker)."""
        return self.strategy.run(lambda *values: fn(*_share(values)), args=tuple(args))

    # -- per update (cross-replica graph code) -------------------------------------------

    def reduce(self, tensors: Sequence[Any]) -> list[tf.Tensor]:
        """The sum over replicas of each replica's local value of ``tensors`` (``ON_READ``
        variables or replica-local tensors), in one all-reduce per dtype of the flattened
        values. Called in cross-replica context; every worker gets the same values."""
        tensors = list(tensors)

        def local() -> list[tf.Tensor]:
            values = [tf.convert_to_tensor(t) for t in tensors]
            groups: dict[tf.DType, list[int]] = {}
            for i, value in enumerate(values):
                groups.setdefault(value.dtype, []).append(i)
            context = tf.distribute.get_replica_context()
            out: list[tf.Tensor | None] = [None] * len(values)
            for indices in groups.values():
                flat = tf.concat([tf.reshape(values[i], [-1]) for i in indices], axis=0)
                flat = context.all_reduce(tf.distribute.ReduceOp.SUM, flat)
                sizes = [int(values[i].shape.num_elements()) for i in indices]
                for i, part in zip(indices, tf.split(flat, sizes), strict=True):
                    out[i] = tf.reshape(part, values[i].shape)
            return out

        reduced = self.strategy.run(local)
        # Identical on every replica after the all-reduce: take this worker's first copy.
        return [self.strategy.experimental_local_results(r)[0] for r in reduced]

    def check_plan(self, plan: Sequence[int], spec: TrainerSpec, arrays: Sequence[Any]) -> None:
        """Every worker must cut the same windows from the same arrays in the same order (one
        collective per ``fit``; the replicas of one process share the plan by construction):
        a worker with another ``shuffle`` or ``seed`` would take its replicas' shares from
        another order -- some examples trained twice, others never, silently -- and workers
        passing their own shard of the data (equal sizes) would each train on part of their
        shard. ``arrays`` (``x, y, sample_weight``) are compared by a digest of their values
        (hashed on the host once per ``fit``: measured 0.4 GB/s on this project's CPU machine)."""
        if not self.multi_worker:
            return
        num_examples, batch_size, shuffle = plan
        limbs = digest(arrays, str(spec.seed))
        steps, drop = spec.accumulation_steps, int(spec.drop_remainder)
        if not self.same_everywhere([num_examples, batch_size, shuffle, steps, drop, *limbs]):
            raise InvalidArgumentError(
                "Every worker must call fit with the same arrays (sizes and values), batch_size, "
                "shuffle, seed, accumulation_steps and drop_remainder (not each worker its own "
                "shard: every replica takes its share of each global micro-batch). Received on "
                f"worker {self._worker()}: num_examples={num_examples}, batch_size={batch_size}, "
                f"shuffle={bool(shuffle)}, seed={spec.seed}, accumulation_steps={steps}, "
                f"drop_remainder={spec.drop_remainder}, and array values or a seed that may "
                "differ from another worker's"
            )

    def check_stream(self, element: Sequence[Any], length: int) -> None:
        """A stream (a ``tf.data.Dataset`` or iterable of global micro-batches) must be the
        same on every worker: each replica takes its share of its own worker's micro-batch, so
        a per-worker ``dataset.shard()`` or an unseeded shuffle would train on part of each
        worker's batches -- examples dropped, silently -- and streams of different lengths
        would stop in mismatched collectives. Compared once per ``fit``, at its first
        micro-batch (``element``, on the host: no peeking, which would shift a reshuffling
        dataset's epochs), with ``length`` (micro-batches per epoch; -1 unknown)."""
        if not self.multi_worker:
            return
        limbs = digest(element)
        if not self.same_everywhere([length, *limbs]):
            raise InvalidArgumentError(
                "Every worker must pass the same stream of global micro-batches (each replica "
                "trains on its share of each): the first micro-batch or the number of "
                "micro-batches differs across workers (a per-worker dataset.shard(), an "
                "unseeded shuffle?). Pass the same unsharded tf.data.Dataset, seeded, on every "
                f"worker. Received on worker {self._worker()}: micro-batches per epoch="
                f"{'unknown' if length < 0 else length} and a first micro-batch that differs "
                "from another worker's"
            )

    def check_state(self, variables: Sequence[Any]) -> None:
        """Every worker must start ``fit`` from the same weights, optimizer state and position
        (one collective per ``fit``). The strategy broadcasts a variable's initial value only;
        weights set or loaded on some workers (``set_weights``, ``load_weights`` or a checkpoint
        restored on the chief alone) would be updated by the same reduced gradient on each
        worker from different values: replicas apart for good, silently."""
        if not self.multi_worker:
            return
        # Eager reads of mirrored variables: this worker's first copy, no collective.
        limbs = digest([tf.convert_to_tensor(v).numpy() for v in variables])
        if not self.same_everywhere(limbs):
            raise InvalidArgumentError(
                "Every worker must start fit from the same model weights, optimizer state and "
                "position: set, load or restore them on every worker alike "
                "(MultiWorkerMirroredStrategy broadcasts only the initial values). Received on "
                f"worker {self._worker()}: weights/optimizer/position that differ from another "
                "worker's"
            )

    @contextlib.contextmanager
    def collectives(self) -> Iterator[None]:
        """Around host calls that run collectives (the update, :meth:`same_everywhere`): under
        ``MultiWorkerMirroredStrategy`` a peer's failure is re-raised as the same TensorFlow
        error class with a message saying what probably happened."""
        try:
            yield
        except _PEER_FAILURES as error:
            if not self.multi_worker:
                raise
            message = _COLLECTIVE_FAILED.format(worker=self._worker(), error=error.message)
            raise type(error)(error.node_def, error.op, message) from error

    def _worker(self) -> int:
        resolver = self.strategy.cluster_resolver
        return 0 if resolver is None else int(resolver.task_id or 0)

    def layout(self) -> tuple[int, int, int]:
        """(replicas of all workers, replicas of this worker, this worker's index): what a
        checkpoint of per-replica partial sums belongs to. ``MirroredStrategy`` on 2 devices and
        ``MultiWorkerMirroredStrategy`` on 2 workers of 1 device both have 2 replicas in sync,
        but the first saves 2 replicas' sums per file and the second 1."""
        local = len(self.strategy.extended.worker_devices)
        return self.num_replicas, local, self._worker()

    def same_everywhere(self, values: Sequence[int]) -> bool:
        """Whether ``values`` (host integers below 2**26) are equal on every worker (eager; a
        collective every worker must join: once per ``fit``). ``ReduceOp`` has no MAX: with
        ``s1 = sum(v)`` and ``s2 = sum(v*v)`` over the ``R`` replicas, all are equal exactly
        when ``s1 == R*v`` and ``s2 == R*v*v`` (zero variance; exact in float64)."""
        vector = tf.constant([float(v) for v in values], tf.float64)
        local = tf.concat([vector, vector * vector], axis=0)

        def total() -> tf.Tensor:
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.SUM, local)

        with self.collectives():
            summed = tf.function(lambda: self.strategy.run(total), autograph=False)()
        summed = self.strategy.experimental_local_results(summed)[0]
        return bool(tf.reduce_all(tf.equal(summed, float(self.num_replicas) * local)))

    def run_in_replicas(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on every replica (cross-replica graph code): state that must be updated in
        replica context (Keras metrics under a strategy)."""
        return self.strategy.run(fn)


def _share(values: Sequence[Any]) -> list[Any]:
    # Replica r of R takes positions [r*b, (r+1)*b) of the global micro-batch, b = ceil(n/R),
    # clipped to n (tfreg_core.distributed.rank_share, in graph ops): a partition, empty
    # shares included.
    context = tf.distribute.get_replica_context()
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    world = context.num_replicas_in_sync
    leaves = [v for v in tf.nest.flatten(values[1]) if v is not None]
    n = tf.shape(leaves[0])[0]
    b = (n + world - 1) // world
    start = tf.minimum(replica * b, n)
    stop = tf.minimum(start + b, n)
    return [
        None if v is None else tf.nest.map_structure(lambda t: t[start:stop], v) for v in values
    ]


def replicas(model: keras.layers.Layer, *, owner: str) -> Replicas | None:
    """The :class:`Replicas` of the strategy in scope when ``owner`` is built (``None`` without
    one), after checking that ``model``'s variables belong to it."""
    strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    variables = list(model.variables)
    distributed = [_distributed(v) for v in variables]
    if strategy is None:
        if any(distributed):
            raise InvalidArgumentError(
                f"The model's variables were created under a tf.distribute strategy: build the "
                f"{owner} inside the same strategy.scope(). Received: {owner} built outside any "
                "strategy scope"
            )
        return None
    if not isinstance(strategy, _SUPPORTED):
        raise InvalidArgumentError(
            "Exact distributed accumulation supports tf.distribute.MirroredStrategy and "
            f"MultiWorkerMirroredStrategy. Received: strategy={type(strategy).__name__}"
        )
    if variables and not all(distributed):
        raise InvalidArgumentError(
            f"The {owner} is built inside strategy.scope() but the model's variables are not "
            "distributed: build (or load) the model inside the same scope. Received: "
            f"a model built outside strategy.scope() ({type(strategy).__name__})"
        )
    foreign = [
        v.name
        for v in variables
        if getattr(getattr(v, "value", v), "distribute_strategy", strategy) is not strategy
    ]
    if foreign:
        raise InvalidArgumentError(
            f"The model's variables belong to another strategy than the one the {owner} is "
            f"built in. Received: variables {foreign[:3]} from another strategy.scope()"
        )
    return Replicas(strategy)
