"""Hyperparameters, validation and ``get_config`` of every regularizer, framework-free.

``tfreg`` and ``torchref`` subclass these and add only ``__call__``, so the two frameworks cannot
drift apart in what they accept, how they reject it, or what they serialize.

Factor precision: Keras 3 stores ``L1``'s and ``OrthogonalRegularizer``'s factor as a float32
tensor (their configs hold the float32-rounded value) and casts every factor -- ``L2``'s and
``L1L2``'s too -- through float32 before multiplying. ``call_factor`` reproduces that; ``PNorm``
and ``GroupLasso`` (not Keras') use their strength exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tfreg_core import validation
from tfreg_core.conversions import l2_to_torch_weight_decay, torch_weight_decay_to_l2


def float32_rounded(value: float) -> float:
    """The float64 value of ``value`` rounded to float32 -- Keras' factor precision."""
    return float(np.float32(value))


class L1Spec:
    def __init__(self, l1: float | None = 0.01) -> None:
        self.l1 = float32_rounded(validation.non_negative_float32(0.01 if l1 is None else l1, "l1"))

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}


class L2Spec:
    def __init__(self, l2: float | None = 0.01) -> None:
        self.l2 = validation.non_negative_float32(0.01 if l2 is None else l2, "l2")

    @property
    def call_factor(self) -> float:
        return float32_rounded(self.l2)

    def get_config(self) -> dict[str, Any]:
        return {"l2": self.l2}

    @classmethod
    def from_torch_weight_decay(cls, weight_decay: float) -> Any:
        """The penalty whose gradient is torch's *coupled* ``weight_decay`` (SGD, Adam, RMSprop):
        ``L2(weight_decay / 2)``, since ``d/dw (wd/2 * w**2) = wd * w`` is what torch adds.

        Decoupled decay -- ``torch.optim.AdamW`` and every Keras optimizer's ``weight_decay`` --
        is not a penalty: it shrinks ``w <- w - lr * wd * w`` outside the adaptive scaling, so no
        ``L2`` reproduces it under Adam. Use the optimizer's own argument for that.

        Not under torch's ``maximize=True``: torch negates the objective's gradient *before*
        adding ``wd * w``, so coupled decay still shrinks the weights, while a penalty in the
        objective is maximized with it and grows them: per SGD step the two differ by
        ``2 * lr * wd * w`` (the decay term reversed; 1e-3 of a step here, up to the whole step
        when decay dominates). ``torchref.Trainer`` refuses a ``regularizer`` with such an
        optimizer; keep ``weight_decay`` in the optimizer there.

        Like every Keras ``L2``, the factor is applied through float32: on float64 weights the
        gradient is ``wd * w`` exactly only when ``wd / 2`` is a float32 number (``2**-13``; not
        ``1e-4``, off by ~1e-8 relative). ``l2_penalty(w, wd / 2)`` is exact for any ``wd``.
        """
        return cls(l2=torch_weight_decay_to_l2(weight_decay))

    def to_torch_weight_decay(self) -> float:
        """The coupled torch ``weight_decay`` with the same gradient: ``2 * l2``."""
        return l2_to_torch_weight_decay(self.l2)


class L1L2Spec:
    def __init__(self, l1: float | None = 0.0, l2: float | None = 0.0) -> None:
        self.l1 = validation.non_negative_float32(0.0 if l1 is None else l1, "l1")
        self.l2 = validation.non_negative_float32(0.0 if l2 is None else l2, "l2")

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}


class OrthogonalSpec:
    def __init__(self, factor: float = 0.01, mode: str = "rows") -> None:
        self.factor = float32_rounded(validation.non_negative_float32(factor, "factor"))
        self.mode = validation.choice(mode, "mode", ("rows", "columns"))

    def get_config(self) -> dict[str, Any]:
        return {"factor": self.factor, "mode": self.mode}


class PNormSpec:
    def __init__(self, strength: float = 0.01, *, p: float = 2.0) -> None:
        self.strength = validation.non_negative_float(strength, "strength")
        self.p = validation.finite_float_at_least(p, "p", 1.0)

    def get_config(self) -> dict[str, Any]:
        return {"strength": self.strength, "p": self.p}


class GroupLassoSpec:
    """``strength`` and the norm's ``axis``. Configs hold JSON-friendly values: an int axis stays
    an int, a sequence becomes a list (``axis=(0, 1)`` -> ``get_config()["axis"] == [0, 1]``), so
    a config survives a JSON round trip unchanged and rebuilds an equal regularizer."""

    def __init__(self, strength: float = 0.01, *, axis: int | Sequence[int]) -> None:
        self.strength = validation.non_negative_float(strength, "strength")
        checked = validation.axes(axis, "axis")
        self.axis: int | list[int] = (
            checked[0] if isinstance(axis, (int, np.integer)) else list(checked)
        )

    def get_config(self) -> dict[str, Any]:
        return {"strength": self.strength, "axis": self.axis}
