"""``pkg.module:function`` specs: how the CLIs import a team's factory functions.

``tfreg-parity --model M:make_pair`` and the torch factory a recorded bundle names
(``torchref.verify``) are both imported here, with the working directory on ``sys.path`` (as
``python -m`` would, so ``tests.parity_pairs:make_pair`` works from a repository root). Whatever
goes wrong -- a malformed spec, ImportError, a SyntaxError or an exception or ``sys.exit()`` at
import, no such callable -- is a :class:`FactorySpecError` naming the spec in one line (the CLIs'
exit status 2), never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from tfreg_harness.exits import one_line

__all__ = ["FactorySpecError", "import_factory"]


class FactorySpecError(ValueError):
    """A ``pkg.module:function`` spec that cannot be imported."""


def import_factory(spec: str, *, option: str) -> Callable[..., Any]:
    """Import ``spec`` and return the function; ``option`` names it in messages
    (``"--model"``, ``"torch factory"``)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise FactorySpecError(
            f"{option} must look like pkg.module:function. Received: {option} {spec!r}"
        )
    if os.getcwd() not in sys.path:  # console scripts do not put the working directory there
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # ImportError, SyntaxError, a crash or exit at import
        raise FactorySpecError(
            f"{option} {spec!r}: cannot import {module_name!r}: {one_line(exc)}"
        ) from None
    factory: Callable[..., Any] | None = getattr(module, attribute, None)
    if not callable(factory):
        raise FactorySpecError(
            f"{option} {spec!r}: {module_name} has no callable {attribute!r} "
            f"(found {type(factory).__name__})"
        )
    return factory
