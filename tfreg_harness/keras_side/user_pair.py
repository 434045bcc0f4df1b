"""``tfreg-parity --model MODULE:FUNCTION``: the parity report for a user's own model pair.

The contract, for ``FUNCTION`` (called ``make_pair`` below):

- ``make_pair()`` returns either the tuple ``(keras_model, torch_module, x, y)`` or a dict with
  those four keys plus any keyword argument of :func:`tfreg.parity.check_parity` (``loss``,
  ``training``, ``steps``, ``keras_optimizer``, ``torch_optimizer``, ``rtol``, ...), which are
  passed on as given. A ``device`` key (so the same dict also feeds ``check_parity(**pair)``)
  must name the device ``make_pair`` was called for; another one is refused.
- If ``make_pair`` takes a ``device`` parameter it is called once per device the run asks for,
  as ``make_pair(device="cpu")`` / ``make_pair(device="gpu")``, and must put the torch module on
  that device. A ``make_pair`` without one is run on the CPU only.

With ``--record PATH --torch-factory T:make_torch`` the pair is also recorded for
``python -m torchref.verify`` on a machine without TensorFlow (``tfreg_harness.keras_side.record``):
``make_torch`` is a torch-only function of the team's code that builds the same torch module.

``MODULE`` is imported with the current directory on ``sys.path`` (as ``python -m`` would), so a
team's ``tests/parity_pairs.py`` is ``--model tests.parity_pairs:make_pair`` from the repository
root. Anything wrong with the spec or the returned value -- a module that cannot be imported, has
a SyntaxError or raises at import, a ``make_pair`` that raises -- raises :class:`PairSpecError`
(the CLI's exit status 2: unusable input); a ``make_pair`` that calls ``sys.exit()`` raises
:class:`PairFactoryExited` (status 1: nothing ran, whatever the exit code it asked for); what
``check_parity`` finds is a report row (status 1 on failure), a ``check_parity`` that raises or
exits an "error" row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from tfreg_harness.exits import one_line
from tfreg_harness.factories import FactorySpecError, import_factory
from tfreg_harness.keras_side.api import check_parity
from tfreg_harness.report import Report, Row

__all__ = [
    "PAIR_KEYS",
    "PairFactoryExited",
    "PairSpecError",
    "check_user_pair",
    "load_pair_factory",
    "make_user_pair",
]

PAIR_KEYS = ("keras_model", "torch_module", "x", "y")


class PairSpecError(ValueError):
    """The ``--model`` spec cannot be imported or its function broke the pair contract."""


class PairFactoryExited(Exception):
    """``make_pair`` called ``sys.exit()``: no pair, nothing checked (never a pass)."""


def load_pair_factory(spec: str) -> Callable[..., Any]:
    """Import ``"pkg.module:function"`` and return the function (:class:`PairSpecError`)."""
    try:
        return import_factory(spec, option="--model")
    except FactorySpecError as exc:
        raise PairSpecError(str(exc)) from None


def _passed_on_keywords() -> set[str]:
    parameters = inspect.signature(check_parity).parameters.values()
    return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}


def _takes_device(factory: Callable[..., Any]) -> bool:
    try:
        return "device" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def _arguments(spec: str, made: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(made, tuple):
        if len(made) != len(PAIR_KEYS):
            raise PairSpecError(
                f"--model {spec!r} returned a tuple of {len(made)} items; expected "
                f"({', '.join(PAIR_KEYS)}) or a dict with those keys"
            )
        return made, {}
    if isinstance(made, dict):
        missing = [k for k in PAIR_KEYS if k not in made]
        allowed = _passed_on_keywords()
        unknown = sorted(set(made) - set(PAIR_KEYS) - allowed)
        if missing or unknown:
            raise PairSpecError(
                f"--model {spec!r} returned a dict missing {missing} / with unknown keys "
                f"{unknown}; it needs {list(PAIR_KEYS)} and may add {sorted(allowed)}"
            )
        kwargs = {k: v for k, v in made.items() if k not in PAIR_KEYS}
        return tuple(made[k] for k in PAIR_KEYS), kwargs
    raise PairSpecError(
        f"--model {spec!r} returned {type(made).__name__}; expected the tuple "
        f"({', '.join(PAIR_KEYS)}) or a dict with those keys"
    )


def make_user_pair(
    spec: str, factory: Callable[..., Any], device: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Call ``factory`` for ``device``: ``(keras_model, torch_module, x, y)`` and the
    ``check_parity`` keyword arguments it returned."""
    try:
        made = factory(device=device) if _takes_device(factory) else factory()
    except SystemExit as exc:
        raise PairFactoryExited(
            f"--model {spec!r}: {factory.__name__}() called sys.exit({exc.code!r}); nothing ran"
        ) from None
    except Exception as exc:
        raise PairSpecError(
            f"--model {spec!r}: {factory.__name__}() raised {one_line(exc)}"
        ) from None
    args, kwargs = _arguments(spec, made)
    given = kwargs.pop("device", device)  # the run's device is passed to check_parity itself
    if given != device:
        raise PairSpecError(
            f"--model {spec!r}: {factory.__name__}() was called for device {device!r} but "
            f"returned device={given!r}"
        )
    return args, kwargs


def check_user_pair(spec: str, *, devices: list[str]) -> Report:
    """Build the pair of ``spec`` for each of ``devices`` and return :func:`check_parity`'s rows.

    A ``check_parity`` that raises (or exits) becomes an ``error`` row naming the exception (the
    pair was usable input, the harness could not check it); a broken spec raises
    :class:`PairSpecError`, a factory that exits :class:`PairFactoryExited`.
    """
    factory = load_pair_factory(spec)
    if any(d != "cpu" for d in devices) and not _takes_device(factory):
        raise PairSpecError(
            f"--model {spec!r}: {factory.__name__}() takes no `device` parameter, so it can only "
            f"run on the CPU. Received: --device {' + '.join(devices)}"
        )
    report = Report()
    for device in devices:
        args, kwargs = make_user_pair(spec, factory, device)
        try:
            report.extend(check_parity(*args, device=device, **kwargs).rows)
        except (Exception, SystemExit) as exc:  # the report shows it, like a crashing check
            report.extend(
                [Row(f"check_parity({spec})", "-", device, "error", detail=one_line(exc))]
            )
    return report
