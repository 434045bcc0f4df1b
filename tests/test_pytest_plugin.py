"""The pytest plugin (``tfreg_harness.keras_side.pytest_plugin``): the ``parity`` fixture, tolerance
overrides from ini / marker / call, device refusal, and an import that loads no framework.

Inner sessions run in-process (pytester) with the plugin loaded by ``-p`` and the installed entry
point blocked, so the tests behave the same whether or not this checkout is pip-installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

_ROOT = Path(__file__).resolve().parents[1]
_PLUGIN = ["-p", "no:tfreg_parity", "-p", "tfreg_harness.keras_side.pytest_plugin"]

# The pair's rows are float64 model_cross comparisons (table: 1e-10) and, with steps, float64
# trajectory ones (table: 1e-9); each test below sets distinct values to see which one applied.
_TESTS = """
import pytest
from parity_pair_example import make_broken_pair, make_pair

def _after_steps(row):  # the trajectory claim: weights after each step, eval after the steps
    return row.check.startswith("step") or row.check.endswith("after steps")

def _tolerances(report):
    return {r.tolerance for r in report.rows if not _after_steps(r)}

def test_correct_pair(parity):
    report = parity.check(**make_pair())
    assert _tolerances(report) == {EXPECTED}

@pytest.mark.parity_rtol({"model_cross/float64": 2e-10})
def test_marker_beats_ini(parity):
    assert _tolerances(parity.check(**make_pair())) == {2e-10}

@pytest.mark.parity_rtol(model_cross=2e-10)
def test_call_beats_marker(parity):
    report = parity.check(**make_pair(), rtol={"model_cross": 3e-10, "trajectory/float64": 4e-9})
    assert _tolerances(report) == {3e-10}
    assert {r.tolerance for r in report.rows if _after_steps(r)} == {4e-9}

def test_broken_pair(parity):
    parity.check(*make_broken_pair())
"""


@pytest.fixture(scope="module")
def _frameworks_loaded() -> None:
    # pytester's in-process sessions drop the modules they imported when they end, and
    # TensorFlow and torch (with the submodules an optimizer step imports lazily) cannot be
    # imported twice in one process: check the pair once out here so they stay loaded.
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from parity_pair_example import make_pair

        from tfreg.parity import check_parity

        check_parity(**make_pair())
    finally:
        sys.path.remove(str(Path(__file__).parent))


@pytest.fixture
def inner(pytester: pytest.Pytester, _frameworks_loaded: None) -> pytest.Pytester:
    pytester.syspathinsert(Path(__file__).parent)  # parity_pair_example
    return pytester


def test_fixture_checks_pairs_with_overrides_from_ini_marker_and_call(inner) -> None:
    inner.makeini("[pytest]\nparity_rtol =\n    model_cross/float64=5e-11\n")
    inner.makepyfile(test_pairs=_TESTS.replace("EXPECTED", "5e-11"))
    result = inner.runpytest(*_PLUGIN, "-q")
    result.assert_outcomes(passed=3, failed=1)
    # The broken pair fails at pairing (relu vs tanh is a configuration mismatch), with the table.
    result.stdout.fnmatch_lines(
        ["*test_broken_pair*", "*parity failed for layer pairing*relu vs torch tanh*"]
    )


def test_without_overrides_the_table_applies(inner) -> None:
    inner.makepyfile(test_pairs=_TESTS.replace("EXPECTED", "1e-10"))
    inner.runpytest(*_PLUGIN, "-q", "-k", "correct_pair").assert_outcomes(passed=1)


def test_bad_ini_policy_stops_the_session(inner) -> None:
    inner.makeini("[pytest]\nparity_rtol =\n    gradients=1e-6\n")
    inner.makepyfile(test_x="def test_x():\n    pass\n")
    result = inner.runpytest(*_PLUGIN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*parity_rtol*No tolerance to override for 'gradients'*"])


def test_missing_gpu_fails_the_test(inner, monkeypatch) -> None:
    from tfreg_harness.keras_side import devices

    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu"])  # whatever this has
    inner.makepyfile(test_gpu=_TESTS)
    result = inner.runpytest(*_PLUGIN, "--parity-device", "gpu", "-k", "correct_pair")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*device 'gpu' requested, but no GPU is visible*"])


def test_entry_point_names_the_plugin_module() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((_ROOT / "pyproject.toml").read_text())
    entry_points = project["project"]["entry-points"]["pytest11"]
    assert entry_points == {"tfreg_parity": "tfreg_harness.keras_side.pytest_plugin"}
    assert "matplotlib>=3.7" in project["project"]["optional-dependencies"]["plot"]


def test_loading_the_plugin_imports_no_framework() -> None:
    # Every pytest session of an environment with tfreg installed loads the plugin: it must not
    # cost a TensorFlow import (seconds) or fail where one framework is absent.
    # The old module name (environments installed before the move name it) is the same module.
    code = (
        "import sys, tfreg_harness.keras_side.pytest_plugin as new, tfreg_harness.pytest_plugin; "
        "assert sys.modules['tfreg_harness.pytest_plugin'] is new; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'torch', 'tfreg') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip() == "[]"
