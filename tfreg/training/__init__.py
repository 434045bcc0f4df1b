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

The package: :mod:`~tfreg.training.window` (the window's state, ``micro``/``close``/``discard``
over :mod:`tfreg_core.update`, on TensorFlow's array ops from ``tfreg._ops``),
:mod:`~tfreg.training.engine` and :mod:`~tfreg.training.trainer` (``Trainer``),
:mod:`~tfreg.training.callbacks` (its Keras callbacks), :mod:`~tfreg.training.keras_fit`
(``AccumulatingModel``), :mod:`~tfreg.training.checkpoint` (the trainer checkpoint format),
:mod:`~tfreg.training.checks` (what a Keras model or optimizer is refused for).
"""

from tfreg._losses import per_example_loss
from tfreg.training.keras_fit import AccumulatingModel
from tfreg.training.trainer import Trainer
from tfreg_core.training import History

__all__ = ["AccumulatingModel", "History", "Trainer", "per_example_loss"]
