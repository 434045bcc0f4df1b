"""Reference PyTorch implementations of tfreg's penalties: same names, formulas and precision.

Each class is a callable of one tensor with ``get_config()``; the functional core
(``*_penalty``) applies factors exactly in the tensor's dtype. The Keras-named classes round their
factor through float32 exactly as Keras 3 (and therefore ``tfreg``) does, so
``torchref.L1(0.037)`` on float64 equals ``tfreg.L1(0.037)``, not ``0.037 * w.abs().sum()``
(they differ by ~1e-8 relative); use ``l1_penalty(w, 0.037)`` for the exact product.

Relation to torch's optimizers: ``SGD/Adam(weight_decay=wd)`` (coupled) adds ``wd * w`` to the
gradient, which is the gradient of ``L2(wd / 2)``. ``AdamW(weight_decay=wd)`` is decoupled and is
not a penalty. Torch has no built-in L1, orthogonal, p-norm or group penalty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tfreg_core import registry, specs, validation
from torchref._compat import torch

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

# Keras' fuzz factor (keras.config.epsilon()), used by its row/column normalisation.
_KERAS_EPSILON = 1e-7


# --- functional core ---------------------------------------------------------------


def _checked(x: Any, factor: Any, name: str) -> float:
    """Validate a functional penalty's arguments; return the factor as a float."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor. Received: x of type {type(x).__name__}")
    value = validation.non_negative_float(factor, name)
    if x.is_floating_point():
        value = validation.factor_fits(value, name, torch.finfo(x.dtype).max, str(x.dtype))
    return value


def l1_penalty(x: torch.Tensor, l1: float) -> torch.Tensor:
    """``l1 * sum(|x|)``; gradient 0 at ``x == 0``."""
    l1 = _checked(x, l1, "l1")
    return l1 * x.abs().sum()


def l2_penalty(x: torch.Tensor, l2: float) -> torch.Tensor:
    """``l2 * sum(x**2)`` (no 1/2). Its gradient equals coupled ``weight_decay = 2 * l2``."""
    l2 = _checked(x, l2, "l2")
    return l2 * x.square().sum()


def orthogonal_penalty(x: torch.Tensor, factor: float, mode: str = "rows") -> torch.Tensor:
    """Keras' orthogonality penalty: ``factor * mean_{i<j} |<u_i, u_j>|`` over rows (or columns)
    ``u = x * min(rsqrt(sum x^2), 1/1e-7)``. A single row/column gives 0 (no pairs)."""
    factor = _checked(x, factor, "factor")
    validation.rank_two(tuple(x.shape))
    validation.choice(mode, "mode", ("rows", "columns"))
    axis = 1 if mode == "rows" else 0
    square_sum = x.square().sum(dim=axis, keepdim=True)
    # An all-zero row makes rsqrt inf; torch's backward then gives 0 * inf = NaN where TF's
    # RsqrtGrad gives 0. Taking the 1/epsilon branch without rsqrt(0) keeps Keras' value and
    # TF's (zero) gradient.
    positive = square_sum > 0
    inv_norm = torch.where(
        positive,
        torch.clamp(torch.rsqrt(torch.where(positive, square_sum, 1.0)), max=1.0 / _KERAS_EPSILON),
        1.0 / _KERAS_EPSILON,
    )
    units = x * inv_norm
    product = units @ units.T if mode == "rows" else units.T @ units
    size = product.shape[0]
    if size < 2:
        return product.sum() * 0.0
    off_diagonal = product * (1.0 - torch.eye(size, dtype=x.dtype, device=x.device))
    num_pairs = size * (size - 1.0) / 2.0
    return factor * 0.5 * off_diagonal.abs().sum() / num_pairs


def pnorm_penalty(x: torch.Tensor, strength: float, p: float = 2.0) -> torch.Tensor:
    """``strength * torch.linalg.vector_norm(x, p)`` -- non-squared; gradient 0 at zero."""
    strength = _checked(x, strength, "strength")
    p = validation.finite_float_at_least(p, "p", 1.0)
    return strength * torch.linalg.vector_norm(x, ord=p)


def group_lasso_penalty(
    x: torch.Tensor, strength: float, axis: int | Sequence[int]
) -> torch.Tensor:
    """``strength * sum_g ||x_g||_2``; the norm runs over ``axis``, groups are the other indices."""
    strength = _checked(x, strength, "strength")
    axes = validation.normalized_axes(validation.axes(axis, "axis"), x.dim(), "axis")
    return strength * torch.linalg.vector_norm(x, ord=2, dim=axes).sum()


# --- classes -----------------------------------------------------------------------------


class Regularizer:
    """Base class: a penalty is ``regularizer(tensor) -> scalar tensor`` plus ``get_config()``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Regularizer:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class L1(specs.L1Spec, Regularizer):
    """``l1 * sum(|w|)``, factor through float32 as Keras' ``L1`` (config holds the rounded value).

    Plain PyTorch equivalent: ``l1 * w.abs().sum()``; no torch optimizer option does L1.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return l1_penalty(x, self.l1)


class L2(specs.L2Spec, Regularizer):
    """``l2 * sum(w**2)`` (no 1/2), factor through float32 as Keras' ``L2``.

    Same gradient as ``torch.optim.SGD(weight_decay=2 * l2)`` (coupled decay): see
    :meth:`from_torch_weight_decay`. ``AdamW``'s decoupled decay is not a penalty.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return l2_penalty(x, self.call_factor)


class L1L2(specs.L1L2Spec, Regularizer):
    """``l1 * sum(|w|) + l2 * sum(w**2)``; zero factors are skipped, as in Keras.

    Both factors are applied through float32, as Keras' ``L1L2`` does (its config keeps the
    values as given): on float64 weights ``L1L2(l1=0.037)`` is ``float32(0.037) * sum|w|``, ~1e-8
    relative from ``0.037 * w.abs().sum()``. ``l1_penalty``/``l2_penalty`` use factors exactly.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        regularization = torch.zeros((), dtype=x.dtype, device=x.device)
        if self.l1 != 0.0:
            regularization = regularization + l1_penalty(x, specs.float32_rounded(self.l1))
        if self.l2 != 0.0:
            regularization = regularization + l2_penalty(x, specs.float32_rounded(self.l2))
        return regularization


class OrthogonalRegularizer(specs.OrthogonalSpec, Regularizer):
    """Keras' orthogonality penalty on rows (``mode="rows"``) or columns of a 2-D tensor:
    ``factor * mean_{i<j} |<u_i, u_j>|``, where ``u_i = w_i * min(1 / ||w_i||_2, 1e7)`` are the
    L2-normalised rows (or columns), i.e. ``factor * sum_{i != j} |(U U^T)_ij| / (n * (n - 1))``.
    The factor is applied through float32, as in Keras. A single row/column gives 0 (Keras: NaN).

    Layout: a Keras Dense kernel is ``(in, out)`` and ``Linear.weight`` is ``(out, in)``, so Keras
    ``mode="rows"`` on the kernel corresponds to ``mode="columns"`` here on ``Linear.weight``.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return orthogonal_penalty(x, self.factor, self.mode)


class PNorm(specs.PNormSpec, Regularizer):
    """``strength * torch.linalg.vector_norm(w, p)`` -- what ``c * torch.norm(w, p)`` computes.

    Non-squared: ``PNorm(c, p=2)`` has gradient ``c * w / ||w||``, unlike ``weight_decay``.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return pnorm_penalty(x, self.strength, self.p)


class GroupLasso(specs.GroupLassoSpec, Regularizer):
    """``strength * sum_g ||w_g||_2`` with the norm over ``axis``. For ``Linear.weight (out, in)``,
    ``axis=0`` gives one group per input feature (Keras Dense kernel ``(in, out)``: ``axis=1``)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return group_lasso_penalty(x, self.strength, self.axis)


_CLASSES: dict[str, type[Regularizer]] = {
    cls.__name__: cls for cls in (L1, L2, L1L2, OrthogonalRegularizer, PNorm, GroupLasso)
}


def serialize(regularizer: Regularizer) -> dict[str, Any]:
    """``{"class_name": ..., "config": {...}}`` -- JSON-friendly, and what ``tfreg.deserialize``
    reads (``tfreg.serialize`` writes the same two keys plus Keras' ``module`` and
    ``registered_name``, which mean nothing without Keras)."""
    return registry.to_dict(regularizer, _CLASSES)


def deserialize(config: dict[str, Any]) -> Regularizer:
    """Inverse of :func:`serialize`; also loads what ``tfreg.serialize`` (or Keras, for the
    Keras-named classes) writes. ``class_name`` may be a string key of :func:`get`."""
    return registry.from_dict(config, _CLASSES)


def get(identifier: Any) -> Regularizer | None:
    """``None``, a string key (same keys as ``tfreg.get``), ``{"class_name", "config"}``, a class
    or any callable of one tensor."""
    return registry.resolve(identifier, _CLASSES, deserialize)
