"""``AccumulatingModel``: exact gradient accumulation inside ``model.fit`` (see
:mod:`tfreg.training`), a ``keras.Model`` wrapper whose ``train_step`` adds each micro-batch to
a :class:`~tfreg.training.window.Window` and closes it every ``accumulation_steps``."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from tfreg._compat import keras, tf
from tfreg._losses import loss_terms, micro_batch_gradients, output_names
from tfreg.batchnorm import WindowMoments
from tfreg.distributed import Replicas, replicas, update_function
from tfreg.proximal import PROXIMAL_CLASSES, Proximal
from tfreg.regularizers import get as _get_regularizer
from tfreg.training import checks
from tfreg.training.window import Window
from tfreg_core.batchnorm import check_mode as _check_batchnorm_mode
from tfreg_core.training import ALL_SKIPPED_MESSAGE, TrainerSpec, object_config, resolve_proximal
from tfreg_core.validation import InvalidArgumentError

__all__ = ["AccumulatingModel"]


class _WindowMean(keras.metrics.Mean):
    """Keras' ``Mean`` of the windows' logged values, weighted by their example counts, that
    also counts skipped windows: a skipped window adds nothing, and while every window closed
    since the last reset was skipped the result is NaN -- what Keras logs for an epoch whose
    losses are all non-finite (``Mean``'s ``divide_no_nan`` would show 0)."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.skipped = self.add_variable(shape=(), initializer="zeros", name="skipped")

    def update_window(self, value: tf.Tensor, weight: tf.Tensor, finite: tf.Tensor) -> None:
        self.update_state(
            tf.where(finite, value, tf.zeros_like(value)),
            sample_weight=tf.where(finite, weight, tf.zeros_like(weight)),
        )
        self.skipped.assign_add(tf.cast(tf.logical_not(finite), self.skipped.dtype))

    def all_skipped(self) -> tf.Tensor:
        return tf.logical_and(self.count == 0, self.skipped > 0)

    def result(self) -> tf.Tensor:
        value = super().result()
        return tf.where(self.all_skipped(), tf.constant(float("nan"), value.dtype), value)

    def reset_state(self) -> None:
        super().reset_state()
        self.skipped.assign(0)


class _FlushAtEpochEnd(keras.callbacks.Callback):
    """Flush the partial window after the epoch's last step -- before ``fit`` validates, so
    validation sees the epoch's final weights (``on_epoch_end`` comes after validation). Runs
    after the user's callbacks, so a ``stop_training`` they set on this step flushes too.
    Epochs of unknown length end with the data: ``AccumulatingModel.make_train_function``
    flushes there."""

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        steps = self.params.get("steps")
        if (steps and batch + 1 >= steps) or self.model.stop_training:
            self.model.flush()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.model.flush()  # a no-op after the flushes above
        if bool(self.model._loss_tracker.all_skipped()):
            warnings.warn(
                ALL_SKIPPED_MESSAGE.format(epoch=epoch + 1),
                RuntimeWarning,
                stacklevel=2,
            )


@keras.saving.register_keras_serializable(package="tfreg")
class AccumulatingModel(keras.Model):
    """Exact accumulation inside ``model.fit``: wraps ``model`` (sharing its weights) and
    replaces ``train_step``.

    Each ``train_step`` (one micro-batch of ``fit``'s ``batch_size``) adds the gradient of
    ``sum(w_i * l_i)`` and the loss-element count to an accumulator (one per output with a
    loss); the step that completes ``accumulation_steps`` micro-batches applies, once::

        g = sum_o lambda_o * sum_W grad(w_i * l_o,i) / N_o,W + grad(penalty);   optimizer.apply(g)

    (the optimizer's own ``clipnorm``/``weight_decay`` apply once, inside ``apply``). ``compile``
    takes Keras' ``loss`` (one, list or dict; ``"sum_over_batch_size"`` reduction) and
    ``loss_weights``; masks, ``ignore_class``, per-timestep weights and ``class_weight`` count as
    in plain Keras, and float16 models train with loss scaling (see the module docstring). The
    penalty is ``regularizer`` (via :func:`tfreg.penalty`) plus the layers' own weight
    regularizers. Windows restart every epoch. The micro-batches left over after an epoch's last
    step (fewer than ``accumulation_steps``) are applied as one update scaled by their own count
    (``drop_remainder=False``, the default) or discarded (``drop_remainder=True``), before
    ``fit`` validates; a ``fit`` cut short by ``steps_per_epoch``/early stopping leaves no window
    half-applied either (``flush()`` runs at every epoch end). Unlike
    ``Trainer(drop_remainder=True)``, a *full* window whose last micro-batch is short is kept.

    Against Keras' ``optimizer(gradient_accumulation_steps=k)``: Keras averages per-micro-batch
    *means* (biased when sizes or weights differ) and carries a partial window into the next
    epoch, losing it at the end of training. Non-finite windows are skipped and counted in
    ``skipped_updates`` (windows in which nothing counted: ``empty_windows``). ``fit`` logs
    ``loss`` as plain Keras does on the concatenated windows -- data loss plus penalty per
    window, averaged over the epoch by example count, a skipped window left out -- and
    ``data_loss`` beside it; between window ends the logs show the windows completed so far.
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        accumulation_steps: int,
        regularizer: Any = None,
        include_bias: bool = False,
        drop_remainder: bool = False,
        proximal: Proximal | dict[str, Any] | Sequence[Any] | None = None,
        batchnorm: str = "per_micro_batch",
        **kwargs: Any,
    ) -> None:
        spec = TrainerSpec(
            accumulation_steps=accumulation_steps,
            include_bias=include_bias,
            drop_remainder=drop_remainder,
        )
        if not isinstance(model, keras.layers.Layer):
            raise InvalidArgumentError(f"model must be a Keras model. Received: model={model!r}")
        checks.reject_activity_regularizers(model)
        checks.reject_custom_steps(model, "AccumulatingModel")
        batchnorm = _check_batchnorm_mode(batchnorm)
        if batchnorm == "per_micro_batch":
            checks.warn_batchnorm(model, accumulation_steps)
        if type(self).compute_loss is not keras.Model.compute_loss:
            raise InvalidArgumentError(
                "AccumulatingModel's train_step does not call compute_loss (it accumulates "
                "the compiled loss's sums and counts): an override would be ignored. "
                f"Received: {type(self).__name__}.compute_loss"
            )
        # The wrapper must hand inputs to `model` untouched (a float32 wrapper would round
        # float64 inputs); `model`'s own layers cast as they always do.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.model = model
        self.spec = spec
        self.regularizer = None if regularizer is None else _get_regularizer(regularizer)
        self.proximal = resolve_proximal(proximal, PROXIMAL_CLASSES)
        self.batchnorm = batchnorm
        self._moments: WindowMoments | None = None
        self._window: Window | None = None  # built by fit, rebuilt by a recompile
        self._replicas: Replicas | None = None
        self._pending = 0  # micro-batches of the open window, counted on the host (strategy)
        if model.built:  # built as its model is: load_weights works on a fresh wrapper
            self.build(None)

    def build(self, input_shape: Any = None) -> None:
        """Keras builds the wrapper at its first call (``fit``'s first step, ``predict``,
        ``evaluate``): the wrapped model is built (from ``input_shape`` if it is not yet) and
        the wrapper with it, so ``save_weights``/``load_weights``, ``export`` and the saving
        callbacks work; it has no variables of its own."""
        if not self.model.built:
            self.model.build(input_shape)

    def _lock_state(self) -> None:
        # As keras.Sequential and Functional: mutable after build -- compile creates the
        # trackers (and a recompile new ones) after the wrapper is built.
        pass

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.model(inputs, training=training)

    def export(self, filepath: Any, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``export`` (the wrapper serves exactly its model's forward)."""
        return self.model.export(filepath, *args, **kwargs)

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments, ``model`` serialized: ``.save("m.keras")``,
        ``keras.models.load_model`` and ``ModelCheckpoint`` round-trip the wrapper (weights and
        optimizer state come with the file; the accumulator is empty at every epoch end)."""
        return {
            **super().get_config(),
            "model": keras.saving.serialize_keras_object(self.model),
            "accumulation_steps": self.spec.accumulation_steps,
            "regularizer": keras.saving.serialize_keras_object(self.regularizer),
            "include_bias": self.spec.include_bias,
            "drop_remainder": self.spec.drop_remainder,
            "proximal": object_config(self.proximal),
            "batchnorm": self.batchnorm,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> AccumulatingModel:
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        regularizer = config.pop("regularizer", None)
        if regularizer is not None:
            regularizer = keras.saving.deserialize_keras_object(
                regularizer, custom_objects=custom_objects
            )
        return cls(model, regularizer=regularizer, **config)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """``load_model``'s compile: this class's ``compile`` (checks included; it builds the
        optimizer variables, so the saved optimizer state loads into them)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    def compile(
        self,
        optimizer: Any = "rmsprop",
        loss: Any = None,
        loss_weights: Any = None,
        **kwargs: Any,
    ) -> None:
        optimizer = keras.optimizers.get(optimizer)
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise InvalidArgumentError(
                "AccumulatingModel accumulates itself; the optimizer must not. Received: "
                f"optimizer.gradient_accumulation_steps={optimizer.gradient_accumulation_steps}"
            )
        pending = self._open_micro_batches()
        if pending:
            raise InvalidArgumentError(
                "compile() with a window half-filled would drop its micro-batches: recompile "
                "between fits (fit flushes every window at each epoch end) or call flush() "
                f"first. Received: {pending} micro-batch(es) accumulated"
            )
        names = output_names(self.model)
        terms = loss_terms(loss, loss_weights, names)
        optimizer = checks.loss_scaled(optimizer, self.model)
        if self.proximal is not None:  # as Trainer does at construction: before any update
            self.proximal.check(optimizer)
        checks.check_optimizer_variables(optimizer, self.model.trainable_variables)
        self._names, self._terms = names, terms
        model_names = getattr(self.model, "output_names", None)
        if model_names:  # Keras' compile reads them to pair dict losses with the outputs
            self.output_names = list(model_names)
        super().compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights, **kwargs)
        with self.distribute_strategy.scope():
            self._replicas = replicas(self.model, owner="AccumulatingModel")
        if self._replicas is not None:
            checks.refuse_per_window_replicas(self.batchnorm)
            self._replicas.check_keras_fit()
            self._replicas.check_options(self.optimizer, jit_compile=self.jit_compile is True)
        # Keras' loss tracker, as a window mean that reports an all-skipped epoch as NaN.
        self._loss_tracker = _WindowMean(name="loss")
        self._data_loss_tracker = _WindowMean(name="data_loss")
        # As Keras' recompile: the trainable set is read again (unfreezing to fine-tune), so
        # the window is rebuilt for it (empty: checked above).
        self._window = None
        if self.model.built:
            self._build_state()

    @property
    def metrics(self) -> list[Any]:
        # `data_loss` is a training-window log only. Evaluation leaves it out of the metrics
        # too (not only of the step's logs): Keras returns its metrics' cross-replica results
        # only when their names match the step's logs, and otherwise the last step's logs --
        # under a strategy, one replica's partial value (a wrong val_loss).
        tracker = getattr(self, "_data_loss_tracker", None)
        # Keras lists the loss tracker twice (as `_loss_tracker` and as a tracked attribute),
        # and `data_loss` once: each result is computed once per step.
        metrics: list[Any] = []
        for m in super().metrics:
            if m is not tracker and all(m is not seen for seen in metrics):
                metrics.append(m)
        if tracker is not None and not getattr(self, "_evaluating", False):
            metrics.append(tracker)
        return metrics

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        self._check_batch_sizes(keras.Model.evaluate, args, kwargs)
        self._evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating = False

    def _check_batch_sizes(self, method: Callable[..., Any], args: Any, kwargs: Any) -> None:
        if self._replicas is not None:
            bound = inspect.signature(method).bind_partial(self, *args, **kwargs)
            self._replicas.check_keras_batch_sizes(method.__name__, bound.arguments)

    def _open_micro_batches(self) -> int:
        return 0 if self._window is None else int(self._window.micro_batches.numpy())

    def _build_state(self) -> None:
        if self._window is not None:
            return
        variables = list(self.model.trainable_variables)
        with self.distribute_strategy.scope():
            if not hasattr(self, "_skipped"):  # counters carry over a recompile
                self._skipped = tf.Variable(tf.constant(0, tf.int64), trainable=False)
                self._empty_windows = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            if not self.optimizer.built:
                self.optimizer.build(variables)
            if self.batchnorm == "per_window" and self._moments is None:
                self._moments = WindowMoments(self.model)
            # The optimizer's own clipnorm/global_clipnorm apply inside its `apply`.
            self._window = Window(
                self.model,
                variables,
                self._terms,
                self.optimizer,
                regularizer=self.regularizer,
                include_bias=self.spec.include_bias,
                proximal=self.proximal,
                replicas=self._replicas,
                moments=self._moments,
                count_examples=True,
            )
        self._apply_fn = update_function(self._apply_window, self._replicas)

    @property
    def skipped_updates(self) -> int:
        """Windows skipped (non-finite gradient, or float16 overflow under loss scaling)."""
        return 0 if self._window is None else int(self._skipped.numpy())

    @property
    def empty_windows(self) -> int:
        """Windows in which no loss element counted (all masked): applied with a zero data
        gradient, as Keras does on such a batch."""
        return 0 if self._window is None else int(self._empty_windows.numpy())

    def fit(self, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        if not self.model.built:
            raise ValueError("Build the wrapped model (e.g. with keras.Input) before fit().")
        self._build_state()
        self._check_batch_sizes(keras.Model.fit, args, kwargs)
        return super().fit(*args, callbacks=[*(callbacks or []), _FlushAtEpochEnd()], **kwargs)

    def make_train_function(self, force: bool = False) -> Any:
        """Keras' train function, flushing the partial window when the epoch's data ends.

        An epoch of unknown length (a ``tf.data`` pipeline of unknown cardinality, a
        generator) ends when the train function finds no more data; Keras then validates at
        once. Flushing there, before the end-of-data error reaches ``fit``, makes validation
        see the epoch's final weights."""
        if self.train_function is not None and not force:
            return self.train_function
        if self._replicas is not None and self.steps_per_execution != 1:
            raise InvalidArgumentError(
                "Under a tf.distribute strategy AccumulatingModel closes its windows between "
                "Keras steps: compile with steps_per_execution=1. Received: "
                f"steps_per_execution={self.steps_per_execution}"
            )
        super().make_train_function(force=force)
        step = self.train_function

        def train_function(iterator: Any) -> Any:
            try:
                logs = step(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                self.flush()
                raise
            if self._replicas is not None:
                # Under a strategy the window closes here, in cross-replica context (an
                # all-reduce inside the replicas' tf.cond is what Keras cannot do).
                self._pending += 1
                if self._pending >= self.spec.accumulation_steps:
                    self._apply_fn()
                    self._pending = 0
                    # The step's logs were read before the window closed: the closing step
                    # reports the window, as on one device (where it closes inside the step).
                    trackers = (self._loss_tracker, self._data_loss_tracker)
                    logs = {**logs, **{t.name: t.result() for t in trackers if t.name in logs}}
            return logs

        self.train_function: Any = train_function
        return train_function

    def _apply_window(self) -> None:
        assert self._window is not None  # fit() built the state
        values = self._window.close()
        examples, finite = values["examples"], tf.logical_not(values["skipped"])
        # What plain Keras logs for a batch of the window's examples: data loss + penalty,
        # averaged over the epoch by example count. A skipped window adds nothing (an epoch
        # of skipped windows logs NaN, as Keras does, and warns: _WindowMean).

        def track() -> None:
            # Under a strategy Keras' metrics update in replica context; every replica adds
            # the same (value, weight), so the mean over replicas is the value.
            for tracker, key in (
                (self._loss_tracker, "loss"),
                (self._data_loss_tracker, "data_loss"),
            ):
                tracker.update_window(values[key], examples, finite)

        if self._replicas is None:
            track()
        else:
            self._replicas.run_in_replicas(track)
        self._skipped.assign_add(tf.cast(values["skipped"], tf.int64))
        self._empty_windows.assign_add(tf.cast(values["elements"] == 0, tf.int64))

    def flush(self) -> None:
        """Apply (or, with ``drop_remainder``, discard) a partial window; called at epoch end."""
        if not self._open_micro_batches():
            return
        assert self._window is not None  # it holds micro-batches
        self._pending = 0
        if self.spec.drop_remainder:
            self._window.discard()
        else:
            self._apply_fn()

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        window = self._window
        assert window is not None  # fit() built the state
        with window.capture():
            batch = micro_batch_gradients(
                self,  # through Keras' __call__: the wrapper is built (and saveable) by fit
                self._terms,
                self._names,
                window.variables,
                x,
                y,
                sample_weight,
                loss_scale=checks.loss_scale(self.optimizer),
                check_forward=lambda: checks.reject_added_losses(self),
            )
        first = next(t for t in tf.nest.flatten(x) if t is not None)
        window.micro(batch, y, sample_weight, examples=tf.cast(tf.shape(first)[0], tf.float64))
        if self._replicas is None:  # under a strategy: closed in make_train_function's loop

            def close() -> tf.Tensor:
                self._apply_window()
                return tf.constant(True)

            closes = window.micro_batches >= self.spec.accumulation_steps
            tf.cond(closes, close, lambda: tf.constant(False))
        return self.compute_metrics(x, y, batch.y_pred, sample_weight=sample_weight)
