"""tfreg.Trainer on MirroredStrategy (2 logical CPUs) vs torchref.Trainer on DDP (2 gloo ranks).

One MLP, float64, initial weights drawn once in NumPy and loaded into both frameworks through
the harness layout maps; the same examples, sample weights, L2 penalty and global clipnorm; 20
accumulated updates (2 epochs of 10 windows) with SGD+momentum and with Adam. The losses of
every update and the final weights must agree to the "trajectory" row (float64: 1e-9).

The window plan is the same on both sides although the two ``batch_size`` s differ: tfreg takes
the **global** micro-batch (Keras' convention under a strategy, ``R*b = 6``), torchref the
micro-batch **per rank** (torch's, ``b = 3``); both plan the epoch with micro-batches of 6
(:mod:`tfreg_core.distributed`), which the example counts per update and the first update's
loss (checked against a plain torch computation on the planned window) pin.

Where the optimizers differ, the matching formulation of ``test_trajectories`` is used: torch's
SGD momentum is Keras' recursion for a constant rate, with Keras' float32 rounding of lr and
momentum applied to the torch values (:func:`f32`); Keras' Adam is matched by
``torchref.KerasAdamW`` (weight_decay=0), not ``torch.optim.Adam`` (epsilon placement).

Processes: one TensorFlow subprocess (its 2 logical CPU devices must be configured before TF
initialises, so not in the pytest process) runs both optimizers; 2 spawned gloo ranks on
localhost run both torch trajectories; the three start together. Every wait has a timeout.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import torchref
from tfreg_core.windows import epoch_order, plan_epoch
from tfreg_harness import assert_close, tolerance
from tfreg_harness.architecture import mlp_spec

REPO = Path(__file__).resolve().parents[1]
WORLD = 2  # replicas (tf) == ranks (torch)
K, B = 2, 3  # micro-batches per update, examples per replica in each micro-batch
FEATURES, CLASSES = 4, 3
SPEC = mlp_spec(hidden=(5,), classes=CLASSES)
# 9 full windows of R*k*b = 12 and a short one of 7 per epoch: its second micro-batch has one
# example, all on rank 0, so rank 1 joins that update with an empty share.
N, EPOCHS = 115, 2
UPDATES = EPOCHS * -(-N // (WORLD * K * B))
L2 = 2.0**-7  # float32-exact: Keras' L2 rounds its factor through float32
# Global norm of the reduced gradient (data + penalty): binds on most updates (the unclipped
# runs' norms are 0.26-0.89, above 0.5 on 15 of 20 SGD and 18 of 20 Adam updates).
CLIP = 0.5
LR, MOMENTUM, ADAM_LR = 0.05, 0.9, 0.01
# float64, the table's "trajectory" row (1e-9): the frameworks sum the window in different
# orders (TF: per replica, then one all-reduce of the sums; torch: per rank, then DDP's
# bucketed all-reduce, its average undone by x2) and compute the forward/backward, the penalty,
# the clipping norm and the optimizer step with their own kernels and association; that
# ~1e-16 per-step round-off compounds over 20 updates (the bound covers ill-conditioned
# trajectories too). Measured max relative differences (2026-12-02): sgd-momentum weights
# 2.4e-16, losses 2.6e-16; adam weights 7.5e-17, losses 2.6e-16 -- round-off of the last bit.
TRAJECTORY = tolerance("trajectory", "float64")
# The first update's loss at the initial weights: one forward pass in each framework against a
# plain torch one, the "model_cross" row (1e-10).
FORWARD = tolerance("model_cross", "float64")
# All processes together (a hang guard): they take ~20 s on an idle 2-core machine.
TIMEOUT_S = 150
GROUP_TIMEOUT = datetime.timedelta(seconds=30)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def f32(value: float) -> float:
    """``value`` as Keras sees it after its float32 variable / ``ops.cast``."""
    return float(np.float32(value))


# name: (Keras optimizer, torch optimizer); see the module docstring for why these match.
OPTIMIZERS = {
    "sgd-momentum": (
        lambda keras: keras.optimizers.SGD(LR, momentum=MOMENTUM),
        lambda params: torch.optim.SGD(params, lr=f32(LR), momentum=f32(MOMENTUM)),
    ),
    "adam": (
        lambda keras: keras.optimizers.Adam(ADAM_LR),
        lambda params: torchref.KerasAdamW(params, lr=ADAM_LR),
    ),
}


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "x": rng.normal(size=(N, FEATURES)),
        "y": rng.integers(0, CLASSES, size=N),
        "sample_weight": rng.uniform(0.5, 2.0, size=N),
    }


def _history(history: Any) -> dict[str, np.ndarray]:
    # History has the same records in both trainers (tfreg_core.training.History).
    return {
        key: np.array([r[key] for r in history.records])
        for key in ("loss", "data_loss", "examples", "micro_batches")
    }


# -- TensorFlow: MirroredStrategy over 2 logical CPUs, in its own process ---------------------


def tf_main(directory: Path) -> None:
    """Both trajectories on ``MirroredStrategy``; writes ``tf.npz``. Runs as ``__main__``."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * WORLD
    )
    import keras

    import tfreg
    from tfreg_harness.keras_side.architecture import build_model

    inputs = np.load(directory / "inputs.npz")
    initial = [inputs[f"keras_{i}"] for i in range(int(inputs["keras_count"]))]
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(WORLD)])
    out: dict[str, Any] = {"replicas": strategy.num_replicas_in_sync}
    for name, (keras_optimizer, _) in OPTIMIZERS.items():
        with strategy.scope():
            model = build_model(SPEC, (FEATURES,), dtype="float64")
            model.set_weights(initial)
            trainer = tfreg.Trainer(
                model,
                keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"),
                keras_optimizer(keras),
                accumulation_steps=K,
                regularizer=tfreg.L2(L2),
                global_clipnorm=CLIP,
            )
        history = trainer.fit(
            inputs["x"],
            inputs["y"],
            batch_size=WORLD * B,  # global: each replica gets b of every micro-batch
            epochs=EPOCHS,
            sample_weight=inputs["sample_weight"],
            verbose=0,
        )
        out.update({f"{name}/{k}": v for k, v in _history(history).items()})
        out.update({f"{name}/weight_{i}": w for i, w in enumerate(model.get_weights())})
    np.savez(directory / "tf.npz", **out)


# -- torch: DDP on 2 gloo ranks ---------------------------------------------------------------


def _rank(rank: int, port: int, directory: str) -> None:
    from tfreg_harness.torch_side.architecture import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=GROUP_TIMEOUT)
    out: dict[str, Any] = {}
    try:
        inputs = np.load(Path(directory) / "inputs.npz")
        initial = {k[len("torch/") :]: torch.as_tensor(inputs[k]) for k in inputs if "torch/" in k}
        for name, (_, torch_optimizer) in OPTIMIZERS.items():
            module = build_model(SPEC, (FEATURES,), dtype="float64")
            module.load_state_dict(initial)
            model = torch.nn.parallel.DistributedDataParallel(module)
            trainer = torchref.Trainer(
                model,
                "cross_entropy",
                torch_optimizer(model.parameters()),
                accumulation_steps=K,
                regularizer=torchref.L2(L2),
                global_clipnorm=CLIP,
            )
            history = trainer.fit(
                inputs["x"],
                inputs["y"],
                batch_size=B,  # per rank: the global micro-batch is WORLD * B
                epochs=EPOCHS,
                sample_weight=inputs["sample_weight"],
                verbose=0,
            )
            out[name] = {
                "history": _history(history),
                "state": {k: v.detach().numpy() for k, v in module.state_dict().items()},
            }
    except Exception as error:  # reported to the parent, which asserts on it
        out = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    torch.save(out, Path(directory) / f"rank{rank}.pt")
    if "error" not in out:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the runs, started together ---------------------------------------------------------------


def initial_pair() -> Any:
    """The model pair, weights from one NumPy draw loaded into Keras and transferred to torch
    through the layout maps (``build_pair``)."""
    from tfreg_harness.keras_side.models import build_pair

    return build_pair(SPEC, (FEATURES,), dtype="float64", rng=np.random.default_rng(3))


def _inputs(directory: Path) -> Any:
    """Writes the initial weights (each framework's layout) and the data for the processes;
    returns the pair."""
    pair = initial_pair()
    keras_weights = pair.keras.get_weights()
    arrays = {f"keras_{i}": w for i, w in enumerate(keras_weights)}
    arrays.update({f"torch/{k}": v.numpy() for k, v in pair.torch.state_dict().items()})
    np.savez(directory / "inputs.npz", keras_count=len(keras_weights), **arrays, **data())
    return pair


def _run(directory: Path) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The TF subprocess and the WORLD ranks, started together and waited for at most
    TIMEOUT_S in all; returns their results."""
    deadline = time.monotonic() + TIMEOUT_S
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    log = directory / "tf.log"  # a file, not a pipe nobody reads while the ranks run
    with log.open("w") as out:
        tf_process = subprocess.Popen(
            [sys.executable, __file__, str(directory)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    ranks = [ctx.Process(target=_rank, args=(r, port, str(directory))) for r in range(WORLD)]
    try:
        for p in ranks:
            p.start()
        for p in ranks:
            p.join(max(deadline - time.monotonic(), 0))
        hung = [p for p in ranks if p.is_alive()]
        assert not hung, f"{len(hung)} rank(s) still running after {TIMEOUT_S} s"
        try:
            tf_process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the MirroredStrategy process still running after {TIMEOUT_S} s")
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
                p.join()
        if tf_process.poll() is None:
            tf_process.kill()
            tf_process.wait()
    assert tf_process.returncode == 0, log.read_text()[-3000:]
    files = [directory / f"rank{r}.pt" for r in range(WORLD)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no result: {missing}"
    results = [torch.load(f, weights_only=False) for f in files]
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r}: {result.get('trace')}"
    return dict(np.load(directory / "tf.npz")), results


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        pair = _inputs(directory)
        tf_out, ranks = _run(directory)
    return {"pair": pair, "tf": tf_out, "ranks": ranks}


# -- tests ------------------------------------------------------------------------------------


def _weights(pair: Any, tf_out: dict[str, np.ndarray], name: str, state: dict) -> tuple:
    """Both final weight sets as one vector each, torch's mapped to Keras' layout."""
    count = sum(1 for k in tf_out if k.startswith(f"{name}/weight_"))
    pair.keras.set_weights([tf_out[f"{name}/weight_{i}"] for i in range(count)])
    pair.torch.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    pairs = [p for p in pair.parameter_pairs() if p.trainable]
    keras_weights = np.concatenate([p.keras_variable.numpy().ravel() for p in pairs])
    torch_weights = np.concatenate([p.torch_value().ravel() for p in pairs])
    return keras_weights, torch_weights


def test_both_run_two_replicas_on_the_same_window_plan(runs) -> None:
    assert int(runs["tf"]["replicas"]) == WORLD
    # tfreg's global batch_size R*b and torchref's per-rank b plan the same windows.
    planned = [w.examples for w in plan_epoch(N, batch_size=WORLD * B, accumulation_steps=K)]
    assert planned[-1] == 7 and len(planned) * EPOCHS == UPDATES == 20
    for name in OPTIMIZERS:
        for history in [runs["ranks"][r][name]["history"] for r in range(WORLD)]:
            np.testing.assert_array_equal(history["examples"], planned * EPOCHS)
            np.testing.assert_array_equal(history["micro_batches"], [K] * UPDATES)
        np.testing.assert_array_equal(runs["tf"][f"{name}/examples"], planned * EPOCHS)
        np.testing.assert_array_equal(runs["tf"][f"{name}/micro_batches"], [K] * UPDATES)


def test_first_update_loss_is_the_planned_window_at_the_initial_weights(runs) -> None:
    # Written out in plain torch: sum(w*l)/N on the first R*k*b examples of epoch 0's order
    # (the trainers' default seed), at the initial weights.
    module = initial_pair().torch
    d = data()
    window = epoch_order(N, shuffle=True, seed=0, epoch=0)[: WORLD * K * B]
    with torch.no_grad():
        logits = module(torch.as_tensor(d["x"][window]))
        values = torch.nn.functional.cross_entropy(
            logits, torch.as_tensor(d["y"][window]), reduction="none"
        )
        expected = float((values * torch.as_tensor(d["sample_weight"][window])).mean())
    for name in OPTIMIZERS:
        tf_first = runs["tf"][f"{name}/data_loss"][0]
        torch_first = runs["ranks"][0][name]["history"]["data_loss"][0]
        assert_close(
            f"{name} tf first loss", np.array([tf_first]), np.array([expected]), rtol=FORWARD.rtol
        )
        assert_close(
            f"{name} torch first loss",
            np.array([torch_first]),
            np.array([expected]),
            rtol=FORWARD.rtol,
        )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_mirrored_strategy_trajectory_equals_ddp_trajectory(runs, name) -> None:
    ranks = runs["ranks"]
    # DDP keeps the ranks bit-identical; the History is the global one on both.
    for key, value in ranks[0][name]["state"].items():
        np.testing.assert_array_equal(value, ranks[1][name]["state"][key], err_msg=key)
    for key in ("loss", "data_loss"):
        np.testing.assert_array_equal(
            ranks[0][name]["history"][key], ranks[1][name]["history"][key]
        )
        assert_close(
            f"{name} {key} per update",
            runs["tf"][f"{name}/{key}"],
            ranks[0][name]["history"][key],
            rtol=TRAJECTORY.rtol,
        )
    keras_weights, torch_weights = _weights(runs["pair"], runs["tf"], name, ranks[0][name]["state"])
    assert_close(f"{name} final weights", keras_weights, torch_weights, rtol=TRAJECTORY.rtol)


if __name__ == "__main__":
    tf_main(Path(sys.argv[1]))
