"""Proximal steps after each update: L1 (exact zero weights), group lasso (exact zero groups:
input features, neurons, filters) and their sum (sparse group lasso), with thresholds consistent
with the optimizer that stepped. The arithmetic and every formula: :mod:`tfreg_core.proximal`.

**Why a proximal step.** ``loss + l1 * ||w||_1`` (or a group lasso) minimised by (sub)gradient
descent -- the penalty in the loss, ``tfreg.L1`` / ``tfreg.GroupLasso`` as a regularizer --
moves weights that should be zero around zero, and they essentially never *are* zero (the seed
notebook's observation; ``GroupLasso(0.05, axis=1)`` leaves group norms of 3e-4..1e-3). Proximal
gradient descent splits the objective: an ordinary optimizer step on the smooth loss, then the
proximal operator of the penalty,

    ProximalL1:          w <- sign(w) * max(|w| - s * l1, 0)
    ProximalGroupLasso:  w_g <- w_g * max(0, 1 - t * lambda * c_g / ||w_g||)     (scalar t)

which sets what the step left close to zero to exactly ``0``. It minimises the *same* objective,
handling the non-smooth part exactly. So: **do not also put the penalty in the loss** (it would
be applied twice). ``ProximalChain([ProximalL1(...), ProximalGroupLasso(...)])`` (or a list passed
as ``Trainer(proximal=[...])``) is the sparse group lasso prox.

**Thresholds** (``threshold=``). ``"scalar"``: the step is the learning rate ``lr_t`` of the step
just taken (exact ISTA for plain SGD; with momentum a common heuristic). ``"preconditioned"``:
the per-coordinate step of Adam/AdamW/RMSprop (ProxGen): Keras Adam's
``s = lr * sqrt(1 - b2^t) / (sqrt(v) + eps)``, RMSprop's ``s = lr / sqrt(v + eps)``, read from
the optimizer's ``velocity`` variables; the group version is the exact diagonal-preconditioned
block prox. ``"auto"`` (default): preconditioned for Adam/AdamW/RMSprop, scalar for SGD, an error
for other optimizers (pass ``"scalar"`` to use the heuristic knowingly). torch's Adam puts eps on
``sqrt(v_hat)`` instead (``torchref.proximal``); ``torchref.KerasAdamW`` follows Keras.

**Learning rate and schedules.** The step uses ``lr_t``, the rate of the step just taken: a
``LearningRateSchedule`` is evaluated at ``iterations - 1`` (``optimizer.learning_rate`` already
gives the *next* step's rate once ``apply_gradients`` has counted the step). Keras keeps the rate
as a float32 variable: on float64 weights the threshold is ``float32(lr) * l1``, which equals
torch's ``lr * l1`` only when ``lr`` is a float32 number (0.5, 2**-k, ...).

The torch twin is :mod:`torchref.proximal` (same names and arithmetic; it reads the learning rate
from ``optimizer.param_groups`` and the second moments from ``optimizer.state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np

from tfreg._compat import keras, tf
from tfreg.penalties import penalized_variables
from tfreg_core import proximal as _core
from tfreg_core import validation

__all__ = [
    "PROXIMAL_CLASSES",
    "Proximal",
    "ProximalChain",
    "ProximalGroupLasso",
    "ProximalL1",
    "apply_proximal_l1",
    "block_soft_threshold",
    "named_penalized",
    "soft_threshold",
    "step_sizes",
]

_Variables: TypeAlias = keras.layers.Layer | Sequence[Any]


class _TFOps:
    """:class:`tfreg_core.proximal.ArrayOps` on TensorFlow tensors (graph-safe)."""

    sqrt = staticmethod(tf.sqrt)
    where = staticmethod(tf.where)
    zeros_like = staticmethod(tf.zeros_like)
    ones_like = staticmethod(tf.ones_like)

    @staticmethod
    def sum_keep(x: tf.Tensor, axes: tuple[int, ...]) -> tf.Tensor:
        return tf.reduce_sum(x, axis=axes, keepdims=True)

    @staticmethod
    def max_keep(x: tf.Tensor, axes: tuple[int, ...]) -> tf.Tensor:
        return tf.reduce_max(x, axis=axes, keepdims=True)

    @staticmethod
    def maximum(x: tf.Tensor, floor: float) -> tf.Tensor:
        return tf.maximum(x, tf.constant(floor, x.dtype))

    @staticmethod
    def tiny(x: tf.Tensor) -> float:
        return float(np.finfo(x.dtype.as_numpy_dtype).tiny)

    @staticmethod
    def transpose(x: tf.Tensor, permutation: tuple[int, ...]) -> tf.Tensor:
        return tf.transpose(x, permutation)

    @staticmethod
    def reshape(x: tf.Tensor, shape: tuple[int, ...]) -> tf.Tensor:
        return tf.reshape(x, shape)

    @staticmethod
    def pad_columns(x: tf.Tensor, width: int) -> tf.Tensor:
        return tf.pad(x, [[0, 0], [0, width]])

    @staticmethod
    def concat_rows(xs: Sequence[tf.Tensor]) -> tf.Tensor:
        return tf.concat(list(xs), axis=0)

    @staticmethod
    def constant(values: np.ndarray, like: tf.Tensor) -> tf.Tensor:
        return tf.constant(values, like.dtype)

    @staticmethod
    def kind(x: tf.Tensor) -> Any:
        return x.dtype


_OPS = _TFOps()


def _name(variable: Any, index: int) -> str:
    return getattr(variable, "path", None) or getattr(variable, "name", None) or f"v{index}"


def named_penalized(
    model_or_variables: _Variables, *, include_bias: bool = False
) -> list[tuple[str, Any]]:
    """``(name, variable)`` for each variable ``tfreg.penalty`` would penalise: the variable's
    ``path`` (else its name, else ``v<i>``)."""
    variables = penalized_variables(model_or_variables, include_bias=include_bias)
    return [(_name(v, i), v) for i, v in enumerate(variables)]


def soft_threshold(x: Any, threshold: Any) -> tf.Tensor:
    """``sign(x) * max(|x| - threshold, 0)``, the proximal operator of ``threshold * ||x||_1``.

    ``threshold`` is a non-negative Python number (checked) or a tensor (scalar or per-entry,
    not checked: it may live in a graph); it is rounded once to ``x``'s dtype. Entries with
    ``|x| <= threshold`` become exactly 0 (``-0.0`` for negative ones, which compares equal to 0).
    """
    x = tf.convert_to_tensor(x)
    if not _is_tensor(threshold):
        threshold = validation.non_negative_float(threshold, "threshold")
    t = _in_dtype(threshold, x.dtype)
    return tf.sign(x) * tf.maximum(tf.abs(x) - t, tf.zeros((), x.dtype))


def block_soft_threshold(x: Any, threshold: Any, *, axis: int | Sequence[int]) -> tf.Tensor:
    """``x_g * max(0, 1 - threshold / ||x_g||)`` per group, the norm over ``axis`` (``GroupLasso``'s
    convention): the proximal operator of ``threshold * sum_g ||x_g||``; exact zero groups."""
    x = tf.convert_to_tensor(x)
    if not _is_tensor(threshold):
        threshold = validation.non_negative_float(threshold, "threshold")
    axes = validation.normalized_axes(validation.axes(axis, "axis"), len(x.shape), "axis")
    return _core.block_soft_threshold(x, _in_dtype(threshold, x.dtype), axes, _OPS)


def _is_tensor(value: Any) -> bool:
    return tf.is_tensor(value) or isinstance(value, keras.Variable)


def _in_dtype(value: tf.Tensor | float, dtype: tf.DType) -> tf.Tensor:
    # tf.cast of a Python float goes through float32 first; convert it directly instead.
    if _is_tensor(value):
        return tf.cast(tf.convert_to_tensor(value), dtype)
    return tf.convert_to_tensor(value, dtype=dtype)


def _inner(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    # A LossScaleOptimizer's own attributes are not those of the optimizer that stepped.
    return getattr(optimizer, "inner_optimizer", optimizer)


def _step_learning_rate(optimizer: keras.optimizers.Optimizer) -> tf.Tensor:
    """The learning rate of the optimizer step just taken, as a tensor (no host sync)."""
    if optimizer.gradient_accumulation_steps:
        # Keras counts micro-steps and updates only every k-th one; a prox after each micro-step
        # would shrink k times per update.
        raise validation.InvalidArgumentError(
            "A proximal step needs one call per real update; this optimizer accumulates "
            "gradients and updates only every k-th step. Use tfreg's Trainer for accumulation. "
            f"Received: optimizer.gradient_accumulation_steps="
            f"{optimizer.gradient_accumulation_steps!r}"
        )
    optimizer = _inner(optimizer)
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


def _threshold(learning_rate: Any, factor: float) -> tf.Tensor | float:
    """``lr_t * factor``: a float64 tensor, or a Python float for a Python learning rate."""
    if isinstance(learning_rate, keras.optimizers.Optimizer):
        learning_rate = _step_learning_rate(learning_rate)
    elif _is_tensor(learning_rate):
        learning_rate = _checked_tensor_learning_rate(learning_rate)
    if _is_tensor(learning_rate):
        return tf.cast(tf.convert_to_tensor(learning_rate), tf.float64) * factor
    if hasattr(learning_rate, "apply_gradients"):
        raise validation.InvalidArgumentError(
            "learning_rate must be a number, a tensor or a Keras 3 optimizer. "
            f"Received: learning_rate={learning_rate!r}"
        )
    return _core.proximal_threshold(learning_rate, factor)


# --- the optimizer's per-coordinate step (threshold="preconditioned") ------------------------


def _kind(learning_rate: Any) -> str:
    if not isinstance(learning_rate, keras.optimizers.Optimizer):
        return "number"
    cls = type(_inner(learning_rate))
    # Exact types: a subclass may override update_step, and then its step is not this formula.
    if cls in (keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.RMSprop):
        return "adaptive"
    return "sgd" if cls is keras.optimizers.SGD else "other"


def _check_adaptive(optimizer: keras.optimizers.Optimizer) -> None:
    inner = _inner(optimizer)
    name = type(inner).__name__
    unsupported = {
        "amsgrad": getattr(inner, "amsgrad", False),
        "centered": getattr(inner, "centered", False),
        "momentum": getattr(inner, "momentum", 0.0) if name == "RMSprop" else 0.0,
    }
    for option, value in unsupported.items():
        if value:
            raise validation.InvalidArgumentError(
                f"threshold='preconditioned' supports {name} without {option} (its step is then "
                f"not a per-coordinate scaling of one gradient). Received: {option}={value!r}"
            )
    if not inner.epsilon > 0:
        raise validation.InvalidArgumentError(
            "threshold='preconditioned' needs epsilon > 0 (with 0 a coordinate whose second "
            f"moment is 0 has an infinite step). Received: epsilon={inner.epsilon!r}"
        )


def _slot(optimizer: keras.optimizers.Optimizer, variable: Any, index: int, suffix: str) -> Any:
    # Keras names a variable's slot f"{path with / -> _}_{suffix}" (add_variable_from_reference)
    # and offers no public per-variable accessor; refuse rather than guess on 0 or 2 matches.
    path = getattr(variable, "path", None)
    wanted = None if path is None else f"{path.replace('/', '_')}_{suffix}"
    matches = [v for v in optimizer.variables if wanted is not None and v.name == wanted]
    if len(matches) != 1 or tuple(matches[0].shape) != tuple(variable.shape):
        raise validation.InvalidArgumentError(
            f"threshold='preconditioned' reads the optimizer's {suffix!r} of each thresholded "
            f"variable; found {len(matches)} for {_name(variable, index)} (build the optimizer "
            "on the model's variables and step it first). Received: "
            f"optimizer={type(optimizer).__name__}"
        )
    return matches[0]


def step_sizes(optimizer: keras.optimizers.Optimizer, variables: Sequence[Any]) -> list[tf.Tensor]:
    """The per-coordinate step ``s`` the Adam/AdamW/RMSprop ``optimizer`` just took on each of
    ``variables`` (its update was ``w <- w - s * m_hat``, resp. ``- s * g``), in the variable's
    dtype, with Keras' own casts:

        Adam/AdamW   s = lr_t * sqrt(1 - b2^t) / (sqrt(v) + epsilon),  t = iterations
        RMSprop      s = lr_t / sqrt(v + epsilon)

    ``v`` is the optimizer's ``velocity`` of the variable. torch's Adam differs (epsilon on
    ``sqrt(v / (1 - b2^t))``, see ``torchref.step_sizes``)."""
    if _kind(optimizer) != "adaptive":
        _core.effective_mode("preconditioned", _kind(optimizer), optimizer)
    _check_adaptive(optimizer)
    inner = _inner(optimizer)
    rate = _step_learning_rate(optimizer)
    steps = []
    for i, variable in enumerate(variables):
        v = tf.convert_to_tensor(_slot(inner, variable, i, "velocity"))
        lr = tf.cast(rate, v.dtype)
        if isinstance(inner, keras.optimizers.RMSprop):
            steps.append(lr / keras.ops.sqrt(keras.ops.add(v, inner.epsilon)))
            continue
        # The casts of Adam.update_step: b2 through ops.cast, t = the iterations counted so far.
        t = keras.ops.cast(inner.iterations, v.dtype)
        b2_power = keras.ops.power(keras.ops.cast(inner.beta_2, v.dtype), t)
        denominator = keras.ops.add(keras.ops.sqrt(v), inner.epsilon)
        steps.append(lr * keras.ops.sqrt(1 - b2_power) / denominator)
    return steps


# --- operators -----------------------------------------------------------------------------


def _prox_variables(model_or_variables: Any, include_bias: bool) -> list[Any]:
    variables = penalized_variables(model_or_variables, include_bias=include_bias)
    for i, v in enumerate(variables):
        if not hasattr(v, "assign") or not tf.as_dtype(v.dtype).is_floating:
            raise validation.InvalidArgumentError(
                "A proximal step updates floating-point variables in place. Received: "
                f"{_name(v, i)}={v!r}"
            )
    return variables


class _Operator:
    """Shared by the operators: which threshold applies, checked before anything changes."""

    threshold_mode: str

    def check(self, optimizer: Any) -> None:
        """Refuse now an optimizer this operator's ``threshold`` cannot serve (trainers call
        this at construction, before any step)."""
        if _core.effective_mode(self.threshold_mode, _kind(optimizer), optimizer) == (
            "preconditioned"
        ):
            _check_adaptive(optimizer)

    def check_model(self, model: Any) -> None:
        """Refuse now what ``apply`` would refuse on ``model``'s (built) variables -- a
        non-floating one, an ``axis`` out of range for a kernel -- so that a trainer fails
        with this error before tracing its step (inside, TF wraps it in a ``StagingError``)."""
        variables = _prox_variables(model, include_bias=getattr(self, "include_bias", False))
        axes_for = getattr(self, "axes_for", None)
        if axes_for is not None:  # the group operators; L1 has no axis to check
            for i, v in enumerate(variables):
                axes_for(tuple(v.shape), _name(v, i))

    def check_rates(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Refuse now the rate of the coming update (a schedule's at ``iterations``, or the
        ``learning_rate`` a callback assigned) when negative or non-finite: trainers call this
        eagerly before a window's first micro-batch (one host read per window)."""
        inner = _inner(optimizer)
        schedule = inner._learning_rate  # Keras has no public accessor for the schedule
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            rate = schedule(inner.iterations)
            where = f"the learning-rate schedule at step {int(inner.iterations)}"
        else:
            rate, where = inner.learning_rate, "optimizer.learning_rate"
        _core.check_rate(float(tf.convert_to_tensor(rate)), where)

    def _steps(self, variables: list[Any], learning_rate: Any) -> list[tf.Tensor] | None:
        """Per-variable step tensors (preconditioned), or None (scalar)."""
        self.check(learning_rate)
        mode = _core.effective_mode(self.threshold_mode, _kind(learning_rate), learning_rate)
        return step_sizes(learning_rate, variables) if mode == "preconditioned" else None


def apply_proximal_l1(
    variables_or_model: _Variables,
    *,
    l1: float,
    learning_rate: float | tf.Tensor | keras.optimizers.Optimizer,
    include_bias: bool = False,
    threshold: str = "auto",
) -> None:
    """Soft-threshold the penalised variables in place: ``w <- soft_threshold(w, s * l1)``.

    Call it right after each optimizer update. ``learning_rate`` is a Python number, a scalar
    tensor, or the Keras optimizer that took the step (its current rate, or its schedule at the
    step just taken; with ``threshold`` auto/preconditioned and Adam/AdamW/RMSprop its
    per-coordinate step, see :func:`step_sizes`). Scope is ``tfreg.penalty``'s: kernels unless
    ``include_bias``; a sequence of variables is taken as given. Works inside ``tf.function``
    (pass the optimizer or a tensor, not a changing Python float, to avoid retracing).
    Everything is validated before any variable changes; a negative or non-finite learning-rate
    tensor raises at once eagerly, and inside ``tf.function`` fails an assert that every assign
    depends on. A ``LossScaleOptimizer`` is read through its inner optimizer; an update it skips
    for non-finite gradients is still thresholded, so call this only after applied steps.
    """
    spec = ProximalL1(l1=l1, include_bias=include_bias, threshold=threshold)
    spec.apply(variables_or_model, learning_rate)


class ProximalL1(_Operator, _core.ProximalL1Spec):
    """Proximal L1 (ISTA): after each update, ``w <- sign(w) * max(|w| - s * l1, 0)``.

    ``s = lr_t`` (``threshold="scalar"``; ``"auto"`` with SGD or a learning rate) or Adam's /
    RMSprop's per-coordinate step (``"preconditioned"``; ``"auto"`` with those). Same objective
    as ``loss + l1 * sum|w|`` over the kernels, solved by proximal gradient: exact zeros instead
    of tiny oscillating weights. ``l1`` is used exactly, not rounded through float32. PyTorch
    twin: ``torchref.ProximalL1`` (identical thresholds; it reads ``lr`` from ``param_groups``).

    Trainer hook: a training loop holding ``proximal=ProximalL1(l1=...)`` calls
    ``proximal.apply(model, optimizer)`` once per update, immediately after
    ``optimizer.apply_gradients`` (after constraints, inside the same ``tf.function`` step), and
    must not add an L1 penalty for the same weights to the loss.
    """

    def apply(self, model_or_variables: _Variables, learning_rate: Any) -> None:
        """Soft-threshold ``model_or_variables``' penalised variables by ``s * l1``."""
        variables = _prox_variables(model_or_variables, self.include_bias)
        steps = self._steps(variables, learning_rate)
        if steps is None:
            threshold = _threshold(learning_rate, self.l1)
            for v in variables:
                v.assign(soft_threshold(v, _in_dtype(threshold, tf.as_dtype(v.dtype))))
            return
        for v, s in zip(variables, steps, strict=True):
            v.assign(soft_threshold(v, s * _in_dtype(self.l1, s.dtype)))


class ProximalGroupLasso(_Operator, _core.ProximalGroupLassoSpec):
    """Proximal group lasso: after each update, each kernel's groups (the norm over ``axis``,
    as ``tfreg.GroupLasso``) are shrunk by the prox of ``strength * sum_g c_g * ||w_g||``:

        scalar step t = lr_t:   w_g <- w_g * max(0, 1 - t * strength * c_g / ||w_g||)
        Adam/RMSprop steps s:   zero iff ||z_g / s_g|| <= strength * c_g, else the exact
                                diagonal-preconditioned block prox (tfreg_core.proximal)

    ``c_g = 1`` or ``sqrt(|g|)`` (``group_weights="sqrt_size"``). Groups become *exactly* zero.
    On a Dense kernel ``(in, out)``, ``axis=1`` groups input features (feature selection),
    ``axis=0`` neurons; on a Conv2D kernel ``(kh, kw, in, out)``, ``axis=(0, 1, 2)`` groups output
    filters. Kernels only (rank >= 2; a bias is not a group member). torch twin:
    ``torchref.ProximalGroupLasso`` -- torch's layouts are transposed (``Linear.weight (out, in)``:
    input features are ``axis=0``). Do not also put ``GroupLasso`` on the same kernels.
    """

    def apply(self, model_or_variables: _Variables, learning_rate: Any) -> None:
        """Apply the group prox to ``model_or_variables``' kernels (in place)."""
        variables = _prox_variables(model_or_variables, include_bias=False)
        plans = []
        for i, v in enumerate(variables):
            axes = self.axes_for(tuple(v.shape), _name(v, i))
            plans.append((v, axes, self.tau(tuple(v.shape), axes)))
        steps = self._steps(variables, learning_rate)
        if self.strength == 0:
            return  # the prox of a zero penalty is the identity
        if steps is None:
            for v, axes, tau in plans:
                # lr_t * tau in float64, rounded once to the variable's dtype (as torchref does).
                t = _in_dtype(_threshold(learning_rate, tau), tf.as_dtype(v.dtype))
                v.assign(_core.block_soft_threshold(tf.convert_to_tensor(v), t, axes, _OPS))
            return
        zs = [tf.convert_to_tensor(v) for v, _, _ in plans]
        taus, group_axes = [tau for _, _, tau in plans], [a for _, a, _ in plans]
        for (v, _, _), x in zip(
            plans, _core.preconditioned_block_proxes(zs, steps, taus, group_axes, _OPS), strict=True
        ):
            v.assign(x)


class ProximalChain(_core.ProximalChainSpec):
    """The proximal operators in ``operators`` applied in order after each update:
    ``ProximalChain([ProximalL1(l1=a), ProximalGroupLasso(b, axis=1)])`` is the sparse group
    lasso prox (L1 first -- the only order that is the prox of the sum; others are refused).
    Each element may be an operator or its ``{"class_name", "config"}``; ``Trainer(proximal=[...])``
    builds one. Same class in ``torchref``."""

    def __init__(self, operators: Sequence[Any]) -> None:
        super().__init__(operators, PROXIMAL_CLASSES)


PROXIMAL_CLASSES: tuple[type, ...] = (ProximalL1, ProximalGroupLasso, ProximalChain)
# What a trainer's ``proximal=`` holds once resolved.
Proximal = ProximalL1 | ProximalGroupLasso | ProximalChain
