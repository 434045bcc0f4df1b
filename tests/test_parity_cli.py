"""The tfreg-parity command: table, exit codes, JSON/Markdown outputs, skips listed with reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tfreg_harness.compare import compare
from tfreg_harness.keras_side import cli, devices
from tfreg_harness.keras_side.checks import GROUPS, Check, SkipCheck, registered_groups, run_one
from tfreg_harness.report import Report, Row


@pytest.fixture(autouse=True, scope="module")
def _builtin_checks_registered() -> None:
    """Register the built-in checks before any test swaps ``checks.CHECKS`` for a copy: else the
    first registration lands in the copy and is lost when it is restored (test-order fragility)."""
    registered_groups()


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
    from tfreg_harness.keras_side import checks

    failing = Check("always off", "broken", lambda d, dev: [compare("x", [2.0], [1.0], rtol=0)])
    monkeypatch.setattr(checks, "CHECKS", [*checks.CHECKS, failing])
    assert cli.main(["--group", "broken", "--dtype", "float64"]) == 1
    assert "always off" in capsys.readouterr().out


def test_cli_help_and_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as shown:
        cli.main(["--help"])
    assert shown.value.code == 0
    help_text = capsys.readouterr().out
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
    from tfreg_harness.keras_side import checks

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
    from tfreg_harness.keras_side import checks

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


_BROKEN_MODULES = {
    "pair_with_syntax_error": "def make_pair(:\n",
    "pair_raising_at_import": "raise RuntimeError('license server unreachable')\n",
    "pair_exiting_at_import": "import sys\nsys.exit(3)\n",
}


@pytest.fixture
def pair_modules(tmp_path, monkeypatch) -> Path:
    """tests/parity_pair_example.py and a few broken pair modules, importable."""
    for name, text in _BROKEN_MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("parity_pair_example", "--model must look like pkg.module:function"),
        ("no_such_module_here:make_pair", "cannot import 'no_such_module_here'"),
        ("parity_pair_example:missing", "has no callable 'missing'"),
        ("parity_pair_example:make_three_things", "tuple of 3 items"),
        ("pair_with_syntax_error:make_pair", "cannot import 'pair_with_syntax_error': SyntaxError"),
        ("pair_raising_at_import:make_pair", "RuntimeError: license server unreachable"),
        ("pair_exiting_at_import:make_pair", "cannot import 'pair_exiting_at_import': SystemExit"),
    ],
)
def test_model_spec_problems_are_exit_2_with_one_line(pair_modules, capsys, spec, message) -> None:
    assert cli.main(["--model", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfreg-parity: error: --model") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_a_make_pair_that_exits_is_nothing_ran_exit_1(pair_modules, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    assert cli.main(["--model", "parity_pair_example:make_exiting_pair", "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "called sys.exit(0); nothing ran" in err
    assert not out.exists()


def test_an_all_nan_pair_fails(pair_modules, capsys) -> None:
    # A correct port fed NaN inputs: NaN on both sides is no agreement (it read "9 passed").
    assert cli.main(["--model", "parity_pair_example:make_nan_pair"]) == 1
    out = capsys.readouterr().out
    assert "0 passed" in out and "logits" in out


def test_a_looping_make_pair_is_stopped_by_timeout(pair_modules, capsys) -> None:
    started = time.perf_counter()
    argv = ["--model", "parity_pair_example:make_looping_pair", "--timeout", "1"]
    assert cli.main(argv) == 1
    assert time.perf_counter() - started < 30
    assert "did not finish within 1 s (--timeout)" in capsys.readouterr().err


def test_sigint_exits_130_without_traceback_or_files(pair_modules, tmp_path, capsys) -> None:
    outputs = [tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.npz"]
    argv = ["--model", "parity_pair_example:make_interrupted_pair", "--json", str(outputs[0])]
    argv += ["--junit-xml", str(outputs[1])]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err == "tfreg-parity: interrupted\n"
    assert not any(p.exists() for p in outputs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.")]


def test_model_on_gpu_needs_a_make_pair_that_takes_the_device(monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu", "gpu"])
    argv = ["--model", "parity_pair_example:make_broken_pair", "--device", "gpu"]
    assert cli.main(argv) == 2
    assert "takes no `device`" in capsys.readouterr().err


# scikit-learn is in no extra the parity install names; this wrapper makes it unimportable.
_WITHOUT_SKLEARN = (
    "import sys; sys.modules['sklearn'] = None; from tfreg_harness.keras_side.cli import main; "
)


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


@pytest.mark.parametrize(
    ("option", "target", "message"),
    [
        ("--json", "", "--json: an empty path"),
        ("--junit-xml", "no/such/folder/r.xml", "does not exist"),
        ("--record", "/proc/r.npz", "cannot write in"),
        ("--markdown", ".", "is a directory"),
        ("--plot", "r.json/plots", "does not exist"),
    ],
)
def test_unwritable_outputs_are_exit_2_before_the_run(
    monkeypatch, tmp_path, capsys, option, target, message
) -> None:
    from tfreg_harness.keras_side import checks

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text("{}")
    ran = []
    monkeypatch.setattr(checks, "run_one", lambda *a: ran.append(a))
    assert cli.main(["--group", "penalties", option, target]) == 2
    err = capsys.readouterr().err
    assert not ran and err.count("\n") == 1 and message in err, err


def test_json_exit_status_is_the_returned_one_when_a_late_write_fails(
    monkeypatch, tmp_path, capsys
) -> None:
    from tfreg_harness import junit
    from tfreg_harness.keras_side import checks

    exact = Check("exact", "late", lambda d, dev: [compare("x", [1.0], [1.0], rtol=0)])
    monkeypatch.setattr(checks, "CHECKS", [*checks.CHECKS, exact])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(junit, "write_junit_xml", disk_full)
    out, xml = tmp_path / "r.json", tmp_path / "r.xml"
    argv = ["--group", "late", "--dtype", "float64", "--json", str(out), "--junit-xml", str(xml)]
    assert cli.main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["exit_status"] == 2 and data["ok"] is False and data["counts"]["pass"] == 1


def test_record_with_model_needs_a_torch_factory() -> None:
    for argv in (
        ["--model", "m:f", "--record", "b.npz"],
        ["--torch-factory", "m:f"],
        ["--model", "m:f", "--torch-factory", "m:f"],
        ["--timeout", "0"],
        ["--timeout", "1e12"],  # before: OverflowError from setitimer, traceback, exit 1
    ):
        with pytest.raises(SystemExit) as usage:
            cli.main(argv)
        assert usage.value.code == 2


def test_help_documents_every_exit_status() -> None:
    text = cli.build_parser().format_help()
    assert all(f"\n  {code}" in text for code in ("0 ", "1 ", "2 ", "130"))
    assert "--timeout" in text and "--torch-factory" in text


# torchref.verify on a machine without TensorFlow: the child cannot import it.
_WITHOUT_TF = (
    "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None; "
    "from tfreg_harness.torch_side.verify import main; sys.exit(main(sys.argv[1:]))"
)


def test_record_of_a_users_pair_is_verified_without_tensorflow(
    pair_modules, tmp_path, capsys
) -> None:
    """tfreg-parity --model --record records the team's pair (not the built-ins), and
    torchref.verify -- TensorFlow unimportable -- rebuilds their torch module and checks it."""
    bundle = tmp_path / "pair.npz"
    argv = ["--model", "parity_pair_example:make_pair", "--record", str(bundle)]
    assert cli.main([*argv, "--torch-factory", "parity_pair_example:make_torch"]) == 0
    from tfreg_harness.bundle import load_bundle

    (case,), _ = load_bundle(bundle)
    assert (case.kind, case.name) == ("pair", "model parity_pair_example:make_pair")
    # weights, two steps of weights, input, outputs, loss, gradients of the 4 parameters
    assert {k.split("/")[0] for k in case.arrays} == {
        "state", "grad", "step1", "step2", "x", "y", "logits", "loss"
    }  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}

    good = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TF, str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    assert "1 passed, 0 failed" in good.stdout and "model parity_pair_example" in good.stdout
    # The same bundle naming a wrong port (tanh) fails: verify ran THEIR module.
    from tfreg_harness.bundle import save_bundle
    from tfreg_harness.torch_side.verify import main as verify_main

    case.params = case.params | {"torch_factory": "parity_pair_example:make_torch_tanh", "steps": 0}
    case.arrays = {k: v for k, v in case.arrays.items() if not k.startswith("step")}
    save_bundle(tmp_path / "tanh.npz", [case], {})
    capsys.readouterr()
    assert verify_main([str(tmp_path / "tanh.npz")]) == 1  # in-process: TF's presence is moot
    assert "fail: logits" in capsys.readouterr().out


def test_record_refuses_an_unimportable_torch_factory(pair_modules, tmp_path, capsys):
    argv = ["--model", "parity_pair_example:make_pair", "--record", str(tmp_path / "b.npz")]
    argv += ["--torch-factory", "no_such_module:make_torch"]
    assert cli.main(argv) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
    assert not (tmp_path / "b.npz").exists()


def test_a_pair_that_fails_here_is_not_recorded(pair_modules, tmp_path, capsys) -> None:
    bundle = tmp_path / "b.npz"
    argv = ["--model", "parity_pair_example:make_broken_pair", "--record", str(bundle)]
    assert cli.main([*argv, "--torch-factory", "parity_pair_example:make_torch_tanh"]) == 1
    assert "not recorded" in capsys.readouterr().out and not bundle.exists()


def test_plot_without_matplotlib_is_a_usage_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as usage:
        cli.main(["--group", "penalties", "--plot", str(tmp_path)])
    assert usage.value.code == 2
