"""Exact gradient accumulation, as four functions on an explicit state: ``init`` / ``add`` /
``result`` / ``reset``.

Exactness comes from what is accumulated. Add the gradient of each micro-batch's *sum* of
(weighted) per-example losses together with that micro-batch's loss-element count; ``result``
divides the summed gradient by the window's total count. That is the gradient of
``sum(w_i * l_i) / N`` over the concatenated window -- Keras' ``"sum_over_batch_size"`` on one big
batch -- for any micro-batch sizes. Averaging per-micro-batch *means* (what Keras' optimizer
``gradient_accumulation_steps`` and most tutorials do) weights the examples of a short
micro-batch more heavily and is only right when every micro-batch has the same size and weight.

The state is a ``tf.Module`` of non-trainable ``tf.Variable`` s, so the functions work eagerly
and inside ``tf.function`` (no retracing: shapes are fixed at ``init``) and the state goes into a
``tf.train.Checkpoint`` -- a run saved mid-window resumes bit-identically. Sums are kept in each
variable's dtype, but never below float32: under a mixed-precision policy the float16/bfloat16
compute gradients are added into float32 sums.

The torch twin is :mod:`torchref.accumulation` (same functions, tensors instead of variables).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tfreg._compat import tf
from tfreg._ops import UPDATE_OPS
from tfreg.distributed import local_variable, scatter_add, zero
from tfreg_core.accumulation import COUNT_MESSAGE, check_add, reject_count, reject_gradient
from tfreg_core.update import data_gradient

__all__ = ["AccumulatorState", "add", "init", "reset", "result"]

_LOW_PRECISION = (tf.float16, tf.bfloat16)


def _static_shape(grad: Any) -> tuple[int | None, ...] | None:
    shape = tf.TensorShape(grad.shape)  # IndexedSlices: the dense shape
    return None if shape.rank is None else tuple(shape.as_list())


def _sum_dtype(variable_dtype: tf.DType, dtype: Any) -> tf.DType:
    if dtype is not None:
        return tf.as_dtype(dtype)
    return tf.float32 if variable_dtype in _LOW_PRECISION else variable_dtype


class AccumulatorState(tf.Module):
    """``sums[i]`` (one per variable), ``count`` (float64: exact for any integer count a window
    can have) and ``micro_batches``. Create with :func:`init`."""

    def __init__(self, variables: Sequence[Any], dtype: Any = None, name: str | None = None):
        super().__init__(name=name or "accumulator")
        with self.name_scope:
            # Replica-local under a tf.distribute strategy (each replica adds its own
            # micro-batches, no collective); plain variables without one.
            self.sums = [
                local_variable(
                    tf.zeros(v.shape, dtype=_sum_dtype(tf.as_dtype(v.dtype), dtype)),
                    name=f"sum_{i}",
                )
                for i, v in enumerate(variables)
            ]
            self.count = local_variable(tf.constant(0.0, tf.float64), name="count")
            self.micro_batches = local_variable(
                tf.constant(0, tf.int64), name="micro_batches", first=True
            )


def init(variables: Sequence[Any], *, dtype: Any = None) -> AccumulatorState:
    """Zeroed state for ``variables`` (their shapes; dtype per module docstring unless given)."""
    variables = list(variables)
    if not variables:
        raise ValueError("init() needs at least one variable. Received: variables=[]")
    return AccumulatorState(variables, dtype)


def add(
    state: AccumulatorState, grads: Sequence[Any], count: Any, *, check_count: bool = True
) -> AccumulatorState:
    """Add one micro-batch: ``grads`` of its loss *sum*, and its loss-element ``count``.

    ``None`` gradients (variables the loss does not reach) add nothing; ``tf.IndexedSlices``
    (embedding lookups) are scatter-added without densifying (under a ``tf.distribute``
    strategy summed densely: replica-local variables have no scatter-add, see
    :func:`tfreg.distributed.scatter_add`). Shapes, the gradient count and a
    finite ``count >= 0`` are checked before the first assign (nothing half-applied); a tensor
    count gets a graph-side assert (finite, >= 0) that runs before the sums are touched.
    ``check_count=False`` leaves the value checks out (shapes are still checked) for a caller
    whose count is finite and >= 0 by construction (the trainers' element counts): the graph's
    assert is a conditional, run on every micro-batch.
    """
    grads = list(grads)
    for i, g in enumerate(grads):
        if g is not None and not (
            (tf.is_tensor(g) or isinstance(g, tf.IndexedSlices)) and g.dtype.is_floating
        ):
            reject_gradient(i, g, "a floating tf.Tensor, tf.Variable or tf.IndexedSlices")
    is_tensor = tf.is_tensor(count)
    check_add(
        [None if g is None else _static_shape(g) for g in grads],
        [tuple(s.shape) for s in state.sums],
        count,
        unit="variables",
        count_tensor=(
            (tuple(count.shape), count.dtype.is_floating or count.dtype.is_integer)
            if is_tensor
            else None
        ),
    )
    checks = []
    if not check_count:
        pass
    elif is_tensor and tf.executing_eagerly():  # the value is known: checked before any assign
        value = float(tf.cast(count, tf.float64))
        if not (math.isfinite(value) and value >= 0):
            reject_count(count)
    elif is_tensor:
        # A tensor count is only known at run time: asserted in the graph, before any assign.
        # inf passed `assert_non_negative` and silently divided the window's gradient to zero.
        as_float = tf.cast(count, tf.float64)
        ok = tf.logical_and(tf.math.is_finite(as_float), as_float >= 0)
        checks.append(tf.debugging.Assert(ok, [COUNT_MESSAGE, as_float]))
    with tf.control_dependencies(checks):
        for acc, grad in zip(state.sums, grads, strict=True):
            if grad is None:
                continue
            if isinstance(grad, tf.IndexedSlices):
                scatter_add(acc, tf.IndexedSlices(tf.cast(grad.values, acc.dtype), grad.indices))
            else:
                acc.assign_add(tf.cast(grad, acc.dtype))
        # A Python number straight to float64: tf.cast would make it a float32 tensor first
        # (16777217 counted as 16777216).
        state.count.assign_add(
            tf.cast(count, tf.float64) if is_tensor else tf.constant(float(count), tf.float64)
        )
        state.micro_batches.assign_add(1)
    return state


def result(state: AccumulatorState) -> list[tf.Tensor]:
    """The window's gradient: each sum divided by the total count, by the trainers' rule
    (:func:`tfreg_core.update.data_gradient`, one term).

    A window whose micro-batches counted no element (every timestep masked, ``count == 0``)
    gives its sums -- zero -- as Keras' ``divide_no_nan`` does on such a batch. A window without
    any micro-batch gives NaN on purpose: a step taken from nothing must be caught by a
    finiteness check, never silently applied as a zero-gradient step.
    """
    grads = data_gradient([state.sums], [state.count], [False], UPDATE_OPS)
    return [UPDATE_OPS.where(state.micro_batches > 0, g, float("nan")) for g in grads]


def reset(state: AccumulatorState) -> AccumulatorState:
    """Zero the sums and counters (after the update that consumed them)."""
    for acc in state.sums:
        zero(acc)
    zero(state.count)
    zero(state.micro_batches)
    return state
