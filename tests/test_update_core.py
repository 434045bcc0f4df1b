"""The framework-free rules of closing a window (tfreg_core.update), on NumPy with hand-computed
numbers; the trainers of both twins run these same functions (their suites check them against
plain Keras fit and plain torch loops)."""

from __future__ import annotations

import numpy as np
import pytest

from tfreg_core.update import FLOAT_OPS, Term, clip, close_window, window_record


def _close(sums, counts, micro_batches=2, **kwargs):
    return close_window(
        sums,
        counts,
        FLOAT_OPS,
        summed=kwargs.pop("summed", [False] * len(counts)),
        micro_batches=micro_batches,
        **kwargs,
    )


def test_each_term_is_divided_by_its_own_count_and_an_all_masked_term_adds_zero():
    # term 0: sums [6, 3] over N=3 -> [2, 1]; term 1: every element masked (N=0, sums 0)
    grads, finite = _close([[np.array([6.0, 3.0])], [np.array([0.0, 0.0])]], [3.0, 0.0])
    np.testing.assert_array_equal(grads[0], [2.0, 1.0])
    assert finite


def test_a_summed_term_is_its_sum_and_the_penalty_is_added_once():
    grads, _ = _close(
        [[np.array([6.0])], [np.array([1.5])]],
        [3.0, 5.0],
        summed=[False, True],
        penalty_grads=[np.array([0.25])],
    )
    np.testing.assert_array_equal(grads[0], [6.0 / 3 + 1.5 + 0.25])


def test_a_non_finite_sum_stays_non_finite_even_when_nothing_counted():
    # Keras' gradient through divide_no_nan with N = 0 is 0 * NaN = NaN: skipped, not zeroed.
    _, finite = _close([[np.array([np.nan])]], [0.0])
    assert not finite


def test_a_window_without_micro_batches_is_never_applied():
    _, finite = _close([[np.array([0.0])]], [0.0], micro_batches=0)
    assert not finite


def test_an_unreached_parameter_stays_none_and_is_left_out_of_the_norm():
    # Global norm over the reached ones only: ||(3, 4)|| = 5, clipped to 1 -> (0.6, 0.8).
    grads, finite = _close([[np.array([3.0]), None, np.array([4.0])]], [1.0], global_clipnorm=1.0)
    assert grads[1] is None
    np.testing.assert_allclose(grads[0], [0.6], rtol=1e-15)  # float64: one rounding
    np.testing.assert_allclose(grads[2], [0.8], rtol=1e-15)
    assert finite


def test_a_penalty_reaching_an_unreached_parameter_gives_it_the_penalty_gradient():
    grads, _ = _close([[np.array([2.0]), None]], [2.0], penalty_grads=[None, np.array([0.5])])
    np.testing.assert_array_equal(grads[0], [1.0])
    np.testing.assert_array_equal(grads[1], [0.5])


@pytest.mark.parametrize(
    ("g", "expected"),
    [([3.0, 4.0], [0.6, 0.8]), ([0.3, 0.4], [0.3, 0.4]), ([0.0, 0.0], [0.0, 0.0])],
)
def test_clipnorm_is_kerass_per_tensor_formula(g, expected):
    # g * c / max(||g||, c) with c = 1: scaled to norm 1 above it, unchanged below, 0 stays 0.
    (clipped,) = clip([np.array(g)], FLOAT_OPS, clipnorm=1.0)
    np.testing.assert_allclose(clipped, expected, rtol=1e-15)


def test_an_overflowing_global_norm_makes_the_window_non_finite():
    # ||G||^2 overflows float32: Keras' scale + (norm - norm) is NaN, the window is skipped.
    big = np.array([3e38], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        _, finite = _close([[big, big]], [np.float32(1.0)], global_clipnorm=1.0)
    assert not finite


def test_unscale_divides_with_the_count():
    # torchref's loss scaling: sums hold 8x the gradient of sum(l) over N=4 -> 32 / 32.
    grads, _ = _close([[np.array([32.0])]], [4.0], unscale=8.0)
    np.testing.assert_array_equal(grads[0], [1.0])


def test_the_record_uses_the_same_counts():
    terms = [Term("a", 0.5), Term("b", 2.0, summed=True), Term("c", 1.0)]
    record = window_record(
        terms,
        loss_sums=[6.0, 1.5, 0.0],
        counts=[3.0, 4.0, 0.0],
        penalty=0.25,
        ops=FLOAT_OPS,
        metrics={"accuracy": 3.0},
        weight_sum=4.0,
    )
    # a: 6/3 = 2, weighted 1; b: summed 1.5, weighted 3; c: nothing counted, 0.
    assert record == {
        "loss": 4.25,
        "data_loss": 4.0,
        "penalty": 0.25,
        "elements": 7.0,
        "a_loss": 2.0,
        "b_loss": 1.5,
        "c_loss": 0.0,
        "accuracy": 0.75,
    }
