"""Training with exact gradient accumulation: ``Trainer`` (a ``tf.GradientTape`` loop) and
``AccumulatingModel`` (the same arithmetic inside ``model.fit``).

One update over a window of micro-batches ``W`` applies (see :mod:`tfreg_core.training`)::

    g = sum_{i in W} grad(w_i * l_i) / N_W + grad(penalty),   N_W = loss elements in W

-- the gradient Keras' ``"sum_over_batch_size"`` loss gives on the concatenated window -- then
clipping and one optimizer step. Penalty, weight decay, clipping and the step happen once per
update; the optimizer's ``iterations`` counts updates. The last short window of an epoch is
an update scaled by its own example count (``drop_remainder=True`` drops it). A non-finite
gradient skips the whole update (weights and optimizer state untouched; ``History`` records it)
or raises ``FloatingPointError`` (``on_nonfinite="raise"``).

Differences from PyTorch (``torchref.training``): none in the trainer's arithmetic. The
optimizers differ: Keras keeps the learning rate as a float32 variable and casts momentum,
Adam's betas (inside ``beta**t``) and weight decay through float32 even for float64 weights, and
adds Adam's epsilon to ``sqrt(v)`` where torch adds it to ``sqrt(v_hat)`` --
``torchref.KerasAdamW`` reproduces Keras; ``parity_tests/test_trajectories.py`` pins each gap.
BatchNorm statistics (and Keras' moving averages) are computed per micro-batch: accumulation
makes the *gradient* exact, not batch statistics -- a BatchNorm model trained with 4 x 64 is not
the model trained with 256. Layers' ``activity_regularizer`` and ``add_loss`` terms (which
Keras adds to every batch's loss, so per micro-batch they would change strength) are rejected
with an ``InvalidArgumentError`` naming the layer; ``regularizer=`` and variable regularizers
are applied once per update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from tfreg import accumulation
from tfreg._compat import keras, tf
from tfreg.penalties import penalty as _penalty
from tfreg.regularizers import get as _get_regularizer
from tfreg.sparsity import ProximalL1
from tfreg_core.training import (
    NONFINITE_MESSAGE,
    RECORD_FIELDS,
    ArrayData,
    Position,
    StreamData,
    TrainerSpec,
    fit_data,
    leaves,
    object_config,
    resolve_proximal,
    run_fit,
    unpack_micro_batch,
)
from tfreg_core.training import History as History
from tfreg_core.validation import InvalidArgumentError

__all__ = ["AccumulatingModel", "History", "Trainer", "per_example_loss"]

_ALLOWED_REDUCTIONS = ("sum_over_batch_size", "mean", "none", None)


def per_example_loss(loss: Any, dtype: Any = None) -> Callable[[Any, Any], tf.Tensor]:
    """A function ``(y_true, y_pred) -> per-element losses`` computed in ``dtype``.

    ``loss`` is a Keras loss object, a name ``keras.losses.get`` knows, or a function of
    ``(y_true, y_pred)`` returning per-example values. Keras losses compute in floatx (float32)
    unless built with ``dtype=``; here both inputs are cast to ``dtype`` first, as a Keras loss
    built with ``dtype=dtype`` does. ``dtype=None`` takes the predictions' dtype, promoted to at
    least float32 (mixed precision): a float64 model gets a float64 loss. A loss object whose
    reduction is ``"sum"`` or ``"mean_with_sample_weight"`` is rejected: the window contract is
    ``"sum_over_batch_size"``.
    """
    resolved = keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(resolved, keras.losses.Loss):
        if resolved.reduction not in _ALLOWED_REDUCTIONS:
            raise InvalidArgumentError(
                "The loss's reduction must be 'sum_over_batch_size' (the accumulation contract "
                f"reproduces it over each window). Received: loss.reduction={resolved.reduction!r}"
            )
        fn: Callable[[Any, Any], Any] = resolved.call
    elif callable(resolved):
        fn = resolved
    else:
        raise InvalidArgumentError(
            f"loss must be a Keras loss, a loss name or a callable. Received: loss={loss!r}"
        )

    def values(y_true: Any, y_pred: Any) -> tf.Tensor:
        y_pred = tf.convert_to_tensor(y_pred)
        target = dtype or (y_pred.dtype if y_pred.dtype == tf.float64 else tf.float32)
        return fn(tf.cast(y_true, target), tf.cast(y_pred, target))

    return values


def _sparse_categorical_accuracy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    labels = tf.cast(tf.reshape(y_true, [-1]), tf.int64)
    return tf.cast(tf.equal(tf.argmax(y_pred, axis=-1), labels), tf.float64)


def _categorical_accuracy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.equal(tf.argmax(y_pred, -1), tf.argmax(y_true, -1)), tf.float64)


def _binary_accuracy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    hits = tf.equal(tf.cast(y_pred > 0.5, tf.float64), tf.cast(y_true, tf.float64))
    return tf.reduce_mean(tf.cast(hits, tf.float64), axis=-1)


_METRIC_FNS = {
    "sparse_categorical_accuracy": _sparse_categorical_accuracy,
    "categorical_accuracy": _categorical_accuracy,
    "binary_accuracy": _binary_accuracy,
}


def _clip(grads: list[tf.Tensor], spec: TrainerSpec) -> list[tf.Tensor]:
    # Keras' formula g * c / max(||g||, c), per variable or over all of them.
    if spec.clipnorm is not None:
        return [
            g * spec.clipnorm / tf.maximum(tf.norm(g), tf.cast(spec.clipnorm, g.dtype))
            for g in grads
        ]
    if spec.global_clipnorm is not None:
        return tf.clip_by_global_norm(grads, spec.global_clipnorm)[0]
    return grads


def _reject_activity_regularizers(model: keras.layers.Layer) -> None:
    # An activity penalty is a per-example data term Keras divides by the micro-batch size; it
    # has no exact window equivalent, so refusing beats silently changing its strength.
    for layer in model._flatten_layers(include_self=True):
        if getattr(layer, "activity_regularizer", None) is not None:
            raise InvalidArgumentError(
                "Exact accumulation does not support activity regularizers (their Keras "
                f"scaling is per micro-batch). Received: layer {layer.name!r} with "
                f"activity_regularizer={layer.activity_regularizer!r}"
            )


def _reject_added_losses(model: keras.layers.Layer) -> None:
    # Called right after a forward pass (the only time `add_loss` terms exist). Keras fit adds
    # them to every batch's loss; summed per micro-batch they would count once per micro-batch,
    # and a data-dependent term has no exact window equivalent -- ignoring them (as before)
    # silently optimised another objective, so refuse. Variable regularizers live elsewhere
    # (`_get_regularization_losses`) and are applied once per update.
    for layer in model._flatten_layers(include_self=True):
        added = layer._get_own_losses()
        if added:
            raise InvalidArgumentError(
                "Exact accumulation does not support losses added with add_loss() (Keras adds "
                "them to each batch's loss, so they would count once per micro-batch). Move the "
                "term into the loss, or use regularizer= / a variable regularizer (applied once "
                f"per update). Received: layer {layer.name!r} added {len(added)} loss(es) in call()"
            )


def _reject_loss_scaling(optimizer: Any, policy: Any) -> None:
    # Loss scaling skips and rescales on overflow inside `apply`; with accumulation the overflow
    # is caught (and the window skipped) before the scaler could ever shrink its scale.
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or (
        getattr(policy, "name", None) == "mixed_float16"
    ):
        raise InvalidArgumentError(
            "Exact accumulation does not implement float16 loss scaling; use the "
            "'mixed_bfloat16' policy (no scaling needed) or float32. Received: "
            f"optimizer={type(optimizer).__name__}, dtype policy={getattr(policy, 'name', policy)}"
        )


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


def _update(
    acc: accumulation.AccumulatorState,
    variables: list[Any],
    optimizer: keras.optimizers.Optimizer,
    penalty_fn: Callable[[], tf.Tensor | None],
    *,
    clip: Callable[[list[tf.Tensor]], list[tf.Tensor]],
    after_step: Callable[[], None] | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One update from the window in ``acc`` (graph code); returns (finite, penalty, count) and
    resets ``acc``. A non-finite gradient leaves weights and optimizer state untouched;
    ``after_step`` (the proximal step) runs only after an applied step."""
    grads = [tf.cast(g, v.dtype) for g, v in zip(accumulation.result(acc), variables, strict=True)]
    with tf.GradientTape() as tape:
        pen = penalty_fn()
    if pen is None:
        pen = tf.constant(0.0, tf.float64)
    else:
        pen_grads = tape.gradient(pen, variables)
        grads = [g if p is None else g + p for g, p in zip(grads, pen_grads, strict=True)]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    grads = clip(grads)

    def step() -> tf.Tensor:
        optimizer.apply(grads, variables)
        if after_step is not None:
            after_step()
        return tf.constant(True)

    tf.cond(finite, step, lambda: tf.constant(False))
    count = tf.identity(acc.count)
    accumulation.reset(acc)
    return finite, pen, count


def _proximal_step(
    proximal: ProximalL1 | None, model: keras.layers.Layer, optimizer: Any
) -> Callable[[], None] | None:
    # The threshold uses the rate of the step just taken (tfreg.sparsity reads it, schedules
    # included, from the optimizer): once per update, never per micro-batch.
    if proximal is None:
        return None
    return lambda: proximal.apply(model, optimizer)


class _Window(tf.Module):
    """Per-window running sums for reporting (float64), the resumable position and the metric
    names the sums belong to (checked when a checkpoint is read)."""

    def __init__(self, metrics: Sequence[str]) -> None:
        super().__init__(name="window")
        zero = tf.constant(0.0, tf.float64)
        self.loss_sum = tf.Variable(zero, trainable=False)
        self.weight_sum = tf.Variable(zero, trainable=False)
        self.metric_sums = [tf.Variable(zero, trainable=False) for _ in metrics]
        self.position = tf.Variable(tf.zeros([len(fields(Position))], tf.int64), trainable=False)
        self.metric_names = tf.Variable(",".join(metrics), trainable=False)

    def reset(self) -> None:
        for v in [self.loss_sum, self.weight_sum, *self.metric_sums]:
            v.assign(tf.zeros_like(v))


class _SeedStates(tf.Module):
    """The model's ``SeedGenerator`` states (Dropout, GaussianNoise, ...): in the checkpoint,
    so a resumed run draws the masks the uninterrupted run drew. ``model.variables`` is
    ``model.weights`` plus these (Keras 3's documented split)."""

    def __init__(self, model: keras.layers.Layer) -> None:
        super().__init__(name="rng")
        weights = {id(w) for w in model.weights}
        self.states = [v for v in model.variables if id(v) not in weights]


class _TrainerCheckpoint(tf.train.Checkpoint):
    """``tf.train.Checkpoint`` that refuses, before restoring anything, a checkpoint whose
    window sums belong to other ``metrics`` (they would be reported under the wrong names)."""

    def __init__(self, metrics: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._metrics = ",".join(metrics)

    def _check(self, path: str) -> None:
        key = "window/metric_names/.ATTRIBUTES/VARIABLE_VALUE"
        reader = tf.train.load_checkpoint(path)
        if reader.has_tensor(key):
            saved = reader.get_tensor(key).decode()
            if saved != self._metrics:
                raise InvalidArgumentError(
                    "The checkpoint was saved by a Trainer with other metrics: "
                    f"metrics={saved.split(',') if saved else []}. Build the Trainer with them. "
                    f"Received: metrics={self._metrics.split(',') if self._metrics else []}"
                )

    def read(self, save_path: str, options: Any = None) -> Any:
        self._check(save_path)
        return super().read(save_path, options=options)

    def restore(self, save_path: str, options: Any = None) -> Any:
        self._check(save_path)
        return super().restore(save_path, options=options)


def _present(args: tuple[Any, Any, Any]) -> tuple[Any, ...]:
    return args if args[2] is not None else args[:2]


def _spec(value: Any) -> tf.TensorSpec:
    # `None` batch dimension: micro-batches of any size (the short last one too) share a trace.
    tensor = value if isinstance(value, tf.Tensor) else np.asarray(value)
    return tf.TensorSpec((None, *tensor.shape[1:]), tf.as_dtype(tensor.dtype))


class _Engine:
    """The TensorFlow half of ``Trainer``: two ``tf.function`` s, each traced once per input
    signature (the batch dimension is ``None``, so the short last micro-batch reuses the trace).
    """

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        model = trainer.model
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise InvalidArgumentError(f"The model has no trainable variables: {model.name!r}")
        self.acc = accumulation.init(self.variables)
        self.window = _Window(trainer.spec.metrics)
        self.rng = _SeedStates(model)
        trainer.optimizer.build(self.variables)
        self.micro_fns: dict[Any, Any] = {}
        self.eval_fns: dict[Any, Any] = {}
        self.apply_fn = tf.function(self._apply, jit_compile=trainer.spec.jit_compile)

    def _traced(self, cache: dict[Any, Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """``fn`` as a ``tf.function`` with nested ``TensorSpec`` s of ``args`` (one trace per
        structure and dtype, never per step). ``sample_weight=None`` gets its own function."""
        weighted = args[2] is not None
        specs = tf.nest.map_structure(_spec, args if weighted else args[:2])
        key = str(specs)
        if key not in cache:
            body = fn if weighted else lambda x, y: fn(x, y, None)
            # No autograph: the bodies are straight-line code, and autograph would rewrap an
            # InvalidArgumentError (add_loss rejection) as a StagingError.
            cache[key] = tf.function(
                body,
                input_signature=list(specs),
                jit_compile=self.t.spec.jit_compile,
                autograph=False,
            )
        return cache[key]

    def _micro_weighted(self, x: Any, y: Any, w: Any) -> None:
        # Weights reach `_micro` as float64 (its running sums are float64); absent weights are
        # ones per example, which is what `sample_weight=None` means for the loss.
        if w is None:
            w = tf.ones(tf.shape(leaves(y)[0])[:1], tf.float64)
        self._micro(x, y, tf.nest.map_structure(lambda v: tf.cast(v, tf.float64), w))

    def micro_step(self, x: Any, y: Any, sample_weight: Any) -> None:
        args = _present((x, y, sample_weight))
        self._traced(self.micro_fns, self._micro_weighted, (x, y, sample_weight))(*args)

    def discard_window(self) -> None:
        """``drop_remainder`` on a stream: the short window's sums are thrown away."""
        accumulation.reset(self.acc)
        self.window.reset()

    def _eval(self, x: Any, y: Any, w: Any) -> tuple[tf.Tensor, ...]:
        # The validation twin of `_micro`: the same per-element losses, in inference mode.
        y_pred = self.t.model(x, training=False)
        values = self.t._loss_fn(y, y_pred)
        if w is None:
            w = tf.ones(tf.shape(values)[:1], tf.float64)
        w = tf.cast(w, tf.float64)
        weights = tf.reshape(tf.cast(w, values.dtype), [-1] + [1] * (values.shape.rank - 1))
        sums = [tf.cast(tf.reduce_sum(values * weights), tf.float64), tf.reduce_sum(w)]
        sums += [tf.reduce_sum(_METRIC_FNS[name](y, y_pred) * w) for name in self.t.spec.metrics]
        return (tf.cast(tf.size(values), tf.float64), *sums)

    def evaluate(self, batches: Iterable[tuple[Any, Any, Any]]) -> dict[str, float]:
        """``val_loss`` (= data loss ``sum(w*l)/N`` over the data + penalty, as Keras'
        ``val_loss`` includes the regularization losses), ``val_data_loss`` and metrics."""
        totals: Any = None
        for args in batches:
            out = self._traced(self.eval_fns, self._eval, args)(*_present(args))
            totals = out if totals is None else [a + b for a, b in zip(totals, out, strict=True)]
        count, loss_sum, weight_sum, *metric_sums = (float(t) for t in totals)
        penalty = _penalty_fn(
            self.t.model, self.variables, self.t.regularizer, self.t.spec.include_bias
        )()
        data_loss = loss_sum / count
        logs = {
            "val_loss": data_loss + (0.0 if penalty is None else float(penalty)),
            "val_data_loss": data_loss,
        }
        for name, total in zip(self.t.spec.metrics, metric_sums, strict=True):
            logs[f"val_{name}"] = total / weight_sum
        return logs

    def _micro(self, x: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            y_pred = self.t.model(x, training=True)
            _reject_added_losses(self.t.model)  # at trace time: nothing has run yet
            values = self.t._loss_fn(y, y_pred)
            weights = tf.reshape(tf.cast(w, values.dtype), [-1] + [1] * (values.shape.rank - 1))
            loss_sum = tf.reduce_sum(values * weights)
        grads = tape.gradient(loss_sum, self.variables)
        accumulation.add(self.acc, grads, tf.size(values))
        self.window.loss_sum.assign_add(tf.cast(loss_sum, tf.float64))
        self.window.weight_sum.assign_add(tf.reduce_sum(w))
        for name, total in zip(self.t.spec.metrics, self.window.metric_sums, strict=True):
            total.assign_add(tf.reduce_sum(_METRIC_FNS[name](y, y_pred) * w))

    def _apply(self) -> dict[str, tf.Tensor]:
        spec = self.t.spec
        finite, pen, count = _update(
            self.acc,
            self.variables,
            self.t.optimizer,
            _penalty_fn(self.t.model, self.variables, self.t.regularizer, spec.include_bias),
            clip=lambda grads: _clip(grads, spec),
            after_step=_proximal_step(self.t.proximal, self.t.model, self.t.optimizer),
        )
        data_loss = self.window.loss_sum / count
        values = {
            "loss": data_loss + pen,
            "data_loss": data_loss,
            "penalty": pen,
            "skipped": tf.logical_not(finite),
        }
        for name, total in zip(self.t.spec.metrics, self.window.metric_sums, strict=True):
            values[name] = total / self.window.weight_sum
        self.window.reset()
        return values

    def apply_step(self) -> dict[str, tf.Tensor]:
        values = self.apply_fn()
        # "raise" reads one flag per update back to the host (graph asserts vanish under XLA);
        # the default "skip" never synchronises here.
        if self.t.spec.on_nonfinite == "raise" and bool(values["skipped"]):
            raise FloatingPointError(NONFINITE_MESSAGE)
        return values

    def fetch(self, values: dict[str, tf.Tensor]) -> dict[str, Any]:
        return {k: v.numpy().item() for k, v in values.items()}

    def get_position(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.window.position.numpy())

    def set_position(self, position: tuple[int, ...]) -> None:
        self.window.position.assign(position)


class Trainer:
    """A ``tf.GradientTape`` training loop with exact gradient accumulation.

    Formula per update (window ``W`` of ``accumulation_steps`` micro-batches of ``batch_size``)::

        g = sum_{i in W} grad(w_i * l_i) / N_W + grad(penalty(model, regularizer)
                                                    + layer kernel_regularizer terms)
        g = clip(g);  optimizer.apply(g)             # once per window

    equal to one step of ``model.fit`` with batch size ``|W|`` on the concatenated window (up to
    float round-off). ``torchref.Trainer`` has the same signature and arithmetic; it takes a
    ``torch.optim`` optimizer and a torch loss.

    ``loss``: Keras loss object/name or ``fn(y_true, y_pred) -> per-example losses``, computed in
    the model's variable dtype. ``metrics``: names from ``tfreg_core.training.METRICS``, reported
    per
    update as ``sum(w*m)/sum(w)`` over the window. ``clipnorm`` clips each variable's gradient,
    ``global_clipnorm`` all of them (Keras' formula). ``proximal=tfreg.ProximalL1(l1=...)``
    soft-thresholds once per applied update, right after the step (exact zeros; do not also put
    an L1 penalty on the same weights). ``seed`` fixes the shuffling order (per
    epoch), which is what makes checkpoint/resume bit-identical. ``jit_compile=True`` compiles
    both steps with XLA (one compilation per distinct micro-batch size).

    Checkpoint/resume: ``ckpt = trainer.checkpoint()`` tracks model, optimizer, accumulator,
    position (epoch, micro-batch) and the model's ``SeedGenerator`` states (Dropout masks); a
    fresh ``Trainer`` on the same model architecture and ``metrics`` restores it with
    ``trainer.checkpoint().restore(path)`` and ``fit`` continues where it stopped, mid-window
    included, bit for bit. ``epochs`` is therefore the final epoch index to train *up to*
    (Keras' ``epochs`` with ``initial_epoch`` taken from the trainer's position): a second
    ``fit(epochs=3)`` after a first one trains nothing and warns (``UserWarning``, at every
    verbosity: Keras' own ``fit`` would stay silent); ``fit(epochs=6)`` trains three more.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: Any,
        optimizer: keras.optimizers.Optimizer | str,
        *,
        accumulation_steps: int = 1,
        regularizer: Any = None,
        include_bias: bool = False,
        clipnorm: float | None = None,
        global_clipnorm: float | None = None,
        on_nonfinite: str = "skip",
        drop_remainder: bool = False,
        jit_compile: bool = False,
        metrics: Sequence[str] = (),
        seed: int = 0,
        proximal: ProximalL1 | dict[str, Any] | None = None,
    ) -> None:
        self.spec = TrainerSpec(
            accumulation_steps=accumulation_steps,
            include_bias=include_bias,
            clipnorm=clipnorm,
            global_clipnorm=global_clipnorm,
            on_nonfinite=on_nonfinite,
            drop_remainder=drop_remainder,
            jit_compile=jit_compile,
            metrics=metrics,
            seed=seed,
        )
        if not isinstance(model, keras.layers.Layer):
            raise InvalidArgumentError(f"model must be a Keras model. Received: model={model!r}")
        optimizer = keras.optimizers.get(optimizer)
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise InvalidArgumentError(
                "The optimizer accumulates gradients itself (and averages micro-batch means); "
                "use Trainer(accumulation_steps=...) instead. Received: optimizer."
                f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps}"
            )
        _reject_activity_regularizers(model)
        _reject_loss_scaling(optimizer, model.dtype_policy)
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.regularizer = None if regularizer is None else _get_regularizer(regularizer)
        self.proximal = resolve_proximal(proximal, ProximalL1)
        self._loss_fn = per_example_loss(loss)
        self._engine: _Engine | None = None
        self.stop_training = False

    def build(self, input_shape: Any = None) -> None:
        """Create accumulator, optimizer variables and position (``fit`` calls this).
        ``input_shape`` builds an unbuilt model (a shape, or a structure of shapes)."""
        if self._engine is not None:
            return
        if not self.model.built:
            if input_shape is None:
                raise ValueError("The model is not built; pass input_shape or call fit first.")
            self.model.build(input_shape)
        self._engine = _Engine(self)

    @property
    def accumulator(self) -> accumulation.AccumulatorState:
        self.build()
        return self._engine.acc

    def checkpoint(self) -> tf.train.Checkpoint:
        """Everything a resumed ``fit`` needs, mid-window included: model, optimizer,
        accumulator, position and the model's ``SeedGenerator`` states (Dropout masks).
        ``read``/``restore`` refuse a checkpoint saved with other ``metrics`` before
        restoring anything."""
        self.build()
        return _TrainerCheckpoint(
            self.spec.metrics,
            model=self.model,
            optimizer=self.optimizer,
            accumulator=self._engine.acc,
            window=self._engine.window,
            rng=self._engine.rng,
        )

    def fit(
        self,
        x: Any,
        y: Any = None,
        *,
        batch_size: int | None = None,
        epochs: int = 1,
        shuffle: bool = True,
        sample_weight: Any = None,
        steps_per_epoch: int | None = None,
        validation_data: Any = None,
        callbacks: Sequence[Any] | None = None,
        verbose: int = 1,
    ) -> History:
        """Train; returns one :class:`History` record per update (see ``tfreg_core.training``).

        ``x``/``y``: arrays, or dicts/tuples of arrays for multi-input/-output models, cut into
        micro-batches of ``batch_size`` (shuffled per epoch with ``seed``). Or ``y=None`` and
        ``x`` an iterable of micro-batches -- a ``tf.data.Dataset`` (prefetched; its tensors
        go to the step function without a host copy), a generator, a list -- yielding
        ``(x, y)`` or ``(x, y, sample_weight)``; unknown cardinality is fine,
        ``steps_per_epoch`` micro-batches make an epoch of an infinite one, and
        ``batch_size``/``sample_weight`` must be None (``shuffle`` does not apply: the data's
        order is used, as Keras does). See :class:`tfreg_core.training.StreamData` for
        resuming mid-epoch. ``validation_data``: ``(x, y)`` / ``(x, y, sample_weight)`` arrays
        (in batches of ``batch_size``, 32 for streams) or an iterable of such micro-batches,
        evaluated after each epoch's last update; ``history.epochs`` gets ``val_loss``,
        ``val_data_loss`` and the metrics. ``callbacks``: ``keras.callbacks.Callback`` objects
        (Keras' hooks: ``on_train_batch_end`` once per update, ``on_epoch_end`` with the epoch
        logs, ``model.stop_training`` honoured; ``self.model`` is the trained model) and/or
        the project's hooks (``tfreg_core.training.HOOKS``), all checked before training.
        """
        data = fit_data(
            x,
            y,
            sample_weight,
            batch_size=batch_size,
            epochs=epochs,
            shuffle=shuffle,
            verbose=verbose,
            steps_per_epoch=steps_per_epoch,
        )
        validation = _validation_batches(validation_data, batch_size)
        keras_callbacks = [c for c in callbacks or () if isinstance(c, keras.callbacks.Callback)]
        hooks = [c for c in callbacks or () if not isinstance(c, keras.callbacks.Callback)]
        if keras_callbacks:
            hooks.append(_KerasCallbacks(keras_callbacks, self.model, epochs, data, verbose))
        if isinstance(data, StreamData) and isinstance(data.data, tf.data.Dataset):
            data.data = data.data.prefetch(tf.data.AUTOTUNE)
        self.build(_input_shape(data))
        engine = self._engine
        return run_fit(
            engine,
            self,
            self.spec,
            data,
            epochs=epochs,
            callbacks=hooks,
            verbose=verbose,
            validate=None if validation is None else lambda: engine.evaluate(validation()),
        )

    def trace_counts(self) -> dict[str, int]:
        """How often each step function was traced (constant after the first update)."""
        self.build()
        counts = {"apply": self._engine.apply_fn.experimental_get_tracing_count()}
        micro = sum(f.experimental_get_tracing_count() for f in self._engine.micro_fns.values())
        counts["micro"] = micro
        return counts

    def get_config(self) -> dict[str, Any]:
        """The keyword arguments (model, loss and optimizer are positional and not included)."""
        config = self.spec.get_config()
        config["regularizer"] = object_config(self.regularizer)
        config["proximal"] = object_config(self.proximal)
        return config


def _input_shape(data: ArrayData | StreamData) -> Any:
    # Builds an unbuilt model from the data's shapes (a dataset's element_spec: nothing is
    # consumed); a generic iterable needs a built model.
    if isinstance(data, ArrayData):
        x = data.x
    elif isinstance(data.data, tf.data.Dataset):
        x = unpack_micro_batch(data.data.element_spec)[0]
    else:
        return None
    shapes = tf.nest.map_structure(lambda v: (None, *v.shape[1:]), x)
    return shapes


def _validation_batches(
    validation_data: Any, batch_size: int | None
) -> Callable[[], Iterable[tuple[Any, Any, Any]]] | None:
    """``validation_data`` checked now (before training); returns a fresh pass per call."""
    if validation_data is None:
        return None
    if isinstance(validation_data, tuple):
        vx, vy, vw = unpack_micro_batch(validation_data)
        arrays = ArrayData(vx, vy, vw, batch_size=batch_size or 32, shuffle=False)
        spec = TrainerSpec()
        return lambda: (batch for _, batch in arrays.steps(spec, 0, 0))
    stream = StreamData(validation_data, steps_per_epoch=None)
    return lambda: (unpack_micro_batch(element) for element in stream.data)


class _KerasCallbacks:
    """``keras.callbacks.Callback`` objects driven by ``run_fit``'s hooks with Keras'
    signatures: ``on_train_batch_end(update, logs)`` per update (``logs``: the record's
    values), ``on_epoch_end(epoch, logs)`` after validation; ``model.stop_training`` (what
    ``EarlyStopping`` sets) stops the trainer."""

    def __init__(
        self,
        callbacks: list[Any],
        model: keras.Model,
        epochs: int,
        data: ArrayData | StreamData,
        verbose: int,
    ) -> None:
        self.model = model
        self.list = keras.callbacks.CallbackList(
            callbacks,
            add_history=False,
            add_progbar=False,
            model=model,
            epochs=epochs,
            steps=None,
            verbose=verbose,
        )
        self.data = data

    def _sync(self, trainer: Trainer) -> None:
        if getattr(self.model, "stop_training", False):
            trainer.stop_training = True

    def on_train_begin(self, trainer: Trainer) -> None:
        self.list.set_params(
            {
                "epochs": self.list.params["epochs"],
                "verbose": self.list.params["verbose"],
                "steps": self.data.updates(trainer.spec),
            }
        )
        self.model.stop_training = False
        self.list.on_train_begin()
        self._sync(trainer)

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        self.list.on_epoch_begin(epoch)
        self._sync(trainer)

    def on_update_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        logs = {k: v for k, v in record.items() if k not in RECORD_FIELDS}
        self.list.on_train_batch_end(record["update"], logs)
        self._sync(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int, history: History) -> None:
        self.list.on_epoch_end(epoch, dict(history.epochs[-1]))
        self._sync(trainer)

    def on_train_end(self, trainer: Trainer, history: History) -> None:
        self.list.on_train_end(dict(history.epochs[-1]) if history.epochs else None)


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


@keras.saving.register_keras_serializable(package="tfreg")
class AccumulatingModel(keras.Model):
    """Exact accumulation inside ``model.fit``: wraps ``model`` (sharing its weights) and
    replaces ``train_step``.

    Each ``train_step`` (one micro-batch of ``fit``'s ``batch_size``) adds the gradient of
    ``sum(w_i * l_i)`` and the loss-element count to an accumulator; the step that completes
    ``accumulation_steps`` micro-batches applies, once::

        g = sum_W grad(w_i * l_i) / N_W + grad(penalty);   optimizer.apply(g)

    (the optimizer's own ``clipnorm``/``weight_decay`` apply once, inside ``apply``). The
    compiled ``loss`` must be a single Keras loss with ``"sum_over_batch_size"`` reduction; the
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
    ``skipped_updates``. ``fit``'s ``loss`` log is the running per-example data loss.
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        accumulation_steps: int,
        regularizer: Any = None,
        include_bias: bool = False,
        drop_remainder: bool = False,
        proximal: ProximalL1 | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        spec = TrainerSpec(
            accumulation_steps=accumulation_steps,
            include_bias=include_bias,
            drop_remainder=drop_remainder,
        )
        if not isinstance(model, keras.layers.Layer):
            raise InvalidArgumentError(f"model must be a Keras model. Received: model={model!r}")
        _reject_activity_regularizers(model)
        # The wrapper must hand inputs to `model` untouched (a float32 wrapper would round
        # float64 inputs); `model`'s own layers cast as they always do.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.model = model
        self.spec = spec
        self.regularizer = None if regularizer is None else _get_regularizer(regularizer)
        self.proximal = resolve_proximal(proximal, ProximalL1)
        self._acc: accumulation.AccumulatorState | None = None

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.model(inputs, training=training)

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

    def compile(self, optimizer: Any = "rmsprop", loss: Any = None, **kwargs: Any) -> None:
        optimizer = keras.optimizers.get(optimizer)
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise InvalidArgumentError(
                "AccumulatingModel accumulates itself; the optimizer must not. Received: "
                f"optimizer.gradient_accumulation_steps={optimizer.gradient_accumulation_steps}"
            )
        for policy in (self.dtype_policy, self.model.dtype_policy):  # float16 on either: scaling
            _reject_loss_scaling(optimizer, policy)
        if loss is None or isinstance(loss, (list, tuple, dict)):
            raise InvalidArgumentError(
                f"AccumulatingModel needs one Keras loss (single output). Received: loss={loss!r}"
            )
        super().compile(optimizer=optimizer, loss=loss, **kwargs)
        self._loss_fn = per_example_loss(loss)
        if self.model.built:
            self._build_state()

    def _build_state(self) -> None:
        if self._acc is not None:
            return
        variables = list(self.model.trainable_variables)
        self._acc = accumulation.init(variables)
        self._skipped = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        self.optimizer.build(variables)
        self._apply_fn = tf.function(self._apply_window)

    @property
    def skipped_updates(self) -> int:
        return 0 if self._acc is None else int(self._skipped.numpy())

    def fit(self, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        if not self.model.built:
            raise ValueError("Build the wrapped model (e.g. with keras.Input) before fit().")
        self._build_state()
        return super().fit(*args, callbacks=[*(callbacks or []), _FlushAtEpochEnd()], **kwargs)

    def make_train_function(self, force: bool = False) -> Any:
        """Keras' train function, flushing the partial window when the epoch's data ends.

        An epoch of unknown length (a ``tf.data`` pipeline of unknown cardinality, a
        generator) ends when the train function finds no more data; Keras then validates at
        once. Flushing there, before the end-of-data error reaches ``fit``, makes validation
        see the epoch's final weights."""
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        step = self.train_function

        def train_function(iterator: Any) -> Any:
            try:
                return step(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                self.flush()
                raise

        self.train_function = train_function
        return train_function

    def _apply_window(self) -> None:
        variables = list(self.model.trainable_variables)
        finite, _, _ = _update(
            self._acc,
            variables,
            self.optimizer,
            _penalty_fn(self.model, variables, self.regularizer, self.spec.include_bias),
            clip=lambda grads: grads,
            after_step=_proximal_step(self.proximal, self.model, self.optimizer),
        )
        self._skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))

    def flush(self) -> None:
        """Apply (or, with ``drop_remainder``, discard) a partial window; called at epoch end."""
        if self._acc is None or int(self._acc.micro_batches.numpy()) == 0:
            return
        if self.spec.drop_remainder:
            accumulation.reset(self._acc)
        else:
            self._apply_fn()

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = list(self.model.trainable_variables)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            _reject_added_losses(self)
            values = self._loss_fn(y, y_pred)
            if sample_weight is None:
                weighted = values
            else:
                w = tf.cast(sample_weight, values.dtype)
                weighted = values * tf.reshape(w, [-1] + [1] * (values.shape.rank - 1))
            loss_sum = tf.reduce_sum(weighted)
        grads = tape.gradient(loss_sum, variables)
        count = tf.size(values)
        accumulation.add(self._acc, grads, count)
        self._loss_tracker.update_state(
            loss_sum / tf.cast(count, loss_sum.dtype), sample_weight=tf.cast(count, tf.float32)
        )
        tf.cond(
            self._acc.micro_batches >= self.spec.accumulation_steps,
            lambda: (self._apply_window(), tf.constant(True))[1],
            lambda: tf.constant(False),
        )
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
