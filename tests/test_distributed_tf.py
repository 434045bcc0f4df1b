"""tfreg.Trainer and tfreg.AccumulatingModel under tf.distribute.MirroredStrategy (logical CPUs).

Logical devices must be configured before TensorFlow initialises, and two strategies with
different device counts clash in one process, so the scenarios run in two subprocesses started
together -- 2 logical CPUs (every scenario) and 4 (the 4 x 1 trajectories) -- each returning all
its results through files (``tests/_tf_mirrored_scenarios.py``); every wait has a timeout. The
references are computed here: one SGD step per concatenated window written out with
``tf.GradientTape`` on plain tensors (no Keras layer, no tfreg), and the one-device Trainer for
the trajectories. Each replica's accumulator copy is read mid-window too: a Trainer that ignored
the strategy (as before the distributed support) computes the right weights on one device. The
refusals run in this process on a 1-device MirroredStrategy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _tf_mirrored_scenarios as sc
import keras
import numpy as np
import pytest
import tensorflow as tf

import tfreg
from tfreg_core import InvalidArgumentError
from tfreg_core.windows import epoch_order
from tfreg_harness import assert_close, tolerance

# float64: R replicas x k micro-batches against one step on the concatenated window, the
# 20-update trajectories and the logs -- the design table's "accumulation" row, 1e-12 relative
# (only the reassociation of the same sums: per replica, then across replicas).
EXACT = tolerance("accumulation", "float64")
REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 180
R = 2  # the replicas of every scenario but the 4 x 1 trajectories


def _start(replicas: int, outdir: Path) -> subprocess.Popen:
    outdir.mkdir()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    script = Path(sc.__file__).resolve()
    command = [sys.executable, str(script), str(replicas), str(outdir)]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def runs() -> dict[int, dict[str, Any]]:
    """``{replicas: {"json": ..., "arrays": ...}}`` from both subprocesses (run concurrently,
    both killed at the deadline or when one fails)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = {r: _start(r, Path(tmp) / f"r{r}") for r in (2, 4)}
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        try:
            for replicas, proc in procs.items():
                try:
                    output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{replicas}-replica scenarios still running after the timeout")
                assert proc.returncode == 0, f"{replicas} replicas:\n{output[-4000:]}"
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        results = {}
        for replicas in procs:
            outdir = Path(tmp) / f"r{replicas}"
            with np.load(outdir / "arrays.npz") as arrays:
                results[replicas] = {
                    "json": json.loads((outdir / "results.json").read_text()),
                    "arrays": dict(arrays),
                }
    return results


def scenario(runs: dict, key: str, replicas: int = R) -> Any:
    value = runs[replicas]["json"][key]
    assert not (isinstance(value, dict) and "error" in value), value.get("trace")
    return value


def state(runs: dict, key: str, replicas: int = R) -> dict[str, np.ndarray]:
    """Replica 0's copy of the scenario's variables (``weight<i>``, ``optimizer<i>``)."""
    prefix = f"{key}/"
    arrays = runs[replicas]["arrays"]
    found = {k[len(prefix) :]: v[0] for k, v in arrays.items() if k.startswith(prefix)}
    assert found, f"no arrays for {key}"
    return found


def weights_of(found: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [found[f"weight{i}"] for i in range(sum(k.startswith("weight") for k in found))]


def assert_weights_close(actual: list, expected: list, label: str) -> None:
    """Norm-wise relative difference per variable at the float64 tolerance."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(f"{label}[{i}]", a, np.asarray(e), rtol=EXACT.rtol)


# -- the one-device reference: one step per concatenated window, by hand ----------------------


def _mlp_logits(v: list[tf.Variable], x: tf.Tensor) -> tf.Tensor:
    return tf.tanh(x @ v[0] + v[1]) @ v[2] + v[3]


def _masked_logits(v: list[tf.Variable], x: tf.Tensor) -> tf.Tensor:
    return tf.gather(v[0], x) @ v[1] + v[2]


MODELS = {  # name -> (initial weights, logits, data, mask of the loss elements that count)
    "mlp": (sc.mlp_weights, _mlp_logits, sc.data, lambda x: np.ones(len(x))),
    "masked": (sc.masked_weights, _masked_logits, sc.masked_data, lambda x: x != 0),
}


def reference_epoch(model: str, windows: list[np.ndarray]) -> tuple[list, list[dict]]:
    """One SGD(LR) step per window: ``sum(w*l*m)/sum(m)`` (0 when nothing counts) + L2 on the
    kernels (rank >= 2), clipped to global norm CLIP as ``g * c / max(||g||, c)``. Returns the
    weights and a record per window (loss values before its step, and the gradient norm)."""
    init, logits_fn, data_fn, mask_fn = MODELS[model]
    x, y, sw = data_fn(sum(len(w) for w in windows))
    v = [tf.Variable(w) for w in init()]
    records = []
    for idx in windows:
        mask = mask_fn(x[idx]).astype(np.float64)
        with tf.GradientTape() as tape:
            logits = logits_fn(v, tf.constant(x[idx]))
            values = tf.nn.sparse_softmax_cross_entropy_with_logits(y[idx], logits)
            weights = sw[idx] * mask  # per-example or per-timestep weights
            data_loss = tf.math.divide_no_nan(tf.reduce_sum(values * weights), mask.sum())
            penalty = tf.add_n([sc.L2 * tf.reduce_sum(p**2) for p in v if p.shape.rank >= 2])
            total = data_loss + penalty
        grads = tape.gradient(total, v)
        norm = float(tf.sqrt(tf.add_n([tf.reduce_sum(g**2) for g in grads])))
        for p, g in zip(v, grads, strict=True):
            p.assign_sub(sc.LR * g * sc.CLIP / max(norm, sc.CLIP))
        records.append(
            {
                "data_loss": float(data_loss),
                "penalty": float(penalty),
                "loss": float(total),
                "elements": float(mask.sum()),
                "examples": len(idx),
                "norm": norm,
            }
        )
    assert any(r["norm"] > sc.CLIP for r in records), "clipping never binds: the test is weak"
    return [p.numpy() for p in v], records


def windows(n: int, size: int, *, shuffle: bool) -> list[np.ndarray]:
    """The concatenated windows of ``size`` examples: Trainer's order (seed 0, epoch 0) or fit's
    unshuffled one."""
    order = epoch_order(n, shuffle=shuffle, seed=0, epoch=0)
    return [order[start : start + size] for start in range(0, n, size)]


EXACT_CASES = [("mlp", *case) for case in sc.CASES] + [("masked", *sc.MASKED)]
EXACT_IDS = [f"{m}-R2-k{k}-b{b}-N{n}" for m, k, b, n in EXACT_CASES]


def _key(model: str, k: int, b: int, n: int) -> str:
    return "masked" if model == "masked" else f"{k}-{b}-{n}"


# -- 1, 6: R=2 x k x b against one step per concatenated window --------------------------------


@pytest.mark.parametrize(("model", "k", "b", "n"), EXACT_CASES, ids=EXACT_IDS)
def test_trainer_equals_one_step_per_concatenated_window(runs, model, k, b, n) -> None:
    key = f"trainer-{_key(model, k, b, n)}"
    expected, ref_records = reference_epoch(model, windows(n, R * k * b, shuffle=True))
    assert_weights_close(weights_of(state(runs, key)), expected, key)
    records = scenario(runs, key)["records"]
    assert [r["examples"] for r in records] == [r["examples"] for r in ref_records]
    # The last global micro-batch holds one example: replica 1's share of it is empty.
    assert records[-1]["examples"] % (R * b) == 1
    # The global count of the loss elements that count (masked timesteps excluded): a count
    # per replica, or a mean of replica means, would be off in every window that differs.
    assert [r["elements"] for r in records] == [r["elements"] for r in ref_records]
    for field in ("loss", "data_loss", "penalty"):
        assert_close(
            f"{key} {field}",
            [r[field] for r in records],
            [r[field] for r in ref_records],
            rtol=EXACT.rtol,
        )
    assert not any(r["skipped"] for r in records)


SPLIT_CASES = [case for case in EXACT_CASES if case[0] == "mlp" and case[1] > 1]


@pytest.mark.parametrize(
    ("model", "k", "b", "n"), SPLIT_CASES, ids=[f"k{c[1]}" for c in SPLIT_CASES]
)
def test_trainer_splits_each_micro_batch_across_the_replicas(runs, model, k, b, n) -> None:
    """Each replica accumulates its own share (no collective per micro-batch): mid-window,
    the replicas' counts add up to the window's count so far and none holds all of it. (A
    Trainer that ignored the strategy and ran on one device passed the weight tests.) Only
    the windows' open micro-batches are seen (a closing one is applied and reset), so the
    cases with k > 1; MLP only, where a share's count is its example count."""
    shares = scenario(runs, f"trainer-{_key(model, k, b, n)}")["shares"]
    order = epoch_order(n, shuffle=True, seed=0, epoch=0)
    sizes = [len(order[i : i + R * b]) for i in range(0, n, R * b)]
    assert len(shares) == len(sizes)
    running = 0
    for i, (size, counts) in enumerate(zip(sizes, shares, strict=True)):
        running += size
        if (i + 1) % k == 0 or i == len(sizes) - 1:  # the window closed: applied and reset
            assert counts == [0.0] * R, (i, counts)
            running = 0
            continue
        assert len(counts) == R and sum(counts) == running, (i, counts)
        assert max(counts) < running, (i, counts)


@pytest.mark.parametrize(("model", "k", "b", "n"), EXACT_CASES, ids=EXACT_IDS)
def test_accumulating_model_equals_one_step_per_concatenated_window(runs, model, k, b, n) -> None:
    key = f"wrapper-{_key(model, k, b, n)}"
    expected, ref_records = reference_epoch(model, windows(n, R * k * b, shuffle=False))
    assert_weights_close(weights_of(state(runs, key)), expected, key)
    result = scenario(runs, key)
    assert result["skipped"] == 0
    # fit's epoch logs: each window's loss weighted by its example count (plain Keras' mean).
    for field in ("loss", "data_loss"):
        mean = sum(r[field] * r["examples"] for r in ref_records) / n
        assert_close(f"{key} {field}", result["history"][field], [mean], rtol=EXACT.rtol)


def test_logs_equal_the_one_device_logs(runs) -> None:
    key = _key("mlp", *sc.CASES[2])
    records = scenario(runs, f"trainer-{key}")["records"]
    history = scenario(runs, f"wrapper-{key}")["history"]
    one = scenario(runs, "one-device")
    assert len(records) == len(one["records"]) == 2
    assert [r["examples"] for r in records] == [r["examples"] for r in one["records"]]
    for field in ("loss", "data_loss", "penalty", "elements"):
        assert_close(
            f"Trainer {field}",
            [r[field] for r in records],
            [r[field] for r in one["records"]],
            rtol=EXACT.rtol,
        )
    assert set(history) == set(one["history"]) == {"loss", "data_loss"}
    for field, values in one["history"].items():
        assert_close(f"fit {field}", history[field], values, rtol=EXACT.rtol)


# -- 2: 1 x 4 == 2 x 2 == 4 x 1 ----------------------------------------------------------------


@pytest.mark.parametrize("name", sc.OPTIMIZERS)
def test_trajectories_one_by_four_two_by_two_four_by_one(runs, name) -> None:
    window, updates = sc.TRAJECTORY["window"], sc.TRAJECTORY["updates"]
    x, y, sw = sc.data(window * updates, seed=2)
    model = sc.mlp()
    t = tfreg.Trainer(model, sc.loss(), sc.optimizer(name), accumulation_steps=4)
    assert len(t.fit(x, y, batch_size=window // 4, sample_weight=sw, verbose=0)) == updates
    for replicas in (2, 4):
        assert scenario(runs, f"trajectory-{name}", replicas) == {"updates": updates}
        found = state(runs, f"trajectory-{name}", replicas)
        assert_weights_close(weights_of(found), model.get_weights(), f"{replicas} replicas")


# -- 3: tf.data input ------------------------------------------------------------------------


def test_dataset_of_global_micro_batches_equals_arrays(runs) -> None:
    key = f"trainer-{_key('mlp', *sc.CASES[2])}"  # the same epoch, fed as arrays
    arrays, dataset = state(runs, key), state(runs, "dataset")
    assert set(arrays) == set(dataset)
    for name, value in arrays.items():
        assert_close(name, dataset[name], value, rtol=EXACT.rtol)
    ours, expected = scenario(runs, "dataset")["records"], scenario(runs, key)["records"]
    assert [r["examples"] for r in ours] == [r["examples"] for r in expected]
    for field in ("loss", "elements"):
        assert_close(field, [r[field] for r in ours], [r[field] for r in expected], rtol=EXACT.rtol)


# -- 4, 5: consensus on a non-finite gradient; replicas bit-identical --------------------------


def test_nan_on_one_replica_skips_the_update_everywhere(runs) -> None:
    result = scenario(runs, "nan")
    assert [r["skipped"] for r in result["records"]] == [False, True]
    assert result["iterations"] == 1
    arrays = runs[R]["arrays"]
    before = [k for k in arrays if k.startswith("nan-update0/")]
    assert before
    for name in before:
        # Weights and optimizer state (moments, iterations) untouched, on every replica, and
        # the replicas' copies bit-identical after the skip.
        after = arrays[name.replace("update0", "update1")]
        np.testing.assert_array_equal(after, arrays[name], err_msg=name)
        assert all(np.array_equal(copy, after[0]) for copy in after), name
    assert "Non-finite gradient" in result["raised"]
    assert result["raise_iterations"] == 1


@pytest.mark.parametrize("replicas", [2, 4])
def test_replicas_stay_bit_identical(runs, replicas) -> None:
    arrays = runs[replicas]["arrays"]
    assert arrays
    differ = [k for k, v in arrays.items() if not all(np.array_equal(c, v[0]) for c in v)]
    assert not differ, f"copies differ across replicas: {differ}"
    assert {v.shape[0] for v in arrays.values()} == {replicas}


# -- 8: one trace per step function ----------------------------------------------------------


@pytest.mark.parametrize(("model", "k", "b", "n"), EXACT_CASES, ids=EXACT_IDS)
def test_trace_counts_constant_with_a_short_last_micro_batch(runs, model, k, b, n) -> None:
    # After one epoch and after two more, each ending with a one-example global micro-batch.
    traces = scenario(runs, f"trainer-{_key(model, k, b, n)}")["traces"]
    assert traces == [{"apply": 1, "micro": 1}] * 2


# -- 7: refusals, in this process, on a 1-device MirroredStrategy ----------------------------


def _mirrored() -> tf.distribute.MirroredStrategy:
    return tf.distribute.MirroredStrategy(["/cpu:0"])


def _inside(strategy: Any, fn: Any) -> Any:
    """``fn`` to be called inside ``strategy.scope()``."""

    def call() -> Any:
        with strategy.scope():
            return fn()

    return call


def _in_scope(strategy: Any) -> keras.Model:
    with strategy.scope():
        return sc.mlp()


def _trainer_jit(strategy: Any) -> Any:
    model = _in_scope(strategy)
    return model, _inside(
        strategy, lambda: tfreg.Trainer(model, sc.loss(), "sgd", jit_compile=True)
    )


def _optimizer_outside(strategy: Any) -> Any:
    model, opt = _in_scope(strategy), keras.optimizers.SGD(learning_rate=sc.LR)
    return model, _inside(strategy, lambda: tfreg.Trainer(model, sc.loss(), opt))


def _model_outside(strategy: Any) -> Any:
    model = sc.mlp()
    return model, _inside(strategy, lambda: tfreg.Trainer(model, sc.loss(), "sgd"))


def _trainer_outside(strategy: Any) -> Any:
    model = _in_scope(strategy)
    return model, lambda: tfreg.Trainer(model, sc.loss(), "sgd")


def _one_device(_: Any) -> Any:
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    model = _in_scope(strategy)
    return model, _inside(strategy, lambda: tfreg.Trainer(model, sc.loss(), "sgd"))


def _float16(strategy: Any) -> Any:
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((sc.D,)), keras.layers.Dense(sc.C, dtype="mixed_float16")]
        )
    return model, _inside(strategy, lambda: tfreg.Trainer(model, sc.loss(), "sgd"))


def _steps_per_execution(strategy: Any) -> Any:
    with strategy.scope():
        model = sc.mlp()
        wrapper = tfreg.AccumulatingModel(model, accumulation_steps=2)
        wrapper.compile(optimizer="sgd", loss=sc.loss(), steps_per_execution=2)
    x, y, _ = sc.data(8)
    return model, lambda: wrapper.fit(x, y, batch_size=2, verbose=0)


REFUSALS = {
    "jit_compile": (_trainer_jit, r"jit_compile=True is not supported .*strategy"),
    "optimizer-outside-scope": (_optimizer_outside, r"optimizer=SGD built outside Mirrored"),
    "model-outside-scope": (_model_outside, r"a model built outside strategy\.scope\(\)"),
    "trainer-outside-scope": (_trainer_outside, r"Trainer built outside any strategy scope"),
    "OneDeviceStrategy": (_one_device, r"strategy=OneDeviceStrategy"),
    "float16-loss-scaling": (_float16, r"optimizer=LossScaleOptimizer"),
    "steps_per_execution": (_steps_per_execution, r"steps_per_execution=2"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_setups_refused_before_any_update(case) -> None:
    make, message = REFUSALS[case]
    model, call = make(_mirrored())
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(InvalidArgumentError, match=message):
        call()
    for w, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_one_device_mirrored_strategy_trains_in_process() -> None:
    # The refusals above run on this strategy: it must be one the engines accept.
    strategy = _mirrored()
    with strategy.scope():
        model = sc.mlp()
        t = tfreg.Trainer(model, sc.loss(), keras.optimizers.SGD(learning_rate=sc.LR))
    x, y, sw = sc.data(8)
    reference = sc.mlp()
    one = tfreg.Trainer(reference, sc.loss(), keras.optimizers.SGD(learning_rate=sc.LR))
    for trainer in (t, one):
        trainer.fit(x, y, batch_size=4, sample_weight=sw, verbose=0)
    assert_weights_close(model.get_weights(), reference.get_weights(), "1-device strategy")
