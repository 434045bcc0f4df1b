"""The tfreg-parity command: table, exit codes, JSON/Markdown outputs, skips listed with reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tfreg.parity import cli, devices
from tfreg.parity.checks import GROUPS, Check, SkipCheck, registered_groups, run_one
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
    assert all(group in help_text for group in GROUPS) and "--allow-missing-device" in help_text
    with pytest.raises(SystemExit) as usage_error:
        cli.main(["--device", "tpu"])
    assert usage_error.value.code == 2


def test_help_lists_exactly_the_registered_groups() -> None:
    assert sorted(GROUPS) == registered_groups()


def test_unknown_group_is_a_usage_error_naming_the_groups(capsys) -> None:
    with pytest.raises(SystemExit) as usage_error:
        cli.main(["--group", "nonexistent"])
    assert usage_error.value.code == 2
    err = capsys.readouterr().err
    assert "'nonexistent'" in err and all(group in err for group in GROUPS)


@pytest.fixture
def no_gpu(monkeypatch) -> None:
    """This machine as one without a GPU, whatever it has (the CLI asks devices at run time)."""
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu"])


def test_device_gpu_without_gpu_fails_unless_allowed(no_gpu, tmp_path, capsys) -> None:
    out = tmp_path / "gpu.json"
    args = ["--group", "penalties", "--dtype", "float64", "--device", "gpu", "--json", str(out)]
    assert cli.main(args) == 1
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["exit_status"] == 1
    assert data["counts"]["error"] == len(data["rows"]) > 0
    assert "--allow-missing-device" in data["rows"][0]["detail"]
    capsys.readouterr()
    # Allowed: the GPU rows are skips with their reason, and the run says nothing ran.
    assert cli.main([*args, "--allow-missing-device"]) == 0
    data = json.loads(out.read_text())
    assert data["ok"] is True and {r["status"] for r in data["rows"]} == {"skip"}
    assert "no check ran" in capsys.readouterr().err


def test_a_run_where_nothing_ran_is_not_green(monkeypatch, capsys) -> None:
    from tfreg.parity import checks

    only32 = Check(
        "f32 only", "f32", lambda d, dev: [compare("x", [1.0], [1.0], rtol=0)], dtypes=("float32",)
    )
    skipping = Check("skips", "skipping", lambda d, dev: (_ for _ in ()).throw(SkipCheck("n/a")))
    monkeypatch.setattr(checks, "CHECKS", [*checks.CHECKS, only32, skipping])
    assert cli.main(["--group", "f32", "--dtype", "float64"]) == 1  # no cell at all
    assert "no check ran" in capsys.readouterr().err
    assert cli.main(["--group", "skipping"]) == 1  # every cell skipped
    assert cli.main(["--group", "f32"]) == 0


def test_json_junit_and_plot_of_a_mixed_run(monkeypatch, tmp_path) -> None:
    from tfreg.parity import checks

    def crash(d, dev):
        raise RuntimeError("boom")

    mixed = [
        Check("exact", "mixed", lambda d, dev: [compare("x", [1.0], [1.0], rtol=1e-12)]),
        Check("off", "mixed", lambda d, dev: [compare("x", [2.0], [1.0], rtol=1e-6)]),
        Check("crash", "mixed", crash, dtypes=("float64",)),
    ]
    monkeypatch.setattr(checks, "CHECKS", [*checks.CHECKS, *mixed])
    out_json, out_xml, plots = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "plots"
    args = ["--group", "mixed", "--json", str(out_json), "--junit-xml", str(out_xml)]
    assert cli.main([*args, "--plot", str(plots)]) == 1
    data = json.loads(out_json.read_text())
    assert set(data["versions"]) == {"python", "numpy", "tensorflow", "keras", "torch", "tfreg"}
    assert data["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert data["machine"]["cpu"] and "tensorflow" in data["machine"]["devices"]
    assert data["timings"]["total_s"] >= data["timings"]["checks_s"] >= 0
    assert all(isinstance(r["seconds"], float) for r in data["rows"])
    assert data["command"] == ["tfreg-parity", *args, "--plot", str(plots)]
    suite = ET.parse(out_xml).getroot().find("testsuite")
    # 2 dtypes x (exact, off) + crash at float64 only.
    assert [suite.get(k) for k in ("tests", "failures", "errors", "skipped")] == [
        "5",
        "2",
        "1",
        "0",
    ]
    assert (plots / "parity.png").read_bytes()[:4] == b"\x89PNG"


def test_model_runs_a_users_pair_and_exits_by_its_result(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "m.json"
    assert cli.main(["--model", "parity_pair_example:make_pair", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = [r["check"] for r in data["rows"]]
    assert names[:2] == ["logits", "loss"] and any(n.startswith("step 2 ") for n in names)
    assert data["model"] == "parity_pair_example:make_pair" and data["ok"] is True
    assert cli.main(["--model", "parity_pair_example:make_broken_pair"]) == 1
    assert "fail" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("parity_pair_example", "must look like pkg.module:make_pair"),
        ("no_such_module_here:make_pair", "cannot import 'no_such_module_here'"),
        ("parity_pair_example:missing", "has no callable 'missing'"),
        ("parity_pair_example:make_three_things", "tuple of 3 items"),
    ],
)
def test_model_spec_problems_are_usage_errors(monkeypatch, capsys, spec, message) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    with pytest.raises(SystemExit) as usage_error:
        cli.main(["--model", spec])
    assert usage_error.value.code == 2
    assert message in capsys.readouterr().err


def test_model_on_gpu_needs_a_make_pair_that_takes_the_device(monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu", "gpu"])
    with pytest.raises(SystemExit) as usage_error:
        cli.main(["--model", "parity_pair_example:make_broken_pair", "--device", "gpu"])
    assert usage_error.value.code == 2 and "takes no `device`" in capsys.readouterr().err


# scikit-learn is in no extra the parity install names; this wrapper makes it unimportable.
_WITHOUT_SKLEARN = "import sys; sys.modules['sklearn'] = None; from tfreg.parity.cli import main; "


def test_harness_runs_without_scikit_learn(tmp_path) -> None:
    out = tmp_path / "m.json"
    argv = ["--group", "models", "--dtype", "float64", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_SKLEARN + f"sys.exit(main({argv!r}))"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "pass" for r in rows), rows
