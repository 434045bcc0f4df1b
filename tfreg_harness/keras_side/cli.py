"""``tfreg-parity`` / ``python -m tfreg.parity``: run the TensorFlow-vs-PyTorch parity matrix.

Exit status (what a CI job keys on):

- 0: every check that ran passed, and at least one ran;
- 1: a check failed or errored, a requested device is missing (``--device gpu`` on a machine
  without a GPU visible to both frameworks, unless ``--allow-missing-device``), nothing ran
  (a run that checks nothing is not a pass; a ``make_pair`` that calls ``sys.exit()``), or the
  run exceeded ``--timeout``;
- 2: usage error or unusable input, one line on stderr (unknown ``--group``, a ``--model`` that
  cannot be imported -- SyntaxError, an exception at import -- or breaks the pair contract,
  ``--plot`` without matplotlib, an output path that cannot be written, found before the run);
- 130: interrupted (SIGINT); no output file is left half-written (every file is written to a
  temporary name and renamed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tfreg_harness.deadline import DEFAULT_TIMEOUT_S, timeout_seconds
from tfreg_harness.exits import guarded, unusable
from tfreg_harness.keras_side.checks import GROUPS
from tfreg_harness.outputs import (
    REPORT_OUTPUTS,
    OutputPathError,
    add_report_outputs,
    check_output_paths,
    write_text_atomic,
)
from tfreg_harness.report import Report, Row

PROG = "tfreg-parity"
# (option, attribute) of every file the run writes; --plot names a folder.
OUTPUTS = (*REPORT_OUTPUTS, ("--plot", "plot"), ("--record", "record"))

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
  tfreg-parity --model tests.parity_pairs:make_pair   your own pair (see keras_side/user_pair.py)

  tfreg-parity --model tests.parity_pairs:make_pair --record pair.npz \
      --torch-factory tests.parity_pairs:make_torch   record your pair for torchref.verify

exit status:
  0    every check that ran passed, and at least one ran
  1    a check failed or errored; --device gpu without a GPU (unless --allow-missing-device);
       nothing ran (no check, make_pair called sys.exit); the run exceeded --timeout
  2    usage error or unusable input, one line: unknown group, --model not importable
       (SyntaxError, exception at import) or malformed, an output path that cannot be
       written (checked before the run)
  130  interrupted (Ctrl-C); no output file is left half-written
"""
)

_MISSING_DEVICE = "no GPU visible to both frameworks"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
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
    add_report_outputs(parser, testcase="row")
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
        "on a machine without TensorFlow (e.g. a torch-only GPU image); with --model, your "
        "pair's (needs --torch-factory), else the built-in cases",
    )
    parser.add_argument(
        "--torch-factory",
        metavar="MODULE:FUNCTION",
        help="with --model and --record: the torch-only function of your code base that builds "
        "the torch module (FUNCTION() returns it, or {'torch_module': ..., 'torch_optimizer': "
        "...} when make_pair has steps); torchref.verify imports it to rebuild your module",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="stop a run (a --model factory or a check that hangs) after SECONDS: exit 1 "
        "(default %(default)g)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) found before anything runs."""
    if args.model and (args.group or args.full or args.quick):
        parser.error("--model runs your pair only; it takes no --group/--quick/--full")
    if args.model and args.dtype != "all":
        parser.error("--model: the dtype is your model's; --dtype does not apply")
    if args.model and args.record is not None and not args.torch_factory:
        parser.error(
            "--record with --model needs --torch-factory MODULE:FUNCTION: the torch-only "
            "function that builds your module, so torchref.verify can rebuild and check it"
        )
    if args.torch_factory and not (args.model and args.record is not None):
        parser.error("--torch-factory applies to --model with --record only")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error('--plot needs matplotlib: pip install "tfreg[plot]"')


def _error(message: str) -> int:
    return unusable(PROG, message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _check_arguments(parser, args)
    try:
        check_output_paths(args, OUTPUTS, folders=("--plot",))
    except OutputPathError as exc:
        return _error(str(exc))
    what = PROG if not args.model else f"{PROG} --model {args.model}"
    return guarded(PROG, lambda: _finish(args, _run(args)), timeout=args.timeout, what=what)


def _run(args: argparse.Namespace) -> int | tuple[Report, list[float | None], float, str]:
    """Run the checks (and the recording): the report, per-row seconds, total seconds and what
    was recorded -- or an exit status when the run cannot produce a report."""
    from tfreg._compat import tf

    # Each check builds fresh trainers, whose first traces TF would report as "retracing".
    tf.get_logger().setLevel("ERROR")
    from tfreg_harness.keras_side.devices import available_devices

    devices = ["cpu", "gpu"] if args.device == "all" else [args.device]
    # --device all asks for the GPU where there is one; --device gpu asks for it outright.
    optional = args.device == "all" or args.allow_missing_device
    missing = [d for d in devices if d not in available_devices()]
    started = time.perf_counter()
    report = Report()
    seconds: list[float | None] = []
    if args.model:
        from tfreg_harness.keras_side.user_pair import (
            PairFactoryExited,
            PairSpecError,
            check_user_pair,
        )

        try:
            report = check_user_pair(args.model, devices=[d for d in devices if d not in missing])
        except PairSpecError as exc:
            return _error(str(exc))
        except PairFactoryExited as exc:
            print(f"{PROG}: {exc}: a run that checks nothing is not a pass", file=sys.stderr)
            return 1
        seconds = [None] * len(report.rows)
        for device in missing:
            report.extend([_missing_row(f"model {args.model}", "-", device, optional)])
            seconds.append(0.0)
    else:
        from tfreg_harness.keras_side.checks import run_one, selected

        try:
            checks = selected(full=args.full, groups=args.group)
        except ValueError as exc:
            build_parser().error(f"--group: {exc}")
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
    recorded = ""
    if args.record is not None:
        status, _ = _verdict(report, missing_allowed=optional)
        if args.model and status != 0:
            recorded = f"not recorded to {args.record}: the pair did not pass here"
        elif args.model:
            from tfreg_harness.keras_side.record import record_user_pair
            from tfreg_harness.keras_side.user_pair import PairSpecError

            try:
                record_user_pair(args.record, args.model, args.torch_factory)
            except PairSpecError as exc:
                return _error(str(exc))
            recorded = f"recorded your pair ({args.model}) to {args.record}"
        else:
            from tfreg_harness.keras_side.record import record_bundle

            n_cases = record_bundle(args.record)
            recorded = f"recorded {n_cases} TensorFlow cases to {args.record}"
    args.optional = optional
    return report, seconds, time.perf_counter() - started, recorded


def _finish(
    args: argparse.Namespace, outcome: int | tuple[Report, list[float | None], float, str]
) -> int:
    """Print the report and write the outputs (an ``int`` outcome: the run's exit status)."""
    if isinstance(outcome, int):
        return outcome
    report, seconds, elapsed, recorded = outcome
    status, verdict = _verdict(report, missing_allowed=args.optional)
    print(report.to_text())
    counts = report.counts()
    print(
        f"\n{counts['pass']} passed, {counts['fail'] + counts['error']} failed, "
        f"{counts['skip']} skipped in {elapsed:.1f}s"
    )
    if recorded:
        print(recorded)
    if verdict:
        print(verdict, file=sys.stderr)
    try:
        _write_outputs(args, report, seconds, elapsed)
    except OSError as exc:  # checked before the run; a disk that filled up since
        status = _error(f"cannot write an output: {exc}")
    if args.json is not None:
        # Last, so that its exit_status is the one this run returns.
        try:
            _write_json(args, report, seconds, elapsed, status)
        except OSError as exc:
            status = _error(f"--json {args.json}: {exc}")
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


def _environment() -> dict[str, Any]:
    from tfreg_harness.keras_side.environment import machine, versions

    return {"versions": versions(), "machine": machine()}


def _write_json(
    args: argparse.Namespace,
    report: Report,
    seconds: list[float | None],
    elapsed: float,
    status: int,
) -> None:
    data = report.as_dict()
    for row, took in zip(data["rows"], seconds, strict=True):
        row["seconds"] = None if took is None else round(took, 4)
    data |= {
        "ok": status == 0,
        "exit_status": status,
        "command": [PROG, *args.argv],
        "model": args.model,
        **_environment(),
        "timings": {
            "total_s": round(elapsed, 4),
            "checks_s": round(sum(t for t in seconds if t is not None), 4),
        },
    }
    write_text_atomic(args.json, json.dumps(data, indent=2) + "\n")


def _write_outputs(
    args: argparse.Namespace,
    report: Report,
    seconds: list[float | None],
    elapsed: float,
) -> None:
    """Markdown, JUnit XML and the plot, each written atomically (the JSON comes last)."""
    if args.markdown is not None:
        report.write_markdown(args.markdown)
    if args.junit_xml is not None:
        from tfreg_harness.junit import write_junit_xml

        environment = _environment()
        properties = {f"version.{k}": v for k, v in environment["versions"].items()}
        properties |= {
            f"machine.{k}": json.dumps(v) if isinstance(v, dict) else v
            for k, v in environment["machine"].items()
        }
        write_junit_xml(
            report,
            args.junit_xml,
            suite=PROG,
            seconds=seconds,
            total_seconds=elapsed,
            properties=properties,
        )
    if args.plot is not None:
        _plot(report, Path(args.plot))


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
