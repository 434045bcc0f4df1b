"""tfreg_harness.compare: norm-wise relative error, NaN handling, reporting of the worst index."""

from __future__ import annotations

import numpy as np
import pytest

from tfreg_core.validation import InvalidArgumentError
from tfreg_harness import assert_close, compare, tolerance


def test_reports_max_abs_rel_and_index() -> None:
    expected = np.array([[1.0, -4.0], [2.0, 0.5]])
    actual = expected.copy()
    actual[1, 0] += 1e-3
    result = compare("w", actual, expected, rtol=1e-6)
    assert result.max_abs == pytest.approx(1e-3, rel=1e-9)
    assert result.max_rel == pytest.approx(1e-3 / 4.0, rel=1e-9)  # norm-wise: scale = max|e| = 4
    assert result.index == (1, 0)
    assert not result.passed
    assert "FAIL" in str(result) and "(1, 0)" in str(result)


def test_norm_wise_relative_ignores_tiny_entries() -> None:
    # An entry that is zero up to round-off must not fail an otherwise exact comparison.
    expected = np.array([1.0, 1e-17])
    actual = np.array([1.0, 3e-17])
    assert compare("g", actual, expected, rtol=1e-12).passed


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        pytest.param([np.nan, 1.0], [np.nan, 1.0], id="same-nan"),
        pytest.param([np.nan, np.nan], [np.nan, np.nan], id="all-nan"),
        pytest.param([np.inf, 1.0], [np.inf, 1.0], id="same-inf"),
        pytest.param([np.nan, 1.0], [0.0, 1.0], id="nan-vs-number"),
        pytest.param([1.0, 2.0], [1.0, np.nan], id="number-vs-nan"),
        pytest.param([np.inf, 1.0], [-np.inf, 1.0], id="opposite-inf"),
    ],
)
def test_non_finite_values_never_match(actual, expected) -> None:
    # NaN == NaN is not agreement: two diverged runs say nothing about the port (issue 18).
    result = compare("x", np.array(actual), np.array(expected), rtol=1e-3, atol=1.0)
    assert not result.passed
    assert result.max_abs == np.inf and "FAIL" in str(result)
    first_bad = next(
        i for i, (a, e) in enumerate(zip(actual, expected, strict=True)) if not np.isfinite(a + e)
    )
    assert result.index == (first_bad,)


def test_shape_mismatch_is_an_error_naming_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2,\) vs expected \(3,\)"):
        compare("x", np.zeros(2), np.zeros(3), rtol=0)


def test_assert_close_raises_with_report() -> None:
    with pytest.raises(AssertionError, match=r"max abs 1\.000e-01"):
        assert_close("x", np.array([1.1]), np.array([1.0]), rtol=1e-6)


def test_tolerance_table_lookup_and_unknown_claim() -> None:
    assert tolerance("penalty_cross", "float64").rtol == 1e-12
    assert tolerance("penalty_vs_keras", "float32").rtol == 0.0
    with pytest.raises(
        InvalidArgumentError, match=r"claim='nope', dtype='float64'\. Known claims: \['accum"
    ):
        tolerance("nope", "float64")
    with pytest.raises(ValueError, match=r"claim='penalty_cross', dtype='float16'"):
        tolerance("penalty_cross", "float16")


def test_invalid_argument_error_is_both_value_and_type_error() -> None:
    assert issubclass(InvalidArgumentError, ValueError)
    assert issubclass(InvalidArgumentError, TypeError)


def test_compare_floored_is_absolute_near_zero_and_relative_elsewhere() -> None:
    from tfreg_harness.compare import compare_floored

    # expected within atol of 0: |1e-17 - 3e-17| = 2e-17 <= atol 1e-16 passes, named "== 0".
    near_zero = compare_floored("g", [3e-17], [1e-17], rtol=1e-12, atol=1e-16)
    assert near_zero.passed and near_zero.name == "g == 0" and near_zero.rtol == 0.0
    # elsewhere relative: 1 vs 1 + 1e-9 fails at 1e-12, and NaN never passes either way.
    assert not compare_floored("w", [1.0 + 1e-9], [1.0], rtol=1e-12, atol=1e-16).passed
    assert not compare_floored("w", [np.nan], [np.nan], rtol=1e-12, atol=1e-16).passed
