"""The parity matrix: named checks, each run per dtype and device, producing report rows.

A check function takes ``(dtype, device)`` and returns the comparisons it made
(``tfreg_harness.compare``
results, each already carrying its tolerance). It raises :class:`SkipCheck` with a reason when it
cannot run (no GPU, missing framework feature); any other exception is reported as an error row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tfreg_harness.compare import Comparison
from tfreg_harness.keras_side.devices import available_devices
from tfreg_harness.report import Row


class SkipCheck(Exception):
    """Raised by a check that cannot run here; the message is the reason shown in the report."""


@dataclass(frozen=True)
class Check:
    name: str
    group: str
    run: Callable[[str, str], Sequence[Comparison]]
    quick: bool = True
    dtypes: tuple[str, ...] = ("float32", "float64")


CHECKS: list[Check] = []

# The built-in groups, for ``tfreg-parity --help`` (which lists them before any check module is
# imported); a test asserts that the registered checks use exactly these.
GROUPS: dict[str, str] = {
    "penalties": "penalty values and gradients: tfreg vs Keras (bit-identical), vs torchref",
    "accumulation": "k micro-batches of b == one batch of k*b, uneven and short windows",
    "trajectories": "optimizer trajectories tfreg vs torchref (SGD, momentum, decay, AdamW)",
    "models": "transferred models: logits, loss, every gradient (MLP, CNN, BatchNorm, Dropout)",
    "sparsity": "sparsity reports and proximal L1 trajectories on transferred weights",
}


def register(
    name: str, group: str, *, quick: bool = True, dtypes: tuple[str, ...] = ("float32", "float64")
) -> Callable[
    [Callable[[str, str], Sequence[Comparison]]], Callable[[str, str], Sequence[Comparison]]
]:
    """Decorator adding a check function to the matrix."""

    def add(
        fn: Callable[[str, str], Sequence[Comparison]],
    ) -> Callable[[str, str], Sequence[Comparison]]:
        CHECKS.append(Check(name=name, group=group, run=fn, quick=quick, dtypes=dtypes))
        return fn

    return add


def registered_groups() -> list[str]:
    """The groups of the registered checks (built-in and any registered since), sorted."""
    _load_builtin_checks()
    return sorted({c.group for c in CHECKS})


def selected(*, full: bool, groups: Iterable[str] | None = None) -> list[Check]:
    """The checks of ``groups`` (all when ``None``), the quick subset unless ``full``. An unknown
    group raises ``ValueError`` naming it and the registered groups."""
    known = registered_groups()
    wanted = set(groups) if groups else None
    unknown = sorted((wanted or set()) - set(known))
    if unknown:
        raise ValueError(f"Unknown check group(s) {unknown}. Registered groups: {known}")
    return [c for c in CHECKS if (full or c.quick) and (wanted is None or c.group in wanted)]


def run_one(check: Check, dtype: str, device: str) -> Row:
    """Run one cell of the matrix; never raises (a crash is an "error" row naming the exception)."""
    if device not in available_devices():
        return Row(check.name, dtype, device, "skip", detail="no GPU visible to both frameworks")
    try:
        comparisons = list(check.run(dtype, device))
    except SkipCheck as reason:
        return Row(check.name, dtype, device, "skip", detail=str(reason))
    except Exception as exc:  # a crash is a row, so the report shows every failure
        return Row(check.name, dtype, device, "error", detail=f"{type(exc).__name__}: {exc}")
    if not comparisons:
        return Row(check.name, dtype, device, "error", detail="check made no comparison")
    # Comparisons against an exact zero (rtol 0, absolute bound) have no meaningful relative
    # error; the row's relative column summarises the relative comparisons.
    relative = [c for c in comparisons if c.rtol > 0] or comparisons
    failing = [c.name for c in comparisons if not c.passed]
    return Row(
        check.name,
        dtype,
        device,
        "fail" if failing else "pass",
        max_abs=max(c.max_abs for c in comparisons),
        max_rel=max(c.max_rel for c in relative),
        tolerance=max(c.rtol for c in relative),
        detail=("failed: " + ", ".join(failing)) if failing else "",
    )


def _load_builtin_checks() -> None:
    # Importing the modules runs their @register decorators (once; Python caches modules).
    from tfreg_harness.keras_side.checks import models, penalties, sparsity, training  # noqa: F401


__all__ = [
    "CHECKS",
    "GROUPS",
    "Check",
    "SkipCheck",
    "register",
    "registered_groups",
    "run_one",
    "selected",
]
