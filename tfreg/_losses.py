"""One micro-batch's loss and gradient, shared by ``Trainer`` and ``AccumulatingModel``.

A compiled loss is a tuple of :class:`LossTerm` s, one per model output that has a loss (Keras'
``compile(loss=..., loss_weights=...)`` rules: one loss is applied to every output; a list goes by
position, a dict by output name). For one micro-batch :func:`micro_batch_gradients` returns, per
term ``o``::

    S_o = sum over loss elements e of  w_e * m_e * l_o(e)      (the weighted loss *sum*)
    N_o = sum_e m_e                                           (the elements that count)
    grad(lambda_o * S_o)

where ``l_o(e)`` are the loss's per-element values (Keras' ``Loss.call``), ``m_e`` the Keras mask
-- the output's ``_keras_mask`` (``compute_mask``: ``Embedding(mask_zero=True)``, ``Masking``...)
combined with the mask the loss sets on its values (``ignore_class``) exactly as
``keras.losses.Loss.__call__`` combines them -- and ``w_e`` the sample weight broadcast over the
element's leading axes. Without a mask ``N_o`` is the number of loss values. Accumulated over a
window ``W`` the update's data gradient is ``sum_o grad(lambda_o * S_o,W) / N_o,W``: Keras'
``"sum_over_batch_size"`` on the concatenated window, each output with its own count.

Denominator: Keras 3.15 weights a masked loss by ``divide_no_nan(total, valid)``, i.e. it divides
by the exact number of valid elements (older Keras 3 releases divided by ``valid + 1e-7``); the
count here is exact too, and a window in which no element counts contributes a zero gradient,
as ``divide_no_nan`` does. ``tests/test_training_losses.py`` pins both.

Per-example sample weights (shape ``(N,)``) on a per-timestep loss ``(N, T)`` weight each
example's elements; Keras itself raises there (``Incompatible shapes``) or, when ``N == T``,
broadcasts the weights along the time axis. Per-timestep weights ``(N, T)`` act per element.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tfreg._compat import keras, tf
from tfreg_core.validation import InvalidArgumentError

__all__ = [
    "LossTerm",
    "MicroBatch",
    "element_weights",
    "loss_sums",
    "loss_terms",
    "micro_batch_gradients",
    "output_names",
    "per_example_loss",
]

_ALLOWED_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "none", None)
# Reductions under which Keras fit trains the batch's weighted *sum*: "sum" reduces to it, and
# "none"/None hand compile a tensor of weighted values, whose gradient is that of their sum.
_SUM_REDUCTIONS = ("sum", "none", None)
# Keras loss functions whose targets are class indices (one fewer dimension than the output),
# and those whose targets legitimately have another shape (label sequences, labels for
# embeddings): no target-shape check for the latter.
_CLASS_INDEX_FNS = (
    keras.losses.sparse_categorical_crossentropy,
    keras.losses.categorical_generalized_cross_entropy,
)
_FREE_SHAPE_FNS = (keras.losses.ctc, keras.losses.circle)


def _rank_fix(shape1: tf.TensorShape, shape2: tf.TensorShape) -> tuple[int, str] | None:
    """Keras' ``squeeze_or_expand_to_same_rank`` (what ``compile`` applies before a loss
    function) as a decision: ranks differing by one with a trailing 1 are reconciled by
    expanding a rank-1 partner or squeezing the trailing 1. ``(which, "expand"|"squeeze")``."""
    r1, r2 = shape1.rank, shape2.rank
    for first, (big, rb, rs) in enumerate(((shape1, r1, r2), (shape2, r2, r1))):
        if rb == rs + 1 and big[-1] == 1:
            return (1 - first, "expand") if rs == 1 else (first, "squeeze")
    return None


def _same_rank(x1: tf.Tensor, x2: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    fix = _rank_fix(x1.shape, x2.shape)
    pair = [x1, x2]
    if fix is not None:
        i, op = fix
        pair[i] = tf.expand_dims(pair[i], -1) if op == "expand" else tf.squeeze(pair[i], -1)
    return pair[0], pair[1]


def _same_rank_shapes(s1: tf.TensorShape, s2: tf.TensorShape) -> tuple[list[Any], list[Any]]:
    fix = _rank_fix(s1, s2)
    pair = [s1.as_list(), s2.as_list()]
    if fix is not None:
        i, op = fix
        pair[i] = [*pair[i], 1] if op == "expand" else pair[i][:-1]
    return pair[0], pair[1]


def _resolve(loss: Any) -> tuple[Callable[[Any, Any], Any], Any]:
    """``(values(y_true, y_pred), the underlying loss function or object)``."""
    if isinstance(loss, keras.losses.Loss):
        if loss.reduction not in _ALLOWED_REDUCTIONS:
            raise InvalidArgumentError(
                "The loss's reduction must be 'sum_over_batch_size' (or 'mean'), 'sum' or "
                "'none'/None (trained as Keras fit trains them on the concatenated window). "
                f"Received: loss.reduction={loss.reduction!r}"
            )
        return loss.call, getattr(loss, "fn", loss)
    resolved = keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(resolved, keras.losses.Loss):
        return _resolve(resolved)
    if not callable(resolved):
        raise InvalidArgumentError(
            f"loss must be a Keras loss, a loss name or a callable. Received: loss={loss!r}"
        )
    return (lambda y_true, y_pred: resolved(*_same_rank(y_true, y_pred))), resolved


def per_example_loss(loss: Any, dtype: Any = None) -> Callable[[Any, Any], tf.Tensor]:
    """A function ``(y_true, y_pred) -> per-element losses`` computed in ``dtype``.

    ``loss`` is a Keras loss object, a name ``keras.losses.get`` knows, or a function of
    ``(y_true, y_pred)`` returning per-example values (given targets of the predictions' rank,
    as ``compile`` gives them). Keras losses compute in floatx (float32) unless built with
    ``dtype=``; here both inputs are cast to ``dtype`` first, as a Keras loss built with
    ``dtype=dtype`` does. ``dtype=None`` takes the predictions' dtype, promoted to at least
    float32 (mixed precision): a float64 model gets a float64 loss. A loss object whose
    reduction is ``"sum"`` or ``"mean_with_sample_weight"`` is rejected: the window contract is
    ``"sum_over_batch_size"``. The values keep the mask the loss sets on them
    (``ignore_class``) as ``_keras_mask``.
    """
    call, _ = _resolve(loss)

    def values(y_true: Any, y_pred: Any) -> tf.Tensor:
        y_pred = tf.convert_to_tensor(y_pred)
        target = dtype or (y_pred.dtype if y_pred.dtype == tf.float64 else tf.float32)
        return call(tf.cast(y_true, target), tf.cast(y_pred, target))

    return values


@dataclass(frozen=True)
class LossTerm:
    """One output's loss: ``name`` (the output's), ``index`` into the flat outputs, the
    per-element ``values`` function, its ``weight`` (``loss_weights``), what the target
    check needs: ``class_index`` (targets are class indices) and ``builtin`` (a Keras loss whose
    targets must match the output's shape), and ``reduction``: ``"mean"`` (Keras'
    ``"sum_over_batch_size"``), or ``"sum"`` / ``"none"`` (``None`` too), for which Keras fit
    trains the batch's weighted *sum* ``S_o`` (``"none"`` hands ``compile`` the weighted values
    and the gradient of a tensor is that of its sum), so the window trains ``S_o,W`` itself --
    no division by ``N_o,W`` (``summed``). Keras logs ``S_o`` for ``"sum"`` and the mean of the
    values for ``"none"``; the reports follow (``S_o / N_o``: with a mask, Keras' log averages
    the masked zeros too)."""

    name: str
    index: int
    values: Callable[[Any, Any], tf.Tensor]
    weight: float
    class_index: bool
    builtin: bool
    reduction: str = "mean"

    @property
    def summed(self) -> bool:
        """Keras fit trains this term's weighted sum (reduction "sum" or "none")."""
        return self.reduction != "mean"


def output_names(model: keras.layers.Layer) -> list[str]:
    """The model's output names (Functional models), else one output named ``"output"``."""
    names = getattr(model, "output_names", None)
    return list(names) if names else ["output"]


def _term(loss: Any, name: str, index: int, weight: Any) -> LossTerm:
    _, fn = _resolve(loss)
    builtin = fn not in _FREE_SHAPE_FNS and (
        getattr(fn, "__module__", type(fn).__module__).startswith("keras.")
    )
    try:
        weight = 1.0 if weight is None else float(weight)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"loss_weights must be numbers. Received: loss_weights[{name!r}]={weight!r}"
        ) from None
    return LossTerm(
        name=name,
        index=index,
        values=per_example_loss(loss),
        weight=weight,
        class_index=fn in _CLASS_INDEX_FNS,
        builtin=builtin,
        reduction=_reduction(loss),
    )


def _reduction(loss: Any) -> str:
    """``"sum"`` / ``"none"`` (Keras fit trains the weighted sum) or ``"mean"``."""
    resolved = keras.losses.get(loss) if isinstance(loss, str) else loss
    if not isinstance(resolved, keras.losses.Loss) or resolved.reduction not in _SUM_REDUCTIONS:
        return "mean"
    return resolved.reduction or "none"


def _by_output(value: Any, names: Sequence[str], argument: str) -> list[Any]:
    """``value`` (a dict by output name or a list in output order) as one entry per output."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise InvalidArgumentError(
                f"{argument} has keys that are not output names {list(names)}. "
                f"Received: {argument} keys {sorted(value)}"
            )
        return [value.get(name) for name in names]
    if len(value) != len(names):
        raise InvalidArgumentError(
            f"{argument} needs one entry per output ({len(names)}: {list(names)}). "
            f"Received: {len(value)} entries"
        )
    return list(value)


def loss_terms(loss: Any, loss_weights: Any, names: Sequence[str]) -> tuple[LossTerm, ...]:
    """Keras' ``compile`` rules: one loss -> every output (``loss_weights`` a number); a
    list/dict -> per output (``loss_weights`` the same structure; ``None`` entries have no
    loss)."""
    if loss is None:
        raise InvalidArgumentError("A loss is required. Received: loss=None")
    if isinstance(loss, (list, tuple, Mapping)):
        losses = _by_output(loss, names, "loss")
        if loss_weights is None:
            weights = [None] * len(names)
        elif isinstance(loss_weights, (list, tuple, Mapping)):
            weights = _by_output(loss_weights, names, "loss_weights")
        else:
            raise InvalidArgumentError(
                "With one loss per output, loss_weights must be a list or dict like loss. "
                f"Received: loss_weights={loss_weights!r}"
            )
    else:
        if isinstance(loss_weights, (list, tuple, Mapping)):
            # Keras raises here too ("loss_weights must match the number of losses").
            raise InvalidArgumentError(
                "One loss applies to every output with the same weight: pass loss as a "
                f"list/dict to weight outputs. Received: loss_weights={loss_weights!r}"
            )
        losses, weights = [loss] * len(names), [loss_weights] * len(names)
    terms = tuple(
        _term(item, name, i, weight)
        for i, (name, item, weight) in enumerate(zip(names, losses, weights, strict=True))
        if item is not None
    )
    if not terms:
        raise InvalidArgumentError(f"Every output's loss is None. Received: loss={loss!r}")
    return terms


class MicroBatch(NamedTuple):
    """Per term: ``grads`` (of ``weight * S``, one list per term), ``sums`` (``S``, unweighted
    by ``loss_weights``, float64) and ``counts`` (``N``, float64); ``y_pred`` for metrics."""

    grads: list[list[Any]]
    sums: list[tf.Tensor]
    counts: list[tf.Tensor]
    y_pred: Any


def _flat(structure: Any, names: Sequence[str], argument: str) -> list[Any]:
    """Outputs, targets or per-output weights as one entry per output name."""
    if isinstance(structure, Mapping):
        missing = [n for n in names if n not in structure]
        if missing:
            raise InvalidArgumentError(
                f"{argument} is a dict without the outputs {missing}. "
                f"Received: {argument} keys {sorted(structure)}"
            )
        return [structure[n] for n in names]
    if isinstance(structure, (list, tuple)):
        if len(structure) != len(names):
            raise InvalidArgumentError(
                f"{argument} needs one entry per output ({len(names)}: {list(names)}). "
                f"Received: {len(structure)} entries"
            )
        return list(structure)
    if len(names) != 1:
        raise InvalidArgumentError(
            f"The model has {len(names)} outputs {list(names)}; {argument} must be a list or "
            f"dict with one entry per output (one array would be broadcast against every "
            f"output). Received: {argument} of shape {tuple(structure.shape)}"
        )
    return [structure]


def _check_target(term: LossTerm, y_true: tf.Tensor, y_pred: tf.Tensor) -> None:
    """Refuse targets a built-in loss would broadcast against the output (or, for a class-index
    loss, float labels it would truncate). Static shapes: checked while tracing, before any
    update."""
    if term.class_index:
        if y_true.dtype.is_floating:
            raise InvalidArgumentError(
                f"Output {term.name!r} has a class-index loss (its targets are class "
                "indices), which would truncate float labels to integers; pass integer "
                f"labels (e.g. y.astype('int64')). Received: y dtype {y_true.dtype.name}"
            )
        t = y_true.shape.as_list()
        if len(t) == y_pred.shape.rank and t and t[-1] == 1:
            t = t[:-1]
        expected = y_pred.shape[:-1].as_list()
    else:
        if not term.builtin:
            return
        t, expected = _same_rank_shapes(y_true.shape, y_pred.shape)
    same = len(t) == len(expected) and all(
        a is None or b is None or a == b for a, b in zip(t, expected, strict=True)
    )
    if not same:
        raise InvalidArgumentError(
            f"The target for output {term.name!r} has shape {tuple(y_true.shape)}, which the "
            f"loss would broadcast against the output's shape {tuple(y_pred.shape)}. "
            f"Received: y[{term.name!r}].shape={tuple(y_true.shape)}"
        )


def element_weights(sample_weight: Any, values: tf.Tensor) -> tf.Tensor | None:
    """Per-example (N,) weights spread over each example's elements; (N, T...) weights, or
    (N, T, 1) ones, per element. Any other shape is refused rather than broadcast."""
    if sample_weight is None:
        return None
    w = tf.cast(sample_weight, values.dtype)
    rank, vrank = w.shape.rank, values.shape.rank
    if rank == vrank + 1 and w.shape[-1] == 1:
        w = tf.squeeze(w, -1)
        rank -= 1
    if rank is None or rank > vrank or not values.shape[:rank].is_compatible_with(w.shape):
        raise InvalidArgumentError(
            f"sample_weight of shape {tuple(sample_weight.shape)} does not match the loss "
            f"values' shape {tuple(values.shape)} (per example or per element). "
            f"Received: sample_weight.shape={tuple(sample_weight.shape)}"
        )
    return tf.reshape(w, tf.concat([tf.shape(w), tf.ones([vrank - rank], tf.int32)], 0))


def _mask(y_pred: tf.Tensor, values: tf.Tensor) -> tf.Tensor | None:
    # As keras.losses.Loss.__call__: the output's mask and the values' own mask, and-ed.
    masks: list[Any] = [getattr(t, "_keras_mask", None) for t in (y_pred, values)]
    masks = [tf.cast(m, tf.bool) for m in masks if m is not None]
    if not masks:
        return None
    mask = masks[0] if len(masks) == 1 else tf.logical_and(*masks)
    if mask.shape.rank == values.shape.rank + 1 and mask.shape[-1] == 1:
        mask = tf.squeeze(mask, -1)
    return mask


def loss_sums(
    terms: Sequence[LossTerm], names: Sequence[str], y: Any, y_pred: Any, sample_weight: Any
) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """Per term the weighted loss sum over the elements that count, and their count (float64):
    what one micro-batch adds to a window, and what validation sums over its data."""
    y_true = _flat(y, names, "y")
    weights = (
        _flat(sample_weight, names, "sample_weight")
        if isinstance(sample_weight, (Mapping, list, tuple))
        else [sample_weight] * len(names)
    )
    outputs = _flat(y_pred, names, "the model's outputs")
    sums, counts = [], []
    for term in terms:
        target, output = y_true[term.index], outputs[term.index]
        _check_target(term, tf.convert_to_tensor(target), output)
        values = term.values(target, output)
        mask = _mask(output, values)
        weighted = values
        w = element_weights(weights[term.index], values)
        if w is not None:
            weighted = weighted * w
        if mask is None:
            count = tf.cast(tf.size(values), tf.float64)
        else:
            weighted = tf.where(mask, weighted, tf.zeros_like(weighted))
            count = tf.reduce_sum(tf.cast(mask, tf.float64))
        sums.append(tf.reduce_sum(weighted))
        counts.append(count)
    return sums, counts


def micro_batch_gradients(
    model: Callable[..., Any],
    terms: Sequence[LossTerm],
    names: Sequence[str],
    variables: Sequence[Any],
    x: Any,
    y: Any,
    sample_weight: Any,
    *,
    loss_scale: tf.Tensor | None = None,
    check_forward: Callable[[], None] | None = None,
) -> MicroBatch:
    """Forward ``x`` (training mode), then per term the weighted loss sum, its element count and
    the gradient of ``weight * sum`` (see the module docstring). ``y`` and ``sample_weight`` are a
    tensor, or a list/dict with one entry per output; ``sample_weight`` may be ``None``, per
    example or per element. ``loss_scale`` (float16 loss scaling): the gradient is taken of
    ``scale * S / max(N, 1)`` (the range of Keras' scaled batch mean) and multiplied back by
    ``max(N, 1) / scale``, so the returned gradients are unscaled gradients of ``S`` (float32).
    ``check_forward`` runs right after the forward pass (the add_loss refusal)."""
    with tf.GradientTape(persistent=len(terms) > 1) as tape:
        y_pred = model(x, training=True)
        if check_forward is not None:
            check_forward()
        sums, counts = loss_sums(terms, names, y, y_pred, sample_weight)
        # Inside the tape: the weighting (and loss scaling) must be recorded. Scaled, the
        # micro-batch *mean* is differentiated (the float16 range Keras' scaled batch loss
        # uses), and the gradient brought back to the sum's: * max(N, 1) / scale.
        targets, unscale = [], []
        for term, total, count in zip(terms, sums, counts, strict=True):
            target = total * tf.cast(term.weight, total.dtype)
            if loss_scale is not None:
                factor = tf.cast(loss_scale, total.dtype) / tf.cast(
                    tf.maximum(count, 1.0), total.dtype
                )
                target = target * factor
                unscale.append(factor)
            targets.append(target)
    grads = []
    for i, target in enumerate(targets):
        g = tape.gradient(target, list(variables))
        if loss_scale is not None:
            g = [None if gi is None else _unscale(gi, unscale[i]) for gi in g]
        grads.append(g)
    del tape
    return MicroBatch(grads, [tf.cast(s, tf.float64) for s in sums], counts, y_pred)


def _unscale(grad: Any, scale: tf.Tensor) -> Any:
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values / tf.cast(scale, grad.dtype), grad.indices)
    return grad / tf.cast(scale, grad.dtype)
