"""Proximal operators, framework-free: the arithmetic ``tfreg.proximal`` and ``torchref.proximal``
run on their own tensors, plus the validated hyperparameters of their classes.

**Proximal gradient.** A training step on the smooth loss ``f`` followed by the proximal operator
of the non-smooth penalty ``h`` minimises ``f + h`` with exact zeros (ISTA). One update with
per-coordinate step ``s`` (a scalar ``lr`` for SGD) moves ``w`` to ``z = w - s * g`` and then to

    prox(z) = argmin_x  sum_i (x_i - z_i)^2 / (2 s_i)  +  h(x).

- L1, ``h = l1 * ||x||_1``:  ``x_i = sign(z_i) * max(|z_i| - s_i * l1, 0)`` (soft-threshold).
- Group lasso, ``h = lambda * sum_g c_g * ||x_g||_2``, scalar step ``t``: the block soft-threshold

      x_g = z_g * max(0, 1 - t * lambda * c_g / ||z_g||)

  (exact zero groups). ``c_g`` is 1, or ``sqrt(|g|)`` with ``group_weights="sqrt_size"`` (as skglm
  and group-lasso offer); all groups of one tensor have the same size, so ``c_g`` is one number
  per tensor.
- Group lasso, per-coordinate step ``s`` (the diagonal-preconditioned block prox): with
  ``tau = lambda * c_g``, the group is zero iff ``||z_g / s_g||_2 <= tau``; otherwise

      x_i = z_i * nu / (s_i + nu),   nu = ||x_g|| / tau  the root of  Q(nu) = tau,
      Q(nu) = || z_g / (s_g + nu) ||_2

  (stationarity ``(x_i - z_i) / s_i + tau * x_i / ||x_g|| = 0``). ``1 / Q`` is concave and
  increasing in ``nu`` (a power mean of order -2 of functions linear in ``nu``), so Newton's
  method on ``1/Q(nu) = 1/tau``,

      nu <- nu + (Q / tau - 1) * Q^2 / S,     S = sum_i z_i^2 / (s_i + nu)^3,

  started at the lower bound ``nu_0 = max(0, ||z_g|| / tau - max_i s_i)`` climbs monotonically to
  the root and converges quadratically; with equal steps it is exact after one iteration and
  gives the block soft-threshold above. :data:`NEWTON_ITERATIONS` fixed iterations (no host
  sync, no data-dependent loop: identical in both frameworks). ``benchmarks/
  prox_newton_certificate.py`` checks them on 1200 random groups (sizes 1..3000, step spreads
  up to 1e8, ``tau`` from 1e-12 to 1 - 1e-3 of the zero threshold) against an independent root
  (Brent): in float64 within 8 round-off allowances ``eps * max|x| / gap`` (``gap`` the relative
  distance to the zero threshold: near it ``x`` is as ill-conditioned as the problem); 5
  iterations miss by up to ~1e3 allowances, and the tighter ``max(Jensen, per-coordinate)``
  lower bound as a start does not save one. On 2 of the seeds 0..10 one group in 1200 needs a
  7th iteration (after 6: 5e-11..1e-9 of max|x| off; a coordinate with a tiny share of ``z`` but a
  tiny step, whose line dominates ``1/Q`` below the root). float32 converges in 4..6; with
  ``tau`` below ~1e-11 of the threshold (``nu`` > ~1e12, a strength below ~1e-13 of the
  weights' norm) ``(s + nu)^3`` overflows float32 and the result is NaN (a known limit).
- Sparse group lasso, ``h = l1 * ||x||_1 + lambda * sum_g c_g ||x_g||``: the prox is the L1
  soft-threshold followed by the group prox, with the same steps (scalar or per-coordinate):
  the group step scales a group by a positive factor, so it keeps the L1 step's signs and zeros,
  and the KKT conditions of the sum follow. :class:`ProximalChainSpec` enforces that order.

**Adaptive optimizers (ProxGen, Yun et al., NeurIPS 2021).** Adam's update is
``w <- w - s * m_hat`` with a per-coordinate step ``s``; the consistent prox uses that ``s``
(``threshold="preconditioned"``) instead of the scalar ``lr`` (``threshold="scalar"``, the old
heuristic, which minimises a different objective). The step each framework's optimizer took:

    Keras Adam/AdamW   s = lr * sqrt(1 - b2^t) / (sqrt(v) + eps)          (eps outside v_hat)
    torch Adam/AdamW   s = lr / (sqrt(v) / sqrt(1 - b2^t) + eps)          (eps on sqrt(v_hat))
    torchref.KerasAdamW  the Keras formula (float32-rounded lr and b2 as Keras rounds them)
    Keras RMSprop      s = lr / sqrt(v + eps)                              (eps inside the root)
    torch RMSprop      s = lr / (sqrt(v) + eps)

with ``v`` the optimizer's second-moment state after the step and ``t`` the step count.
``amsgrad``, centered RMSprop and RMSprop momentum are refused (their step is not this ``s``).
A step below the dtype's smallest normal number (a zero step: learning rate 0) is raised to it,
which leaves the tensor unchanged, so the arithmetic never divides by zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from tfreg_core import validation
from tfreg_core.specs import GroupLassoSpec

__all__ = [
    "BATCH_ENTRIES",
    "GROUP_WEIGHTS",
    "NEWTON_ITERATIONS",
    "NUMPY_OPS",
    "THRESHOLD_MODES",
    "ArrayOps",
    "ProximalChainSpec",
    "ProximalGroupLassoSpec",
    "ProximalL1Spec",
    "block_soft_threshold",
    "check_rate",
    "effective_mode",
    "group_weight",
    "include_bias_flag",
    "preconditioned_block_prox",
    "preconditioned_block_proxes",
    "proximal_threshold",
    "resolve",
    "soft_threshold",
]

THRESHOLD_MODES = ("auto", "scalar", "preconditioned")
GROUP_WEIGHTS = (None, "sqrt_size")
NEWTON_ITERATIONS = 6
# Below this many entries (padded), a kernel's solve costs its ~90 op dispatches, not its passes
# over the data: such kernels are solved together, as the rows of one padded matrix.
BATCH_ENTRIES = 1 << 15


class ArrayOps(Protocol):
    """The few array functions the arithmetic needs; each framework supplies its own (operators
    ``+ - * / > <=`` come from the arrays themselves)."""

    def sqrt(self, x: Any) -> Any: ...

    def where(self, condition: Any, x: Any, y: Any) -> Any: ...

    def maximum(self, x: Any, floor: float) -> Any: ...

    def sum_keep(self, x: Any, axes: tuple[int, ...]) -> Any: ...

    def max_keep(self, x: Any, axes: tuple[int, ...]) -> Any: ...

    def zeros_like(self, x: Any) -> Any: ...

    def ones_like(self, x: Any) -> Any: ...

    def tiny(self, x: Any) -> float: ...

    def transpose(self, x: Any, permutation: tuple[int, ...]) -> Any: ...

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any: ...

    def pad_columns(self, x: Any, width: int) -> Any:
        """A 2-D ``x`` with ``width`` zero columns appended."""

    def concat_rows(self, xs: Sequence[Any]) -> Any: ...

    def constant(self, values: np.ndarray, like: Any) -> Any:
        """``values`` as an array of ``like``'s kind (dtype, device)."""

    def kind(self, x: Any) -> Any:
        """What arrays must share to be concatenated (dtype, device), hashable."""


class _NumpyOps:
    sqrt = staticmethod(np.sqrt)
    where = staticmethod(np.where)
    zeros_like = staticmethod(np.zeros_like)
    ones_like = staticmethod(np.ones_like)

    @staticmethod
    def sum_keep(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return np.asarray(np.sum(x, axis=axes, keepdims=True))

    @staticmethod
    def max_keep(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return np.asarray(np.max(x, axis=axes, keepdims=True))

    @staticmethod
    def maximum(x: np.ndarray, floor: float) -> np.ndarray:
        return np.asarray(np.maximum(x, floor))

    @staticmethod
    def tiny(x: np.ndarray) -> float:
        return float(np.finfo(x.dtype).tiny)

    @staticmethod
    def transpose(x: np.ndarray, permutation: tuple[int, ...]) -> np.ndarray:
        return np.transpose(x, permutation)

    @staticmethod
    def reshape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.reshape(x, shape)

    @staticmethod
    def pad_columns(x: np.ndarray, width: int) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, width)))

    @staticmethod
    def concat_rows(xs: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs, axis=0)

    @staticmethod
    def constant(values: np.ndarray, like: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=like.dtype)

    @staticmethod
    def kind(x: np.ndarray) -> Any:
        return x.dtype


NUMPY_OPS: ArrayOps = _NumpyOps()


def include_bias_flag(value: Any) -> bool:
    """``include_bias`` must be a real bool: a truthy string or 1 would silently widen the scope."""
    if not isinstance(value, bool):
        raise validation.InvalidArgumentError(
            f"include_bias must be a bool. Received: include_bias={value!r}"
        )
    return value


def soft_threshold(x: Any, threshold: Any) -> np.ndarray:
    """NumPy ``sign(x) * max(|x| - threshold, 0)``: the proximal operator of
    ``threshold * ||x||_1`` (``threshold`` a non-negative number, or an array of per-entry
    thresholds). The reference the framework versions are tested against."""
    if np.ndim(threshold) == 0:
        threshold = validation.non_negative_float(threshold, "threshold")
    x = np.asarray(x)
    shrunk: np.ndarray = np.sign(x) * np.maximum(np.abs(x) - threshold, 0)
    return shrunk


def proximal_threshold(learning_rate: Any, l1: float) -> float:
    """``learning_rate * l1``: how far one scalar proximal step moves every entry towards zero.

    Computed once in float64 (then rounded to the weights' dtype by the caller) in both
    frameworks, so the threshold, like the step, is identical given identical inputs.
    """
    return validation.non_negative_float(learning_rate, "learning_rate") * l1


def check_rate(learning_rate: Any, where: str) -> None:
    """Refuse the learning rate the coming update will use (``where`` names it) unless it is a
    finite number >= 0: a proximal step with a negative rate pushes weights *away* from zero,
    with NaN it makes them NaN. Trainers call it before a window's first micro-batch."""
    try:
        validation.non_negative_float(learning_rate, "learning_rate")
    except validation.InvalidArgumentError:
        raise validation.InvalidArgumentError(
            "A proximal step needs a finite learning rate >= 0 (negative: weights pushed away "
            "from zero; NaN: NaN weights); checked before the window's first micro-batch, "
            f"nothing was changed. Received: {where}={learning_rate!r}"
        ) from None


def group_weight(shape: Sequence[int], axes: tuple[int, ...], mode: str | None) -> float:
    """``c_g`` of every group of a tensor of ``shape`` whose groups' norms run over ``axes``:
    1, or ``sqrt(|g|)`` (``|g|`` = product of the sizes along ``axes``) for ``"sqrt_size"``."""
    if mode is None:
        return 1.0
    return math.sqrt(math.prod(int(shape[a]) for a in axes))


def block_soft_threshold(z: Any, threshold: Any, axes: tuple[int, ...], ops: ArrayOps) -> Any:
    """``z_g * max(0, 1 - threshold / ||z_g||)`` per group (norms over ``axes``): the proximal
    operator of ``threshold * sum_g ||z_g||``. Groups with ``||z_g|| <= threshold`` become exactly
    zero; an all-zero group stays zero (no division by its zero norm)."""
    norm = ops.sqrt(ops.sum_keep(z * z, axes))
    keep = norm > threshold
    safe = ops.where(keep, norm, ops.ones_like(norm))
    return z * ops.where(keep, 1 - threshold / safe, ops.zeros_like(norm))


def preconditioned_block_prox(
    z: Any,
    step: Any,
    tau: Any,
    axes: tuple[int, ...],
    ops: ArrayOps,
    *,
    iterations: int = NEWTON_ITERATIONS,
) -> Any:
    """``argmin_x sum_i (x_i - z_i)^2 / (2 step_i) + tau * sum_g ||x_g||`` (norms over ``axes``),
    by the Newton iteration of the module docstring. ``step`` has ``z``'s shape, entries >= 0;
    ``tau`` > 0 is a Python number, or an array of one per group (``z``'s shape reduced over
    ``axes``)."""
    # The cost is the passes over the whole tensor (the rest is per group), so there are as few
    # as the arithmetic allows without fusing ops: seven to start (step floor, ||z / s||, ||z||,
    # max s), six per iteration (d = s + nu, r = z / d once, Q^2 = sum r^2 and S = sum r^2 / d
    # from it), three for the result.
    s = ops.maximum(step, ops.tiny(z))
    r = z / s
    zero_group = ops.sqrt(ops.sum_keep(r * r, axes)) <= tau
    nu = ops.sqrt(ops.sum_keep(z * z, axes)) / tau - ops.max_keep(s, axes)
    # Zero groups' nu is irrelevant (set to 0 at the end); 1 keeps their arithmetic finite (an
    # all-zero group would otherwise divide 0 by 0).
    one = ops.ones_like(nu)
    nu = ops.where(zero_group, one, ops.where(nu > 0, nu, ops.zeros_like(nu)))
    for _ in range(iterations):
        d = s + nu
        r = z / d
        r2 = r * r
        q2 = ops.sum_keep(r2, axes)
        curvature = ops.where(zero_group, one, ops.sum_keep(r2 / d, axes))
        nu = nu + (ops.sqrt(q2) / tau - 1) * q2 / curvature
    # nu = 0 makes a zero group's factor nu / (s + nu) exactly 0 (s > 0): the group is masked
    # per group, not by another pass over the tensor.
    nu = ops.where(zero_group, ops.zeros_like(nu), nu)
    return z * (nu / (s + nu))


def _layout(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """The permutation that moves ``axes`` last, the number of groups and the group size."""
    rest = tuple(a for a in range(len(shape)) if a not in axes)
    return rest + axes, math.prod(shape[a] for a in rest), math.prod(shape[a] for a in axes)


def _as_rows(x: Any, axes: tuple[int, ...], width: int, ops: ArrayOps) -> Any:
    """``x`` as a (groups, width) matrix: one group per row, zero-padded on the right."""
    permutation, groups, size = _layout(tuple(x.shape), axes)
    if permutation != tuple(range(len(permutation))):
        x = ops.transpose(x, permutation)
    x = ops.reshape(x, (groups, size))
    return x if size == width else ops.pad_columns(x, width - size)


def _from_rows(rows: Any, shape: tuple[int, ...], axes: tuple[int, ...], ops: ArrayOps) -> Any:
    """The inverse of :func:`_as_rows` for a tensor of ``shape``."""
    permutation, _, size = _layout(shape, axes)
    x = ops.reshape(rows[:, :size], tuple(shape[a] for a in permutation))
    inverse = tuple(int(a) for a in np.argsort(permutation))
    return x if inverse == tuple(range(len(inverse))) else ops.transpose(x, inverse)


def preconditioned_block_proxes(
    zs: Sequence[Any],
    steps: Sequence[Any],
    taus: Sequence[float],
    axes: Sequence[tuple[int, ...]],
    ops: ArrayOps,
) -> list[Any]:
    """:func:`preconditioned_block_prox` of each ``(zs[i], steps[i], taus[i], axes[i])``.

    Small tensors of one kind (dtype, device) are solved in one call: each laid out as rows (one
    group per row, ``axes`` last), zero-padded to the widest group (``z = 0`` adds nothing to
    any sum; its step 0 becomes the floor, below every real step, so the start's ``max s`` is
    unchanged) and stacked, with ``tau`` per row. The same arithmetic per group, so the same
    result up to the order of the sums (round-off); one set of ~90 ops instead of one per
    tensor. Large tensors are solved alone (no copies)."""
    layouts = {
        i: _layout(tuple(z.shape), a)
        for i, (z, a) in enumerate(zip(zs, axes, strict=True))
        if None not in tuple(z.shape)  # a dimension unknown when tracing: solved alone
    }
    small: dict[Any, list[int]] = {}
    for i, (_, groups, size) in layouts.items():
        if groups * size <= BATCH_ENTRIES:
            small.setdefault(ops.kind(zs[i]), []).append(i)
    out: dict[int, Any] = {}
    for candidates in small.values():
        width = max(layouts[i][2] for i in candidates)
        members = [i for i in candidates if layouts[i][1] * width <= BATCH_ENTRIES]
        if len(members) < 2:
            continue
        z = ops.concat_rows([_as_rows(zs[i], axes[i], width, ops) for i in members])
        step = ops.concat_rows([_as_rows(steps[i], axes[i], width, ops) for i in members])
        member_taus = [taus[i] for i in members]
        tau: Any = member_taus[0]
        if len(set(member_taus)) > 1:  # one per row (group_weights="sqrt_size")
            column = np.repeat(member_taus, [layouts[i][1] for i in members])
            tau = ops.constant(column[:, None], z)
        x = preconditioned_block_prox(z, step, tau, (1,), ops)
        start = 0
        for i in members:
            groups = layouts[i][1]
            out[i] = _from_rows(x[start : start + groups], tuple(zs[i].shape), axes[i], ops)
            start += groups
    return [
        out[i] if i in out else preconditioned_block_prox(z, steps[i], taus[i], axes[i], ops)
        for i, z in enumerate(zs)
    ]


def _threshold_mode(value: Any) -> str:
    return validation.choice(value, "threshold", THRESHOLD_MODES)


def effective_mode(requested: str, kind: str, optimizer: Any) -> str:
    """``"scalar"`` or ``"preconditioned"`` for a ``threshold`` mode and what stepped: ``kind``
    is ``"number"`` (a learning rate, no optimizer), ``"sgd"``, ``"adaptive"`` (a supported
    Adam/AdamW/RMSprop) or ``"other"``. ``"auto"`` picks the consistent prox where one is
    known (scalar for SGD, preconditioned for adaptive) and refuses to guess otherwise."""
    if requested == "scalar":
        return "scalar"
    if kind == "adaptive":
        return "preconditioned"
    if requested == "auto" and kind in ("number", "sgd"):
        return "scalar"
    name = "a learning rate" if kind == "number" else type(optimizer).__name__
    if requested == "preconditioned":
        raise validation.InvalidArgumentError(
            "threshold='preconditioned' needs the optimizer that took the step, one of Adam, "
            "AdamW, RMSprop (Keras or torch) or torchref.KerasAdamW, to read its per-coordinate "
            f"step. Received: {name} ({optimizer!r})"
        )
    raise validation.InvalidArgumentError(
        "threshold='auto' knows the consistent prox for SGD (scalar lr * lambda) and for "
        "Adam/AdamW/RMSprop (their per-coordinate step); for this optimizer pass "
        "threshold='scalar' to use lr * lambda (a heuristic: it ignores the optimizer's "
        f"scaling). Received: optimizer={name}"
    )


class ProximalL1Spec:
    """Hyperparameters of ``ProximalL1``: ``l1`` (the L1 strength lambda, used exactly -- not
    rounded through float32, this is not a Keras class), the scope ``include_bias`` and
    ``threshold`` (``"auto"``, ``"scalar"`` or ``"preconditioned"``, see the module docstring)."""

    def __init__(self, *, l1: float, include_bias: bool = False, threshold: str = "auto") -> None:
        self.l1 = validation.non_negative_float(l1, "l1")
        self.include_bias = include_bias_flag(include_bias)
        self.threshold_mode = _threshold_mode(threshold)

    def threshold(self, learning_rate: float) -> float:
        """``learning_rate * l1`` for a Python learning rate (see :func:`proximal_threshold`)."""
        return proximal_threshold(learning_rate, self.l1)

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "include_bias": self.include_bias, "threshold": self.threshold_mode}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(l1={self.l1!r}, include_bias={self.include_bias!r}, "
            f"threshold={self.threshold_mode!r})"
        )


class ProximalGroupLassoSpec(GroupLassoSpec):
    """Hyperparameters of ``ProximalGroupLasso``: ``strength`` (lambda, exact) and ``axis`` as
    ``GroupLasso`` (the norm runs over ``axis``; each index of the other axes is one group),
    ``group_weights`` (None or ``"sqrt_size"``) and ``threshold`` as ``ProximalL1``. Kernels
    only (rank >= 2), the scope of ``penalty()``."""

    def __init__(
        self,
        strength: float = 0.01,
        *,
        axis: int | Sequence[int],
        group_weights: str | None = None,
        threshold: str = "auto",
    ) -> None:
        super().__init__(strength, axis=axis)
        if group_weights not in GROUP_WEIGHTS:
            raise validation.InvalidArgumentError(
                "Invalid value for argument group_weights: expected None or 'sqrt_size'. "
                f"Received: group_weights={group_weights!r}"
            )
        self.group_weights = group_weights
        self.threshold_mode = _threshold_mode(threshold)

    def axes_for(self, shape: Sequence[int], name: str) -> tuple[int, ...]:
        """``axis`` resolved against ``shape`` (raises naming the tensor if out of range)."""
        try:
            axes = validation.axes(self.axis, "axis")
            return validation.normalized_axes(axes, len(shape), "axis")
        except validation.InvalidArgumentError as error:
            raise validation.InvalidArgumentError(
                f"{error} (tensor {name}, shape {tuple(shape)})"
            ) from None

    def tau(self, shape: Sequence[int], axes: tuple[int, ...]) -> float:
        """``lambda * c_g`` for a tensor of ``shape``."""
        return self.strength * group_weight(shape, axes, self.group_weights)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "group_weights": self.group_weights,
            "threshold": self.threshold_mode,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.strength!r}, axis={self.axis!r}, "
            f"group_weights={self.group_weights!r}, threshold={self.threshold_mode!r})"
        )


def resolve(proximal: Any, classes: Sequence[type[Any]]) -> Any:
    """``None``, an instance of one of ``classes`` (a framework's proximal operators), its
    ``{"class_name", "config"}`` dict, or a list/tuple of those, composed by the class in
    ``classes`` that derives from :class:`ProximalChainSpec`."""
    by_name = {cls.__name__: cls for cls in classes}
    if proximal is None or isinstance(proximal, tuple(classes)):
        return proximal
    if isinstance(proximal, dict) and proximal.get("class_name") in by_name:
        return by_name[proximal["class_name"]](**proximal.get("config", {}))
    chains: list[type[Any]] = [cls for cls in classes if issubclass(cls, ProximalChainSpec)]
    if isinstance(proximal, (list, tuple)) and chains:
        return chains[0](list(proximal))
    raise validation.InvalidArgumentError(
        f"proximal must be None, one of {sorted(by_name)}, its config, or a list of them. "
        f"Received: proximal={proximal!r}"
    )


class ProximalChainSpec:
    """Several proximal operators applied in order after each update, as one operator.

    Supported: the sparse group lasso ``[ProximalL1, ProximalGroupLasso]`` (L1 first: that
    composition *is* the prox of the sum, see the module docstring), or either alone. Any other
    list is refused: the prox of a sum is not in general the composition of the proxes (two
    group lassos with different axes overlap; group-then-L1 is not the prox of the sum).
    Elements are operators of ``classes`` or their configs.
    """

    def __init__(self, operators: Sequence[Any], classes: Sequence[type[Any]]) -> None:
        if isinstance(operators, (str, bytes, dict)) or not isinstance(operators, Sequence):
            raise validation.InvalidArgumentError(
                f"operators must be a list of proximal operators. Received: operators={operators!r}"
            )
        singles = [cls for cls in classes if not issubclass(cls, ProximalChainSpec)]
        resolved = [resolve(op, singles) for op in operators]
        kinds = [
            "l1"
            if isinstance(op, ProximalL1Spec)
            else "group"
            if isinstance(op, ProximalGroupLassoSpec)
            else None
            for op in resolved
        ]
        if kinds not in (["l1"], ["group"], ["l1", "group"]):
            raise validation.InvalidArgumentError(
                "A proximal chain composes at most one ProximalL1 followed by at most one "
                "ProximalGroupLasso (the sparse group lasso prox: L1 first); other orders or "
                f"repeats are not the prox of the summed penalty. Received: operators={operators!r}"
            )
        self.operators = resolved

    def apply(self, model: Any, optimizer_or_learning_rate: Any) -> None:
        """Apply each operator in order (all read the same optimizer step)."""
        for op in self.operators:
            op.apply(model, optimizer_or_learning_rate)

    def check(self, optimizer: Any) -> None:
        """Each operator's ``check`` (refuses an optimizer its threshold cannot serve)."""
        for op in self.operators:
            op.check(optimizer)

    def check_model(self, model: Any) -> None:
        """Each operator's ``check_model`` (refuses parameters its step cannot update)."""
        for op in self.operators:
            op.check_model(model)

    def check_rates(self, optimizer: Any) -> None:
        """The first operator's ``check_rates`` (all read the same optimizer's rate)."""
        self.operators[0].check_rates(optimizer)

    def get_config(self) -> dict[str, Any]:
        return {
            "operators": [
                {"class_name": type(op).__name__, "config": op.get_config()}
                for op in self.operators
            ]
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.operators!r})"
