"""The tfreg-parity command: table, exit codes, JSON/Markdown outputs, skips listed with reasons."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tfreg.parity import cli
from tfreg.parity.checks import Check, SkipCheck, run_one
from tfreg_harness.compare import compare
from tfreg_harness.report import Report, Row


def _check(fn) -> Check:
    return Check(name="demo", group="test", run=fn)


def test_run_one_pass_fail_skip_error_rows() -> None:
    exact = _check(lambda d, dev: [compare("x", [1.0], [1.0], rtol=0)])
    off = _check(lambda d, dev: [compare("x", [1.1], [1.0], rtol=1e-6)])

    def skip(d, dev):
        raise SkipCheck("needs a GPU")

    def crash(d, dev):
        raise RuntimeError("boom")

    assert run_one(exact, "float64", "cpu").status == "pass"
    failed = run_one(off, "float64", "cpu")
    assert failed.status == "fail" and failed.detail == "failed: x"
    assert failed.max_abs == pytest.approx(0.1)
    skipped = run_one(_check(skip), "float64", "cpu")
    assert (skipped.status, skipped.detail) == ("skip", "needs a GPU")
    errored = run_one(_check(crash), "float64", "cpu")
    assert (errored.status, errored.detail) == ("error", "RuntimeError: boom")
    assert run_one(_check(lambda d, dev: []), "float64", "cpu").status == "error"


def test_report_ok_counts_and_renderings(tmp_path) -> None:
    report = Report(
        [
            Row("a", "float64", "cpu", "pass", 0.0, 0.0, 1e-12),
            Row("b", "float32", "gpu", "skip", detail="no GPU visible to both frameworks"),
        ]
    )
    assert report.ok and report.counts() == {"pass": 1, "fail": 0, "skip": 1, "error": 0}
    md = report.to_markdown()
    assert "| a | float64 | cpu | 0 | 0 | 1.00e-12 | pass |" in md
    assert "SKIP (no GPU visible to both frameworks)" in md
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ok"] is True and data["rows"][1]["status"] == "skip"
    report.extend([Row("c", "float64", "cpu", "fail", 1.0, 1.0, 1e-12)])
    assert not report.ok


def test_cli_penalties_quick_writes_outputs_and_exits_zero(tmp_path, capsys) -> None:
    out_json, out_md = tmp_path / "p.json", tmp_path / "p.md"
    code = cli.main(
        [
            "--group",
            "penalties",
            "--device",
            "all",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads(out_json.read_text())
    statuses = {r["status"] for r in data["rows"]}
    assert statuses <= {"pass", "skip"}
    # GPU rows are listed as skipped with their reason, not dropped (this machine has no GPU).
    gpu_rows = [r for r in data["rows"] if r["device"] == "gpu"]
    assert gpu_rows and all(r["status"] in ("skip", "pass") for r in gpu_rows)
    assert "tfreg vs keras" in out_md.read_text()
    assert "passed" in printed


def test_cli_exit_code_is_one_when_a_check_fails(monkeypatch, capsys) -> None:
    from tfreg.parity import checks

    failing = Check("always off", "broken", lambda d, dev: [compare("x", [2.0], [1.0], rtol=0)])
    monkeypatch.setattr(checks, "CHECKS", [*checks.CHECKS, failing])
    assert cli.main(["--group", "broken", "--dtype", "float64"]) == 1
    assert "always off" in capsys.readouterr().out


def test_cli_help_and_usage_errors() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "tfreg.parity", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--quick" in help_text and "exit status" in help_text
    with pytest.raises(SystemExit) as usage_error:
        cli.main(["--device", "tpu"])
    assert usage_error.value.code == 2
