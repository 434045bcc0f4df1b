"""Training with exact gradient accumulation: ``Trainer`` (a ``tf.GradientTape`` loop) and
``AccumulatingModel`` (the same arithmetic inside ``model.fit``).

One update over a window of micro-batches ``W`` applies (see :mod:`tfreg_core.training`)::

    g = sum_o lambda_o * sum_{e in W} grad(w_e * l_o(e)) / N_o,W + grad(penalty)

over the outputs ``o`` with a loss (weights ``lambda_o`` = ``loss_weights``), each with its own
count ``N_o,W`` of the loss elements that count (Keras masks -- ``compute_mask`` /
``_keras_mask`` -- and ``ignore_class`` excluded; see :mod:`tfreg._losses`, the one
micro-batch-gradient function both front ends use) -- the gradient Keras'
``"sum_over_batch_size"`` loss gives on the concatenated window -- then clipping and one
optimizer step. A window in which no element of an output counts contributes a zero gradient
for it (Keras' ``divide_no_nan``), reported as ``elements == 0`` / ``empty_windows``.
Penalty, weight decay, clipping and the step happen once per update; the optimizer's
``iterations`` counts updates (LR schedules see updates). The last short window of an epoch is
an update scaled by its own example count (``drop_remainder=True`` drops it). A non-finite
gradient skips the whole update (weights and optimizer state untouched; ``History`` records it)
or raises ``FloatingPointError`` (``on_nonfinite="raise"``).

Mixed precision: under ``mixed_bfloat16`` gradients are accumulated in float32. A model that
computes in float16 gets a ``keras.optimizers.LossScaleOptimizer`` (as ``compile`` does under
``mixed_float16``; pass one to set its ``initial_scale``): each micro-batch is differentiated
scaled (Keras' scaled batch mean) and accumulated *unscaled* in float32; the scale is read per
window and adjusted once per update -- a window that overflowed is skipped and the scale halves,
as ``LossScaleOptimizer`` does per step without accumulation. A micro-batch's backward pass
carries ``k`` times larger values than Keras' batch of ``k`` micro-batches (its mean divides by
``N_micro``), so it overflows at a ``k`` times smaller scale: under overflow pressure the
scale settles ``log2(k)`` halvings lower (see ``tfreg_harness.differences.note`` topic
``"float16_loss_scale"``).

Embedding + Adam/AdamW/RMSprop: the window's ``IndexedSlices`` gradients are summed (dense) and
the optimizer steps on the sum, as torch does; Keras ``fit`` hands the slices to
``update_step``, which updates the moments once per token *occurrence*, so a batch with repeated
tokens differs from Keras ``fit`` in the embedding rows, even at ``accumulation_steps=1``
(topic ``"embedding_sparse_adam"``).

Differences from PyTorch (``torchref.training``): none in the trainer's arithmetic. The
optimizers differ: Keras keeps the learning rate as a float32 variable and casts momentum,
Adam's betas (inside ``beta**t``) and weight decay through float32 even for float64 weights, and
adds Adam's epsilon to ``sqrt(v)`` where torch adds it to ``sqrt(v_hat)`` --
``torchref.KerasAdamW`` reproduces Keras; ``parity_tests/test_trajectories.py`` pins each gap.
BatchNorm statistics (and Keras' moving averages) are computed per micro-batch: accumulation
makes the *gradient* exact, not batch statistics -- a BatchNorm model trained with 4 x 64 is not
the model trained with 256 (both front ends warn at construction). ``batchnorm="per_window"``
(``Trainer`` and ``AccumulatingModel``) keeps the moving mean/variance untouched by the
micro-batches and updates them once per window with the window's pooled moments -- exactly what
one ``fit`` step on the concatenated window does to them (:mod:`tfreg.batchnorm`); gradients
are unchanged (normalisation stays per micro-batch). Layers'
``activity_regularizer`` and ``add_loss`` terms (which Keras adds to every batch's loss, so per
micro-batch they would change strength) are rejected with an ``InvalidArgumentError`` naming
the layer; ``regularizer=`` and variable regularizers are applied once per update.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from tfreg import accumulation
from tfreg._compat import keras, tf
from tfreg._losses import (
    LossTerm,
    element_weights,
    loss_sums,
    loss_terms,
    micro_batch_gradients,
    output_names,
)
from tfreg._losses import per_example_loss as per_example_loss
from tfreg.batchnorm import WindowMoments
from tfreg.checkpoint import check_file, run_fingerprint
from tfreg.distributed import Replicas, local_variable, replicas, update_function, zero
from tfreg.penalties import penalty as _penalty
from tfreg.proximal import PROXIMAL_CLASSES, Proximal
from tfreg.regularizers import get as _get_regularizer
from tfreg_core import checkpoint as core_checkpoint
from tfreg_core.batchnorm import check_mode as _check_batchnorm_mode
from tfreg_core.labels import check_class_labels
from tfreg_core.training import (
    ALL_SKIPPED_MESSAGE,
    NONFINITE_MESSAGE,
    RECORD_FIELDS,
    ArrayData,
    Position,
    StreamData,
    TrainerSpec,
    fit_data,
    object_config,
    resolve_proximal,
    run_fit,
    unpack_micro_batch,
    validation_batches,
)
from tfreg_core.training import History as History
from tfreg_core.validation import InvalidArgumentError

__all__ = ["AccumulatingModel", "History", "Trainer", "per_example_loss"]


def _sparse_categorical_accuracy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    predicted = tf.argmax(y_pred, axis=-1)
    labels = tf.reshape(tf.cast(y_true, tf.int64), tf.shape(predicted))  # (N,1) or (N,T) labels
    return tf.cast(tf.equal(predicted, labels), tf.float64)


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
    """Keras' clipping, op for op (float64: equal to ``SGD(clipnorm=c)`` up to the window sum's
    reassociation; float32: within one ulp, see ``Trainer``): per
    variable ``tf.clip_by_norm(g, c)`` (what Keras' TensorFlow optimizer calls, ``g * c /
    max(||g||, c)``); globally ``g * c * min(1/||G||, 1/c)`` with ``1/c`` computed in Python and
    then converted, as Keras' ``clip_by_global_norm`` does. Constants are converted straight to
    the gradient's dtype (``tf.cast`` of a Python float would round it through float32 first:
    a 1.5e-8 relative error in float64 wherever a norm was below ``c``, none at 0.0625)."""
    if spec.clipnorm is not None:
        return [tf.clip_by_norm(g, spec.clipnorm) for g in grads]
    if spec.global_clipnorm is not None:
        dtype = grads[0].dtype
        norm = tf.sqrt(tf.reduce_sum(tf.stack([tf.reduce_sum(tf.square(g)) for g in grads])))
        inverse = tf.constant(1.0 / spec.global_clipnorm, dtype)
        scale = tf.constant(spec.global_clipnorm, dtype) * tf.minimum(1.0 / norm, inverse)
        scale = scale + (norm - norm)  # NaN for a non-finite norm, as in Keras
        return [g * scale for g in grads]
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


# The keras.Model methods that define what fit trains and reports. The trainers compute the
# loss themselves (loss terms, counts, windows); a model that overrides one of them trains
# something they cannot see into.
_KERAS_STEP_METHODS = ("train_step", "test_step", "compute_loss", "compute_metrics")


def _reject_custom_steps(model: keras.layers.Layer, owner: str) -> None:
    """Refuse a model whose class overrides ``train_step``/``test_step``/``compute_loss``/
    ``compute_metrics``: the trainers call the model forward and build the objective from the
    compiled loss, so the override would be silently ignored (another objective trained)."""
    if not isinstance(model, keras.Model):
        return
    custom = [
        name
        for name in _KERAS_STEP_METHODS
        if getattr(type(model), name) is not getattr(keras.Model, name)
    ]
    if custom:
        raise InvalidArgumentError(
            f"{owner} computes the loss and the step itself (exact accumulation over the "
            f"compiled loss); it would ignore {type(model).__name__}.{', .'.join(custom)}. Put "
            "the objective in the loss (a Keras loss or a per-element loss function), or train "
            f"this model with its own fit. Received: model of class {type(model).__name__!r} "
            f"overriding {custom}"
        )


def _warn_batchnorm(model: keras.layers.Layer, accumulation_steps: int) -> None:
    """BatchNormalization normalises each micro-batch with its own statistics and updates its
    moving mean/variance once per micro-batch: accumulation makes the gradient exact for that
    model, which is not the model trained on the concatenated window (1e-2 apart in a small
    test). Said once, at construction, where the choice of batch size is still open."""
    if accumulation_steps < 2:
        return
    layers = [
        layer.name
        for layer in model._flatten_layers(include_self=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if layers:
        warnings.warn(
            f"BatchNormalization layers {layers} normalise each micro-batch with its own "
            "statistics and update their moving mean/variance once per micro-batch: the "
            f"gradient is exact for that model, not for one step on {accumulation_steps} "
            "concatenated micro-batches (use a larger micro-batch, LayerNormalization or "
            "GroupNormalization where the batch statistics matter). batchnorm='per_window' "
            "updates the moving statistics once per window with the window's pooled moments "
            "(the big batch's update; normalisation stays per micro-batch).",
            UserWarning,
            stacklevel=3,
        )


def _refuse_per_window_replicas(batchnorm: str) -> None:
    if batchnorm == "per_window":
        raise InvalidArgumentError(
            'batchnorm="per_window" is not available under a tf.distribute strategy (each '
            "replica's BatchNormalization sees its own share). Received: "
            'batchnorm="per_window" with a strategy'
        )


def _check_optimizer_variables(optimizer: Any, variables: Sequence[Any]) -> None:
    """A built optimizer steps exactly the variables it was built for: after unfreezing,
    recompile with a new optimizer (Keras' fine-tuning recipe; a built one cannot step the
    variables it has no slots for)."""
    if not getattr(optimizer, "built", False):
        return
    # Keras has no public list of the variables an optimizer was built for.
    built = {id(v) for v in optimizer._trainable_variables}
    missing = [v.path for v in variables if id(v) not in built]
    if missing:
        raise InvalidArgumentError(
            "The optimizer was built for another set of trainable variables (it has no state "
            "for the new ones): compile with a new optimizer after freezing or unfreezing "
            f"layers. Received: trainable variables it was not built for: {missing}"
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


def _float16_compute(model: keras.layers.Layer) -> bool:
    return any(
        getattr(layer, "compute_dtype", None) == "float16"
        for layer in model._flatten_layers(include_self=True)
    )


def _loss_scaled(optimizer: Any, model: keras.layers.Layer) -> Any:
    """The optimizer, wrapped in ``keras.optimizers.LossScaleOptimizer`` when the model computes
    in float16 (what ``compile`` does under ``mixed_float16``), unless it already is one."""
    lso = keras.optimizers.LossScaleOptimizer
    if isinstance(optimizer, lso) or not _float16_compute(model):
        return optimizer
    return lso(optimizer)


def _loss_scale(optimizer: Any) -> tf.Tensor | None:
    # Read once per micro-batch; it changes only at updates, so a window uses one scale.
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return tf.convert_to_tensor(optimizer.dynamic_scale)
    return None


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


def _window_gradient(
    sums: Sequence[Sequence[tf.Tensor]],
    counts: Sequence[tf.Tensor],
    micro_batches: tf.Tensor,
    summed: Sequence[bool],
) -> list[tf.Tensor]:
    """``sum_o sums_o / N_o`` from each loss term's gradient sums and count (a ``summed`` term,
    Keras reduction ``"sum"``/``"none"``: ``sums_o`` itself, as Keras fit trains the big
    batch's sum). A term none of whose elements counted in the window (every timestep masked)
    contributes zero, as Keras' ``divide_no_nan`` does; a window without any micro-batch is NaN
    (never applied)."""
    empty = tf.where(micro_batches > 0, 0.0, float("nan"))
    total: list[tf.Tensor] | None = None
    for term_sums, count, is_sum in zip(sums, counts, summed, strict=True):
        if is_sum:
            part = list(term_sums)
        else:
            part = [tf.math.divide_no_nan(s, tf.cast(count, s.dtype)) for s in term_sums]
        total = part if total is None else [a + b for a, b in zip(total, part, strict=True)]
    assert total is not None, "a model has at least one loss term"
    return [g + tf.cast(empty, g.dtype) for g in total]


def _all_finite(grads: list[tf.Tensor]) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])


class _Reduced:
    """The window after the reduction over replicas (without a strategy: the values as they
    are): per loss term the gradient sums and the count, and ``extras`` (loss/metric sums)."""

    def __init__(
        self,
        accs: Sequence[accumulation.AccumulatorState],
        extras: Sequence[Any],
        replicas: Replicas | None,
    ) -> None:
        local = [*(s for acc in accs for s in acc.sums), *(acc.count for acc in accs), *extras]
        if replicas is None:
            values = [tf.convert_to_tensor(v) for v in local]
        else:  # one all-reduce per dtype of every replica's local sums
            values = replicas.reduce(local)
        n, terms = len(accs[0].sums), len(accs)
        self.sums = [values[i * n : (i + 1) * n] for i in range(terms)]
        self.counts = values[n * terms : (n + 1) * terms]
        self.extras = values[(n + 1) * terms :]


def _update(
    accs: Sequence[accumulation.AccumulatorState],
    variables: list[Any],
    optimizer: keras.optimizers.Optimizer,
    penalty_fn: Callable[[], tf.Tensor | None],
    *,
    clip: Callable[[list[tf.Tensor]], list[tf.Tensor]],
    summed: Sequence[bool],
    after_step: Callable[[], None] | None = None,
    extras: Sequence[Any] = (),
    replicas: Replicas | None = None,
) -> tuple[tf.Tensor, tf.Tensor, _Reduced]:
    """One update from the window in ``accs`` (graph code; cross-replica context under a
    strategy, see :mod:`tfreg.distributed`); returns (finite, penalty, the reduced window) and
    resets ``accs``. ``extras`` (replica-local statistics) are reduced with the gradient sums.
    A non-finite gradient leaves weights and optimizer state untouched; ``after_step`` (the
    proximal step) runs only after an applied step.

    With a ``LossScaleOptimizer`` the (unscaled) window gradient is handed to it scaled by its
    current scale -- a power of two, so the scaling is exact -- and it does what it does
    without accumulation, once per window: a finite gradient is unscaled and applied (the scale
    doubles after ``dynamic_growth_steps`` applied updates), a non-finite one (float16
    overflow) is skipped and the scale halves."""
    window = _Reduced(accs, extras, replicas)
    grads = _window_gradient(window.sums, window.counts, accs[0].micro_batches, summed)
    grads = [tf.cast(g, v.dtype) for g, v in zip(grads, variables, strict=True)]
    with tf.GradientTape() as tape:
        pen = penalty_fn()
    if pen is None:
        pen = tf.constant(0.0, tf.float64)
    else:
        pen_grads = tape.gradient(pen, variables)
        grads = [g if p is None else g + p for g, p in zip(grads, pen_grads, strict=True)]
    grads = clip(grads)
    scale = _loss_scale(optimizer)
    if scale is not None:
        grads = [g * tf.cast(scale, g.dtype) for g in grads]
    finite = _all_finite(grads)

    def step() -> tf.Tensor:
        if scale is None:
            optimizer.apply(grads, variables)
        if after_step is not None:
            after_step()
        return tf.constant(True)

    if scale is not None:
        optimizer.apply(grads, variables)  # skips and shrinks the scale itself
    tf.cond(finite, step, lambda: tf.constant(False))
    for acc in accs:
        accumulation.reset(acc)
    return finite, pen, window


class _LossSums(tf.Module):
    """Per-term running loss sums of the open window (float64), for reporting."""

    def __init__(self, num_terms: int, name: str = "loss_sums") -> None:
        super().__init__(name=name)
        zero = tf.constant(0.0, tf.float64)
        self.sums = [local_variable(zero) for _ in range(num_terms)]

    def add(self, sums: Sequence[tf.Tensor]) -> None:
        for total, value in zip(self.sums, sums, strict=True):
            total.assign_add(value)

    def report(
        self,
        terms: Sequence[LossTerm],
        counts: Sequence[tf.Tensor],
        pen: tf.Tensor,
        sums: Sequence[tf.Tensor],
    ) -> dict[str, tf.Tensor]:
        """``data_loss = sum_o weight_o * S_o / N_o`` (0 for a term with no element; ``S_o``
        for a ``"sum"`` reduction, as Keras logs it on the big batch), ``loss``
        (+ penalty), ``elements`` (sum of N_o; 0 when everything was masked) and, with several
        terms, ``<output>_loss``, from the window's (reduced) ``sums`` of ``self.sums``; then
        zeroes the sums."""
        per_term = [
            s if t.reduction == "sum" else tf.math.divide_no_nan(s, n)
            for t, s, n in zip(terms, sums, counts, strict=True)
        ]
        data_loss = tf.add_n([t.weight * v for t, v in zip(terms, per_term, strict=True)])
        values = {
            "loss": data_loss + pen,
            "data_loss": data_loss,
            "penalty": pen,
            "elements": tf.add_n(list(counts)),
        }
        if len(terms) > 1:
            values.update({f"{t.name}_loss": v for t, v in zip(terms, per_term, strict=True)})
        self.reset()
        return values

    def reset(self) -> None:
        """Zero the sums (after ``report``, or when a short window is dropped)."""
        for total in self.sums:
            zero(total)


def _proximal_step(
    proximal: Proximal | None, model: keras.layers.Layer, optimizer: Any
) -> Callable[[], None] | None:
    # The threshold uses the rate of the step just taken (tfreg.sparsity reads it, schedules
    # included, from the optimizer): once per update, never per micro-batch.
    if proximal is None:
        return None
    return lambda: proximal.apply(model, optimizer)


class _Text(tf.train.experimental.PythonState):
    """A string saved in the checkpoint (metric names, the replica count) -- not a variable,
    which ``MultiWorkerMirroredStrategy`` would have to broadcast (it cannot broadcast
    strings). ``_TrainerCheckpoint`` reads it back before anything is restored; restoring
    leaves it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def serialize(self) -> str:
        return self.text

    def deserialize(self, string_value: Any) -> None:
        pass  # checked equal before the restore


class _Window(tf.Module):
    """Per-window running sums for reporting (float64), the resumable position and the metric
    names the sums belong to (checked when a checkpoint is read)."""

    def __init__(self, num_terms: int, metrics: Sequence[str]) -> None:
        super().__init__(name="window")
        zero = tf.constant(0.0, tf.float64)
        self.losses = _LossSums(num_terms)
        self.weight_sum = local_variable(zero)
        self.metric_sums = [local_variable(zero) for _ in metrics]
        self.position = tf.Variable(tf.zeros([len(fields(Position))], tf.int64), trainable=False)
        self.metric_names = _Text(",".join(metrics))

    def reset(self) -> None:
        """Zero the per-window metric sums (the loss sums reset in ``_LossSums.report``)."""
        for v in [self.weight_sum, *self.metric_sums]:
            zero(v)


class _WindowHeader(tf.Module):
    """The window's position and metric names, without its replica-local sums (a strategy
    saves those per replica, see ``_ReplicaLocal``)."""

    def __init__(self, window: _Window) -> None:
        super().__init__(name="window")
        self.position = window.position
        self.metric_names = window.metric_names


class _SeedStates(tf.Module):
    """The model's ``SeedGenerator`` states (Dropout, GaussianNoise, ...): in the checkpoint,
    so a resumed run draws the masks the uninterrupted run drew. ``model.variables`` is
    ``model.weights`` plus these (Keras 3's documented split)."""

    def __init__(self, model: keras.layers.Layer) -> None:
        super().__init__(name="rng")
        weights = {id(w) for w in model.weights}
        self.states = [v for v in model.variables if id(v) not in weights]


_NAMES_KEY = "window/metric_names/.ATTRIBUTES/py_state"
_REPLICAS_KEY = "replicas/count/.ATTRIBUTES/py_state"
_ONE_DEVICE = (1, 1, 0)  # the layout of a checkpoint without per-replica sums


def _layout_text(layout: tuple[int, int, int]) -> str:
    return "/".join(str(n) for n in layout)


def _describe_layout(layout: tuple[int, ...]) -> str:
    if len(layout) != 3:  # written before the layout was recorded: the replica count alone
        return f"{layout[0]} replica(s), replicas per worker not recorded"
    total, local, worker = layout
    return f"{total} replica(s), {local} of them on worker {worker}"


class _ReplicaLocal(tf.Module):
    """Under a strategy: every local replica's own copy of the open window's partial sums
    (accumulator and statistics), saved component by component. Saving the ``ON_READ``
    variables themselves would store their sum over replicas and restore ``sum / R`` on each:
    the same total, but not the uninterrupted run's summation order, so not bitwise."""

    def __init__(self, replicas: Replicas, variables: Sequence[Any]) -> None:
        super().__init__(name="replicas")
        self.count = _Text(_layout_text(replicas.layout()))
        per_variable = [replicas.strategy.experimental_local_results(v) for v in variables]
        self.local = [list(copies) for copies in zip(*per_variable, strict=True)]


class _TrainerCheckpoint(tf.train.Checkpoint):
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
        super().__init__(run=_Text(core_checkpoint.to_text(run)), **kwargs)
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
            else _ONE_DEVICE
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


def _present(args: tuple[Any, Any, Any]) -> tuple[Any, ...]:
    return args if args[2] is not None else args[:2]


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


def _metric_weights(sample_weight: Any, values: tf.Tensor, y_pred: Any) -> tf.Tensor:
    # A metric's per-element values weighted like the loss -- ones, per example or per element
    # -- and, as Keras' metrics do, by the output's mask (masked elements weigh 0).
    w = element_weights(sample_weight, values)
    w = tf.ones_like(values) if w is None else tf.broadcast_to(w, tf.shape(values))
    mask = getattr(y_pred, "_keras_mask", None)
    if mask is not None and mask.shape.rank == values.shape.rank:
        w = w * tf.cast(mask, w.dtype)
    return w


class _Engine:
    """The TensorFlow half of ``Trainer``: two ``tf.function`` s, each traced once per input
    signature (the batch dimension is ``None``, so the short last micro-batch reuses the trace).
    Holds what the steps need, nothing of the trainer: the model, its loss terms, the optimizer,
    the once-per-update penalty and proximal step, and the options.
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
        self.moments = moments  # batchnorm="per_window": the window's BatchNorm moments
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
        self.accs = [accumulation.init(self.variables) for _ in self.terms]
        self.window = _Window(len(self.terms), spec.metrics)
        self.rng = _SeedStates(model)
        optimizer.build(self.variables)
        self.penalty_fn = _penalty_fn(model, self.variables, regularizer, spec.include_bias)
        self.after_step = _proximal_step(proximal, model, optimizer)
        # Checked eagerly before each window's first micro-batch (a schedule's rate at the
        # coming step): host-side flag, no read of the accumulator.
        self.check_rates = None if proximal is None else lambda: proximal.check_rates(optimizer)
        self.window_open = False
        self.micro_fns: dict[Any, Any] = {}
        self.eval_fns: dict[Any, Any] = {}
        self.apply_fn = update_function(self._apply, self.replicas, jit_compile=spec.jit_compile)

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
                jit_compile=self.spec.jit_compile,
                autograph=False,
            )
        return cache[key]

    def micro_step(self, x: Any, y: Any, sample_weight: Any) -> None:
        if self.check_rates is not None and not self.window_open:
            self.check_rates()
        self.window_open = True
        if self.stream_length is not None:  # the first micro-batch of a fit on a stream
            assert self.replicas is not None  # stream_length is set under a strategy only
            self.replicas.check_stream((x, y, sample_weight), self.stream_length)
            self.stream_length = None
        args = _present((x, y, sample_weight))
        self._traced(self.micro_fns, self._micro_everywhere, (x, y, sample_weight))(*args)

    def _micro_everywhere(self, x: Any, y: Any, w: Any) -> None:
        # Under a strategy every replica accumulates its share of the global micro-batch.
        if self.replicas is None:
            self._micro(x, y, w)
        else:
            self.replicas.run(self._micro, (x, y, w))

    def discard_window(self) -> None:
        """``drop_remainder`` on a stream: the short window's sums are thrown away."""
        self.window_open = False
        for acc in self.accs:
            accumulation.reset(acc)
        self.window.losses.reset()
        self.window.reset()
        if self.moments is not None:
            self.moments.reset()

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
            values = [_METRIC_FNS[name](y, y_pred) for name in self.spec.metrics]
            out.append(tf.reduce_sum(_metric_weights(w, values[0], y_pred)))
            out += [tf.reduce_sum(v * _metric_weights(w, v, y_pred)) for v in values]
        return tuple(out)

    def check_validation(self, batches: Callable[[], Iterable[tuple[Any, Any, Any]]]) -> None:
        """Trace the validation step on the first batch (nothing runs): malformed validation
        data -- another input shape, targets a loss refuses -- fails before the first update,
        not after the first epoch trained."""
        first = next(iter(batches()), None)
        if first is None:
            raise InvalidArgumentError("validation_data yielded no batch. Received: empty data")
        self._traced(self.eval_fns, self._eval, first).get_concrete_function()

    def evaluate(self, batches: Iterable[tuple[Any, Any, Any]]) -> dict[str, float]:
        """``val_loss`` (= ``sum_o weight_o * S_o / N_o`` over the data + penalty, as Keras'
        ``val_loss`` includes the regularization losses), ``val_data_loss`` and metrics."""
        totals: Any = None
        for args in batches:
            out = self._traced(self.eval_fns, self._eval, args)(*_present(args))
            totals = out if totals is None else [a + b for a, b in zip(totals, out, strict=True)]
        totals = [float(t) for t in totals]
        k = len(self.terms)
        sums, counts, metric_part = totals[:k], totals[k : 2 * k], totals[2 * k :]
        per_term = [total / n if n else 0.0 for total, n in zip(sums, counts, strict=True)]
        data_loss = sum(float(t.weight) * v for t, v in zip(self.terms, per_term, strict=True))
        penalty = self.penalty_fn()
        logs = {
            "val_loss": data_loss + (0.0 if penalty is None else float(penalty)),
            "val_data_loss": data_loss,
        }
        if k > 1:
            named = zip(self.terms, per_term, strict=True)
            logs.update({f"val_{t.name}_loss": v for t, v in named})
        if metric_part:
            weight_sum, *metric_sums = metric_part
            for name, total in zip(self.spec.metrics, metric_sums, strict=True):
                logs[f"val_{name}"] = total / weight_sum
        return logs

    def _micro(self, x: Any, y: Any, w: Any) -> None:
        capture = contextlib.nullcontext() if self.moments is None else self.moments.capture()
        with capture:
            batch = micro_batch_gradients(
                self.model,
                self.terms,
                self.names,
                self.variables,
                x,
                y,
                w,
                loss_scale=_loss_scale(self.optimizer),
                check_forward=lambda: _reject_added_losses(self.model),  # at trace time
            )
        for acc, grads, count in zip(self.accs, batch.grads, batch.counts, strict=True):
            accumulation.add(acc, grads, count)
        self.window.losses.add(batch.sums)
        if not self.spec.metrics:
            return
        # Metrics need one output (checked in Trainer.__init__).
        for name, total in zip(self.spec.metrics, self.window.metric_sums, strict=True):
            values = _METRIC_FNS[name](y, batch.y_pred)
            weights = _metric_weights(w, values, batch.y_pred)
            total.assign_add(tf.reduce_sum(values * weights))
        self.window.weight_sum.assign_add(tf.reduce_sum(weights))

    def _apply(self) -> dict[str, tf.Tensor]:
        spec = self.spec
        window = self.window
        finite, pen, reduced = _update(
            self.accs,
            self.variables,
            self.optimizer,
            self.penalty_fn,
            clip=lambda grads: _clip(grads, spec),
            summed=[t.summed for t in self.terms],
            after_step=self.after_step,
            extras=[*window.losses.sums, window.weight_sum, *window.metric_sums],
            replicas=self.replicas,
        )
        k = len(self.terms)
        loss_sums, (weight_sum, *metric_sums) = reduced.extras[:k], reduced.extras[k:]
        values = window.losses.report(self.terms, reduced.counts, pen, loss_sums)
        values["skipped"] = tf.logical_not(finite)
        for name, total in zip(spec.metrics, metric_sums, strict=True):
            values[name] = total / weight_sum
        window.reset()
        if self.moments is not None:  # the forward passes happened, finite or not
            self.moments.close()
        return values

    def apply_step(self) -> dict[str, tf.Tensor]:
        self.window_open = False
        with _collectives(self.replicas):
            values = self.apply_fn()
        # "raise" reads one flag per update back to the host (graph asserts vanish under XLA);
        # the default "skip" never synchronises here.
        if self.spec.on_nonfinite == "raise" and bool(values["skipped"]):
            raise FloatingPointError(NONFINITE_MESSAGE)
        return values

    def fetch(self, values: Mapping[str, tf.Tensor]) -> dict[str, Any]:
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
    the model's variable dtype; for several outputs a list/dict of them, or one applied to every
    output, with ``loss_weights`` (Keras' ``compile`` rules; ``torchref.Trainer`` has one loss).
    Targets a built-in loss would broadcast against its output, one target array for several
    outputs, and float labels for a class-index loss are refused while tracing, before any
    update. Per-example sample weights weight all of an example's loss elements (Keras raises
    for ``(N,)`` weights on an ``(N, T)`` loss). ``metrics``: names from
    ``tfreg_core.training.METRICS`` (single-output models), reported per update as
    ``sum(w*m)/sum(w)`` over the window. History records add ``elements`` (loss elements that
    counted) and, with several outputs, ``<output>_loss``. ``clipnorm`` clips each variable's
    gradient, ``global_clipnorm`` all of them, with Keras' ops: the same as the optimizer's own
    ``clipnorm`` up to the window sum's reassociation in float64 (``<= 1e-12``, pinned); in
    float32 one ulp apart at ``clipnorm=0.05`` (9.6e-8 rel), within the float32 tolerance.
    ``proximal=tfreg.ProximalL1(l1=...)`` soft-thresholds once per applied update, right after
    the step (exact zeros; do not also put an L1 penalty on the same weights). ``seed`` fixes
    the shuffling order (per epoch), which is what makes checkpoint/resume bit-identical.
    ``jit_compile=True`` compiles both steps with XLA (one compilation per distinct micro-batch
    size).

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
        proximal: Proximal | dict[str, Any] | Sequence[Any] | None = None,
        loss_weights: float | Sequence[float] | dict[str, float] | None = None,
        batchnorm: str = "per_micro_batch",
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
        _reject_custom_steps(model, "Trainer")
        self.batchnorm = _check_batchnorm_mode(batchnorm)
        if self.batchnorm == "per_micro_batch":
            _warn_batchnorm(model, accumulation_steps)
        optimizer = _loss_scaled(optimizer, model)
        if on_nonfinite == "raise" and isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise InvalidArgumentError(
                "float16 loss scaling skips the windows that overflow (and shrinks the scale); "
                "on_nonfinite='raise' would stop training at the first one. Use 'skip'. "
                "Received: on_nonfinite='raise' with a LossScaleOptimizer (float16 model)"
            )
        self._replicas = replicas(model, owner="Trainer")
        if self._replicas is not None:
            self._replicas.check_options(optimizer, jit_compile=jit_compile)
            _refuse_per_window_replicas(self.batchnorm)
        names = output_names(model)
        terms = loss_terms(loss, loss_weights, names)
        if self.spec.metrics and len(names) > 1:
            raise InvalidArgumentError(
                "metrics are computed for single-output models only. Received: "
                f"metrics={self.spec.metrics} for outputs {names}"
            )
        self.model = model
        self.loss = loss
        self.loss_weights = loss_weights
        self.optimizer = optimizer
        self.regularizer = None if regularizer is None else _get_regularizer(regularizer)
        self.proximal = resolve_proximal(proximal, PROXIMAL_CLASSES, optimizer)
        self._names, self._terms = names, terms
        self._engine: _Engine | None = None
        self.stop_training = False
        # The digest of the arrays the last fit trained on ("": none, or a stream), recorded in
        # checkpoints: a mid-epoch resume on other data is refused (tfreg_core.training.run_fit).
        self.data_digest = ""
        # The digest a restored checkpoint recorded, checked by the next fit (run_fit) only.
        self.resumed_data_digest = ""

    def build(self, input_shape: Any = None) -> None:
        """Create accumulator, optimizer variables and position (``fit`` calls this).
        ``input_shape`` builds an unbuilt model (a shape, or a structure of shapes)."""
        if self._engine is not None:
            return
        if not self.model.built and input_shape is None:
            raise ValueError("The model is not built; pass input_shape or call fit first.")
        with _scope(self._replicas):
            if not self.model.built:
                self.model.build(input_shape)
            if self.proximal is not None:  # before tracing: TF would wrap it (StagingError)
                self.proximal.check_model(self.model)
            self._engine = _Engine(
                self.model,
                self._terms,
                self._names,
                self.optimizer,
                spec=self.spec,
                regularizer=self.regularizer,
                proximal=self.proximal,
                replicas=self._replicas,
                moments=WindowMoments(self.model) if self.batchnorm == "per_window" else None,
            )
            # Evaluated once eagerly: a regularizer's own error (an axis out of range) reaches
            # the user as is, not wrapped in TF's StagingError by the step's trace.
            self._engine.penalty_fn()

    @property
    def accumulators(self) -> list[accumulation.AccumulatorState]:
        """One accumulator per loss term (output with a loss), each with its own count.

        Under a strategy the sums and counts are replica-local: reading one in cross-replica
        context gives the sum over the replicas, a collective under
        ``MultiWorkerMirroredStrategy`` (every worker must read it, or the others hang)."""
        self.build()
        assert self._engine is not None  # build() made it
        return list(self._engine.accs)

    @property
    def accumulator(self) -> accumulation.AccumulatorState:
        """The accumulator of a single-loss model (see ``accumulators`` for several outputs)."""
        accs = self.accumulators
        if len(accs) != 1:
            raise ValueError(f"The model has {len(accs)} loss terms; use trainer.accumulators.")
        return accs[0]

    def checkpoint(self) -> tf.train.Checkpoint:
        """Everything a resumed ``fit`` needs, mid-window included: model, optimizer,
        accumulator, position and the model's ``SeedGenerator`` states (Dropout masks).
        ``read``/``restore`` refuse a checkpoint saved with other ``metrics`` before
        restoring anything.

        Under a strategy the open window's partial sums are saved per replica, so a resume
        mid-window is bitwise too; it needs the same strategy, replica count and replicas per
        worker (refused otherwise). Under ``MultiWorkerMirroredStrategy`` each worker writes and
        restores its own checkpoint (its replicas' partial sums; another worker's is refused;
        model and optimizer are identical on every worker), at the same point of training."""
        self.build()
        engine = self._engine
        assert engine is not None  # build() made it
        state: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer}
        if engine.moments is not None:
            state["batchnorm"] = engine.moments
        if self._replicas is None:
            state.update(accumulator=engine.accs, window=engine.window)
        else:
            modules: list[tf.Module] = [*engine.accs, engine.window]
            local = [
                v
                for module in modules
                for v in module.variables
                if v.synchronization == tf.VariableSynchronization.ON_READ
            ]
            state.update(
                replicas=_ReplicaLocal(self._replicas, local),
                window=_WindowHeader(engine.window),
            )
        layout = _ONE_DEVICE if self._replicas is None else self._replicas.layout()
        run = run_fingerprint(self, _layout_text(layout))
        counters = (len(engine.accs) if self._replicas is None else 0, self.spec.accumulation_steps)
        return _TrainerCheckpoint(
            self.spec.metrics, layout, run, counters, self._set_data_digest, rng=engine.rng, **state
        )

    def _set_data_digest(self, digest: str) -> None:
        self.data_digest = self.resumed_data_digest = digest

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
        logs, ``model.stop_training`` honoured; ``self.model`` is the trained model as the
        callbacks see it in Keras fit: its attributes, with the trainer's optimizer as
        ``optimizer``, so ``LearningRateScheduler``, ``ReduceLROnPlateau`` and ``TensorBoard``
        work and a rate they set applies from the next update) and/or
        the project's hooks (``tfreg_core.training.HOOKS``), all checked before training.

        Under a ``tf.distribute`` strategy (see :mod:`tfreg.distributed`) ``batch_size`` -- or
        a dataset's batches -- is the global micro-batch: pass the same arrays or
        ``tf.data.Dataset`` on every worker, not a distributed dataset; each replica trains
        on its share.
        """
        if isinstance(x, tf.distribute.DistributedDataset):
            raise InvalidArgumentError(
                "Pass the tf.data.Dataset of global micro-batches itself (the same on every "
                "worker): the Trainer gives each replica its share of each micro-batch and "
                "counts the window globally. Received: x=DistributedDataset (from "
                "experimental_distribute_dataset / distribute_datasets_from_function)"
            )
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
        validation = validation_batches(validation_data, batch_size)
        keras_callbacks = [c for c in callbacks or () if isinstance(c, keras.callbacks.Callback)]
        hooks: list[Any] = [_FinalizeVariables()]  # first: before the callbacks' train end
        hooks += [c for c in callbacks or () if not isinstance(c, keras.callbacks.Callback)]
        if keras_callbacks:
            model = _CallbackModel(self.model, self.optimizer)
            hooks.append(_KerasCallbacks(keras_callbacks, model, epochs, data, verbose))
        if isinstance(data, StreamData) and isinstance(data.data, tf.data.Dataset):
            data.data = data.data.prefetch(tf.data.AUTOTUNE)
        if self._replicas is not None and isinstance(data, ArrayData):
            arrays = (data.x, data.y, data.sample_weight)
            self._replicas.check_plan(data.plan, self.spec, arrays)
        self.build(_input_shape(data))
        engine = self._engine
        assert engine is not None  # build() made it
        if validation is not None and not _one_shot(validation_data):
            engine.check_validation(validation)
        if isinstance(data, ArrayData):
            _check_labels(self.model, self._terms, self.loss, data.y)
        if self._replicas is not None:
            state = [*self.model.weights, *self.optimizer.variables, engine.window.position]
            self._replicas.check_state(state)
            if isinstance(data, StreamData):
                engine.stream_length = _stream_length(data)
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
        assert self._engine is not None  # build() made it
        counts = {"apply": self._engine.apply_fn.experimental_get_tracing_count()}
        micro = sum(f.experimental_get_tracing_count() for f in self._engine.micro_fns.values())
        counts["micro"] = micro
        return counts

    def get_config(self) -> dict[str, Any]:
        """The keyword arguments (model, loss and optimizer are positional and not included)."""
        config = self.spec.get_config()
        config["regularizer"] = object_config(self.regularizer)
        config["proximal"] = object_config(self.proximal)
        config["loss_weights"] = self.loss_weights
        config["batchnorm"] = self.batchnorm
        return config


def _stream_length(data: StreamData) -> int:
    # Micro-batches per epoch where known (compared across workers), else -1.
    if data.steps_per_epoch is not None:
        return data.steps_per_epoch
    if isinstance(data.data, tf.data.Dataset):
        return int(data.data.cardinality())  # -1 unknown, -2 infinite
    return len(data.data) if hasattr(data.data, "__len__") else -1


def _scope(replicas: Replicas | None) -> Any:
    # Variables the trainer creates (accumulators, optimizer slots) belong to the strategy.
    return contextlib.nullcontext() if replicas is None else replicas.strategy.scope()


def _collectives(replicas: Replicas | None) -> Any:
    # A peer's failure in the update's all-reduce re-raised with a clear message.
    return contextlib.nullcontext() if replicas is None else replicas.collectives()


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


class _FinalizeVariables:
    """What Keras ``fit`` does after its last epoch, before ``on_train_end``:
    ``optimizer.finalize_variable_values(trainable variables)`` -- with ``use_ema=True`` the
    weights become their moving averages (without, nothing happens)."""

    def on_train_end(self, trainer: Trainer, history: History) -> None:
        assert trainer._engine is not None  # fit built it before the first epoch
        trainer.optimizer.finalize_variable_values(trainer._engine.variables)


class _CallbackModel:
    """``self.model`` of the Keras callbacks in ``Trainer.fit``: the trained model (every
    attribute read from it: weights, ``save_weights``, layers...) with the trainer's optimizer
    as ``optimizer`` -- what ``LearningRateScheduler``, ``ReduceLROnPlateau`` and
    ``TensorBoard`` read and set, as on a compiled model in ``fit``; the learning rate they
    assign is the optimizer's variable, read by the next update -- and its own
    ``stop_training`` (the user's model is not written to)."""

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        self._model = model
        self.optimizer = optimizer
        self.stop_training = False

    def __getattr__(self, name: str) -> Any:
        if name == "_model":  # not yet set (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self._model, name)


def _check_labels(model: Any, terms: Sequence[LossTerm], loss: Any, y: Any) -> None:
    """Class-index label arrays in range for their output, once per fit before any update
    (out of range, TF fails at that micro-batch on CPU -- after earlier windows were applied --
    and gives garbage on GPU). Outputs whose class count is not static are left alone."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return
    flat_y = tf.nest.flatten(y)
    for term in terms:
        if not term.class_index or len(flat_y) != len(outputs) or term.index >= len(outputs):
            continue
        classes = outputs[term.index].shape[-1]
        if classes is None:
            continue
        ignore = getattr(loss, "ignore_class", None) if len(terms) == 1 else None
        where = "y" if len(terms) == 1 else f"y[{term.name!r}]"
        check_class_labels(flat_y[term.index], int(classes), ignore=ignore, where=where)


def _one_shot(data: Any) -> bool:
    # An iterator (a generator) is not peeked at: its first batch would be lost.
    return not isinstance(data, tuple) and iter(data) is data


class _KerasCallbacks:
    """``keras.callbacks.Callback`` objects driven by ``run_fit``'s hooks with Keras'
    signatures: ``on_train_batch_end(update, logs)`` per update (``logs``: the record's
    values), ``on_epoch_end(epoch, logs)`` after validation; ``model.stop_training`` (what
    ``EarlyStopping`` sets) stops the trainer."""

    def __init__(
        self,
        callbacks: list[Any],
        model: _CallbackModel,
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
        _reject_activity_regularizers(model)
        _reject_custom_steps(model, "AccumulatingModel")
        batchnorm = _check_batchnorm_mode(batchnorm)
        if batchnorm == "per_micro_batch":
            _warn_batchnorm(model, accumulation_steps)
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
        self._accs: list[accumulation.AccumulatorState] | None = None
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
        if self._accs is not None and int(self._accs[0].micro_batches.numpy()):
            raise InvalidArgumentError(
                "compile() with a window half-filled would drop its micro-batches: recompile "
                "between fits (fit flushes every window at each epoch end) or call flush() "
                f"first. Received: {int(self._accs[0].micro_batches.numpy())} micro-batch(es) "
                "accumulated"
            )
        names = output_names(self.model)
        terms = loss_terms(loss, loss_weights, names)
        optimizer = _loss_scaled(optimizer, self.model)
        if self.proximal is not None:  # as Trainer does at construction: before any update
            self.proximal.check(optimizer)
        _check_optimizer_variables(optimizer, self.model.trainable_variables)
        self._names, self._terms = names, terms
        model_names = getattr(self.model, "output_names", None)
        if model_names:  # Keras' compile reads them to pair dict losses with the outputs
            self.output_names = list(model_names)
        super().compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights, **kwargs)
        with self.distribute_strategy.scope():
            self._replicas = replicas(self.model, owner="AccumulatingModel")
        if self._replicas is not None:
            _refuse_per_window_replicas(self.batchnorm)
            self._replicas.check_keras_fit()
            self._replicas.check_options(self.optimizer, jit_compile=self.jit_compile is True)
        # Keras' loss tracker, as a window mean that reports an all-skipped epoch as NaN.
        self._loss_tracker = _WindowMean(name="loss")
        self._data_loss_tracker = _WindowMean(name="data_loss")
        # As Keras' recompile: the trainable set is read again (unfreezing to fine-tune), so
        # the accumulators are rebuilt for it (empty: checked above).
        self._accs = None
        if self.model.built:
            self._build_state()

    @property
    def metrics(self) -> list[Any]:
        # `data_loss` is a training-window log only. Evaluation leaves it out of the metrics
        # too (not only of the step's logs): Keras returns its metrics' cross-replica results
        # only when their names match the step's logs, and otherwise the last step's logs --
        # under a strategy, one replica's partial value (a wrong val_loss).
        tracker = getattr(self, "_data_loss_tracker", None)
        metrics = [m for m in super().metrics if m is not tracker]  # Keras tracks it too
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

    def _build_state(self) -> None:
        if self._accs is not None:
            return
        variables = list(self.model.trainable_variables)
        with self.distribute_strategy.scope():
            self._accs = [accumulation.init(variables) for _ in self._terms]
            self._window_losses = _LossSums(len(self._terms))
            zero = tf.constant(0.0, tf.float64)
            self._window_examples = local_variable(zero)
            if not hasattr(self, "_skipped"):  # counters carry over a recompile
                self._skipped = tf.Variable(tf.constant(0, tf.int64), trainable=False)
                self._empty_windows = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            if not self.optimizer.built:
                self.optimizer.build(variables)
            if self.batchnorm == "per_window" and self._moments is None:
                self._moments = WindowMoments(self.model)
        self._apply_fn = update_function(self._apply_window, self._replicas)

    @property
    def skipped_updates(self) -> int:
        """Windows skipped (non-finite gradient, or float16 overflow under loss scaling)."""
        return 0 if self._accs is None else int(self._skipped.numpy())

    @property
    def empty_windows(self) -> int:
        """Windows in which no loss element counted (all masked): applied with a zero data
        gradient, as Keras does on such a batch."""
        return 0 if self._accs is None else int(self._empty_windows.numpy())

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
        assert self._accs is not None  # fit() built the state
        variables = list(self.model.trainable_variables)
        losses = self._window_losses
        finite, pen, reduced = _update(
            self._accs,
            variables,
            self.optimizer,
            _penalty_fn(self.model, variables, self.regularizer, self.spec.include_bias),
            clip=lambda grads: grads,
            summed=[t.summed for t in self._terms],
            after_step=_proximal_step(self.proximal, self.model, self.optimizer),
            extras=[*losses.sums, self._window_examples],
            replicas=self._replicas,
        )
        *loss_sums, examples = reduced.extras
        values = losses.report(self._terms, reduced.counts, pen, loss_sums)
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
        zero(self._window_examples)
        self._skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        self._empty_windows.assign_add(tf.cast(values["elements"] == 0, tf.int64))
        if self._moments is not None:  # the forward passes happened, finite or not
            self._moments.close()

    def flush(self) -> None:
        """Apply (or, with ``drop_remainder``, discard) a partial window; called at epoch end."""
        if self._accs is None or int(self._accs[0].micro_batches.numpy()) == 0:
            return
        self._pending = 0
        if self.spec.drop_remainder:
            for acc in self._accs:
                accumulation.reset(acc)
            self._window_losses.reset()
            zero(self._window_examples)
            if self._moments is not None:
                self._moments.reset()
        else:
            self._apply_fn()

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        capture = contextlib.nullcontext() if self._moments is None else self._moments.capture()
        with capture:
            batch = micro_batch_gradients(
                self,  # through Keras' __call__: the wrapper is built (and saveable) by fit
                self._terms,
                self._names,
                list(self.model.trainable_variables),
                x,
                y,
                sample_weight,
                loss_scale=_loss_scale(self.optimizer),
                check_forward=lambda: _reject_added_losses(self),
            )
        assert self._accs is not None  # fit() built the state
        for acc, grads, count in zip(self._accs, batch.grads, batch.counts, strict=True):
            accumulation.add(acc, grads, count)
        self._window_losses.add(batch.sums)
        first = next(t for t in tf.nest.flatten(x) if t is not None)
        self._window_examples.assign_add(tf.cast(tf.shape(first)[0], tf.float64))
        if self._replicas is not None:  # the window closes in make_train_function's loop
            return self.compute_metrics(x, y, batch.y_pred, sample_weight=sample_weight)

        def close_window() -> tf.Tensor:
            self._apply_window()
            return tf.constant(True)

        tf.cond(
            self._accs[0].micro_batches >= self.spec.accumulation_steps,
            close_window,
            lambda: tf.constant(False),
        )
        return self.compute_metrics(x, y, batch.y_pred, sample_weight=sample_weight)
