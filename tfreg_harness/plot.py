"""Pictures of a parity report: where a port breaks, at a glance instead of a 60-row table.

Panel 1: every row that has a relative difference and a tolerance (the matrix's checks, a
``check_parity`` report's logits/loss/gradient rows, per-layer rows alike), its max relative
difference against its tolerance on a log axis, coloured by status. Panel 2 (when the report has
rows named ``"step N ..."``, as ``check_parity(steps=N)`` writes them): the largest relative gap
per optimizer step -- a trajectory that drifts shows as a rising line.

matplotlib is imported here only, and drawn through its Agg canvas without pyplot, so plotting
neither needs a display nor changes the caller's matplotlib backend. It comes with the ``plot``
extra (``pip install "tfreg[plot]"``).

This module reads a report through the two small protocols below and imports nothing of
:mod:`tfreg_harness.report`: ``Report.plot`` imports this module (lazily, when it draws), never
the other way round.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tfreg_harness.outputs import atomic_path

__all__ = ["PlottableReport", "PlottableRow", "plot_report", "step_gaps"]


class PlottableRow(Protocol):
    """What a drawn row needs (``tfreg_harness.report.Row`` has it)."""

    @property
    def check(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def max_rel(self) -> float | None: ...
    @property
    def tolerance(self) -> float | None: ...


class PlottableReport(Protocol):
    """What a drawn report needs (``tfreg_harness.report.Report`` has it)."""

    @property
    def rows(self) -> Sequence[PlottableRow]: ...
    def counts(self) -> dict[str, int]: ...


_STEP = re.compile(r"^step (\d+)\b")
_COLOURS = {"pass": "tab:green", "fail": "tab:red", "error": "tab:orange"}


def _gap(row: PlottableRow) -> tuple[float, float] | None:
    """``(max_rel, tolerance)`` when the row has both (the plottable rows), else ``None``."""
    if row.max_rel is None or row.tolerance is None:
        return None
    return float(row.max_rel), float(row.tolerance)


def step_gaps(report: PlottableReport) -> dict[int, tuple[float, float]]:
    """``{step: (largest max rel diff, largest tolerance)}`` over rows named ``"step N ..."``."""
    gaps: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for row in report.rows:
        match = _STEP.match(row.check)
        gap = _gap(row)
        if match and gap is not None:
            gaps[int(match.group(1))].append(gap)
    return {
        step: (max(r for r, _ in values), max(t for _, t in values))
        for step, values in sorted(gaps.items())
    }


def _floor(values: list[float]) -> float:
    # Exact zeros (and zero tolerances: bit-identity claims) have no place on a log axis; they
    # are drawn at a floor two decades under the smallest positive value, marked hollow.
    positive = [v for v in values if 0 < v < math.inf]
    return min(positive, default=1e-16) / 100


def plot_report(report: PlottableReport, path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``report`` to the image ``path`` (format from its suffix, e.g. ``.png``); return it.

    Raises ``ValueError`` when no row has both a relative difference and a tolerance, and
    ``ImportError`` naming the extra when matplotlib is missing.
    """
    plotted = [(r, gap) for r in report.rows if (gap := _gap(r)) is not None]
    rows = [r for r, _ in plotted]
    if not rows:
        raise ValueError(
            "Nothing to plot: no row of the report has a relative difference and a tolerance "
            f"(statuses: {report.counts()})"
        )
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError(
            'Plotting a parity report needs matplotlib: pip install "tfreg[plot]"'
        ) from exc

    gaps = step_gaps(report)
    height = 1.2 + 0.22 * len(rows) + (3.0 if gaps else 0.0)
    figure = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(figure)
    ratios = [max(len(rows) * 0.22, 1.0), 2.6] if gaps else [1.0]
    axes = figure.subplots(len(ratios), 1, height_ratios=ratios, squeeze=False)[:, 0]

    values = [rel for _, (rel, _) in plotted] + [tol for _, (_, tol) in plotted]
    floor = _floor(values)
    ceiling = max((v for v in values if v < math.inf), default=1.0) * 100
    ax = axes[0]
    ys = range(len(rows))
    for y, (row, (rel, tol)) in zip(ys, plotted, strict=True):
        colour = _COLOURS.get(row.status, "tab:gray")
        shown = min(max(rel, floor), ceiling)
        hollow = rel == 0 or rel == math.inf
        ax.scatter(
            [shown],
            [y],
            s=28,
            marker=">" if rel == math.inf else "o",
            facecolors="none" if hollow else colour,
            edgecolors=colour,
            zorder=3,
        )
        ax.scatter([max(tol, floor)], [y], marker="|", s=160, color="black", zorder=2)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), [f"{r.check} [{r.dtype}, {r.device}]" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("max relative difference (dot) vs tolerance (bar); hollow: 0 or inf")
    ax.grid(axis="x", alpha=0.3)
    counts = report.counts()
    ax.set_title(
        title
        or f"parity: {counts['pass']} passed, {counts['fail'] + counts['error']} failed, "
        f"{counts['skip']} skipped"
    )
    if gaps:
        steps = list(gaps)
        ax = axes[1]
        ax.plot(steps, [max(gaps[s][0], floor) for s in steps], "o-", label="largest rel gap")
        ax.plot(steps, [max(gaps[s][1], floor) for s in steps], "k--", label="tolerance")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("weights: torch vs Keras")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    out = Path(path)
    with atomic_path(out) as temporary:  # the temporary keeps the suffix matplotlib reads
        figure.savefig(temporary, dpi=110)
    return out
