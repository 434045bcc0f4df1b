"""A wall-clock limit for a CLI run (``--timeout``): a hanging check must not hang CI.

:func:`deadline` arms ``SIGALRM`` (POSIX, main thread) and raises :class:`RunTimeout` in the
running Python code when the time is up. Python delivers signals between bytecodes, so a single
long native call (one huge matmul) finishes before the exception is raised; a Python loop, a
``make_pair`` that never returns or a training loop stops within one operation. Where there is
no ``SIGALRM`` (Windows) or outside the main thread the run is not limited (CI runners are POSIX).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["DEFAULT_TIMEOUT_S", "RunTimeout", "deadline"]

# The quick matrix takes ~1 min on 2 CPU cores and --full ~10; a user pair or a bundle with a
# trajectory a few minutes. An hour is far above any healthy run and below CI's own job limits
# (GitHub Actions: 6 h), so a hang is reported by us, with a status, rather than killed by CI.
DEFAULT_TIMEOUT_S = 3600.0


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
