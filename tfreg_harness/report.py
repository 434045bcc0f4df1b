"""Parity report rows and their renderings (terminal table, Markdown, JSON).

A row is one check at one dtype on one device. A check that could not run is a row with status
"skip" and the reason -- the report never drops it silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tfreg_harness.outputs import write_text_atomic

Status = Literal["pass", "fail", "skip", "error"]


@dataclass(frozen=True)
class Row:
    check: str
    dtype: str
    device: str
    status: Status
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: float | None = None
    detail: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def extend(self, rows: Iterable[Row]) -> None:
        self.rows.extend(rows)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status in ("fail", "error")]

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "skip": 0, "error": 0}
        for r in self.rows:
            out[r.status] += 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts(), "rows": [asdict(r) for r in self.rows]}

    def write_json(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.as_dict(), indent=2) + "\n")

    def to_markdown(self) -> str:
        lines = [
            "| check | dtype | device | max abs diff | max rel diff | tolerance | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            result = r.status.upper() if r.status != "pass" else "pass"
            if r.detail and r.status != "pass":
                result += f" ({r.detail})"
            lines.append(
                f"| {r.check} | {r.dtype} | {r.device} | {format_number(r.max_abs)} "
                f"| {format_number(r.max_rel)} | {format_number(r.tolerance)} | {result} |"
            )
        c = self.counts()
        lines.append("")
        lines.append(f"{c['pass']} passed, {c['fail'] + c['error']} failed, {c['skip']} skipped")
        return "\n".join(lines) + "\n"

    def write_markdown(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_markdown())

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Draw each row's max relative difference against its tolerance (and, for rows named
        ``"step N ..."``, the per-step trajectory gap) to the image ``path``; needs matplotlib
        (the ``plot`` extra). See :func:`tfreg_harness.plot.plot_report`."""
        from tfreg_harness.plot import plot_report

        return plot_report(self, path, title=title)

    def to_text(self) -> str:
        headers = ("check", "dtype", "device", "max abs", "max rel", "tol", "result")
        body = [
            (
                r.check,
                r.dtype,
                r.device,
                format_number(r.max_abs),
                format_number(r.max_rel),
                format_number(r.tolerance),
                r.status if not r.detail or r.status == "pass" else f"{r.status}: {r.detail}",
            )
            for r in self.rows
        ]
        widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*row) for row in body]
        return "\n".join(line.rstrip() for line in out)


def format_number(value: float | None) -> str:
    """A difference or tolerance as the tables print it: ``-`` (none), ``0``, or ``1.23e-05``."""
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.2e}"
