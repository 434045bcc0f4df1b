"""Weight penalties for TensorFlow/Keras: Keras-identical L1, L2, L1L2, Orthogonal, plus PNorm and
GroupLasso (what Keras lacks).

Functional core first (``*_penalty(x, ...)``: pure functions of one tensor, factor applied in the
tensor's dtype exactly), then thin ``keras.regularizers.Regularizer`` subclasses that add config,
serialization and Keras' factor precision.

Factor precision, deliberately: Keras 3 stores every regularizer factor as float32 and casts it to
the weight's dtype, so on float64 weights ``keras.regularizers.L1(0.037)(w)`` is
``float32(0.037) * sum|w|``, ~1e-8 relative away from ``0.037 * sum|w|``. The Keras-named classes
(``L1``, ``L2``, ``L1L2``, ``OrthogonalRegularizer``) reproduce that bit for bit; the functional
core and the torch-style classes (``PNorm``, ``GroupLasso``) use the factor exactly.
``torchref`` mirrors both choices, so the two frameworks agree either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from tfreg._compat import keras, tf
from tfreg_core import registry, specs, validation

ops = keras.ops

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "GroupLasso",
    "OrthogonalRegularizer",
    "PNorm",
    "Regularizer",
    "deserialize",
    "get",
    "group_lasso_penalty",
    "l1_penalty",
    "l2_penalty",
    "orthogonal_penalty",
    "pnorm_penalty",
    "serialize",
]

Regularizer: TypeAlias = keras.regularizers.Regularizer
"""``keras.regularizers.Regularizer``, re-exported: the base class of every regularizer here, so
``isinstance(r, tfreg.Regularizer)`` holds for Keras' own regularizers too."""
_PACKAGE = "tfreg"


def _factor(factor: float, x: tf.Tensor, name: str) -> tf.Tensor:
    # A Python float converted straight to x's dtype: exact in float64, no float32 detour; a
    # factor beyond the dtype's range is refused (it would give a silent inf).
    dtype = tf.as_dtype(x.dtype)
    if dtype.is_floating:
        validation.factor_fits(float(factor), name, float(dtype.max), dtype.name)
    return ops.convert_to_tensor(factor, dtype=x.dtype)


# --- functional core ---------------------------------------------------------------


def l1_penalty(x: Any, l1: float) -> tf.Tensor:
    """``l1 * sum(|x|)``. The gradient at ``x == 0`` is 0 (the subgradient TF and torch pick)."""
    l1 = validation.non_negative_float(l1, "l1")
    x = ops.convert_to_tensor(x)
    return _factor(l1, x, "l1") * ops.sum(ops.absolute(x))


def l2_penalty(x: Any, l2: float) -> tf.Tensor:
    """``l2 * sum(x**2)`` -- no 1/2, as in Keras. Torch coupled ``weight_decay=wd`` is ``wd/2``."""
    l2 = validation.non_negative_float(l2, "l2")
    x = ops.convert_to_tensor(x)
    return _factor(l2, x, "l2") * ops.sum(ops.square(x))


def orthogonal_penalty(x: Any, factor: float, mode: str = "rows") -> tf.Tensor:
    """``factor * mean_{i<j} |<u_i, u_j>|`` over the L2-normalised rows (or columns) ``u`` of ``x``.

    Normalisation is Keras': ``u = x * min(rsqrt(sum x^2), 1/epsilon)``, epsilon = Keras' fuzz
    factor (1e-7). A matrix with a single row (rows mode) has no pairs: the penalty is 0, where
    Keras divides 0 by 0 and returns NaN.
    """
    factor = validation.non_negative_float(factor, "factor")
    x = ops.convert_to_tensor(x)
    validation.rank_two(tuple(x.shape))
    validation.choice(mode, "mode", ("rows", "columns"))
    axis = 1 if mode == "rows" else 0
    units = ops.nn.normalize(x, axis=axis, order=2)
    if mode == "rows":
        product = ops.matmul(units, ops.transpose(units))
        size = x.shape[0]
    else:
        product = ops.matmul(ops.transpose(units), units)
        size = x.shape[1]
    if size < 2:
        return ops.sum(product) * ops.convert_to_tensor(0.0, dtype=x.dtype)
    product_no_diagonal = product * (1.0 - ops.eye(size, dtype=x.dtype))
    num_pairs = size * (size - 1.0) / 2.0
    return (
        _factor(factor, x, "factor") * 0.5 * ops.sum(ops.absolute(product_no_diagonal)) / num_pairs
    )


def _zero_safe_root(total: tf.Tensor, p: float) -> tf.Tensor:
    """``total ** (1/p)`` with gradient 0 (torch's choice) instead of NaN where ``total == 0``."""
    positive = total > 0
    safe = ops.where(positive, total, ops.ones_like(total))
    root = ops.sqrt(safe) if p == 2.0 else ops.power(safe, 1.0 / p)
    return ops.where(positive, root, ops.zeros_like(total))


def _sum_of_powers(x: tf.Tensor, p: float, axis: tuple[int, ...] | None) -> tf.Tensor:
    if p == 2.0:
        return ops.sum(ops.square(x), axis=axis)
    return ops.sum(ops.power(ops.absolute(x), p), axis=axis)


def pnorm_penalty(x: Any, strength: float, p: float = 2.0) -> tf.Tensor:
    """``strength * ||x||_p`` over all entries -- the *non-squared* norm, as ``torch.norm(w, p)``.

    The gradient is 0 at an all-zero tensor (``tf.norm``'s is NaN there) and at zero entries.
    """
    strength = validation.non_negative_float(strength, "strength")
    x = ops.convert_to_tensor(x)
    p = validation.finite_float_at_least(p, "p", 1.0)
    if p == 1.0:
        return _factor(strength, x, "strength") * ops.sum(ops.absolute(x))
    return _factor(strength, x, "strength") * _zero_safe_root(_sum_of_powers(x, p, None), p)


def group_lasso_penalty(x: Any, strength: float, axis: int | Sequence[int]) -> tf.Tensor:
    """``strength * sum_g ||x_g||_2`` where each group ``g`` is one index of the axes *not* in
    ``axis`` and the norm runs over ``axis`` (as ``tf.norm(x, axis=axis)``). Zero-safe gradient."""
    strength = validation.non_negative_float(strength, "strength")
    x = ops.convert_to_tensor(x)
    axes = validation.normalized_axes(validation.axes(axis, "axis"), len(x.shape), "axis")
    group_norms = _zero_safe_root(_sum_of_powers(x, 2.0, axes), 2.0)
    return _factor(strength, x, "strength") * ops.sum(group_norms)


# --- Keras-compatible classes ---------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class L1(specs.L1Spec, Regularizer):
    """L1 penalty: ``loss = l1 * reduce_sum(abs(x))``. Identical to ``keras.regularizers.L1``.

    As in Keras, the factor is stored as float32 (``get_config()`` returns the float32-rounded
    value). PyTorch: ``l1 * w.abs().sum()``; torch has no optimizer option for L1.
    """

    def __call__(self, x: Any) -> tf.Tensor:
        return l1_penalty(x, self.l1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class L2(specs.L2Spec, Regularizer):
    """L2 penalty: ``loss = l2 * reduce_sum(square(x))`` -- no 1/2. Identical to Keras' ``L2``.

    torch's coupled ``SGD/Adam(weight_decay=wd)`` equals ``L2(l2=wd / 2)``: see
    :meth:`from_torch_weight_decay`. The factor is applied through float32 as Keras does (its
    config keeps the value as given, like Keras').
    """

    def __call__(self, x: Any) -> tf.Tensor:
        return l2_penalty(x, self.call_factor)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class L1L2(specs.L1L2Spec, Regularizer):
    """``l1 * reduce_sum(abs(x)) + l2 * reduce_sum(square(x))``; identical to Keras' ``L1L2``.

    Defaults are 0.0 (``L1L2(l2=0.1)`` has no L1 term), as in Keras. Terms whose factor is 0 are
    skipped, so their gradient contributes nothing, not ``0 * sign(x)``.
    """

    def __call__(self, x: Any) -> tf.Tensor:
        x = ops.convert_to_tensor(x)
        regularization = ops.convert_to_tensor(0.0, dtype=x.dtype)
        if self.l1 != 0.0:
            regularization += l1_penalty(x, specs.float32_rounded(self.l1))
        if self.l2 != 0.0:
            regularization += l2_penalty(x, specs.float32_rounded(self.l2))
        return regularization


@keras.saving.register_keras_serializable(package=_PACKAGE)
class OrthogonalRegularizer(specs.OrthogonalSpec, Regularizer):
    """``factor * mean_{i<j} |<u_i, u_j>|`` over L2-normalised rows (``mode="rows"``) or columns.

    Identical to Keras' in float32. Two deliberate differences: float64 weights work (Keras raises
    an InvalidArgumentError because it multiplies its float32 factor into a float64 sum), and a
    single row/column gives 0 (Keras: NaN from 0/0). Layout: on a Dense kernel ``(in, out)``,
    ``mode="rows"`` here is ``mode="columns"`` on the transposed torch ``Linear.weight (out, in)``.
    """

    def __call__(self, inputs: Any) -> tf.Tensor:
        return orthogonal_penalty(inputs, self.factor, self.mode)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PNorm(specs.PNormSpec, Regularizer):
    """``strength * ||x||_p`` (non-squared, all entries), the penalty PyTorch users write as
    ``c * torch.norm(w, p)``. ``PNorm(c, p=2)`` is *not* ``L2``: its gradient is
    ``c * w / ||w||``, not ``2 * l2 * w``.

    Gradient at an all-zero tensor is 0 (``torch.norm``'s choice; ``tf.norm`` gives NaN). The
    strength is applied exactly in the weight's dtype (no float32 rounding). ``p >= 1`` finite.
    """

    def __call__(self, x: Any) -> tf.Tensor:
        return pnorm_penalty(x, self.strength, self.p)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GroupLasso(specs.GroupLassoSpec, Regularizer):
    """Group lasso: ``strength * sum_g ||w_g||_2``; the L2 norm runs over ``axis``, and each index
    of the remaining axes is one group. Drives whole groups to zero together.

    On a Dense kernel ``(in, out)``, ``axis=1`` makes one group per input feature (feature
    selection); on torch's ``Linear.weight (out, in)`` the same groups are ``axis=0``. On a Conv2D
    kernel ``(kh, kw, in, out)``, ``axis=(0, 1, 2)`` makes one group per output filter. No
    ``sqrt(group size)`` weighting is applied. Zero-safe gradient; exact strength (no float32).
    """

    def __call__(self, x: Any) -> tf.Tensor:
        return group_lasso_penalty(x, self.strength, self.axis)


# --- lookup and serialization -----------------------------------------------------------

_CLASSES: dict[str, type[Regularizer]] = {
    cls.__name__: cls for cls in (L1, L2, L1L2, OrthogonalRegularizer, PNorm, GroupLasso)
}
# Keras' own lookup of a *config* (``Dense(kernel_regularizer={"class_name": "p_norm", ...})``)
# finds class names among the global custom objects, so the key is added there. A bare string
# (``kernel_regularizer="p_norm"``) cannot be taught to Keras: its ``regularizers.get`` reads
# strings from its built-in table only, with no public way to extend it -- pass
# ``tfreg.get("p_norm")`` or ``tfreg.PNorm()``. Only keys that build without arguments are added
# ("group_lasso" needs an axis).
keras.saving.get_custom_objects().setdefault("p_norm", PNorm)


def serialize(regularizer: Regularizer) -> dict[str, Any]:
    """Keras' serialized form (``{"module", "class_name", "config", "registered_name"}``)."""
    return keras.saving.serialize_keras_object(regularizer)


def deserialize(
    config: dict[str, Any], custom_objects: dict[str, Any] | None = None
) -> Regularizer:
    """Inverse of :func:`serialize`; plain ``{"class_name": "L1", ...}`` names and the string keys
    of :func:`get` (``"l1l2"``, ``"group_lasso"``, ...) resolve to tfreg's classes. What
    names no regularizer (Keras returns an unknown ``class_name`` as the bare string, e.g.
    ``{"class_name": "system", "module": "os"}``) raises ``InvalidArgumentError``, as
    ``torchref.deserialize`` does."""
    obj = keras.saving.deserialize_keras_object(
        config, module_objects=registry.lookup_table(_CLASSES), custom_objects=custom_objects
    )
    if isinstance(obj, (str, type)) or not callable(obj):
        raise validation.InvalidArgumentError(
            f"Could not interpret regularizer identifier: {config}"
        )
    return obj


def get(identifier: Any) -> Regularizer | None:
    """Keras' ``regularizers.get`` with tfreg's classes: ``None``, a string key ("l1", "L1L2",
    "orthogonal_regularizer", "p_norm", ...), a config dict, a class, or a callable."""
    return registry.resolve(identifier, _CLASSES, deserialize)
