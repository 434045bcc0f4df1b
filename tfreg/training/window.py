"""One accumulation window of the TensorFlow trainers: its variables, ``micro`` (one
micro-batch in), ``close`` (one update out) and ``discard``. ``Trainer`` (its engine) and
``AccumulatingModel`` each hold one; the arithmetic of closing is
:func:`tfreg_core.update.close_window` and :func:`tfreg_core.update.window_record`, run on
TensorFlow tensors (:data:`tfreg._ops.UPDATE_OPS`), the pattern of ``torch.optim``'s
functional kernels: this class gathers the window's state, the core computes.

The variables, per loss term ``o``: an accumulator (:mod:`tfreg.accumulation`: gradient sums
``G_o``, element count ``N_o``, micro-batches) and the loss sum ``S_o``; for the metrics the
weight sum and one weighted sum per metric; optionally the examples seen (``AccumulatingModel``'s
loss tracker weighs windows by them); the resumable position and the metric names
(``Trainer``'s checkpoint). Under a ``tf.distribute`` strategy the sums are replica-local and
``close`` reduces them with one all-reduce per dtype (:meth:`tfreg.distributed.Replicas.reduce`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from tfreg import accumulation
from tfreg._compat import keras, tf
from tfreg._losses import LossTerm, MicroBatch, element_weights
from tfreg._ops import METRIC_OPS, UPDATE_OPS
from tfreg.batchnorm import WindowMoments
from tfreg.distributed import Replicas, local_variable, zero
from tfreg.penalties import penalty as _penalty
from tfreg.proximal import Proximal
from tfreg.training.checkpoint import Text
from tfreg.training.checks import loss_scale
from tfreg_core.metrics import METRIC_FUNCTIONS
from tfreg_core.training import Position
from tfreg_core.update import Term, close_window, window_record

__all__ = ["Window", "metric_sums"]


def _penalty_fn(
    model: keras.layers.Layer, variables: list[Any], regularizer: Any, include_bias: bool
) -> Callable[[], tf.Tensor | None]:
    """The once-per-update penalty: ``regularizer`` via :func:`tfreg.penalty` plus every
    variable's own Keras ``regularizer`` (``kernel_regularizer=`` on a layer), as float64."""

    def total() -> tf.Tensor | None:
        terms = []
        if regularizer is not None:
            terms.append(_penalty(model, regularizer, include_bias=include_bias))
        terms += [v.regularizer(v) for v in variables if getattr(v, "regularizer", None)]
        return tf.add_n([tf.cast(t, tf.float64) for t in terms]) if terms else None

    return total


def _metric_weights(sample_weight: Any, values: tf.Tensor, y_pred: Any) -> tf.Tensor:
    # A metric's per-element values weighted like the loss -- ones, per example or per element
    # -- and, as Keras' metrics do, by the output's mask (masked elements weigh 0).
    w = element_weights(sample_weight, values)
    w = tf.ones_like(values) if w is None else tf.broadcast_to(w, tf.shape(values))
    mask = getattr(y_pred, "_keras_mask", None)
    if mask is not None and mask.shape.rank == values.shape.rank:
        w = w * tf.cast(mask, w.dtype)
    return w


def metric_sums(
    metrics: Sequence[str], y: Any, y_pred: Any, sample_weight: Any
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """One batch's metric weight sum ``sum(w)`` and per metric ``sum(value * w)`` (float64;
    :mod:`tfreg_core.metrics`, one-output models)."""
    values = [METRIC_FUNCTIONS[name](y, y_pred, METRIC_OPS) for name in metrics]
    weights = _metric_weights(sample_weight, values[0], y_pred)
    return tf.reduce_sum(weights), [tf.reduce_sum(v * weights) for v in values]


class _LossSums(tf.Module):
    # Per-term loss sums (float64); a module of its own: the checkpoint path window/losses/sums.
    def __init__(self, num_terms: int) -> None:
        super().__init__(name="loss_sums")
        self.sums = [local_variable(tf.constant(0.0, tf.float64)) for _ in range(num_terms)]


class _State(tf.Module):
    """The window's statistics, position and metric names, as ``Trainer.checkpoint()`` saves
    them under ``window/`` (the accumulators go under ``accumulator/``)."""

    def __init__(self, num_terms: int, metrics: Sequence[str]) -> None:
        super().__init__(name="window")
        zero_ = tf.constant(0.0, tf.float64)
        self.losses = _LossSums(num_terms)
        self.weight_sum = local_variable(zero_)
        self.metric_sums = [local_variable(zero_) for _ in metrics]
        self.position = tf.Variable(tf.zeros([len(fields(Position))], tf.int64), trainable=False)
        self.metric_names = Text(",".join(metrics))


class Window:
    """The open window of ``variables`` (see the module docstring) and the update that closes
    it: ``optimizer``, the once-per-update penalty (``regularizer`` and the variables' own
    regularizers), ``proximal`` (applied after an applied step), Keras' ``clipnorm`` /
    ``global_clipnorm``. Graph-safe: ``micro``, ``close`` and ``discard`` run inside the
    trainers' ``tf.function`` s (``close`` in cross-replica context under a strategy)."""

    def __init__(
        self,
        model: keras.layers.Layer,
        variables: Sequence[Any],
        terms: Sequence[LossTerm],
        optimizer: Any,
        *,
        regularizer: Any = None,
        include_bias: bool = False,
        proximal: Proximal | None = None,
        metrics: Sequence[str] = (),
        clipnorm: float | None = None,
        global_clipnorm: float | None = None,
        replicas: Replicas | None = None,
        moments: WindowMoments | None = None,
        count_examples: bool = False,
    ) -> None:
        self.model = model
        self.variables = list(variables)
        self.terms = tuple(terms)
        self.optimizer = optimizer
        self.metrics = tuple(metrics)
        self.clipnorm, self.global_clipnorm = clipnorm, global_clipnorm
        self.replicas = replicas
        self.moments = moments  # batchnorm="per_window": the window's BatchNorm moments
        self.penalty = _penalty_fn(model, self.variables, regularizer, include_bias)
        self.proximal = proximal
        self.accs = [accumulation.init(self.variables) for _ in self.terms]
        self.state = _State(len(self.terms), self.metrics)
        zero_ = tf.constant(0.0, tf.float64)
        self.examples = local_variable(zero_) if count_examples else None
        # The record's terms: Keras logs S_o for a "sum" reduction, the mean for "none" (which
        # it trains as a sum: `LossTerm.summed`, the gradient's rule).
        self._logged = [Term(t.name, t.weight, summed=t.reduction == "sum") for t in self.terms]

    @property
    def micro_batches(self) -> Any:
        """The open window's micro-batch count (a replica-local variable: every replica
        advances it alike)."""
        return self.accs[0].micro_batches

    def capture(self) -> Any:
        """The context a micro-batch's forward pass runs in (the BatchNorm moments' capture
        under ``batchnorm="per_window"``)."""
        return contextlib.nullcontext() if self.moments is None else self.moments.capture()

    def micro(self, batch: MicroBatch, y: Any, sample_weight: Any, examples: Any = None) -> None:
        """Add one micro-batch (:func:`tfreg._losses.micro_batch_gradients`' result): per term
        its gradient sums, count and loss sum, the metric sums of ``y`` against its
        predictions, and its ``examples`` (when counted)."""
        for acc, grads, count in zip(self.accs, batch.grads, batch.counts, strict=True):
            # An element count (a size, or a sum of a 0/1 mask): finite and >= 0 by
            # construction, so no assert per micro-batch.
            accumulation.add(acc, grads, count, check_count=False)
        for total, value in zip(self.state.losses.sums, batch.sums, strict=True):
            total.assign_add(value)
        if self.examples is not None:
            self.examples.assign_add(examples)
        if self.metrics:  # one output (checked by the Trainer)
            weight_sum, sums = metric_sums(self.metrics, y, batch.y_pred, sample_weight)
            for total, value in zip(self.state.metric_sums, sums, strict=True):
                total.assign_add(value)
            self.state.weight_sum.assign_add(weight_sum)

    def _statistics(self) -> list[Any]:
        state = self.state
        extra = [] if self.examples is None else [self.examples]
        return [*state.losses.sums, state.weight_sum, *state.metric_sums, *extra]

    def _reduced(self) -> tuple[list[list[Any]], list[Any], list[Any]]:
        # (gradient sums per term, counts, statistics), summed over the replicas under a
        # strategy (one all-reduce per dtype), else the variables' values.
        local = [
            *(s for acc in self.accs for s in acc.sums),
            *(acc.count for acc in self.accs),
            *self._statistics(),
        ]
        if self.replicas is None:
            values = [tf.convert_to_tensor(v) for v in local]
        else:
            values = self.replicas.reduce(local)
        n, k = len(self.variables), len(self.terms)
        sums = [values[i * n : (i + 1) * n] for i in range(k)]
        return sums, values[n * k : (n + 1) * k], values[(n + 1) * k :]

    def close(self) -> dict[str, tf.Tensor]:
        """One update from the window (graph code), then an empty window. Returns the record
        (:func:`tfreg_core.update.window_record`: ``loss``, ``data_loss``, ``penalty``,
        ``elements``, per-term losses, metrics), ``skipped`` and, when counted, ``examples``.

        A non-finite gradient leaves weights and optimizer state untouched and skips the
        proximal step. With a ``LossScaleOptimizer`` the (unscaled) window gradient is handed
        to it times its current scale -- a power of two, so exact -- and it does what it does
        without accumulation, once per window: a finite gradient is unscaled and applied (the
        scale doubles after ``dynamic_growth_steps`` applied updates), a non-finite one
        (float16 overflow) is skipped and the scale halves."""
        sums, counts, statistics = self._reduced()
        with tf.GradientTape() as tape:
            pen = self.penalty()
        pen_grads = None if pen is None else tape.gradient(pen, self.variables)
        if pen is None:
            pen = tf.constant(0.0, tf.float64)
        scale = loss_scale(self.optimizer)
        grads, finite = close_window(
            sums,
            counts,
            UPDATE_OPS,
            summed=[t.summed for t in self.terms],
            micro_batches=self.micro_batches,
            penalty_grads=pen_grads,
            dtypes=[v.dtype for v in self.variables],
            clipnorm=self.clipnorm,
            global_clipnorm=self.global_clipnorm,
            rescale=scale,
        )

        def step() -> tf.Tensor:
            if scale is None:
                self.optimizer.apply(grads, self.variables)
            if self.proximal is not None:
                # The threshold uses the rate of the step just taken (tfreg.sparsity reads it,
                # schedules included, from the optimizer): once per update.
                self.proximal.apply(self.model, self.optimizer)
            return tf.constant(True)

        if scale is not None:
            self.optimizer.apply(grads, self.variables)  # skips and shrinks the scale itself
        tf.cond(finite, step, lambda: tf.constant(False))
        k = len(self.terms)
        loss_sums, (weight_sum, *rest) = statistics[:k], statistics[k:]
        metric_totals = rest[: len(self.metrics)]
        record = window_record(
            self._logged,
            loss_sums,
            counts,
            pen,
            UPDATE_OPS,
            metrics=dict(zip(self.metrics, metric_totals, strict=True)),
            weight_sum=weight_sum,
        )
        record["skipped"] = tf.logical_not(finite)
        if self.examples is not None:
            record["examples"] = rest[-1]
        self._reset()
        if self.moments is not None:  # the forward passes happened, finite or not
            self.moments.close()
        return record

    def discard(self) -> None:
        """Throw the open window away (a dropped short window): sums, counts and moments."""
        self._reset()
        if self.moments is not None:
            self.moments.reset()

    def _reset(self) -> None:
        for acc in self.accs:
            accumulation.reset(acc)
        for v in self._statistics():
            zero(v)
