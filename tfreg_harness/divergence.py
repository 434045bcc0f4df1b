"""Per-layer records of a parity run and the report that names where two models part ways.

A parity run compares every paired layer's output (forward) and every parameter's gradient
(backward). :class:`LayerRecord` is one such comparison, in model order; :class:`ParityReport`
keeps them next to the usual rows and names the first forward and the first gradient record that
leaves its tolerance -- where a port breaks, instead of a table in which everything downstream
of the break fails too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tfreg_harness.compare import Comparison
from tfreg_harness.report import Report

Stage = Literal["output", "gradient"]


@dataclass(frozen=True)
class LayerRecord:
    """One per-layer comparison: ``name`` (``"keras_layer <-> torch_module"`` for outputs, the
    Keras variable path for gradients), the layer ``kind`` (Keras class name), the max absolute
    and norm-wise relative difference (``rel`` is ``None`` for an absolute-bound comparison
    against an exact zero), the bound it was held to and whether it held."""

    name: str
    kind: str
    stage: Stage
    max_abs: float
    rel: float | None
    tolerance: float
    passed: bool

    @classmethod
    def of(cls, comparison: Comparison, kind: str, stage: Stage) -> LayerRecord:
        """The record of ``comparison`` (its name, errors, bound and verdict)."""
        return cls(
            comparison.name,
            kind,
            stage,
            comparison.max_abs,
            comparison.relative_error,
            comparison.bound,
            comparison.passed,
        )


@dataclass
class ParityReport(Report):
    """A :class:`Report` plus the per-layer records of the run (``layers``, model order)."""

    layers: list[LayerRecord] = field(default_factory=list)

    def first_failure(self, stage: Stage) -> LayerRecord | None:
        """The first record of ``stage`` ("output" or "gradient") that left its tolerance."""
        return next((r for r in self.layers if r.stage == stage and not r.passed), None)

    @property
    def first_diverging_layer(self) -> str | None:
        record = self.first_failure("output")
        return None if record is None else record.name

    @property
    def first_diverging_gradient(self) -> str | None:
        record = self.first_failure("gradient")
        return None if record is None else record.name

    def summary(self) -> str:
        """One line naming the first diverging layer and gradient (empty when none diverged)."""
        parts = []
        if self.first_diverging_layer:
            parts.append(f"first diverging layer: {self.first_diverging_layer}")
        if self.first_diverging_gradient:
            parts.append(f"first diverging gradient: {self.first_diverging_gradient}")
        return "; ".join(parts)


__all__ = ["LayerRecord", "ParityReport", "Stage"]
