"""Sparsity that is real: sparsity reports, proximal L1 (soft-thresholding) and a Keras callback.

**Why a proximal step.** ``loss + l1 * ||w||_1`` minimised by (sub)gradient descent -- the L1 term
in the loss, ``tfreg.L1`` as a kernel regularizer, ``torch.norm(w, 1)`` added to a torch loss --
moves each weight by ``lr * l1 * sign(w)`` every step, so weights that should be zero oscillate
around it and essentially never *are* zero (the seed notebook's observation). Proximal gradient
descent (ISTA) splits the objective: an ordinary optimizer step on the smooth loss, then the
proximal operator of the L1 term, the soft-threshold

    w <- sign(w) * max(|w| - lr_t * l1, 0)

which sets every weight that the step left within ``lr_t * l1`` of zero to exactly ``0``. It
minimises the *same* objective as the subgradient method, handling the non-smooth part exactly.
So: **do not also put the L1 term in the loss** (the penalty would be applied twice).

**Learning rate and schedules.** The threshold is ``lr_t * l1`` with ``lr_t`` the learning rate
of the step just taken. :func:`apply_proximal_l1` reads it from a Keras optimizer, evaluating a
``LearningRateSchedule`` at ``iterations - 1`` (``optimizer.learning_rate`` already gives the
*next* step's rate once ``apply_gradients`` has counted the step). Keras keeps the learning rate
as a float32 variable: on float64 weights the threshold is ``float32(lr) * l1``, which equals
torch's ``lr * l1`` only when ``lr`` is a float32 number (0.5, 2**-k, ...).

**Momentum and Adam.** With plain SGD this is exactly proximal SGD / ISTA. After a momentum or
adaptive step it is *not* a true proximal method: Adam's step on coordinate ``i`` is scaled by
``1 / (sqrt(v_i) + eps)``, and a consistent prox would shrink coordinate ``i`` by
``lr * l1 / (sqrt(v_i) + eps)``; the uniform ``lr * l1`` used here ignores that scaling, so the
objective being minimised is no longer ``loss + l1 * ||w||_1`` (coordinates with small gradient
history are thresholded relatively harder). Momentum keeps pushing zeroed weights with their
velocity. Both still yield exact zeros and are common heuristics; do not read the result as the
lasso solution.

The torch twin is :mod:`torchref.sparsity` (same names and arithmetic; it reads the learning
rate from ``optimizer.param_groups`` and has no callback: call ``torchref.sparsity_report`` in
your loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tfreg._compat import keras, tf
from tfreg.penalties import penalized_variables
from tfreg_core import sparsity as _core
from tfreg_core import validation
from tfreg_core.sparsity import ParameterSparsity, SparsityReport

__all__ = [
    "ParameterSparsity",
    "ProximalL1",
    "SparsityCallback",
    "SparsityReport",
    "apply_proximal_l1",
    "soft_threshold",
    "sparsity_report",
]

_Variables = keras.layers.Layer | Sequence[Any]


def _name(variable: Any, index: int) -> str:
    return getattr(variable, "path", None) or getattr(variable, "name", None) or f"v{index}"


def sparsity_report(
    model_or_variables: _Variables,
    *,
    rel: float = _core.DEFAULT_REL,
    atol: float = 0.0,
    include_bias: bool = False,
) -> SparsityReport:
    """The :class:`~tfreg_core.sparsity.SparsityReport` of the variables ``tfreg.penalty`` would
    penalise (kernels unless ``include_bias``), computed on NumPy copies.

    Near-zero means ``w == 0`` or ``|w| < max(rel * max|w|, atol)`` per variable; the default
    ``rel=5e-4`` is the seed notebook's rule. Equals ``torchref.sparsity_report`` of the
    transferred torch module (counts exactly; norms up to summation order).
    """
    variables = penalized_variables(
        model_or_variables, include_bias=_core.include_bias_flag(include_bias)
    )
    named = [(_name(v, i), keras.ops.convert_to_numpy(v)) for i, v in enumerate(variables)]
    return _core.sparsity_report(named, rel=rel, atol=atol)


def soft_threshold(x: Any, threshold: Any) -> tf.Tensor:
    """``sign(x) * max(|x| - threshold, 0)``, the proximal operator of ``threshold * ||x||_1``.

    ``threshold`` is a non-negative Python number (checked) or a scalar tensor (not checked: it
    may live in a graph); it is rounded once to ``x``'s dtype. Entries with ``|x| <= threshold``
    become exactly 0 (``-0.0`` for negative ones, which compares equal to 0).
    """
    x = tf.convert_to_tensor(x)
    if not _is_tensor(threshold):
        threshold = validation.non_negative_float(threshold, "threshold")
    t = _in_dtype(threshold, x.dtype)
    return tf.sign(x) * tf.maximum(tf.abs(x) - t, tf.zeros((), x.dtype))


def _is_tensor(value: Any) -> bool:
    return tf.is_tensor(value) or isinstance(value, keras.Variable)


def _in_dtype(value: tf.Tensor | float, dtype: tf.DType) -> tf.Tensor:
    # tf.cast of a Python float goes through float32 first; convert it directly instead.
    if _is_tensor(value):
        return tf.cast(tf.convert_to_tensor(value), dtype)
    return tf.convert_to_tensor(value, dtype=dtype)


def _step_learning_rate(optimizer: keras.optimizers.Optimizer) -> tf.Tensor:
    """The learning rate of the optimizer step just taken, as a tensor (no host sync)."""
    if optimizer.gradient_accumulation_steps:
        # Keras counts micro-steps and updates only every k-th one; a prox after each micro-step
        # would shrink k times per update.
        raise validation.InvalidArgumentError(
            "Proximal L1 needs one call per real update; this optimizer accumulates gradients "
            "and updates only every k-th step. Use tfreg's Trainer for accumulation. Received: "
            f"optimizer.gradient_accumulation_steps={optimizer.gradient_accumulation_steps!r}"
        )
    # A LossScaleOptimizer's own rate attributes are not the schedule that stepped.
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    # Keras has no public accessor for the schedule object itself.
    schedule = optimizer._learning_rate
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        # apply_gradients has already counted the step; before any step, the first step's rate.
        step = tf.maximum(tf.cast(optimizer.iterations, tf.int64) - 1, 0)
        return tf.convert_to_tensor(schedule(step))
    return tf.convert_to_tensor(optimizer.learning_rate)


def _checked_tensor_learning_rate(learning_rate: Any) -> tf.Tensor:
    """A user-given learning-rate tensor, rejected if negative or non-finite (torchref rejects
    these too): a negative rate would push weights *away* from zero.

    Eagerly the value is read and checked at once, raising ``InvalidArgumentError``; inside a
    graph the check is an assert op that the returned tensor depends on, so the assigns that use
    it cannot run first. An optimizer's own rate is not checked (no host read per step)."""
    value = tf.convert_to_tensor(learning_rate)
    if tf.executing_eagerly():
        number = value.numpy().item() if value.shape.num_elements() == 1 else learning_rate
        validation.non_negative_float(number, "learning_rate")
        return value
    value = tf.cast(value, tf.float64)
    message = "learning_rate must be a single finite non-negative number"
    checks = [
        tf.debugging.assert_equal(tf.size(value), 1, message=message),
        tf.debugging.assert_non_negative(value, message=message),
        tf.debugging.assert_all_finite(value, message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(value)


def _threshold(learning_rate: Any, l1: float) -> tf.Tensor | float:
    if isinstance(learning_rate, keras.optimizers.Optimizer):
        learning_rate = _step_learning_rate(learning_rate)
    elif _is_tensor(learning_rate):
        learning_rate = _checked_tensor_learning_rate(learning_rate)
    if _is_tensor(learning_rate):
        return tf.cast(tf.convert_to_tensor(learning_rate), tf.float64) * l1
    if hasattr(learning_rate, "apply_gradients"):
        raise validation.InvalidArgumentError(
            "learning_rate must be a number, a tensor or a Keras 3 optimizer. "
            f"Received: learning_rate={learning_rate!r}"
        )
    return _core.proximal_threshold(learning_rate, l1)


def _prox_variables(model_or_variables: Any, include_bias: bool) -> list[Any]:
    variables = penalized_variables(model_or_variables, include_bias=include_bias)
    for i, v in enumerate(variables):
        if not hasattr(v, "assign") or not tf.as_dtype(v.dtype).is_floating:
            raise validation.InvalidArgumentError(
                "apply_proximal_l1 updates floating-point variables in place. Received: "
                f"{_name(v, i)}={v!r}"
            )
    return variables


def apply_proximal_l1(
    variables_or_model: _Variables,
    *,
    l1: float,
    learning_rate: float | tf.Tensor | keras.optimizers.Optimizer,
    include_bias: bool = False,
) -> None:
    """Soft-threshold the penalised variables in place: ``w <- soft_threshold(w, lr * l1)``.

    Call it right after each optimizer update. ``learning_rate`` is a Python number, a scalar
    tensor, or the Keras optimizer that took the step (its current rate, or its schedule at the
    step just taken). Scope is ``tfreg.penalty``'s: kernels unless ``include_bias``; a sequence
    of variables is taken as given. Works inside ``tf.function`` (pass the optimizer or a tensor,
    not a changing Python float, to avoid retracing). Everything is validated before any
    variable changes; a negative or non-finite learning-rate tensor raises at once eagerly, and
    inside ``tf.function`` fails an assert that every assign depends on. A
    ``LossScaleOptimizer`` is read through its inner optimizer; an update it skips for non-finite
    gradients is still thresholded, so call this only after applied steps.
    """
    spec = ProximalL1(l1=l1, include_bias=include_bias)
    spec.apply(variables_or_model, learning_rate)


class ProximalL1(_core.ProximalL1Spec):
    """Proximal L1 (ISTA): after each update, ``w <- sign(w) * max(|w| - lr_t * l1, 0)``.

    Same objective as ``loss + l1 * sum|w|`` over the kernels, solved by proximal gradient: exact
    zeros instead of tiny oscillating weights (see the module docstring for schedules, momentum
    and Adam). ``l1`` is used exactly, not rounded through float32. PyTorch twin:
    ``torchref.ProximalL1`` (identical thresholds; it reads ``lr`` from ``param_groups``).

    Trainer hook: a training loop holding ``proximal=ProximalL1(l1=...)`` calls
    ``proximal.apply(model, optimizer)`` once per update, immediately after
    ``optimizer.apply_gradients`` (after constraints, inside the same ``tf.function`` step), and
    must not add an L1 penalty for the same weights to the loss.
    """

    def apply(self, model_or_variables: _Variables, learning_rate: Any) -> None:
        """Soft-threshold ``model_or_variables``' penalised variables by ``learning_rate * l1``."""
        variables = _prox_variables(model_or_variables, self.include_bias)
        threshold = _threshold(learning_rate, self.l1)
        for v in variables:
            v.assign(soft_threshold(v, _in_dtype(threshold, tf.as_dtype(v.dtype))))


class SparsityCallback(keras.callbacks.Callback):
    """Adds the model's sparsity totals to each epoch's ``logs`` (hence ``History.history``):
    ``sparsity/zeros``, ``sparsity/near_zeros``, ``sparsity/nonzeros``, ``sparsity/density``,
    ``sparsity/l1``, ``sparsity/l2``, ``sparsity/max_abs``, ``sparsity/size``.

    The full per-variable :class:`SparsityReport` of every epoch is kept in ``self.reports``.
    Thresholds and scope as :func:`sparsity_report`. Keras-only: with torch, call
    ``torchref.sparsity_report(model).scalars()`` in the loop.
    """

    def __init__(
        self,
        *,
        rel: float = _core.DEFAULT_REL,
        atol: float = 0.0,
        include_bias: bool = False,
        prefix: str = "sparsity/",
    ) -> None:
        super().__init__()
        self.rel = validation.non_negative_float(rel, "rel")
        self.atol = validation.non_negative_float(atol, "atol")
        self.include_bias = _core.include_bias_flag(include_bias)
        if not isinstance(prefix, str):
            raise validation.InvalidArgumentError(
                f"prefix must be a str. Received: prefix={prefix!r}"
            )
        self.prefix = prefix
        self.reports: list[SparsityReport] = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.reports = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        report = sparsity_report(
            self.model, rel=self.rel, atol=self.atol, include_bias=self.include_bias
        )
        self.reports.append(report)
        if logs is not None:
            logs.update(report.scalars(self.prefix))
