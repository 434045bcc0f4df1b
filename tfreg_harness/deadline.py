"""A wall-clock limit for a CLI run (``--timeout``): a hanging check must not hang CI.

:func:`deadline` arms ``SIGALRM`` (POSIX, main thread) and raises :class:`RunTimeout` in the
running Python code when the time is up. Python delivers signals between bytecodes, so a single
long native call (one huge matmul) finishes before the exception is raised; a Python loop, a
``make_pair`` that never returns or a training loop stops within one operation. Where there is
no ``SIGALRM`` (Windows) or outside the main thread the run is not limited (CI runners are POSIX).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["DEFAULT_TIMEOUT_S", "MAX_TIMEOUT_S", "RunTimeout", "deadline", "timeout_seconds"]

# The quick matrix takes ~1 min on 2 CPU cores and --full ~10; a user pair or a bundle with a
# trajectory a few minutes. An hour is far above any healthy run and below CI's own job limits
# (GitHub Actions: 6 h), so a hang is reported by us, with a status, rather than killed by CI.
DEFAULT_TIMEOUT_S = 3600.0
# setitimer's limit is the platform's time_t (OverflowError from about 9.2e9 s on Linux); 1e9 s
# (31 years) is no limit in practice and leaves the timer well inside it.
MAX_TIMEOUT_S = 1e9


def timeout_seconds(text: str) -> float:
    """``--timeout``'s argparse type: a number of seconds in (0, :data:`MAX_TIMEOUT_S`]."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}. Received: {text!r}"
        )
    return seconds


class RunTimeout(BaseException):
    """The run exceeded its ``--timeout``. A ``BaseException`` (like ``KeyboardInterrupt``), so the
    harness' own "a crashing check is a row" handlers do not swallow it."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`RunTimeout` ("``what`` did not finish within N s") after ``seconds``."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise RunTimeout(f"{what} did not finish within {seconds:g} s (--timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
