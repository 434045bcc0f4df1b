"""Proximal group lasso and the Adam-consistent (ProxGen) prox, one framework at a time.

What is checked, and against what (never against the implementation itself):
- the core arithmetic against hand-computed values and an independent NumPy/SciPy solution of
  the preconditioned block prox (bracketing root finder on a different parametrisation);
- the optimizer's per-coordinate step and one or three (step + prox) updates against a NumPy
  re-implementation of each optimizer from its documented formula: <= 1e-12 relative, float64;
- the refusals (named argument and value, nothing changed);
- the issue's table row: ``GroupLasso`` as a regularizer leaves no input group exactly zero, the
  proximal version zeroes exactly the 16 irrelevant ones;
- the trainer hook: once per update (accumulation k=3 equals k=1 on the concatenated window),
  config round trips, checkpoint/resume with Adam's state.
Solver-level certificates (skglm, KKT) are in ``parity_tests/test_group_lasso_solvers.py``.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import tfreg
import torchref
from benchmarks import prox_newton_certificate
from benchmarks.prox_newton_certificate import reference as reference_block_prox
from tfreg_core import proximal as core
from tfreg_core.validation import InvalidArgumentError

REFERENCE_RTOL = 1e-12  # float64: both sides evaluate the same formulas, round-off only


def _assert_matches(name: str, actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max()
    assert error <= REFERENCE_RTOL * scale, f"{name}: max abs error {error:.3g}, scale {scale:.3g}"
    np.testing.assert_array_equal(actual == 0, expected == 0, err_msg=f"{name}: zero sets")


# --- an independent reference for the preconditioned block prox -------------------------------
# reference_block_prox: argmin_x sum (x - z)^2 / (2 s) + tau ||x|| for one group, from the
# optimality condition x = z / (1 + s tau / rho), rho = ||x||, solved for rho by Brent's method
# (benchmarks/prox_newton_certificate.py, which certifies the kernel's iteration count with it).


def reference_rows(z: np.ndarray, s: np.ndarray, tau: float) -> np.ndarray:
    return np.stack([reference_block_prox(zr, sr, tau) for zr, sr in zip(z, s, strict=True)])


# --- core -------------------------------------------------------------------------------------


def test_block_soft_threshold_hand_computed() -> None:
    z = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [1.5, 2.0]])
    out = core.block_soft_threshold(z, 2.5, (1,), core.NUMPY_OPS)
    # norms 5, 0.5, 0, 2.5: scaled by 1 - 2.5/5, zeroed, stays zero, zeroed (2.5 <= 2.5)
    np.testing.assert_array_equal(out, [[1.5, 2.0], [0, 0], [0, 0], [0, 0]])


def test_preconditioned_prox_with_equal_steps_is_the_block_soft_threshold() -> None:
    rng = np.random.default_rng(1)
    z = rng.standard_normal((8, 5))
    s = np.full_like(z, 0.3)
    expected = core.block_soft_threshold(z, 0.3 * 7.0, (1,), core.NUMPY_OPS)
    actual = core.preconditioned_block_prox(z, s, 7.0, (1,), core.NUMPY_OPS)
    _assert_matches("equal steps", actual, expected)
    assert 0 < np.count_nonzero(np.all(actual == 0, axis=1)) < 8


@pytest.mark.parametrize("spread", [1.0, 1e3, 1e8], ids=["equal", "1e3", "1e8"])
def test_preconditioned_prox_matches_the_reference(spread: float) -> None:
    rng = np.random.default_rng(2)
    z = rng.standard_normal((40, 7)) * rng.uniform(0.01, 3, size=(40, 1))
    s = 10 ** rng.uniform(0, math.log10(spread), size=z.shape) * 1e-2
    tau = float(np.median(np.linalg.norm(z / s, axis=1)))  # about half the groups zero
    actual = core.preconditioned_block_prox(z, s, tau, (1,), core.NUMPY_OPS)
    _assert_matches("prox", actual, reference_rows(z, s, tau))
    assert 5 < np.count_nonzero(np.all(actual == 0, axis=1)) < 35


def test_zero_step_leaves_the_tensor_unchanged() -> None:
    z = np.array([[1.0, -2.0], [0.0, 0.0]])
    with np.errstate(over="ignore"):  # z / tiny overflows to inf: "not a zero group", as meant
        out = core.preconditioned_block_prox(z, np.zeros_like(z), 5.0, (1,), core.NUMPY_OPS)
    np.testing.assert_array_equal(out, z)


_ARRAY_OPS = {
    "numpy": (core.NUMPY_OPS, np.asarray, np.asarray),
    "tf": (tfreg.proximal._OPS, tf.constant, lambda t: t.numpy()),
    "torch": (torchref.proximal._OPS, torch.as_tensor, lambda t: t.numpy()),
}


@pytest.mark.parametrize("framework", sorted(_ARRAY_OPS))
@pytest.mark.parametrize(
    ("shape", "axes"),
    [((3, 3, 4, 6), (0, 1, 2)), ((3, 3, 4, 6), (3,)), ((6, 3, 3, 4), (0,)), ((9, 5), (0,))],
    ids=["keras-filters", "keras-rows", "torch-filters", "dense-columns"],
)
def test_preconditioned_prox_over_any_axes_matches_the_per_group_solve(
    framework: str, shape: tuple[int, ...], axes: tuple[int, ...]
) -> None:
    # The kernel solves every group of a tensor at once, with the norm over ``axes`` (the layouts
    # of Keras and torch kernels); each group is checked against the independent per-group
    # Brent solve, float64, 1e-12 relative (round-off of the same minimiser). Steps spread over
    # 1e4, as Adam's do; tau puts about half of the groups at zero.
    ops, to_array, to_numpy = _ARRAY_OPS[framework]
    rng = np.random.default_rng(16)
    z = rng.standard_normal(shape) * rng.uniform(0.01, 3, size=shape)
    s = 10 ** rng.uniform(-4, 0, size=shape)
    rest = [a for a in range(len(shape)) if a not in axes]
    rows_of = lambda a: np.transpose(a, rest + list(axes)).reshape(  # noqa: E731
        int(np.prod([shape[a] for a in rest])), -1
    )
    tau = float(np.median(np.linalg.norm(rows_of(z) / rows_of(s), axis=1)))
    actual = to_numpy(core.preconditioned_block_prox(to_array(z), to_array(s), tau, axes, ops))
    _assert_matches(framework, rows_of(actual), reference_rows(rows_of(z), rows_of(s), tau))
    zero = np.all(rows_of(actual) == 0, axis=1)
    assert 0 < np.count_nonzero(zero) < len(zero)
    # Equal steps within each group: the closed form, the block soft-threshold by s_g * tau.
    s_group = np.broadcast_to(np.max(s, axis=axes, keepdims=True), shape).copy()
    closed = core.block_soft_threshold(z, s_group * tau, axes, core.NUMPY_OPS)
    actual = to_numpy(
        core.preconditioned_block_prox(to_array(z), to_array(s_group), tau, axes, ops)
    )
    _assert_matches(f"{framework} equal steps", actual, closed)


def _rows(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    rest = [i for i in range(a.ndim) if i not in axes]
    return np.transpose(a, rest + list(axes)).reshape(math.prod(a.shape[i] for i in rest), -1)


@pytest.mark.parametrize("framework", sorted(_ARRAY_OPS))
def test_preconditioned_prox_of_many_tensors_matches_the_per_group_solve(framework: str) -> None:
    # Kernels of several layouts, group sizes and taus (as group_weights="sqrt_size" gives them)
    # are solved together as zero-padded rows; the 200x200 one (over BATCH_ENTRIES) alone, and
    # the float32 one apart from the float64 ones. Each group against the independent Brent
    # solve: float64 1e-12 relative (round-off), float32 1e-5 (float32 round-off times the
    # conditioning of groups near the threshold).
    ops, to_array, to_numpy = _ARRAY_OPS[framework]
    rng = np.random.default_rng(17)
    cases = [
        ((3, 3, 4, 6), (3,), np.float64),
        ((6, 4, 3, 3), (0,), np.float64),
        ((9, 5), (0,), np.float64),
        ((2, 7), (1,), np.float64),
        ((200, 200), (1,), np.float64),
        ((5, 3), (1,), np.float32),
    ]
    assert core.BATCH_ENTRIES < 200 * 200
    zs, steps, taus = [], [], []
    for shape, axes, dtype in cases:
        z = rng.standard_normal(shape) * rng.uniform(0.01, 3, size=shape)
        s = 10 ** rng.uniform(-4, 0, size=shape)
        # About half of the groups at zero: tau the median of ||z_g / s_g||.
        taus.append(float(np.median(np.linalg.norm(_rows(z, axes) / _rows(s, axes), axis=1))))
        zs.append(z.astype(dtype))
        steps.append(s.astype(dtype))
    xs = core.preconditioned_block_proxes(
        [to_array(z) for z in zs], [to_array(s) for s in steps], taus, [c[1] for c in cases], ops
    )
    for (shape, axes, dtype), z, s, tau, x in zip(cases, zs, steps, taus, xs, strict=True):
        actual, name = to_numpy(x), f"{framework} {shape} axes {axes}"
        assert actual.shape == shape and actual.dtype == dtype, name
        z64, s64 = (_rows(a.astype(np.float64), axes) for a in (z, s))
        expected = reference_rows(z64, s64, tau)
        if dtype == np.float64:
            _assert_matches(name, _rows(actual, axes), expected)
        else:
            np.testing.assert_allclose(_rows(actual, axes), expected, rtol=0, atol=1e-5)
        zero = np.all(_rows(actual, axes) == 0, axis=1)
        assert 0 < np.count_nonzero(zero) < len(zero), name


def test_preconditioned_prox_of_many_tensors_with_a_dimension_unknown_when_tracing() -> None:
    # A tf.function input of shape (None, 4) cannot be laid out as rows: it is solved alone, the
    # other tensor as before; each group against the Brent solve (float64, 1e-12).
    rng = np.random.default_rng(18)
    z1, s1 = rng.standard_normal((5, 4)), 10 ** rng.uniform(-3, 0, (5, 4))
    z2, s2 = rng.standard_normal((3, 6)), 10 ** rng.uniform(-3, 0, (3, 6))
    unknown, known = tf.TensorSpec([None, 4], tf.float64), tf.TensorSpec([3, 6], tf.float64)

    @tf.function(input_signature=[unknown, unknown, known, known])
    def solve(a: tf.Tensor, b: tf.Tensor, c: tf.Tensor, d: tf.Tensor) -> list[tf.Tensor]:
        ops = tfreg.proximal._OPS
        return core.preconditioned_block_proxes([a, c], [b, d], [1.0, 2.0], [(1,), (1,)], ops)

    x1, x2 = solve(z1, s1, z2, s2)
    _assert_matches("unknown dimension", x1.numpy(), reference_rows(z1, s1, 1.0))
    _assert_matches("known", x2.numpy(), reference_rows(z2, s2, 2.0))


def test_newton_iteration_count_is_certified_in_float64() -> None:
    # benchmarks/prox_newton_certificate.py on 150 of its stress groups: the kernel's iteration
    # count is within ROUND_OFF allowances of the independent Brent root (its module docstring
    # defines the allowance), and the criterion has teeth: 3 iterations are far outside it.
    used = core.NEWTON_ITERATIONS
    worst, nonfinite = prox_newton_certificate.certify(150, np.float64, [3, used])
    assert nonfinite == {3: 0, used: 0}
    round_off = prox_newton_certificate.ROUND_OFF
    assert worst[used] <= round_off < 1e3 * round_off < worst[3]


def test_group_weight() -> None:
    assert core.group_weight((20, 8), (1,), None) == 1.0
    assert core.group_weight((3, 3, 4, 16), (0, 1, 2), "sqrt_size") == 6.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axis": 1, "group_weights": "sqrt"}, "group_weights='sqrt'"),
        ({"axis": 1, "threshold": "adam"}, "threshold=adam"),
        ({"axis": "1"}, "axis='1'"),
    ],
)
def test_spec_refusals(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        tfreg.ProximalGroupLasso(0.1, **kwargs)


def test_chain_refuses_orders_that_are_not_the_prox_of_the_sum() -> None:
    l1, group = tfreg.ProximalL1(l1=0.1), tfreg.ProximalGroupLasso(0.1, axis=1)
    for bad in ([group, l1], [l1, l1], [group, tfreg.ProximalGroupLasso(0.1, axis=0)], []):
        with pytest.raises(InvalidArgumentError, match="L1 first"):
            tfreg.ProximalChain(bad)


def test_sparse_group_lasso_is_l1_then_group_and_is_the_prox_of_the_sum() -> None:
    # KKT of argmin (x - z)^2 / (2t) + t*(a |x|_1 + b ||x||) checked directly on the composition.
    rng = np.random.default_rng(3)
    z, t, a, b = rng.standard_normal((30, 6)), 0.5, 0.4, 0.6
    x = core.block_soft_threshold(core.soft_threshold(z, t * a), t * b, (1,), core.NUMPY_OPS)
    for xr, zr in zip(x, z, strict=True):
        if np.all(xr == 0):  # exists |xi_i| <= 1, ||eta|| <= 1: z / t = a xi + b eta
            residual = np.sign(zr) * np.maximum(np.abs(zr) / t - a, 0)
            assert np.linalg.norm(residual) <= b + 1e-12
            continue
        on = xr != 0
        grad = (xr - zr) / t + b * xr / np.linalg.norm(xr)
        np.testing.assert_allclose(grad[on] + a * np.sign(xr[on]), 0, atol=1e-12)
        assert np.all(np.abs(zr[~on] / t) <= a + 1e-12)
    assert 0 < np.count_nonzero(x == 0) < x.size


# --- the optimizers' steps: NumPy re-implementations from the documented formulas ------------

LR, B1, B2, EPS = 2.0**-5, 0.75, 0.875, 1e-7  # float32-exact: Keras rounds lr and b2 to float32
RHO = 0.875
W0_ROWS = np.array([0.01, 0.02, 1.0, 0.5, 2.0, 0.05])


def _problem() -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((6, 4)) * W0_ROWS[:, None]
    grads = [rng.standard_normal((6, 4)) * 0.3 for _ in range(3)]
    return w0, grads


def _numpy_steps(kind: str, w0: np.ndarray, grads: list[np.ndarray], prox) -> np.ndarray:
    """The optimizer's update from its formula, then ``prox(z, s)``, per gradient."""
    w, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        if kind == "rmsprop-keras":
            v = RHO * v + (1 - RHO) * g * g
            s = LR / np.sqrt(v + EPS)
            z = w - s * g
        elif kind == "rmsprop-torch":
            v = RHO * v + (1 - RHO) * g * g
            s = LR / (np.sqrt(v) + EPS)
            z = w - s * g
        else:
            m = B1 * m + (1 - B1) * g
            v = B2 * v + (1 - B2) * g * g
            m_hat = m / (1 - B1**t)
            if kind == "adam-torch":  # eps on sqrt(v_hat)
                s = LR / (np.sqrt(v / (1 - B2**t)) + EPS)
            else:  # Keras / KerasAdamW: eps on sqrt(v), bias correction outside
                s = LR * np.sqrt(1 - B2**t) / (np.sqrt(v) + EPS)
            z = w - s * m_hat
        w = prox(z, s)
    return w


def _keras_optimizer(kind: str) -> keras.optimizers.Optimizer:
    if kind == "rmsprop-keras":
        return keras.optimizers.RMSprop(LR, rho=RHO, epsilon=EPS)
    return keras.optimizers.Adam(LR, beta_1=B1, beta_2=B2, epsilon=EPS)


def _torch_optimizer(kind: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if kind == "rmsprop-torch":
        return torch.optim.RMSprop(params, lr=LR, alpha=RHO, eps=EPS)
    if kind == "adam-torch":
        return torch.optim.Adam(params, lr=LR, betas=(B1, B2), eps=EPS)
    return torchref.KerasAdamW(params, lr=LR, betas=(B1, B2), eps=EPS)


def _run_keras(kind: str, w0: np.ndarray, grads: list[np.ndarray], proximal) -> np.ndarray:
    variable = keras.Variable(w0.copy(), dtype="float64", name="kernel")
    optimizer = _keras_optimizer(kind)
    for g in grads:
        optimizer.apply_gradients([(tf.constant(g), variable)])
        proximal.apply([variable], optimizer)
    return variable.numpy()


def _run_torch(kind: str, w0: np.ndarray, grads: list[np.ndarray], proximal) -> np.ndarray:
    param = torch.tensor(w0.copy(), requires_grad=True)
    optimizer = _torch_optimizer(kind, [param])
    for g in grads:
        param.grad = torch.tensor(g)
        optimizer.step()
        proximal.apply([param], optimizer)
    return param.detach().numpy()


TAU = 1.0
L1 = 0.3
PROXES = {
    "group": (
        lambda fw: fw.ProximalGroupLasso(TAU, axis=1),
        lambda z, s: reference_rows(z, s, TAU),
    ),
    "group-sqrt-size": (
        lambda fw: fw.ProximalGroupLasso(TAU, axis=1, group_weights="sqrt_size"),
        lambda z, s: reference_rows(z, s, TAU * 2.0),  # sqrt(4 columns)
    ),
    "l1": (
        lambda fw: fw.ProximalL1(l1=L1),
        lambda z, s: np.sign(z) * np.maximum(np.abs(z) - L1 * s, 0),
    ),
    "sparse-group": (
        lambda fw: fw.ProximalChain([fw.ProximalL1(l1=L1), fw.ProximalGroupLasso(TAU, axis=1)]),
        lambda z, s: reference_rows(np.sign(z) * np.maximum(np.abs(z) - L1 * s, 0), s, TAU),
    ),
}


@pytest.mark.parametrize("prox", sorted(PROXES))
@pytest.mark.parametrize("kind", ["adam-keras", "rmsprop-keras"])
def test_keras_preconditioned_prox_matches_numpy(kind: str, prox: str) -> None:
    make, reference = PROXES[prox]
    w0, grads = _problem()
    expected = _numpy_steps(kind, w0, grads, reference)
    _assert_matches(f"{kind} {prox}", _run_keras(kind, w0, grads, make(tfreg)), expected)
    assert 0 < np.count_nonzero(expected == 0) < expected.size  # the prox did something


@pytest.mark.parametrize("prox", sorted(PROXES))
@pytest.mark.parametrize("kind", ["adam-torch", "adam-keras", "rmsprop-torch"])
def test_torch_preconditioned_prox_matches_numpy(kind: str, prox: str) -> None:
    # "adam-keras" runs torchref.KerasAdamW: Keras' epsilon placement in torch.
    make, reference = PROXES[prox]
    w0, grads = _problem()
    expected = _numpy_steps(kind, w0, grads, reference)
    _assert_matches(f"{kind} {prox}", _run_torch(kind, w0, grads, make(torchref)), expected)
    assert 0 < np.count_nonzero(expected == 0) < expected.size


def test_epsilon_placement_changes_the_zero_set() -> None:
    # The same gradients through Keras' and torch's Adam formulas threshold differently: with
    # eps = 1e-2 (large enough to matter) the per-coordinate steps differ at step 1 by the
    # factor (sqrt(v) + eps) / (sqrt(v) + eps * sqrt(1 - b2)).
    w0, grads = _problem()
    keras_adam = keras.optimizers.Adam(LR, beta_1=B1, beta_2=B2, epsilon=1e-2)
    variable = keras.Variable(w0.copy(), dtype="float64")
    keras_adam.apply_gradients([(tf.constant(grads[0]), variable)])
    param = torch.tensor(w0.copy(), requires_grad=True)
    torch_adam = torch.optim.Adam([param], lr=LR, betas=(B1, B2), eps=1e-2)
    param.grad = torch.tensor(grads[0])
    torch_adam.step()
    s_keras = tfreg.step_sizes(keras_adam, [variable])[0].numpy()
    s_torch = torchref.step_sizes(torch_adam, [param])[0].numpy()
    root_v = np.abs(grads[0]) * math.sqrt(1 - B2)
    expected_ratio = (root_v + 1e-2 * math.sqrt(1 - B2)) / (root_v + 1e-2)
    np.testing.assert_allclose(s_keras / s_torch, expected_ratio, rtol=1e-12)


def test_scalar_threshold_is_kept_as_an_option() -> None:
    # threshold="scalar" after Adam: the old lr * lambda block soft-threshold.
    w0, grads = _problem()
    variable = keras.Variable(w0.copy(), dtype="float64")
    optimizer = _keras_optimizer("adam-keras")
    optimizer.apply_gradients([(tf.constant(grads[0]), variable)])
    before = variable.numpy()
    tfreg.ProximalGroupLasso(TAU, axis=1, threshold="scalar").apply([variable], optimizer)
    expected = core.block_soft_threshold(before, LR * TAU, (1,), core.NUMPY_OPS)
    np.testing.assert_array_equal(variable.numpy(), expected)


def test_schedule_step_uses_the_rate_of_the_step_just_taken() -> None:
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0], [LR, LR / 4])
    w0, grads = _problem()
    variable = keras.Variable(w0.copy(), dtype="float64")
    optimizer = keras.optimizers.Adam(schedule, beta_1=B1, beta_2=B2, epsilon=EPS)
    optimizer.apply_gradients([(tf.constant(grads[0]), variable)])
    v = (1 - B2) * grads[0] ** 2
    expected = LR * math.sqrt(1 - B2) / (np.sqrt(v) + EPS)  # step 0's rate, not the next one's
    _assert_matches("step", tfreg.step_sizes(optimizer, [variable])[0].numpy(), expected)


# --- refusals ---------------------------------------------------------------------------------


def _mlp(seed: int = 0, inputs: int = 6) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((inputs,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )


@pytest.mark.parametrize(
    ("optimizer", "threshold", "message"),
    [
        (lambda: keras.optimizers.SGD(0.1), "preconditioned", "Received: SGD"),
        (lambda: keras.optimizers.Adagrad(0.1), "auto", "threshold='scalar'"),
        (lambda: keras.optimizers.Adam(0.1, amsgrad=True), "auto", "amsgrad=True"),
        (lambda: keras.optimizers.RMSprop(0.1, centered=True), "auto", "centered=True"),
        (lambda: keras.optimizers.RMSprop(0.1, momentum=0.5), "auto", "momentum=0.5"),
    ],
)
def test_trainer_refuses_unsupported_pairings_at_construction(optimizer, threshold, message):
    proximal = tfreg.ProximalGroupLasso(0.1, axis=1, threshold=threshold)
    with pytest.raises(InvalidArgumentError, match=message):
        tfreg.Trainer(_mlp(), "mse", optimizer(), proximal=proximal)
    model = tfreg.AccumulatingModel(_mlp(), accumulation_steps=2, proximal=proximal)
    with pytest.raises(InvalidArgumentError, match=message):  # at compile, not at the first update
        model.compile(optimizer(), "mse")


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), "Received: SGD"),
        (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), "amsgrad=True"),
        (lambda p: torch.optim.RMSprop(p, lr=0.1, centered=True), "centered=True"),
    ],
)
def test_torch_trainer_refuses_unsupported_pairings(optimizer, message) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    proximal = torchref.ProximalL1(l1=0.1, threshold="preconditioned")
    with pytest.raises(InvalidArgumentError, match=message):
        torchref.Trainer(model, "mse", optimizer(model.parameters()), proximal=proximal)


def test_refusals_change_nothing() -> None:
    model = _mlp()
    before = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.raises(InvalidArgumentError, match="out of range"):
        tfreg.ProximalGroupLasso(0.5, axis=2).apply(model, 1.0)  # rank-2 kernels
    with pytest.raises(InvalidArgumentError, match="preconditioned"):
        tfreg.ProximalGroupLasso(0.5, axis=1, threshold="preconditioned").apply(model, 1.0)
    param = torch.zeros(3, 2, requires_grad=True)
    adam = torch.optim.Adam([param])
    with pytest.raises(InvalidArgumentError, match="has none yet"):
        torchref.ProximalGroupLasso(0.5, axis=1).apply([param], adam)  # before any step
    for v, b in zip(model.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)


# --- the table row ------------------------------------------------------------------


def _twenty_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12)
    x = rng.standard_normal((200, 20))
    y = x[:, :4] @ np.array([1.0, -1.0, 0.5, 2.0]) + 0.1 * rng.standard_normal(200)
    return x, y[:, None]


def _input_groups_trained(**trainer_kwargs) -> tuple[keras.Model, np.ndarray]:
    x, y = _twenty_inputs()
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.set_weights([w for w in _twenty_input_weights()])
    trainer = tfreg.Trainer(model, "mse", keras.optimizers.SGD(0.05), **trainer_kwargs)
    trainer.fit(x, y, batch_size=200, epochs=800, shuffle=False, verbose=0)
    return model, np.linalg.norm(model.layers[0].kernel.numpy(), axis=1)


def _twenty_input_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(13)
    return [
        rng.normal(0, 0.3, (20, 8)).astype("float32"),
        np.zeros(8, "float32"),
        rng.normal(0, 0.3, (8, 1)).astype("float32"),
        np.zeros(1, "float32"),
    ]


def test_table_row_group_lasso_regularizer_gives_no_exact_zero_group() -> None:
    # Today's behaviour, pinned: the penalty in the loss shrinks groups but never to 0.
    model, norms = _input_groups_trained(regularizer=tfreg.GroupLasso(0.05, axis=1))
    assert np.count_nonzero(norms == 0) == 0
    assert tfreg.sparsity_report(model).zero_groups(model.layers[0].kernel.path, 0) == 0
    assert norms[4:].max() < 0.05 * norms[:4].min()  # small, not zero


def test_table_row_proximal_group_lasso_zeroes_the_16_irrelevant_inputs() -> None:
    model, norms = _input_groups_trained(proximal=tfreg.ProximalGroupLasso(0.05, axis=1))
    assert np.flatnonzero(norms == 0).tolist() == list(range(4, 20))
    assert np.all(norms[:4] > 0.1)
    report = tfreg.sparsity_report(model)  # its group view counts them: 16 zero input rows
    assert report.zero_groups(model.layers[0].kernel.path, 0) == 16


# --- the trainer hook ----------------------------------------------------------------------


def _regression(n: int = 30, inputs: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, inputs))
    return x, (x[:, :2].sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((n, 1)))


def _float64_mlp(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(1, dtype="float64"),
        ]
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_prox_runs_once_per_update_under_accumulation(optimizer: str) -> None:
    x, y = _regression()
    proximal = [tfreg.ProximalL1(l1=0.05), tfreg.ProximalGroupLasso(0.3, axis=1)]
    weights = []
    for steps, batch in ((1, 30), (3, 10)):
        model = _float64_mlp(0)
        opt = keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": 0.05}})
        trainer = tfreg.Trainer(model, "mse", opt, accumulation_steps=steps, proximal=proximal)
        trainer.fit(x, y, batch_size=batch, epochs=20, shuffle=False, verbose=0)
        assert trainer.trace_counts()["apply"] == 1  # the prox does not retrace per step
        weights.append(np.concatenate([v.numpy().ravel() for v in model.trainable_variables]))
    np.testing.assert_allclose(weights[1], weights[0], rtol=1e-12, atol=1e-15)
    assert np.count_nonzero(weights[0] == 0) > 0


def test_accumulating_model_applies_the_chain_once_per_window() -> None:
    x, y = _regression()
    results = []
    for steps, batch in ((1, 30), (3, 10)):
        inner = _float64_mlp(1)
        model = tfreg.AccumulatingModel(
            inner, accumulation_steps=steps, proximal=[tfreg.ProximalGroupLasso(1.0, axis=1)]
        )
        model.compile(keras.optimizers.SGD(0.05), "mse")
        model.fit(x, y, batch_size=batch, epochs=20, shuffle=False, verbose=0)
        results.append(inner.layers[0].kernel.numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-12, atol=1e-15)
    assert 0 < np.count_nonzero(np.all(results[0] == 0, axis=1)) < 6


def test_trainer_config_round_trip_with_a_chain() -> None:
    proximal = [tfreg.ProximalL1(l1=0.01), tfreg.ProximalGroupLasso(0.05, axis=1)]
    trainer = tfreg.Trainer(_mlp(), "mse", "adam", proximal=proximal)
    config = trainer.get_config()
    assert config["proximal"] == {
        "class_name": "ProximalChain",
        "config": {
            "operators": [
                {
                    "class_name": "ProximalL1",
                    "config": {"l1": 0.01, "include_bias": False, "threshold": "auto"},
                },
                {
                    "class_name": "ProximalGroupLasso",
                    "config": {
                        "strength": 0.05,
                        "axis": 1,
                        "group_weights": None,
                        "threshold": "auto",
                    },
                },
            ]
        },
    }
    assert tfreg.Trainer(_mlp(), "mse", "adam", **config).get_config() == config
    torch_model = torch.nn.Sequential(torch.nn.Linear(6, 1))
    torch_config = {k: v for k, v in config.items() if k != "loss_weights"}  # tfreg-only (outputs)
    torch_trainer = torchref.Trainer(
        torch_model, "mse", torch.optim.Adam(torch_model.parameters()), **torch_config
    )
    assert torch_trainer.get_config()["proximal"] == config["proximal"]


def test_checkpoint_resume_with_the_adam_prox(tmp_path) -> None:
    x, y = _regression()

    def trainer(seed: int) -> tfreg.Trainer:
        return tfreg.Trainer(
            _float64_mlp(seed),
            "mse",
            keras.optimizers.Adam(0.05),
            accumulation_steps=3,
            proximal=tfreg.ProximalGroupLasso(1.0, axis=1),
        )

    straight = trainer(2)
    straight.fit(x, y, batch_size=5, epochs=4, verbose=0)
    first = trainer(2)
    first.fit(x, y, batch_size=5, epochs=2, verbose=0)
    path = first.checkpoint().write(str(tmp_path / "ckpt"))
    resumed = trainer(3)  # other initial weights: the checkpoint must overwrite them
    resumed.checkpoint().read(path).assert_consumed()
    resumed.fit(x, y, batch_size=5, epochs=4, verbose=0)
    for a, b in zip(
        straight.model.trainable_variables, resumed.model.trainable_variables, strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.count_nonzero(np.all(straight.model.layers[0].kernel.numpy() == 0, axis=1)) > 0
