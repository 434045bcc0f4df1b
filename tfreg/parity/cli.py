"""``tfreg-parity`` / ``python -m tfreg.parity``: run the TensorFlow-vs-PyTorch parity matrix.

Exit status: 0 when every check that ran passed, 1 when any failed or errored (skips do not fail
the run -- they are listed with their reason), 2 for bad command-line arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from tfreg.parity.devices import available_devices

_DESCRIPTION = """\
Run the TensorFlow/Keras vs PyTorch parity matrix and print a table: check, dtype, device,
max abs diff, max rel diff (norm-wise: max|a-e| / max|e|), tolerance, result.

Checks compare tfreg (TensorFlow) against Keras itself and against torchref (PyTorch) on the
same seeded weights and data: penalty values and gradients, accumulated vs one-batch updates,
optimizer trajectories, sparsity. Tolerances come from one table (tfreg_harness.tolerances): float64
checks claim exactness up to round-off, float32 checks realistic use.
"""

_EPILOG = """\
examples:
  tfreg-parity                      quick matrix on CPU (what `make demo` runs)
  tfreg-parity --full --device all  everything, on CPU and (if visible) GPU
  tfreg-parity --json out.json --markdown out.md
exit status: 0 all ran checks passed, 1 a check failed or errored, 2 usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfreg-parity",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the fast subset (default)")
    size.add_argument("--full", action="store_true", help="every check, longer trajectories")
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu", "all"),
        default="cpu",
        help="where to run; gpu rows are skipped (not failed) when no GPU is visible",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "float64", "all"), default="all", help="dtypes to run"
    )
    parser.add_argument("--group", action="append", help="only these check groups (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown")
    parser.add_argument(
        "--record",
        metavar="PATH",
        help="also write TensorFlow's results to a .npz bundle for `python -m torchref.verify` "
        "on a machine without TensorFlow (e.g. a torch-only GPU image)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tfreg._compat import tf

    # Each check builds fresh trainers, whose first traces TF would report as "retracing".
    tf.get_logger().setLevel("ERROR")
    from tfreg.parity.checks import run_one, selected
    from tfreg_harness.report import Report, Row

    devices = ["cpu", "gpu"] if args.device == "all" else [args.device]
    checks = selected(full=args.full, groups=args.group)
    cells = [
        (check, dtype, device)
        for check in checks
        for dtype in check.dtypes
        if args.dtype in ("all", dtype)
        for device in devices
    ]
    report = Report()
    started = time.perf_counter()
    with _progress(len(cells), disabled=args.no_progress) as advance:
        for check, dtype, device in cells:
            if device not in available_devices():
                report.extend(
                    [
                        Row(
                            check.name,
                            dtype,
                            device,
                            "skip",
                            detail="no GPU visible to both frameworks",
                        )
                    ]
                )
            else:
                report.extend([run_one(check, dtype, device)])
            advance(check.name)
    elapsed = time.perf_counter() - started
    print(report.to_text())
    counts = report.counts()
    print(
        f"\n{counts['pass']} passed, {counts['fail'] + counts['error']} failed, "
        f"{counts['skip']} skipped in {elapsed:.1f}s"
    )
    if args.json:
        report.write_json(args.json)
    if args.markdown:
        report.write_markdown(args.markdown)
    if args.record:
        from tfreg.parity.record import record_bundle

        n_cases = record_bundle(args.record)
        print(f"recorded {n_cases} TensorFlow cases to {args.record}")
    return 0 if report.ok else 1


class _progress:
    """A rich progress bar on stderr when rich is installed and stderr is a terminal."""

    def __init__(self, total: int, *, disabled: bool) -> None:
        self.total = total
        self.bar = None
        if not disabled and sys.stderr.isatty():
            try:
                from rich.progress import Progress
            except ImportError:
                return
            self.bar = Progress(transient=True)

    def __enter__(self):  # -> Callable[[str], None]
        if self.bar is None:
            return lambda _name: None
        self.bar.start()
        task = self.bar.add_task("parity checks", total=self.total)
        return lambda name: self.bar.update(task, advance=1, description=name[:48])

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
