"""``tfreg-parity`` / ``python -m tfreg.parity``: run the TensorFlow-vs-PyTorch parity matrix.

Exit status (what a CI job keys on):

- 0: every check that ran passed, and at least one ran;
- 1: a check failed or errored, a requested device is missing (``--device gpu`` on a machine
  without a GPU visible to both frameworks, unless ``--allow-missing-device``), or nothing ran
  (a run that checks nothing is not a pass);
- 2: usage error or unusable input (unknown ``--group``, a ``--model`` that cannot be imported or
  breaks the pair contract, ``--plot`` without matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tfreg.parity.checks import GROUPS
from tfreg_harness.report import Report, Row

_DESCRIPTION = """\
Run the TensorFlow/Keras vs PyTorch parity matrix and print a table: check, dtype, device,
max abs diff, max rel diff (norm-wise: max|a-e| / max|e|), tolerance, result.

Checks compare tfreg (TensorFlow) against Keras itself and against torchref (PyTorch) on the
same seeded weights and data: penalty values and gradients, accumulated vs one-batch updates,
optimizer trajectories, sparsity. Tolerances come from one table (tfreg_harness.tolerances): float64
checks claim exactness up to round-off, float32 checks realistic use. With --model, the report is
tfreg.parity.check_parity on your own Keras model / torch module pair instead.
"""

_EPILOG = (
    "check groups (--group):\n"
    + "".join(f"  {name:<14}{text}\n" for name, text in GROUPS.items())
    + """
examples:
  tfreg-parity                      quick matrix on CPU (what `make demo` runs)
  tfreg-parity --full --device all  everything, on CPU and (if visible) GPU
  tfreg-parity --group models --json out.json --junit-xml parity.xml --plot parity-plots/
  tfreg-parity --model tests.parity_pairs:make_pair   your own pair (see tfreg.parity.user_pair)

exit status:
  0  every check that ran passed, and at least one ran
  1  a check failed or errored; --device gpu without a GPU (unless --allow-missing-device);
     or nothing ran
  2  usage error or unusable input (unknown group, --model not importable or malformed)
"""
)

_MISSING_DEVICE = "no GPU visible to both frameworks"


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
        help="where to run. gpu: without a GPU visible to both frameworks its rows are errors "
        "(exit 1) unless --allow-missing-device; all: CPU, plus GPU where visible",
    )
    parser.add_argument(
        "--allow-missing-device",
        action="store_true",
        help="report rows of a missing device as skipped instead of failing the run",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "float64", "all"), default="all", help="dtypes to run"
    )
    parser.add_argument(
        "--group",
        action="append",
        metavar="GROUP",
        help=f"only these check groups (repeatable): {', '.join(GROUPS)}",
    )
    parser.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="check your own pair: FUNCTION() returns (keras_model, torch_module, x, y) or a "
        "dict with those keys plus check_parity keyword arguments",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown")
    parser.add_argument(
        "--junit-xml", metavar="PATH", help="also write JUnit XML (one testcase per row) for CI"
    )
    parser.add_argument(
        "--plot",
        metavar="DIR",
        help="also draw DIR/parity.png: each row's relative difference against its tolerance "
        '(and the per-step gap); needs matplotlib, pip install "tfreg[plot]"',
    )
    parser.add_argument(
        "--record",
        metavar="PATH",
        help="also write TensorFlow's results to a .npz bundle for `python -m torchref.verify` "
        "on a machine without TensorFlow (e.g. a torch-only GPU image)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) found before anything runs."""
    if args.model and (args.group or args.full or args.quick):
        parser.error("--model runs your pair only; it takes no --group/--quick/--full")
    if args.model and args.dtype != "all":
        parser.error("--model: the dtype is your model's; --dtype does not apply")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error('--plot needs matplotlib: pip install "tfreg[plot]"')


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _check_arguments(parser, args)
    from tfreg._compat import tf

    # Each check builds fresh trainers, whose first traces TF would report as "retracing".
    tf.get_logger().setLevel("ERROR")
    from tfreg.parity.devices import available_devices

    devices = ["cpu", "gpu"] if args.device == "all" else [args.device]
    # --device all asks for the GPU where there is one; --device gpu asks for it outright.
    optional = args.device == "all" or args.allow_missing_device
    missing = [d for d in devices if d not in available_devices()]
    started = time.perf_counter()
    report = Report()
    seconds: list[float | None] = []
    if args.model:
        from tfreg.parity.user_pair import PairSpecError, check_user_pair

        try:
            report = check_user_pair(args.model, devices=[d for d in devices if d not in missing])
        except PairSpecError as exc:
            parser.error(str(exc))
        seconds = [None] * len(report.rows)
        for device in missing:
            report.extend([_missing_row(f"model {args.model}", "-", device, optional)])
            seconds.append(0.0)
    else:
        from tfreg.parity.checks import run_one, selected

        try:
            checks = selected(full=args.full, groups=args.group)
        except ValueError as exc:
            parser.error(f"--group: {exc}")
        cells = [
            (check, dtype, device)
            for check in checks
            for dtype in check.dtypes
            if args.dtype in ("all", dtype)
            for device in devices
        ]
        with _progress(len(cells), disabled=args.no_progress) as advance:
            for check, dtype, device in cells:
                cell_started = time.perf_counter()
                if device in missing:
                    row = _missing_row(check.name, dtype, device, optional)
                else:
                    row = run_one(check, dtype, device)
                report.extend([row])
                seconds.append(time.perf_counter() - cell_started)
                advance(check.name)
    elapsed = time.perf_counter() - started

    status, verdict = _verdict(report, missing_allowed=optional)
    print(report.to_text())
    counts = report.counts()
    print(
        f"\n{counts['pass']} passed, {counts['fail'] + counts['error']} failed, "
        f"{counts['skip']} skipped in {elapsed:.1f}s"
    )
    if verdict:
        print(verdict, file=sys.stderr)
    _write_outputs(args, report, seconds, elapsed, status)
    return status


def _missing_row(check: str, dtype: str, device: str, optional: bool) -> Row:
    if optional:
        return Row(check, dtype, device, "skip", detail=_MISSING_DEVICE)
    return Row(
        check,
        dtype,
        device,
        "error",
        detail=f"--device {device}: {_MISSING_DEVICE} (--allow-missing-device to skip)",
    )


def _verdict(report: Report, *, missing_allowed: bool) -> tuple[int, str]:
    """Exit status and, when the run is not green for a reason the table does not say, why."""
    if report.failed:
        return 1, ""
    if report.counts()["pass"] == 0:
        device_skips = all(r.status == "skip" and r.detail == _MISSING_DEVICE for r in report.rows)
        if report.rows and device_skips and missing_allowed:
            return 0, "no check ran: the device is missing and --allow-missing-device was given"
        return 1, (
            f"no check ran ({len(report.rows)} rows, none passed): a run that checks nothing "
            "is not a pass"
        )
    return 0, ""


def _write_outputs(
    args: argparse.Namespace,
    report: Report,
    seconds: list[float | None],
    elapsed: float,
    status: int,
) -> None:
    if args.json or args.junit_xml:
        from tfreg.parity.environment import machine, versions

        environment: dict[str, Mapping[str, object]] = {
            "versions": versions(),
            "machine": machine(),
        }
    if args.json:
        data = report.as_dict()
        for row, took in zip(data["rows"], seconds, strict=True):
            row["seconds"] = None if took is None else round(took, 4)
        data |= {
            "ok": status == 0,
            "exit_status": status,
            "command": ["tfreg-parity", *args.argv],
            "model": args.model,
            **environment,
            "timings": {
                "total_s": round(elapsed, 4),
                "checks_s": round(sum(t for t in seconds if t is not None), 4),
            },
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.markdown:
        report.write_markdown(args.markdown)
    if args.junit_xml:
        from tfreg_harness.junit import write_junit_xml

        properties = {f"version.{k}": v for k, v in environment["versions"].items()}
        properties |= {
            f"machine.{k}": json.dumps(v) if isinstance(v, dict) else v
            for k, v in environment["machine"].items()
        }
        write_junit_xml(
            report,
            args.junit_xml,
            suite="tfreg-parity",
            seconds=seconds,
            total_seconds=elapsed,
            properties=properties,
        )
    if args.plot:
        _plot(report, Path(args.plot))
    if args.record:
        from tfreg.parity.record import record_bundle

        n_cases = record_bundle(args.record)
        print(f"recorded {n_cases} TensorFlow cases to {args.record}")


def _plot(report: Report, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        path = report.plot(directory / "parity.png")
    except ValueError as exc:  # nothing plottable (every row skipped): the run's status says so
        print(f"--plot: {exc}", file=sys.stderr)
    else:
        print(f"plotted {path}")


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

    def __enter__(self) -> Callable[[str], None]:
        bar = self.bar
        if bar is None:
            return lambda _name: None
        bar.start()
        task = bar.add_task("parity checks", total=self.total)
        return lambda name: bar.update(task, advance=1, description=name[:48])

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
