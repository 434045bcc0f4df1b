"""Closing a window into one update, framework-free: the arithmetic both trainers run.

A window holds, per loss term ``o`` (one per output with a loss; ``torchref`` has one), the summed
gradient ``G_o = sum_W grad(w_i * l_o,i)`` and the loss-element count ``N_o`` (sum of weights for
weighted class indices), plus the number of micro-batches it took. Closing it gives the gradient
of one step on the concatenated window::

    g = sum_o G_o / N_o                  (G_o itself for a "summed" term: Keras reduction
                                          "sum"/"none", whose fit trains the big batch's sum)
      + grad(penalty)                    (once per update, never per micro-batch)
    g = clip(g)                          (Keras' clipnorm / global_clipnorm formulas)
    finite = all(isfinite(g)) and the window took a micro-batch

The rules at the edges, written once here:

- **A term none of whose elements counted** (every timestep masked, ``N_o = 0``): its ``G_o`` is a
  sum of nothing, zero, and the term contributes ``G_o / 1`` = 0 -- what Keras' ``divide_no_nan``
  gives on such a batch. A non-finite ``G_o`` stays non-finite (Keras' gradient through
  ``divide_no_nan`` is ``0 * NaN`` = NaN), so the window is skipped rather than silently zeroed.
- **A window without any micro-batch** is not a gradient: ``finite`` is false and nothing is
  applied (the trainers never close one; :func:`tfreg.accumulation.result` returns NaN for it).
- **A parameter the window never reached** (``None`` in the gradients: a frozen or unused torch
  parameter) stays ``None``: it takes no part in the clip norm or the finiteness check, and the
  optimizer skips it, as in a plain torch loop. A zero gradient would not be the same: momentum
  and decoupled weight decay would still move it.
- **Clipping** follows Keras' TensorFlow optimizer op for op: per tensor ``g * c / max(||g||, c)``
  (``tf.clip_by_norm``); globally ``g * (c * min(1/||G||, 1/c) + (||G|| - ||G||))`` (Keras'
  ``clip_by_global_norm``: the last term makes the scale NaN for a non-finite norm, so a window
  whose norm overflows is skipped). ``torch.nn.utils.clip_grad_norm_`` divides by
  ``||G|| + 1e-6`` instead: up to 1e-6 relative off Keras near the threshold.
- The finiteness check runs on the clipped (and, under float16 loss scaling, rescaled) gradient:
  what the optimizer would receive.

The logged record (:func:`window_record`) is built from the same counts: per term
``S_o / N_o`` (0 for ``N_o = 0``; ``S_o`` for a ``"sum"`` reduction, as Keras logs it),
``data_loss = sum_o weight_o * that``, ``loss = data_loss + penalty``, ``elements = sum_o N_o``,
and per metric ``metric_sum / weight_sum``. Validation uses the same record over the whole
validation data.

Each framework passes an :class:`UpdateOps` for its arrays (``tfreg`` graph-safe TensorFlow ops,
``torchref`` torch ops that may work in place on the window's own sums, which closing consumes:
the pattern of ``torch.optim``'s functional kernels). Operators ``+ - * /`` come from the arrays
themselves. :data:`FLOAT_OPS` runs the same rules on Python floats (host-side logs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "FLOAT_OPS",
    "Term",
    "UpdateOps",
    "clip",
    "close_window",
    "data_gradient",
    "per_term_loss",
    "window_record",
]


class UpdateOps(Protocol):
    """The array functions closing a window needs; each framework supplies its own."""

    def where(self, condition: Any, x: Any, y: Any) -> Any:
        """Elementwise choice; ``x`` or ``y`` may be a Python number (converted to the other's
        dtype)."""
        ...

    def cast_like(self, x: Any, like: Any) -> Any:
        """``x`` (an array or a Python number) in ``like``'s dtype: a no-op when they agree; a
        Python float is converted straight, never rounded through float32 first."""
        ...

    def cast(self, x: Any, dtype: Any) -> Any: ...

    def sum_squares(self, x: Any) -> Any:
        """``sum(x * x)`` over every element, a scalar of ``x``'s dtype."""
        ...

    def total(self, xs: Sequence[Any]) -> Any:
        """The sum of scalars of one dtype, as Keras' ``ops.sum(ops.stack(xs))``."""
        ...

    def sqrt(self, x: Any) -> Any: ...

    def minimum(self, x: Any, y: Any) -> Any: ...

    def maximum(self, x: Any, y: Any) -> Any: ...

    def all_finite(self, xs: Sequence[Any]) -> Any:
        """Whether every element of every array is finite (a boolean scalar)."""
        ...

    def logical_and(self, x: Any, y: Any) -> Any: ...


@dataclass(frozen=True)
class Term:
    """What the record needs of one loss term: its log ``name``, ``weight`` (``loss_weights``)
    and whether it is ``summed`` (Keras reduction ``"sum"``/``"none"``, trained as a sum)."""

    name: str = "loss"
    weight: float = 1.0
    summed: bool = False


def _divisor(count: Any, ops: UpdateOps) -> Any:
    # N where N > 0, else 1 (see the module docstring: an all-masked term contributes its zero
    # sum, a non-finite one stays non-finite). In the count's dtype (float64 in tfreg).
    return ops.where(count > 0, count, 1.0)


def data_gradient(
    sums: Sequence[Sequence[Any]],
    counts: Sequence[Any],
    summed: Sequence[bool],
    ops: UpdateOps,
    *,
    unscale: Any = None,
) -> list[Any]:
    """``sum_o G_o / N_o`` (``G_o`` for a summed term) from each term's gradient ``sums`` and
    ``counts``; a ``None`` sum (a parameter the window did not reach) contributes nothing, and
    a parameter no term reached stays ``None``. ``unscale`` (optional, a scalar): the sums hold
    ``unscale`` times the gradient (torchref's loss scaling); it multiplies the divisor in the
    count's dtype, and the product is cast to each sum's dtype once."""
    total: list[Any] | None = None
    for term_sums, count, is_sum in zip(sums, counts, summed, strict=True):
        divisor = None if is_sum else _divisor(count, ops)
        if unscale is not None:
            divisor = unscale if divisor is None else divisor * unscale
        part = [
            s if s is None or divisor is None else s / ops.cast_like(divisor, s) for s in term_sums
        ]
        total = part if total is None else [_add(a, b) for a, b in zip(total, part, strict=True)]
    if total is None:
        raise ValueError("a window has at least one loss term. Received: sums=[]")
    return total


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    return a if b is None else a + b


def clip(
    grads: Sequence[Any],
    ops: UpdateOps,
    *,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
) -> list[Any]:
    """Keras' ``clipnorm`` (per tensor) or ``global_clipnorm`` (over all tensors), formulas in
    the module docstring; ``None`` entries are left out and stay ``None``."""
    present = [g for g in grads if g is not None]
    if clipnorm is not None:
        clipped = iter([_clip_by_norm(g, clipnorm, ops) for g in present])
    elif global_clipnorm is not None and present:
        first = present[0]
        norm = ops.sqrt(ops.total([ops.sum_squares(g) for g in present]))
        inverse = ops.cast_like(1.0 / global_clipnorm, first)
        scale = ops.cast_like(global_clipnorm, first) * ops.minimum(1.0 / norm, inverse)
        scale = scale + (norm - norm)
        clipped = iter([g * ops.cast_like(scale, g) for g in present])
    else:
        return list(grads)
    return [None if g is None else next(clipped) for g in grads]


def _clip_by_norm(g: Any, clipnorm: float, ops: UpdateOps) -> Any:
    c = ops.cast_like(clipnorm, g)
    return g * c / ops.maximum(ops.sqrt(ops.sum_squares(g)), c)


def _sum(values: Sequence[Any]) -> Any:
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def close_window(
    sums: Sequence[Sequence[Any]],
    counts: Sequence[Any],
    ops: UpdateOps,
    *,
    summed: Sequence[bool],
    micro_batches: Any,
    penalty_grads: Sequence[Any] | None = None,
    dtypes: Sequence[Any] | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    unscale: Any = None,
    rescale: Any = None,
) -> tuple[list[Any], Any]:
    """The update's gradients and whether to apply them (module docstring), in order: the data
    gradient (:func:`data_gradient`), cast to the variables' ``dtypes``, plus the penalty's
    gradients (``None`` where the penalty does not reach a variable; a variable the data did not
    reach but the penalty does takes part with the penalty gradient alone), clipped, times
    ``rescale`` (float16 loss scaling: Keras' ``LossScaleOptimizer`` takes scaled gradients),
    and the finiteness of the result -- false too when ``micro_batches`` is 0."""
    grads = data_gradient(sums, counts, summed, ops, unscale=unscale)
    if dtypes is not None:
        grads = [None if g is None else ops.cast(g, d) for g, d in zip(grads, dtypes, strict=True)]
    if penalty_grads is not None:
        grads = [_add(g, p) for g, p in zip(grads, penalty_grads, strict=True)]
    grads = clip(grads, ops, clipnorm=clipnorm, global_clipnorm=global_clipnorm)
    if rescale is not None:
        grads = [None if g is None else g * ops.cast_like(rescale, g) for g in grads]
    present = [g for g in grads if g is not None]
    finite = ops.all_finite(present) if present else True
    return grads, ops.logical_and(finite, micro_batches > 0)


def per_term_loss(loss_sum: Any, count: Any, term: Term, ops: UpdateOps) -> Any:
    """The logged loss of one term: ``S_o / N_o`` (``S_o``, zero, for ``N_o = 0``), ``S_o``
    when summed."""
    if term.summed:
        return loss_sum
    return loss_sum / ops.cast_like(_divisor(count, ops), loss_sum)


def window_record(
    terms: Sequence[Term],
    loss_sums: Sequence[Any],
    counts: Sequence[Any],
    penalty: Any,
    ops: UpdateOps,
    *,
    metrics: Mapping[str, Any] | None = None,
    weight_sum: Any = None,
) -> dict[str, Any]:
    """``loss``, ``data_loss``, ``penalty``, ``elements`` and, with several terms,
    ``<name>_loss``; per metric name in ``metrics`` (its weighted sum) ``sum / weight_sum``."""
    per_term = [
        per_term_loss(s, n, t, ops) for t, s, n in zip(terms, loss_sums, counts, strict=True)
    ]
    data_loss = _sum([t.weight * v for t, v in zip(terms, per_term, strict=True)])
    values = {
        "loss": data_loss + penalty,
        "data_loss": data_loss,
        "penalty": penalty,
        "elements": _sum(list(counts)),
    }
    if len(terms) > 1:
        values.update({f"{t.name}_loss": v for t, v in zip(terms, per_term, strict=True)})
    for name, total in (metrics or {}).items():
        values[name] = total / weight_sum
    return values


class _FloatOps:
    """:class:`UpdateOps` on Python floats and NumPy arrays (host-side logs, tests)."""

    @staticmethod
    def where(condition: Any, x: Any, y: Any) -> Any:
        return np.where(condition, x, y) if np.ndim(condition) else (x if condition else y)

    @staticmethod
    def cast_like(x: Any, like: Any) -> Any:
        return x

    @staticmethod
    def cast(x: Any, dtype: Any) -> Any:
        return np.asarray(x, dtype=dtype)

    @staticmethod
    def sum_squares(x: Any) -> Any:
        return np.sum(np.square(x))

    @staticmethod
    def total(xs: Sequence[Any]) -> Any:
        return np.sum(np.stack(xs))

    @staticmethod
    def sqrt(x: Any) -> Any:
        return np.sqrt(x)

    @staticmethod
    def minimum(x: Any, y: Any) -> Any:
        return np.minimum(x, y)

    @staticmethod
    def maximum(x: Any, y: Any) -> Any:
        return np.maximum(x, y)

    @staticmethod
    def all_finite(xs: Sequence[Any]) -> bool:
        return all(bool(np.all(np.isfinite(x))) for x in xs)

    @staticmethod
    def logical_and(x: Any, y: Any) -> bool:
        return bool(x) and bool(y)


FLOAT_OPS: UpdateOps = _FloatOps()
