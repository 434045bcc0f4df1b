"""The TensorFlow half of ``Trainer``: the step functions ``tfreg_core.training.run_fit`` drives
(``micro_step``, ``apply_step``, ``micro_update``, ``discard_window``, ``evaluate``), each a
``tf.function`` traced once per input signature, over one :class:`~tfreg.training.window.Window`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tfreg._compat import keras, tf
from tfreg._losses import LossTerm, loss_sums, micro_batch_gradients
from tfreg.batchnorm import WindowMoments
from tfreg.distributed import Replicas, update_function
from tfreg.proximal import Proximal
from tfreg.training.checkpoint import SeedStates
from tfreg.training.checks import loss_scale, reject_added_losses
from tfreg.training.window import Window, metric_sums
from tfreg_core.training import NONFINITE_MESSAGE, TrainerSpec
from tfreg_core.update import FLOAT_OPS, Term, window_record
from tfreg_core.validation import InvalidArgumentError

__all__ = ["Engine", "collectives", "scope"]


def _present(args: tuple[Any, Any, Any]) -> tuple[Any, ...]:
    return args if args[2] is not None else args[:2]


def _signature(value: Any) -> Any:
    # What `_spec` makes of `value`, cheaply: the key of its trace.
    if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
        return _spec(value)
    tensor = value if isinstance(value, tf.Tensor) else np.asarray(value)
    return tf.as_dtype(tensor.dtype), tuple(tensor.shape[1:])


def _spec(value: Any) -> tf.TypeSpec:
    # `None` batch dimension: micro-batches of any size (the short last one too) share a trace.
    if isinstance(value, tf.RaggedTensor):  # ragged rows: one trace for every row length
        return tf.RaggedTensorSpec(
            (None, *value.shape[1:]), value.dtype, value.ragged_rank, value.row_splits.dtype
        )
    if isinstance(value, tf.SparseTensor):
        return tf.SparseTensorSpec((None, *value.shape[1:]), value.dtype)
    tensor = value if isinstance(value, tf.Tensor) else np.asarray(value)
    return tf.TensorSpec((None, *tensor.shape[1:]), tf.as_dtype(tensor.dtype))


class Engine:
    """The TensorFlow half of ``Trainer``: ``tf.function`` s, each traced once per input
    signature (the batch dimension is ``None``, so the short last micro-batch reuses the trace):
    a micro-batch into the window, the window's update and, for windows of one micro-batch
    (``accumulation_steps=1`` without a strategy), both and the position fused in one graph
    (one call per update). Holds what the steps need, nothing of the trainer: the model, its
    loss terms, the :class:`~tfreg.training.window.Window` (optimizer, penalty, proximal step)
    and the options.
    """

    def __init__(
        self,
        model: keras.layers.Layer,
        terms: Sequence[LossTerm],
        names: Sequence[str],
        optimizer: keras.optimizers.Optimizer,
        *,
        spec: TrainerSpec,
        regularizer: Any,
        proximal: Proximal | None,
        replicas: Replicas | None,
        moments: WindowMoments | None = None,
    ) -> None:
        self.model = model
        self.replicas = replicas
        # Set by Trainer.fit on a stream under a strategy: compared across workers at the next
        # micro-batch (see Replicas.check_stream).
        self.stream_length: int | None = None
        self.terms = tuple(terms)
        self.names = tuple(names)
        self.optimizer = optimizer
        self.spec = spec
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise InvalidArgumentError(f"The model has no trainable variables: {model.name!r}")
        self.window = Window(
            model,
            self.variables,
            self.terms,
            optimizer,
            regularizer=regularizer,
            include_bias=spec.include_bias,
            proximal=proximal,
            metrics=spec.metrics,
            clipnorm=spec.clipnorm,
            global_clipnorm=spec.global_clipnorm,
            replicas=replicas,
            moments=moments,
        )
        self.rng = SeedStates(model)
        optimizer.build(self.variables)
        # Checked eagerly before each window's first micro-batch (a schedule's rate at the
        # coming step): host-side flag, no read of the accumulator.
        self.check_rates = None if proximal is None else lambda: proximal.check_rates(optimizer)
        self.window_open = False
        self.micro_fns: dict[Any, Any] = {}
        self.fused_fns: dict[Any, Any] = {}
        self.eval_fns: dict[Any, Any] = {}
        # Each function's concrete function, called directly: the polymorphic call's argument
        # binding and conversion cost more than the graph of a small model (ISTA on 442 x 10:
        # 0.65 ms against 0.29 ms per call, measured).
        self._concrete: dict[tuple[int, str], Any] = {}
        self.apply_fn = update_function(self._apply, self.replicas, jit_compile=spec.jit_compile)
        # run_fit's optional fused step: every window is one micro-batch. Under a strategy the
        # update runs in cross-replica context, outside the replicas' step (two functions).
        fused = spec.accumulation_steps == 1 and replicas is None
        self.micro_update = self._micro_update if fused else None

    def _traced(
        self,
        cache: dict[Any, Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        extra: Sequence[tf.TensorSpec] = (),
    ) -> Any:
        """``fn`` as a ``tf.function`` with nested ``TensorSpec`` s of ``args`` (one trace per
        structure and dtype, never per step) and the ``extra`` specs after them, kept in
        ``cache``; returns its concrete function. ``sample_weight=None`` gets its own
        function."""
        weighted = args[2] is not None
        present = args if weighted else args[:2]
        # Per call: the key only (building the TensorSpecs cost ~45 us a step; tf.nest ~25).
        if all(isinstance(a, (tf.Tensor, np.ndarray)) for a in present):
            key: Any = tuple(_signature(a) for a in present)
        else:
            key = repr(tf.nest.map_structure(_signature, present))
        if key not in cache:
            specs = [*tf.nest.map_structure(_spec, present), *extra]
            body = fn if weighted else lambda x, y, *rest: fn(x, y, None, *rest)
            # No autograph: the bodies are straight-line code, and autograph would rewrap an
            # InvalidArgumentError (add_loss rejection) as a StagingError.
            cache[key] = tf.function(
                body,
                input_signature=specs,
                jit_compile=self.spec.jit_compile,
                autograph=False,
            )
            self._concrete[id(cache), key] = cache[key].get_concrete_function()
        return self._concrete[id(cache), key]

    def _begin(self, x: Any, y: Any, sample_weight: Any) -> None:
        # Host-side, before a micro-batch: a window's first checks the proximal rates; the
        # first of a fit on a stream under a strategy compares the stream across workers.
        if self.check_rates is not None and not self.window_open:
            self.check_rates()
        self.window_open = True
        if self.stream_length is not None:
            assert self.replicas is not None  # stream_length is set under a strategy only
            self.replicas.check_stream((x, y, sample_weight), self.stream_length)
            self.stream_length = None

    def micro_step(self, x: Any, y: Any, sample_weight: Any) -> None:
        self._begin(x, y, sample_weight)
        args = _present((x, y, sample_weight))
        self._traced(self.micro_fns, self._micro_everywhere, (x, y, sample_weight))(*args)

    def _micro_everywhere(self, x: Any, y: Any, w: Any) -> None:
        # Under a strategy every replica accumulates its share of the global micro-batch.
        if self.replicas is None:
            self._micro(x, y, w)
        else:
            self.replicas.run(self._micro, (x, y, w))

    def _micro_update(
        self, x: Any, y: Any, sample_weight: Any, position: tuple[int, ...]
    ) -> dict[str, tf.Tensor]:
        """A window of one micro-batch: the micro-batch, the update and the ``position`` after
        it in one graph call (what ``micro_step`` + ``apply_step`` + ``set_position`` do)."""
        self._begin(x, y, sample_weight)
        position_spec = tf.TensorSpec([len(position)], tf.int64)
        fn = self._traced(self.fused_fns, self._fused, (x, y, sample_weight), [position_spec])
        self.window_open = False
        values = fn(*_present((x, y, sample_weight)), np.asarray(position, np.int64))
        return self._checked(values)

    def _fused(self, x: Any, y: Any, w: Any, position: tf.Tensor) -> dict[str, tf.Tensor]:
        self._micro(x, y, w)
        values = self._apply()
        self.window.state.position.assign(position, read_value=False)
        return values

    def discard_window(self) -> None:
        """``drop_remainder`` on a stream: the short window's sums are thrown away."""
        self.window_open = False
        self.window.discard()

    def _eval(self, x: Any, y: Any, w: Any) -> tuple[tf.Tensor, ...]:
        # Validation: the loss terms and counts `_micro` accumulates, in inference mode.
        y_pred = self.model(x, training=False)
        sums, counts = loss_sums(self.terms, self.names, y, y_pred, w)
        sums = [tf.cast(total, tf.float64) for total in sums]
        # A "sum" loss: Keras' val_loss averages the batch sums weighted by batch size.
        size = tf.cast(tf.shape(tf.nest.flatten(y_pred)[0])[0], tf.float64)
        for i, term in enumerate(self.terms):
            if term.reduction == "sum":
                sums[i], counts[i] = sums[i] * size, size
        out = sums + list(counts)
        if self.spec.metrics:  # one output (checked in Trainer.__init__)
            weight_sum, totals = metric_sums(self.spec.metrics, y, y_pred, w)
            out += [weight_sum, *totals]
        return tuple(out)

    def check_validation(self, batches: Callable[[], Iterable[tuple[Any, Any, Any]]]) -> None:
        """Trace the validation step on the first batch (nothing runs): malformed validation
        data -- another input shape, targets a loss refuses -- fails before the first update,
        not after the first epoch trained."""
        first = next(iter(batches()), None)
        if first is None:
            raise InvalidArgumentError("validation_data yielded no batch. Received: empty data")
        self._traced(self.eval_fns, self._eval, first)

    def evaluate(self, batches: Iterable[tuple[Any, Any, Any]]) -> dict[str, float]:
        """``val_loss`` (= ``sum_o weight_o * S_o / N_o`` over the data + penalty, as Keras'
        ``val_loss`` includes the regularization losses), ``val_data_loss`` and metrics: the
        window record (:func:`tfreg_core.update.window_record`) of the whole validation data,
        on the host."""
        totals: Any = None
        for args in batches:
            out = self._traced(self.eval_fns, self._eval, args)(*_present(args))
            totals = out if totals is None else [a + b for a, b in zip(totals, out, strict=True)]
        totals = [float(t) for t in totals]
        k = len(self.terms)
        sums, counts, metric_part = totals[:k], totals[k : 2 * k], totals[2 * k :]
        penalty = self.window.penalty()
        weight_sum, *metric_totals = metric_part or [None]
        record = window_record(
            [Term(t.name, float(t.weight)) for t in self.terms],  # "sum" terms made means above
            sums,
            counts,
            0.0 if penalty is None else float(penalty),
            FLOAT_OPS,
            metrics=dict(zip(self.spec.metrics, metric_totals, strict=True)),
            weight_sum=weight_sum,
        )
        return {f"val_{k}": v for k, v in record.items() if k not in ("penalty", "elements")}

    def _micro(self, x: Any, y: Any, w: Any) -> None:
        with self.window.capture():
            batch = micro_batch_gradients(
                self.model,
                self.terms,
                self.names,
                self.variables,
                x,
                y,
                w,
                loss_scale=loss_scale(self.optimizer),
                check_forward=lambda: reject_added_losses(self.model),  # at trace time
            )
        self.window.micro(batch, y, w)

    def _apply(self) -> dict[str, tf.Tensor]:
        return self.window.close()

    def apply_step(self) -> dict[str, tf.Tensor]:
        self.window_open = False
        with collectives(self.replicas):
            values = self.apply_fn()
        return self._checked(values)

    def _checked(self, values: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        # "raise" reads one flag per update back to the host (graph asserts vanish under XLA);
        # the default "skip" never synchronises here.
        if self.spec.on_nonfinite == "raise" and bool(values["skipped"]):
            raise FloatingPointError(NONFINITE_MESSAGE)
        return values

    def fetch(self, values: Mapping[str, tf.Tensor]) -> dict[str, Any]:
        return {k: v.numpy().item() for k, v in values.items()}

    def get_position(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.window.state.position.numpy())

    def set_position(self, position: tuple[int, ...]) -> None:
        self.window.state.position.assign(np.asarray(position, np.int64), read_value=False)


def scope(replicas: Replicas | None) -> Any:
    # Variables the trainer creates (accumulators, optimizer slots) belong to the strategy.
    return contextlib.nullcontext() if replicas is None else replicas.strategy.scope()


def collectives(replicas: Replicas | None) -> Any:
    # A peer's failure in the update's all-reduce re-raised with a clear message.
    return contextlib.nullcontext() if replicas is None else replicas.collectives()
