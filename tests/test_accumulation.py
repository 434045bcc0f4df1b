"""The functional accumulator core (``init`` / ``add`` / ``result`` / ``reset``), both frameworks.

Expected values are hand-computed or come from NumPy's closed-form least-squares gradient, never
from the implementation under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch

import tfreg
import torchref
from tfreg_harness import assert_close, tolerance

EXACT = tolerance("accumulation", "float64")


def test_tf_hand_computed_window() -> None:
    v = tf.Variable(tf.zeros(2, tf.float64))
    state = tfreg.accumulation.init([v])
    tfreg.accumulation.add(state, [tf.constant([1.0, 2.0], tf.float64)], 2)
    tfreg.accumulation.add(state, [tf.constant([3.0, 4.0], tf.float64)], 1)
    # (1 + 3) / 3 and (2 + 4) / 3: sums over 3 examples, not the mean of two means (1.75, 2.0...)
    np.testing.assert_array_equal(tfreg.accumulation.result(state)[0].numpy(), [4 / 3, 2.0])
    assert int(state.micro_batches.numpy()) == 2
    tfreg.accumulation.reset(state)
    assert float(state.count.numpy()) == 0.0
    assert np.isnan(tfreg.accumulation.result(state)[0].numpy()).all()  # 0/0: never a silent step
    # Micro-batches whose every element was masked (count 0): their zero sums, the trainers'
    # rule (tfreg_core.update; Keras' divide_no_nan on such a batch). Was NaN (0/0).
    tfreg.accumulation.add(state, [tf.constant([0.0, 0.0], tf.float64)], 0)
    np.testing.assert_array_equal(tfreg.accumulation.result(state)[0].numpy(), [0.0, 0.0])


def test_torch_hand_computed_window() -> None:
    p = torch.zeros(2, dtype=torch.float64)
    state = torchref.accumulation.init([p])
    torchref.accumulation.add(state, [torch.tensor([1.0, 2.0], dtype=torch.float64)], 2)
    torchref.accumulation.add(state, [torch.tensor([3.0, 4.0], dtype=torch.float64)], 1)
    np.testing.assert_array_equal(torchref.accumulation.result(state)[0].numpy(), [4 / 3, 2.0])
    assert state.micro_batches == 2
    torchref.accumulation.reset(state)
    assert state.micro_batches == 0
    assert torch.isnan(torchref.accumulation.result(state)[0]).all()
    # All masked (count 0) after a micro-batch: its zero sums, as in tfreg. Was NaN (0/0).
    torchref.accumulation.add(state, [torch.zeros(2, dtype=torch.float64)], 0)
    np.testing.assert_array_equal(torchref.accumulation.result(state)[0].numpy(), [0.0, 0.0])


def _least_squares(rng: np.random.Generator, n: int = 13, d: int = 4):
    x = rng.normal(size=(n, d))
    y = rng.normal(size=n)
    w = rng.normal(size=d)
    sw = rng.uniform(0.2, 3.0, size=n)
    # d/dw of sum_i sw_i (x_i.w - y_i)^2 / n  -- Keras' "sum_over_batch_size" on the whole batch
    expected = 2.0 * x.T @ (sw * (x @ w - y)) / n
    return x, y, w, sw, expected


@pytest.mark.parametrize("sizes", [(13,), (5, 5, 3), (1, 7, 2, 3), (4, 9)], ids=str)
def test_tf_uneven_micro_batches_equal_one_batch(sizes: tuple[int, ...]) -> None:
    x, y, w0, sw, expected = _least_squares(np.random.default_rng(1))
    w = tf.Variable(w0)
    state = tfreg.accumulation.init([w])
    start = 0
    for size in sizes:
        xb, yb, swb = (a[start : start + size] for a in (x, y, sw))
        with tf.GradientTape() as tape:
            loss_sum = tf.reduce_sum(swb * tf.square(tf.linalg.matvec(xb, w) - yb))
        tfreg.accumulation.add(state, tape.gradient(loss_sum, [w]), size)
        start += size
    assert_close("tf accumulated", tfreg.accumulation.result(state)[0], expected, rtol=EXACT.rtol)


@pytest.mark.parametrize("sizes", [(13,), (5, 5, 3), (1, 7, 2, 3), (4, 9)], ids=str)
def test_torch_uneven_micro_batches_equal_one_batch(sizes: tuple[int, ...]) -> None:
    x, y, w0, sw, expected = _least_squares(np.random.default_rng(1))
    w = torch.tensor(w0, requires_grad=True)
    state = torchref.accumulation.init([w])
    start = 0
    for size in sizes:
        xb, yb, swb = (torch.tensor(a[start : start + size]) for a in (x, y, sw))
        loss_sum = torch.sum(swb * torch.square(xb @ w - yb))
        torchref.accumulation.add(state, torch.autograd.grad(loss_sum, [w]), size)
        start += size
    assert_close(
        "torch accumulated",
        torchref.accumulation.result(state)[0].detach(),
        expected,
        rtol=EXACT.rtol,
    )


def test_tf_add_inside_tf_function_traces_once() -> None:
    v = tf.Variable(tf.zeros(3))
    state = tfreg.accumulation.init([v])

    @tf.function
    def step(g, n):
        tfreg.accumulation.add(state, [g], n)

    for i in range(5):
        step(tf.fill([3], float(i)), tf.constant(i + 1))
    assert step.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(tfreg.accumulation.result(state)[0].numpy(), 10.0 / 15.0)


def test_tf_none_and_indexed_slices() -> None:
    table = tf.Variable(tf.zeros((4, 2)))
    unused = tf.Variable(tf.zeros(3))
    state = tfreg.accumulation.init([table, unused])
    rows = tf.IndexedSlices(tf.ones((2, 2)), tf.constant([1, 3]))
    tfreg.accumulation.add(state, [rows, None], 2)
    tfreg.accumulation.add(state, [rows, None], 2)
    table_grad, unused_grad = tfreg.accumulation.result(state)
    np.testing.assert_array_equal(table_grad.numpy(), [[0, 0], [0.5, 0.5], [0, 0], [0.5, 0.5]])
    np.testing.assert_array_equal(unused_grad.numpy(), [0.0, 0.0, 0.0])


def test_low_precision_variables_accumulate_in_float32() -> None:
    state = tfreg.accumulation.init([tf.Variable(tf.zeros(2, tf.bfloat16))])
    assert state.sums[0].dtype == tf.float32
    t_state = torchref.accumulation.init([torch.zeros(2, dtype=torch.float16)])
    assert t_state.sums[0].dtype == torch.float32
    # 2**-9 is below bfloat16's resolution at 1.0 but not float32's: it must survive.
    tfreg.accumulation.add(state, [tf.constant([1.0, 1.0], tf.bfloat16)], 1)
    tfreg.accumulation.add(state, [tf.constant([2**-9, 0.0], tf.float32)], 1)
    np.testing.assert_array_equal(state.sums[0].numpy(), [1 + 2**-9, 1.0])


def test_wrong_gradient_count_is_rejected() -> None:
    state = tfreg.accumulation.init([tf.Variable(tf.zeros(2))])
    with pytest.raises(ValueError, match="2 gradients for an accumulator of 1"):
        tfreg.accumulation.add(state, [tf.zeros(2), tf.zeros(2)], 1)
    t_state = torchref.accumulation.init([torch.zeros(2)])
    with pytest.raises(ValueError, match="0 gradients for an accumulator of 1"):
        torchref.accumulation.add(t_state, [], 1)
    with pytest.raises(ValueError, match="variables=\\[\\]"):
        tfreg.accumulation.init([])


def test_torch_state_dict_round_trip_is_exact() -> None:
    state = torchref.accumulation.init([torch.zeros(3, dtype=torch.float64)])
    torchref.accumulation.add(state, [torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)], 3)
    saved = state.state_dict()
    other = torchref.accumulation.init([torch.zeros(3, dtype=torch.float64)])
    other.load_state_dict(saved)
    torchref.accumulation.add(state, [torch.ones(3, dtype=torch.float64)], 1)
    torchref.accumulation.add(other, [torch.ones(3, dtype=torch.float64)], 1)
    assert torch.equal(
        torchref.accumulation.result(state)[0], torchref.accumulation.result(other)[0]
    )
    assert other.micro_batches == 2


def test_torch_wrong_gradient_shape_is_rejected_not_broadcast() -> None:
    state = torchref.accumulation.init([torch.zeros(2), torch.zeros(3, 2)])
    with pytest.raises(ValueError, match=r"grads\[1\] of shape \(2,\) .* shape \(3, 2\)"):
        torchref.accumulation.add(state, [torch.ones(2), torch.ones(2)], 1)
    # Nothing half-applied: grads[0] was fine but must not have been added.
    assert float(state.sums[0].abs().sum()) == 0.0 and float(state.count) == 0.0
    assert state.micro_batches == 0


@pytest.mark.parametrize("count", [-5, -0.5, float("nan"), True, 1 + 2j], ids=repr)
def test_bad_count_is_rejected_in_both_frameworks(count: object) -> None:
    t_state = torchref.accumulation.init([torch.zeros(2)])
    with pytest.raises(ValueError, match="finite count >= 0"):
        torchref.accumulation.add(t_state, [torch.ones(2)], count)
    assert float(t_state.sums[0].sum()) == 0.0
    state = tfreg.accumulation.init([tf.Variable(tf.zeros(2))])
    with pytest.raises(ValueError, match="finite count >= 0"):
        tfreg.accumulation.add(state, [tf.ones(2)], count)
    assert float(tf.reduce_sum(state.sums[0])) == 0.0


def test_torch_negative_tensor_count_is_rejected() -> None:
    state = torchref.accumulation.init([torch.zeros(2)])
    with pytest.raises(ValueError, match="finite count >= 0"):
        torchref.accumulation.add(state, [torch.ones(2)], torch.tensor(-3))


def test_tf_bad_shape_leaves_state_untouched() -> None:
    state = tfreg.accumulation.init([tf.Variable(tf.zeros(2)), tf.Variable(tf.zeros((3, 2)))])
    with pytest.raises(ValueError, match=r"grads\[1\] of shape \(2,\) .* shape \(3, 2\)"):
        tfreg.accumulation.add(state, [tf.ones(2), tf.ones(2)], 1)
    assert float(tf.reduce_sum(state.sums[0])) == 0.0
    assert float(state.count.numpy()) == 0.0 and int(state.micro_batches.numpy()) == 0


def test_tf_negative_tensor_count_fails_before_any_assign() -> None:
    state = tfreg.accumulation.init([tf.Variable(tf.zeros(2))])

    @tf.function
    def step(n):
        tfreg.accumulation.add(state, [tf.ones(2)], n)

    with pytest.raises(tf.errors.InvalidArgumentError, match="finite count >= 0"):
        step(tf.constant(-5))
    assert float(tf.reduce_sum(state.sums[0])) == 0.0
    step(tf.constant(2))  # same trace, valid count
    np.testing.assert_array_equal(tfreg.accumulation.result(state)[0].numpy(), [0.5, 0.5])


@pytest.mark.parametrize("count", [float("inf"), float("nan")], ids=repr)
def test_tf_non_finite_tensor_count_fails_before_any_assign(count: float) -> None:
    """A tensor inf passed the old non-negative assert and zeroed the window's gradient."""
    state = tfreg.accumulation.init([tf.Variable(tf.zeros(2, tf.float64))])
    # Eagerly the value is known: the library's own ValueError, before any assign.
    with pytest.raises(ValueError, match="finite count >= 0"):
        tfreg.accumulation.add(state, [tf.ones(2, tf.float64)], tf.constant(count, tf.float64))
    assert float(tf.reduce_sum(state.sums[0])) == 0.0 and float(state.count.numpy()) == 0.0
    assert int(state.micro_batches.numpy()) == 0


def test_tf_check_count_false_leaves_the_per_micro_batch_assert_out() -> None:
    """The trainers' counts are element counts (finite, >= 0 by construction): their window
    adds without the graph-side assert, a conditional run on every micro-batch; the default
    keeps it (the tests above)."""
    state = tfreg.accumulation.init([tf.Variable(tf.zeros(2))])

    def ops(check_count: bool) -> set[str]:
        @tf.function(autograph=False)
        def step(n):
            tfreg.accumulation.add(state, [tf.ones(2)], n, check_count=check_count)

        graph = step.get_concrete_function(tf.TensorSpec([], tf.float64)).graph
        return {op.type for op in graph.get_operations()}

    assert "Assert" not in ops(False) and "If" not in ops(False)
    assert "If" in ops(True)

    @tf.function(autograph=False)
    def unchecked(n):
        tfreg.accumulation.add(state, [tf.ones(2)], n, check_count=False)

    unchecked(tf.constant(2.0, tf.float64))
    np.testing.assert_array_equal(tfreg.accumulation.result(state)[0].numpy(), [0.5, 0.5])
