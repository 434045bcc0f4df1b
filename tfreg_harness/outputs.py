"""Report files a CI job reads: checked before the run, written atomically after it.

A parity run can take minutes; an output path that cannot be written must be found before it
starts (the CLIs' exit status 2), not after, and a run interrupted while writing (SIGINT, a full
disk, a timeout) must never leave a half-written JSON/XML/bundle that a later CI step reads as
the result. :func:`check_output_path` probes the directory the way :func:`atomic_path` will use
it (a temporary file next to the target); :func:`atomic_path` writes to that temporary file and
renames it over the target (``os.replace``: atomic on POSIX and Windows within one filesystem),
fsyncing the file before and its folder after the rename, so that a power loss leaves the old
or the new file, never an empty one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import tempfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from tfreg_core.checkpoint import fsync

__all__ = [
    "REPORT_OUTPUTS",
    "OutputPathError",
    "add_report_outputs",
    "atomic_path",
    "check_output_path",
    "check_output_paths",
    "write_text_atomic",
]

# (option, attribute) of the report files both command-line tools can write.
REPORT_OUTPUTS = (("--json", "json"), ("--markdown", "markdown"), ("--junit-xml", "junit_xml"))


class OutputPathError(ValueError):
    """An output path that cannot be written (empty, a directory, no such or read-only folder)."""


def check_output_path(option: str, path: str | Path, *, directory: bool = False) -> None:
    """Raise :class:`OutputPathError` naming ``option`` unless ``path`` can be (re)written.

    ``directory=True``: ``path`` is a folder the run creates (or fills) with files.
    Nothing is left behind: the probe file is removed.
    """
    if not str(path).strip():
        raise OutputPathError(f"{option}: an empty path. Received: {option} {str(path)!r}")
    target = Path(path)
    if directory:
        if target.exists() and not target.is_dir():
            raise OutputPathError(f"{option} {path}: exists and is not a directory")
        folder = target if target.is_dir() else target.parent
    else:
        if target.is_dir():
            raise OutputPathError(f"{option} {path}: is a directory, not a file")
        folder = target.parent
    if not folder.is_dir():
        raise OutputPathError(f"{option} {path}: the folder {str(folder)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".probe")
    except OSError as exc:
        raise OutputPathError(
            f"{option} {path}: cannot write in {str(folder)!r} ({exc.strerror or exc})"
        ) from None
    os.close(fd)
    os.unlink(probe)
    if not directory and target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"{option} {path}: the existing file is read-only")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so writers that infer the format
    from it still do); on success it replaces ``path``, on any exception (KeyboardInterrupt
    included) it is removed and ``path`` is untouched."""
    target = Path(path)
    fd, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}"
    )
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); the result gets the permissions a plain
        # open() would give it (an existing file's, else 0666 less the umask).
        os.chmod(temporary, _mode(target))
        yield Path(temporary)
        fsync(temporary)  # the data on disk before the name points at it
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync(str(target.parent))  # the rename itself survives a power loss


def _mode(target: Path) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_text_atomic(path: str | Path, text: str) -> None:
    """``Path(path).write_text(text, encoding="utf-8")``, atomically (:func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def add_report_outputs(parser: argparse.ArgumentParser, *, testcase: str) -> None:
    """The :data:`REPORT_OUTPUTS` options of a command line (``testcase``: what one JUnit
    testcase stands for)."""
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown")
    parser.add_argument(
        "--junit-xml",
        metavar="PATH",
        help=f"also write JUnit XML (one testcase per {testcase}) for CI",
    )


def check_output_paths(
    args: argparse.Namespace, options: Iterable[tuple[str, str]], *, folders: Collection[str] = ()
) -> None:
    """:func:`check_output_path` for each ``(option, attribute)`` that ``args`` sets, in order;
    an option in ``folders`` names a directory."""
    for option, attribute in options:
        if getattr(args, attribute) is not None:
            check_output_path(option, getattr(args, attribute), directory=option in folders)
