"""Framework-free report outputs for CI: JUnit XML, plots, tolerance overrides, NumPy test data."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from tfreg_harness.data import digit_like_images
from tfreg_harness.junit import junit_xml
from tfreg_harness.plot import step_gaps
from tfreg_harness.report import Report, Row
from tfreg_harness.tolerances import tolerance, tolerance_overrides

_ROWS = [
    Row("logits", "float64", "cpu", "pass", 1e-15, 2e-15, 1e-10),
    Row("grad dense/kernel", "float64", "cpu", "fail", 3e-3, 0.5, 1e-10, "failed: grad"),
    Row("model CNN", "float32", "gpu", "skip", detail="no GPU visible to both frameworks"),
    Row("model LSTM", "float32", "cpu", "error", detail="RuntimeError: boom"),
    Row("step 1 dense/kernel", "float64", "cpu", "pass", 1e-14, 1e-13, 1e-9),
    Row("step 1 dense/bias", "float64", "cpu", "pass", 0.0, 0.0, 1e-9),
    Row("step 2 dense/kernel", "float64", "cpu", "pass", 1e-13, 4e-13, 1e-9),
]


def test_junit_xml_parses_with_one_testcase_per_row_and_the_right_counts() -> None:
    text = junit_xml(
        Report(list(_ROWS)),
        suite="tfreg-parity",
        seconds=[0.5, 0.25, 0.0, 1.0, 0.0, 0.0, 0.0],
        properties={"version.tensorflow": "2.21.0"},
    )
    suite = ET.fromstring(text).find("testsuite")
    assert suite is not None
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": "7",
        "failures": "1",
        "errors": "1",
        "skipped": "1",
    }
    assert float(suite.get("time")) == pytest.approx(1.75)
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [r.check for r in _ROWS]
    assert cases[1].get("classname") == "tfreg-parity.cpu.float64"
    failure = cases[1].find("failure")
    assert failure is not None and "max rel 5.00e-01" in failure.get("message")
    assert "tolerance 1.00e-10" in failure.get("message") and "failed: grad" in failure.text
    assert cases[2].find("skipped").get("message") == "no GPU visible to both frameworks"
    assert cases[3].find("error").get("message") == "RuntimeError: boom"
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None
    prop = suite.find("properties/property")
    assert (prop.get("name"), prop.get("value")) == ("version.tensorflow", "2.21.0")
    with pytest.raises(ValueError, match="one entry per row"):
        junit_xml(Report(list(_ROWS)), suite="s", seconds=[1.0])


def test_step_gaps_take_the_largest_gap_per_step() -> None:
    assert step_gaps(Report(list(_ROWS))) == {1: (1e-13, 1e-9), 2: (4e-13, 1e-9)}


def test_report_plot_writes_a_png_and_refuses_an_empty_report(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    rows = [*_ROWS, Row("exact", "float64", "cpu", "fail", 1.0, math.inf, 0.0)]
    path = Report(rows).plot(tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="Nothing to plot"):
        Report([_ROWS[2]]).plot(tmp_path / "empty.png")


def test_report_text_of_an_empty_report_is_the_header() -> None:
    assert Report().to_text().splitlines()[0].startswith("check")


def test_tolerance_overrides_apply_inside_the_block_only_and_nest() -> None:
    base = tolerance("model_cross", "float32").rtol
    with tolerance_overrides({"model_cross/float32": 2e-5}, why="team policy"):
        assert tolerance("model_cross", "float32").rtol == 2e-5
        assert tolerance("model_cross", "float32").why == "team policy"
        assert tolerance("model_cross", "float64").rtol == 1e-10  # the other dtype untouched
        with tolerance_overrides({"model_cross": 3e-7}, why="inner"):
            assert tolerance("model_cross", "float64").rtol == 3e-7
            assert tolerance("model_cross", "float32").rtol == 3e-7
        assert tolerance("model_cross", "float32").rtol == 2e-5
    assert tolerance("model_cross", "float32").rtol == base


@pytest.mark.parametrize(
    ("rtol", "match"),
    [
        ({"gradients": 1e-6}, "No tolerance to override for 'gradients'"),
        ({"model_cross/float16": 1e-6}, "No tolerance to override"),
        ({"model_cross": -1.0}, "finite number >= 0"),
        ({"model_cross": float("nan")}, "finite number >= 0"),
        ({"model_cross": "1e-6"}, "finite number >= 0"),
    ],
)
def test_tolerance_overrides_refuse_unknown_claims_and_bad_values(rtol, match) -> None:
    with pytest.raises(ValueError, match=match), tolerance_overrides(rtol, why="x"):
        pass


def test_digit_like_images_are_k_over_16_in_both_dtypes_and_seeded() -> None:
    x32, y32 = digit_like_images(12, dtype="float32", seed=3)
    x64, y64 = digit_like_images(12, dtype="float64", seed=3)
    assert x32.shape == (12, 8, 8) and x32.dtype == np.float32 and x64.dtype == np.float64
    np.testing.assert_array_equal(x32.astype(np.float64), x64)  # k/16 is exact in float32
    np.testing.assert_array_equal(y32, y64)
    assert set(np.unique(x64 * 16)) <= set(range(17)) and set(np.unique(y64)) <= set(range(10))
    with pytest.raises(ValueError, match="n must be a positive int"):
        digit_like_images(0, dtype="float32")
