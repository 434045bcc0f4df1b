"""The MirroredStrategy scenarios of ``tests/test_distributed_tf.py``, run in a subprocess.

``python tests/_tf_mirrored_scenarios.py REPLICAS OUTDIR`` splits the CPU into ``REPLICAS``
logical devices -- which must happen before TensorFlow initialises its devices, hence a process
of its own per device count -- runs every scenario for that count under one
``MirroredStrategy`` and writes ``OUTDIR/arrays.npz`` (every variable's per-replica copies,
stacked on a leading replica axis) and ``OUTDIR/results.json`` (History records, logs, trace
counts, errors). The test module imports the models and data from here, so both sides build
the same thing.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tfreg
from tfreg_core.windows import epoch_order

LR = 0.125  # float32-exact: Keras keeps the learning rate in a float32 variable
L2 = 2.0**-7  # float32-exact: Keras-named regularizers round their factor through float32
CLIP = 0.5  # binds on some windows (the test checks): the global norm of the reduced gradient
D, H, C = 3, 5, 3  # MLP: inputs, hidden units, classes
T, V, E = 4, 6, 2  # masked model: timesteps, vocabulary (0 = padding), embedding width
# (k, b, N) for R=2 (global micro-batch R*b): N not divisible by R*k*b, and the last global
# micro-batch holds one example, so replica 1's share of it is empty. 17 = 2*8 + 1 and
# 25 = 24 + 1 (a last window of one example: replica 1 has none in it); 31 = 20 + 10 + 1 (the
# last window's second micro-batch is empty on replica 1).
CASES = [(1, 4, 17), (3, 4, 25), (2, 5, 31)]
MASKED = (2, 3, 25)  # windows of 12, 12, 1 sequences (some fully padded)
TRAJECTORY = {"window": 12, "updates": 20}  # 4 micro-batches of 3 = 2 x 2 x 3 = 4 x 1 x 3
NAN = {"k": 2, "b": 3, "n": 24, "row": 16}  # see nonfinite()
OPTIMIZERS = ("sgd", "adam")


# -- models and data (the same in every process) ----------------------------------------------


def mlp_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.normal(scale=0.7, size=(D, H)),
        rng.normal(scale=0.1, size=H),
        rng.normal(scale=0.7, size=(H, C)),
        rng.normal(scale=0.1, size=C),
    ]


def mlp() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((D,), dtype="float64"),
            keras.layers.Dense(H, activation="tanh", dtype="float64"),
            keras.layers.Dense(C, dtype="float64"),
        ]
    )
    model.set_weights(mlp_weights())
    return model


def data(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)), rng.integers(0, C, size=n), rng.uniform(0.5, 2.0, size=n)


def masked_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.normal(scale=0.5, size=(V, E)), rng.normal(size=(E, C)), np.zeros(C)]


def masked_model() -> keras.Model:
    """Embedding(mask_zero=True) -> Dense logits per timestep: the loss counts the timesteps
    whose token is not 0 (Dense passes the mask on)."""
    model = keras.Sequential(
        [
            keras.Input((T,), dtype="int32"),
            keras.layers.Embedding(V, E, mask_zero=True, dtype="float64"),
            keras.layers.Dense(C, dtype="float64"),
        ]
    )
    model.set_weights(masked_weights())
    return model


def masked_data(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token sequences of random lengths 0..T (trailing padding; every fifth one empty) and
    per-timestep sample weights (Keras' fit refuses per-example weights on a per-timestep
    loss)."""
    rng = np.random.default_rng(6)
    x = rng.integers(1, V, size=(n, T)).astype(np.int32)
    lengths = rng.integers(0, T + 1, size=n)
    lengths[::5] = 0
    lengths[-1] = T  # AccumulatingModel's (unshuffled) one-example last window counts T
    x[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return x, rng.integers(0, C, size=(n, T)), rng.uniform(0.5, 2.0, size=(n, T))


def loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def optimizer(name: str, **kwargs: Any) -> keras.optimizers.Optimizer:
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=LR, momentum=0.5, **kwargs)
    return keras.optimizers.Adam(learning_rate=2.0**-7, **kwargs)


# -- what the subprocess runs -------------------------------------------------------------------


def components(variables: list[Any], strategy: tf.distribute.Strategy) -> list[np.ndarray]:
    """Each variable's copies on the replicas, stacked: shape (replicas, *variable.shape)."""
    return [
        np.stack([c.numpy() for c in strategy.experimental_local_results(v.value)])
        for v in variables
    ]


class _Results:
    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self.strategy = strategy
        self.arrays: dict[str, np.ndarray] = {}
        self.json: dict[str, Any] = {}

    def state(self, key: str, model: keras.Model, opt: keras.optimizers.Optimizer) -> None:
        """The model's weights and the optimizer's variables, every replica's copy."""
        for i, value in enumerate(components(model.weights, self.strategy)):
            self.arrays[f"{key}/weight{i}"] = value
        for i, value in enumerate(components(opt.variables, self.strategy)):
            self.arrays[f"{key}/optimizer{i}"] = value

    def run(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(self, key, *args)``; a scenario's failure is reported under its key and the
        others still run."""
        try:
            self.json[key] = fn(self, key, *args)
        except Exception as error:  # the test asserts on it, with the traceback
            self.json[key] = {"error": f"{type(error).__name__}: {error}"}
            self.json[key]["trace"] = traceback.format_exc()


def _trainer(model: keras.Model, opt: Any, k: int, **kwargs: Any) -> tfreg.Trainer:
    return tfreg.Trainer(model, loss(), opt, accumulation_steps=k, **kwargs)


def penalised_trainer(model: keras.Model, k: int) -> tuple[Any, tfreg.Trainer]:
    """SGD, L2 penalty and global-norm clipping: the exactness cases' Trainer."""
    opt = keras.optimizers.SGD(learning_rate=LR)
    return opt, _trainer(model, opt, k, regularizer=tfreg.L2(L2), global_clipnorm=CLIP)


def penalised_wrapper(model: keras.Model, k: int) -> tuple[Any, tfreg.AccumulatingModel]:
    """The same for AccumulatingModel: clipping is the optimizer's own global_clipnorm (applied
    once per update, inside apply, to the reduced gradient)."""
    wrapper = tfreg.AccumulatingModel(model, accumulation_steps=k, regularizer=tfreg.L2(L2))
    opt = keras.optimizers.SGD(learning_rate=LR, global_clipnorm=CLIP)
    wrapper.compile(optimizer=opt, loss=loss())
    return opt, wrapper


def fit_wrapper(wrapper: tfreg.AccumulatingModel, data: tuple, batch_size: int) -> dict:
    """One epoch of Keras fit in the data's order (shuffle=False: Keras' shuffling is not
    seeded like the Trainer's)."""
    x, y, sw = data
    logs = wrapper.fit(x, y, batch_size=batch_size, sample_weight=sw, shuffle=False, verbose=0)
    return logs.history


def _exact_trainer(out: _Results, key: str, model_fn, data_fn, k: int, b: int, n: int) -> dict:
    """One epoch (weights, records, each replica's accumulated count after every micro-batch),
    then two more epochs for the trace counts (each epoch's last global micro-batch is short:
    one example)."""
    with out.strategy.scope():
        model = model_fn()
        opt, t = penalised_trainer(model, k)
    x, y, sw = data_fn(n)
    batch_size = out.strategy.num_replicas_in_sync * b
    shares = _Shares(out.strategy)
    history = t.fit(x, y, batch_size=batch_size, sample_weight=sw, verbose=0, callbacks=[shares])
    out.state(key, model, opt)
    traces = [t.trace_counts()]
    t.fit(x, y, batch_size=batch_size, sample_weight=sw, epochs=3, verbose=0)
    return {
        "records": history.records,
        "traces": [*traces, t.trace_counts()],
        "shares": shares.counts,
    }


class _Shares:
    """Each replica's copy of the open window's count, after every micro-batch (a closing one
    has been applied and reset)."""

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self.strategy = strategy
        self.counts: list[list[float]] = []

    def on_micro_batch_end(self, trainer: Any, epoch: int, micro_batch: int) -> None:
        count = trainer.accumulator.count
        self.counts.append([float(c) for c in self.strategy.experimental_local_results(count)])


def _exact_wrapper(out: _Results, key: str, model_fn, data_fn, k: int, b: int, n: int) -> dict:
    with out.strategy.scope():
        model = model_fn()
        opt, wrapper = penalised_wrapper(model, k)
    logs = fit_wrapper(wrapper, data_fn(n), out.strategy.num_replicas_in_sync * b)
    out.state(key, model, opt)
    return {"history": logs, "skipped": wrapper.skipped_updates}


def _one_device(out: _Results, key: str, k: int, b_global: int, n: int) -> dict[str, Any]:
    """Both engines on one device (no strategy), as ``_exact_trainer``/``_exact_wrapper``
    configure them: the History/logs the strategy's must equal."""
    _, t = penalised_trainer(mlp(), k)
    x, y, sw = data(n)
    records = t.fit(x, y, batch_size=b_global, sample_weight=sw, verbose=0).records
    _, wrapper = penalised_wrapper(mlp(), k)
    return {"records": records, "history": fit_wrapper(wrapper, (x, y, sw), b_global)}


def _trajectory(out: _Results, key: str, name: str) -> dict[str, Any]:
    replicas = out.strategy.num_replicas_in_sync
    window, updates = TRAJECTORY["window"], TRAJECTORY["updates"]
    x, y, sw = data(window * updates, seed=2)
    k = 4 // replicas  # 4 micro-batches of 3 examples per window, on R replicas
    with out.strategy.scope():
        model, opt = mlp(), optimizer(name)
        t = _trainer(model, opt, k)
    history = t.fit(x, y, batch_size=window // k, sample_weight=sw, verbose=0)
    out.state(key, model, opt)
    return {"updates": len(history.records)}


def _dataset(out: _Results, key: str, k: int, b: int, n: int) -> dict[str, Any]:
    """``_exact_trainer``'s epoch fed as a tf.data.Dataset of the same global micro-batches:
    the arrays in the Trainer's epoch order (seed 0, epoch 0), batched by R*b."""
    order = epoch_order(n, shuffle=True, seed=0, epoch=0)
    x, y, sw = (a[order] for a in data(n))
    batches = tf.data.Dataset.from_tensor_slices((x, y, sw))
    with out.strategy.scope():
        model = mlp()
        opt, t = penalised_trainer(model, k)
    history = t.fit(batches.batch(out.strategy.num_replicas_in_sync * b), verbose=0)
    out.state(key, model, opt)
    return {"records": history.records}


def _nonfinite(out: _Results, key: str) -> dict[str, Any]:
    """No shuffle, k=2, global micro-batch 6: window 1 is examples 12..23, its first micro-batch
    12..17 -- replica 0 takes 12..14, replica 1 15..17 -- so the NaN in row 16 reaches replica
    1 only; replica 0's gradient is finite and it must skip all the same."""
    x, y, _ = data(NAN["n"], seed=3)
    x[NAN["row"]] = np.nan
    result: dict[str, Any] = {}

    class Snapshot:  # every replica's state after each update
        def __init__(self, model, opt) -> None:
            self.model, self.opt = model, opt

        def on_update_end(self, trainer: Any, record: dict[str, Any]) -> None:
            out.state(f"{key}-update{record['update']}", self.model, self.opt)

    with out.strategy.scope():
        model, opt = mlp(), optimizer("adam")
        t = _trainer(model, opt, NAN["k"])
    history = t.fit(
        x, y, batch_size=2 * NAN["b"], shuffle=False, verbose=0, callbacks=[Snapshot(model, opt)]
    )
    result["records"] = history.records
    result["iterations"] = int(opt.iterations.numpy())
    with out.strategy.scope():
        model, opt = mlp(), optimizer("adam")
        t = _trainer(model, opt, NAN["k"], on_nonfinite="raise")
    try:
        t.fit(x, y, batch_size=2 * NAN["b"], shuffle=False, verbose=0)
    except FloatingPointError as error:
        result["raised"] = str(error)
        result["raise_iterations"] = int(opt.iterations.numpy())
    return result


def scenarios(out: _Results) -> None:
    for name in OPTIMIZERS:
        out.run(f"trajectory-{name}", _trajectory, name)
    if out.strategy.num_replicas_in_sync != 2:
        return
    engines = {"trainer": _exact_trainer, "wrapper": _exact_wrapper}
    for engine, fn in engines.items():
        for k, b, n in CASES:
            out.run(f"{engine}-{k}-{b}-{n}", fn, mlp, data, k, b, n)
        out.run(f"{engine}-masked", fn, masked_model, masked_data, *MASKED)
    k, b, n = CASES[2]
    out.run("one-device", _one_device, k, 2 * b, n)
    out.run("dataset", _dataset, k, b, n)
    out.run("nan", _nonfinite)


def main(replicas: int, outdir: str) -> None:
    # Keras' loss/metric trackers (AccumulatingModel's logs) in float64, so the logs compare at
    # the float64 tolerance; every model sets its dtype itself.
    keras.config.set_floatx("float64")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
    )
    devices = [f"/cpu:{i}" for i in range(replicas)]
    out = _Results(tf.distribute.MirroredStrategy(devices))
    scenarios(out)
    np.savez(Path(outdir) / "arrays.npz", **out.arrays)
    (Path(outdir) / "results.json").write_text(json.dumps(out.json))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
