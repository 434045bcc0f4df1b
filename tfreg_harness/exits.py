"""Exit statuses of the harness' command-line tools (``tfreg-parity``, ``torchref.verify``).

One table for both, since a CI job keys on them:

- 0 (:data:`PASSED`): every check or case passed, and at least one ran;
- 1 (:data:`FAILED`): something failed or errored, nothing ran, or ``--timeout`` expired;
- 2 (:data:`UNUSABLE`): usage error or unusable input, said in one line on stderr (no
  traceback): the same input will fail again, so CI must tell it apart from a failed check;
- 130 (:data:`INTERRUPTED`): SIGINT (128 + 2, the shell's convention), no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tfreg_harness.deadline import RunTimeout, deadline

__all__ = ["FAILED", "INTERRUPTED", "PASSED", "UNUSABLE", "guarded", "one_line", "unusable"]

PASSED, FAILED, UNUSABLE, INTERRUPTED = 0, 1, 2, 130


def one_line(message: str | BaseException) -> str:
    """``message`` (an exception as ``Type: text``) with every run of whitespace one space."""
    text = f"{type(message).__name__}: {message}" if isinstance(message, BaseException) else message
    return " ".join(text.split())


def unusable(prog: str, message: str) -> int:
    """Print ``prog: error: message`` as one line on stderr; return :data:`UNUSABLE`."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return UNUSABLE


def guarded(prog: str, run: Callable[[], int], *, timeout: float, what: str) -> int:
    """``run()`` under a ``timeout``-second :func:`~tfreg_harness.deadline.deadline`: its status,
    or :data:`FAILED` with one line when the time is up, or :data:`INTERRUPTED` on Ctrl-C.
    (Outputs are written atomically, so an interrupted run leaves no half-written file.)"""
    try:
        with deadline(timeout, what):
            return run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except RunTimeout as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return FAILED
