"""What the trainers refuse or warn about in a Keras model and optimizer, before anything runs
(custom steps, activity regularizers, ``add_loss`` terms, BatchNormalization per micro-batch,
an optimizer built for other variables, out-of-range class labels), and float16 loss scaling
(the ``LossScaleOptimizer`` a float16 model gets, the scale a window reads)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from tfreg._compat import keras, tf
from tfreg._losses import LossTerm
from tfreg_core.labels import check_class_labels
from tfreg_core.validation import InvalidArgumentError


def reject_activity_regularizers(model: keras.layers.Layer) -> None:
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


def reject_custom_steps(model: keras.layers.Layer, owner: str) -> None:
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


def warn_batchnorm(model: keras.layers.Layer, accumulation_steps: int) -> None:
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


def refuse_per_window_replicas(batchnorm: str) -> None:
    if batchnorm == "per_window":
        raise InvalidArgumentError(
            'batchnorm="per_window" is not available under a tf.distribute strategy (each '
            "replica's BatchNormalization sees its own share). Received: "
            'batchnorm="per_window" with a strategy'
        )


def check_optimizer_variables(optimizer: Any, variables: Sequence[Any]) -> None:
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


def reject_added_losses(model: keras.layers.Layer) -> None:
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


def loss_scaled(optimizer: Any, model: keras.layers.Layer) -> Any:
    """The optimizer, wrapped in ``keras.optimizers.LossScaleOptimizer`` when the model computes
    in float16 (what ``compile`` does under ``mixed_float16``), unless it already is one."""
    lso = keras.optimizers.LossScaleOptimizer
    if isinstance(optimizer, lso) or not _float16_compute(model):
        return optimizer
    return lso(optimizer)


def loss_scale(optimizer: Any) -> tf.Tensor | None:
    # Read once per micro-batch; it changes only at updates, so a window uses one scale.
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return tf.convert_to_tensor(optimizer.dynamic_scale)
    return None


def check_labels(model: Any, terms: Sequence[LossTerm], loss: Any, y: Any) -> None:
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
