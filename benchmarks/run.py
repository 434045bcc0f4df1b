"""Benchmarks of issue 6: ``make bench`` measures and writes ``benchmarks/RESULTS.md``.

Every timing result is a ratio of two variants measured side by side in this one process. Each
repeat runs every variant once, in an order rotated from repeat to repeat, so load from other
processes hits all variants alike; the report gives the median ratio over the repeats and its
spread (min-max and interquartile range). Tracing is excluded: every variant trains once before
the first timed repeat. Sections:

accumulation  tfreg.Trainer with k micro-batches of b against the same Trainer without
              accumulation (batch b), Keras' ``optimizer(gradient_accumulation_steps=k)`` in
              ``model.fit``, one plain batch of k*b, ``tfreg.AccumulatingModel`` and
              ``torchref.Trainer``: the seed CNN on digits-sized data (1,797 x 8x8x1).
penalty       Trainer(regularizer=R) against no penalty, per regularizer, on the seed CNN at
              8x8 and 28x28; the measured cost of the penalty and its gradient alone is the
              evidence for the overhead.
memory        peak memory of k x b against one batch of k*b (and 1 x b), each configuration in
              a fresh subprocess: after a two-example warm-up (tracing, optimizer slots,
              accumulator) the peak RSS is reset through ``/proc/self/clear_refs``, so the delta
              is the training steps' own peak; on CUDA also ``torch.cuda`` peak statistics.
retracing     ``tfreg.Trainer.trace_counts()`` after 10 and after 1,000 updates.
distributed   tfreg.Trainer on MirroredStrategy (2 logical CPUs, k/2 micro-batches per replica)
              against one device (k micro-batches), per configuration in a subprocess
              (``benchmarks/distributed_tf.py``: the logical devices must exist before
              TensorFlow starts), and the collectives per update in the traced graphs.

Clock: ``cpu`` (process CPU time, all threads) by default on CPU, ``wall`` with ``--device
cuda``; both are always recorded. With one intra-op thread per framework (``--threads 1``, the
default) CPU time is the work done and does not count time another process held the core, which
is what keeps repeats comparable on a shared machine; with two threads on two busy cores the
OpenMP/Eigen pools spin and per-epoch times varied 5x in trial runs.

``--frameworks torch`` (no TensorFlow, e.g. a GPU machine) runs the torch parts only.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/run.py` puts benchmarks/ first, not the repo
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402

FRAMEWORKS = ("tf", "torch")
PARTS = ("accumulation", "penalty", "memory", "retracing", "distributed")
CLOCKS = ("cpu", "wall")
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
LEARNING_RATE = 1e-3
STRENGTH = 1e-4
PENALTY_GOAL = 1.02
# k x b "tracks b" when its peak stays within 1.5x of 1 x b's: accumulation adds one
# gradient-sized buffer (the accumulator), where one batch of k*b holds k times the activations.
MEMORY_GOAL = 1.5


@dataclass(frozen=True)
class PenaltyModel:
    """The seed CNN on ``input_size`` x ``input_size`` x 1 data for the penalty section;
    ``untimed`` regularizers get their standalone cost and predicted ratio only."""

    input_size: int
    examples: int
    batch_size: int
    untimed: tuple[str, ...] = ()
    rounds: int = 1


@dataclass(frozen=True)
class DistributedConfig:
    """One run of ``benchmarks/distributed_tf.py``: the seed CNN on ``input_size`` x
    ``input_size`` x 1 images, ``window`` examples per update in micro-batches of
    ``batch_size`` per device, ``updates`` per timed epoch."""

    input_size: int
    window: int
    batch_size: int
    updates: int


@dataclass(frozen=True)
class Sizes:
    """Problem sizes. ``QUICK`` runs every code path in seconds (the smoke test)."""

    examples: int = 1797  # digits-sized: load_digits has 1,797 images of 8x8x1
    batch_size: int = 32  # micro-batch b
    accumulation_steps: int = 4  # k
    accumulation_rounds: int = 2  # epochs per variant per repeat, alternating
    penalty: tuple[PenaltyModel, ...] = (
        # Short epochs, many rounds: a 2% effect needs fine alternation on a busy machine.
        PenaltyModel(8, 512, 32, rounds=8),
        # On the 3136x64 Dense kernel, rows mode builds a 3136x3136 Gram matrix per update
        # (~0.2 s, ~9 updates' worth, on a 2-core EPYC): only its standalone cost is measured.
        PenaltyModel(28, 512, 64, untimed=("OrthogonalRegularizer(rows)",), rounds=4),
    )
    memory_input: int = 28
    memory_batch_size: int = 64
    memory_steps: int = 8
    memory_updates: int = 2
    trace_updates: tuple[int, int] = (10, 1000)
    trace_batch_size: int = 8
    penalty_calls: int = 200
    # None: every regularizer of `regularizers()`.
    penalties: tuple[str, ...] | None = None
    distributed: tuple[DistributedConfig, ...] = (
        DistributedConfig(8, 128, 16, 8),  # distributed_torch.py's defaults
        # The same per-update cost spread over 2 and over 32 micro-batches of the larger model.
        DistributedConfig(28, 64, 32, 8),
        DistributedConfig(28, 1024, 32, 2),
    )


DEFAULT = Sizes()
QUICK = Sizes(
    examples=24,
    batch_size=4,
    accumulation_steps=2,
    accumulation_rounds=1,
    penalty=(PenaltyModel(8, 8, 4, untimed=("OrthogonalRegularizer(rows)",)),),
    memory_input=8,
    memory_batch_size=4,
    memory_steps=2,
    memory_updates=1,
    trace_updates=(2, 5),
    trace_batch_size=2,
    penalty_calls=3,
    # One of each path: Trainer(regularizer=), Dense kernel_regularizer, not timed.
    penalties=("L1", "OrthogonalRegularizer(rows)", "OrthogonalRegularizer(columns)"),
    distributed=(DistributedConfig(8, 32, 8, 2),),
)


@dataclass(frozen=True)
class Ratio:
    """``numerator`` time / ``denominator`` time, per repeat; ``goal`` met when the median is at
    most ``goal``."""

    label: str
    numerator: str
    denominator: str
    goal: float | None = None


# --------------------------------------------------------------------------------------------
# Frameworks, data, models
# --------------------------------------------------------------------------------------------


def installed_frameworks() -> tuple[str, ...]:
    names = {"tf": "tensorflow", "torch": "torch"}
    return tuple(f for f in FRAMEWORKS if importlib.util.find_spec(names[f]) is not None)


def setup_frameworks(frameworks: Sequence[str], threads: int | None) -> dict[str, str]:
    """Import the frameworks and size their thread pools before any op runs; returns what was
    set. ``threads=0`` keeps the pool sizes; ``None`` leaves the frameworks entirely as the
    caller configured them (a test session must not lose its GPUs or threads to a benchmark)."""
    settings = {}
    if "tf" in frameworks:
        import tensorflow as tf

        settings["tf"] = "as configured by the caller"
        if threads is not None:
            try:
                # TensorFlow parts are CPU measurements (RSS); --device applies to torch.
                tf.config.set_visible_devices([], "GPU")
                if threads:
                    tf.config.threading.set_intra_op_parallelism_threads(threads)
                    tf.config.threading.set_inter_op_parallelism_threads(threads)
                settings["tf"] = (
                    f"{threads} intra-op / {threads} inter-op" if threads else "default"
                )
            except RuntimeError:
                settings["tf"] = "default (TensorFlow was already initialised)"
    if "torch" in frameworks:
        import torch

        if threads:
            torch.set_num_threads(threads)
        settings["torch"] = f"{torch.get_num_threads()} intra-op"
    return settings


def image_data(n: int, size: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random NHWC images in [0, 1) and 10-class labels. Timing and memory do not depend on the
    values, and random data of the digits' shape needs no scikit-learn on a GPU machine."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int32)
    return x, y


def torch_data(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y.astype(np.int64)


def keras_cnn(input_size: int) -> Any:
    """The seed CNN (``tfreg_harness.architecture.cnn_spec``) in Keras, float32, fixed seed."""
    import keras

    from tfreg_harness.architecture import cnn_spec
    from tfreg_harness.keras_side.architecture import build_model

    keras.utils.set_random_seed(0)
    return build_model(cnn_spec(), (input_size, input_size, 1), dtype="float32")


def torch_cnn(input_size: int) -> Any:
    """The seed CNN in torch from the same description, built without TensorFlow (a torch-only
    GPU machine lacks it); weights are torch's default initialisation (timing and memory do not
    depend on them). With both frameworks, :func:`seed_cnns` uses ``build_cnn``'s shared
    weights."""
    import torch

    from tfreg_harness.architecture import cnn_spec
    from tfreg_harness.torch_side.architecture import build_model

    torch.manual_seed(0)
    return build_model(cnn_spec(), (input_size, input_size, 1), dtype="float32")


def seed_cnns(input_size: int, frameworks: Sequence[str], device: str) -> tuple[Any, Any]:
    """(Keras template, torch template) of the seed CNN; None for a framework not benchmarked.
    With both, ``build_cnn`` loads identical NumPy weights into the two."""
    if "tf" in frameworks and "torch" in frameworks:
        from tfreg_harness.keras_side.models import build_cnn

        pair = build_cnn(
            dtype="float32",
            rng=np.random.default_rng(0),
            input_shape=(input_size, input_size, 1),
        )
        return pair.keras, pair.torch.to(device)
    if "tf" in frameworks:
        return keras_cnn(input_size), None
    return None, torch_cnn(input_size).to(device)


def keras_copy(template: Any, dense_regularizer: Any = None) -> Any:
    """A fresh model with ``template``'s weights; ``dense_regularizer`` becomes the Dense
    layers' ``kernel_regularizer``."""
    import keras

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if dense_regularizer is not None and isinstance(layer, keras.layers.Dense):
            config["kernel_regularizer"] = dense_regularizer
        return layer.__class__.from_config(config)

    model = keras.models.clone_model(template, clone_function=clone)
    model.set_weights(template.get_weights())
    return model


def keras_loss() -> Any:
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def keras_adam(**kwargs: Any) -> Any:
    import keras

    return keras.optimizers.Adam(LEARNING_RATE, **kwargs)


def tf_trainer(model: Any, *, accumulation_steps: int, regularizer: Any = None) -> Any:
    import tfreg

    return tfreg.Trainer(
        model,
        keras_loss(),
        keras_adam(),
        accumulation_steps=accumulation_steps,
        regularizer=regularizer,
    )


def torch_trainer(model: Any, *, accumulation_steps: int) -> Any:
    import torch

    import torchref

    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    return torchref.Trainer(
        model, "cross_entropy", optimizer, accumulation_steps=accumulation_steps
    )


def epoch_runner(trainer: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> Callable:
    """One more epoch per call (a Trainer's ``epochs`` counts from the start, as Keras')."""
    done = 0

    def run() -> None:
        nonlocal done
        done += 1
        trainer.fit(x, y, batch_size=batch_size, epochs=done, verbose=0)

    return run


def torch_loop_runner(
    model: Any, x: np.ndarray, y: np.ndarray, batch_size: int, accumulation_steps: int
) -> Callable:
    """The hand-written torch accumulation loop ``torchref.Trainer`` is measured against: a
    permutation per epoch, per micro-batch ``cross_entropy(reduction="sum") / window size``
    and ``backward()``, one ``step()`` and ``zero_grad()`` per window (exact, no bookkeeping)."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    device = next(model.parameters()).device
    epoch = 0

    def run() -> None:
        nonlocal epoch
        order = np.random.default_rng([0, epoch]).permutation(len(x))
        epoch += 1
        model.train()
        for start in range(0, len(x), batch_size * accumulation_steps):
            window = order[start : start + batch_size * accumulation_steps]
            for offset in range(0, len(window), batch_size):
                idx = window[offset : offset + batch_size]
                logits = model(torch.as_tensor(x[idx], device=device))
                target = torch.as_tensor(y[idx], device=device)
                loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                (loss / len(window)).backward()
            optimizer.step()
            optimizer.zero_grad()

    return run


def fit_runner(model: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> Callable:
    return lambda: model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def interleave(
    runs: dict[str, Callable[[], Any]], repeats: int, rounds: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Mean seconds per call of each run, per clock and repeat. A repeat is ``rounds`` rounds,
    each calling every run once in an order rotated from round to round: the finer the
    alternation, the more alike the load each variant sees. Every run is called once untimed
    first (tracing, optimizer slots, allocator pools)."""
    for run in runs.values():
        run()
    names = list(runs)
    times: dict[str, dict[str, list[float]]] = {n: {c: [] for c in CLOCKS} for n in names}
    # A full collection walks every TensorFlow/Keras object (~0.5 s here): never inside a timed
    # call. Objects alive after the warm-up are frozen out of later collections, and the
    # collector is off during a repeat and runs between repeats, untimed.
    gc.collect()
    gc.freeze()
    try:
        for r in range(repeats):
            totals = {n: dict.fromkeys(CLOCKS, 0.0) for n in names}
            gc.disable()
            for k in range(rounds):
                shift = (r * rounds + k) % len(names)
                for name in names[shift:] + names[:shift]:
                    wall, cpu = time.perf_counter(), time.process_time()
                    runs[name]()
                    totals[name]["cpu"] += time.process_time() - cpu
                    totals[name]["wall"] += time.perf_counter() - wall
            gc.enable()
            gc.collect()
            for name in names:
                for c in CLOCKS:
                    times[name][c].append(totals[name][c] / rounds)
    finally:
        gc.enable()
        gc.unfreeze()
    return times


def summarize(values: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(a, [25, 50, 75])
    return {
        "median": float(median),
        "min": float(a.min()),
        "max": float(a.max()),
        "q1": float(q1),
        "q3": float(q3),
        "n": len(a),
        "values": [float(v) for v in a],
    }


def ratio_results(
    times: dict[str, dict[str, list[float]]], ratios: Sequence[Ratio], clock: str
) -> list[dict[str, Any]]:
    out = []
    for spec in ratios:
        if spec.numerator not in times or spec.denominator not in times:
            continue
        num, den = times[spec.numerator], times[spec.denominator]
        per_clock = {
            c: summarize([a / b for a, b in zip(num[c], den[c], strict=True)]) for c in CLOCKS
        }
        verdict = None
        if spec.goal is not None:
            # The interquartile range decides: a goal inside it is below this machine's noise.
            s = per_clock[clock]
            verdict = (
                "met"
                if s["q3"] <= spec.goal
                else "missed"
                if s["q1"] > spec.goal
                else ("inconclusive")
            )
        out.append({**asdict(spec), **per_clock, "verdict": verdict})
    return out


def variant_results(
    times: dict[str, dict[str, list[float]]],
    labels: dict[str, str],
    examples: int,
    updates: dict[str, int],
) -> dict[str, Any]:
    return {
        name: {
            "label": labels[name],
            "updates_per_epoch": updates[name],
            **{f"epoch_s_{c}": summarize(t[c]) for c in CLOCKS},
            **{f"us_per_example_{c}": 1e6 * float(np.median(t[c])) / examples for c in CLOCKS},
        }
        for name, t in times.items()
    }


def updates_per_epoch(examples: int, batch_size: int, accumulation_steps: int) -> int:
    micro_batches = -(-examples // batch_size)
    return -(-micro_batches // accumulation_steps)


# --------------------------------------------------------------------------------------------
# 1. Accumulation overhead
# --------------------------------------------------------------------------------------------

ACCUMULATION_LABELS = {
    "trainer_kxb": "tfreg.Trainer, k×b",
    "trainer_1xb": "tfreg.Trainer, 1×b",
    "trainer_1xkb": "tfreg.Trainer, 1×(k·b)",
    "keras_fit_kxb": "Keras fit, Adam(gradient_accumulation_steps=k), batch b",
    "accumulating_model_kxb": "tfreg.AccumulatingModel fit, k×b",
    "torchref_kxb": "torchref.Trainer, k×b",
    "torchref_1xb": "torchref.Trainer, 1×b",
    "torchref_1xkb": "torchref.Trainer, 1×(k·b)",
    "torch_loop_kxb": "hand-written torch accumulation loop, k×b",
}

ACCUMULATION_RATIOS = (
    Ratio(
        "tfreg.Trainer k×b / tfreg.Trainer 1×b (accumulation overhead)",
        "trainer_kxb",
        "trainer_1xb",
        1.05,
    ),
    Ratio(
        "tfreg.Trainer k×b / Keras fit gradient_accumulation_steps=k",
        "trainer_kxb",
        "keras_fit_kxb",
        1.00,
    ),
    Ratio(
        "tfreg.Trainer k×b / tfreg.Trainer 1×(k·b) (one large batch)", "trainer_kxb", "trainer_1xkb"
    ),
    Ratio(
        "tfreg.AccumulatingModel k×b / Keras fit gradient_accumulation_steps=k",
        "accumulating_model_kxb",
        "keras_fit_kxb",
    ),
    Ratio(
        "torchref.Trainer k×b / hand-written torch loop k×b", "torchref_kxb", "torch_loop_kxb", 1.05
    ),
    Ratio("torchref.Trainer k×b / tfreg.Trainer k×b", "torchref_kxb", "trainer_kxb"),
    Ratio("torchref.Trainer k×b / torchref.Trainer 1×b", "torchref_kxb", "torchref_1xb"),
    Ratio("torchref.Trainer k×b / torchref.Trainer 1×(k·b)", "torchref_kxb", "torchref_1xkb"),
)


def bench_accumulation(
    sizes: Sizes, repeats: int, frameworks: Sequence[str], device: str, clock: str
) -> dict[str, Any]:
    b, k, n = sizes.batch_size, sizes.accumulation_steps, sizes.examples
    x, y = image_data(n, 8)
    keras_template, torch_template = seed_cnns(8, frameworks, device)
    runs: dict[str, Callable[[], Any]] = {}
    updates: dict[str, int] = {}
    if keras_template is not None:
        import tfreg

        for name, steps, batch in (("kxb", k, b), ("1xb", 1, b), ("1xkb", 1, k * b)):
            trainer = tf_trainer(keras_copy(keras_template), accumulation_steps=steps)
            runs[f"trainer_{name}"] = epoch_runner(trainer, x, y, batch)
            updates[f"trainer_{name}"] = updates_per_epoch(n, batch, steps)
        keras_fit = keras_copy(keras_template)
        keras_fit.compile(
            keras_adam(gradient_accumulation_steps=k), keras_loss(), jit_compile=False
        )
        runs["keras_fit_kxb"] = fit_runner(keras_fit, x, y, b)
        # Keras applies once per k micro-batches and carries a partial window into the next epoch.
        updates["keras_fit_kxb"] = n // (b * k)
        wrapped = tfreg.AccumulatingModel(keras_copy(keras_template), accumulation_steps=k)
        wrapped.compile(keras_adam(), keras_loss(), jit_compile=False)
        runs["accumulating_model_kxb"] = fit_runner(wrapped, x, y, b)
        updates["accumulating_model_kxb"] = updates_per_epoch(n, b, k)
    if torch_template is not None:
        xt, yt = torch_data(x, y)
        for name, steps, batch in (("kxb", k, b), ("1xb", 1, b), ("1xkb", 1, k * b)):
            trainer = torch_trainer(copy.deepcopy(torch_template), accumulation_steps=steps)
            runs[f"torchref_{name}"] = epoch_runner(trainer, xt, yt, batch)
            updates[f"torchref_{name}"] = updates_per_epoch(n, batch, steps)
        loop = torch_loop_runner(copy.deepcopy(torch_template), xt, yt, b, k)
        runs["torch_loop_kxb"] = loop
        updates["torch_loop_kxb"] = updates_per_epoch(n, b, k)
    times = interleave(runs, repeats, sizes.accumulation_rounds)
    return {
        "config": {
            "model": "seed CNN (Conv8-Pool-Conv16-Dense64-Dense10), float32, Adam",
            "input": "8x8x1",
            "examples": n,
            "batch_size": b,
            "accumulation_steps": k,
            "device_torch": device,
            "unit": f"{sizes.accumulation_rounds} alternating epochs per variant per repeat",
        },
        "variants": variant_results(times, ACCUMULATION_LABELS, n, updates),
        "ratios": ratio_results(times, ACCUMULATION_RATIOS, clock),
    }


# --------------------------------------------------------------------------------------------
# 2. Penalty overhead
# --------------------------------------------------------------------------------------------


def regularizers() -> dict[str, Any]:
    import tfreg

    return {
        "L1": tfreg.L1(STRENGTH),
        "L2": tfreg.L2(STRENGTH),
        "L1L2": tfreg.L1L2(l1=STRENGTH, l2=STRENGTH),
        "OrthogonalRegularizer(rows)": tfreg.OrthogonalRegularizer(STRENGTH, mode="rows"),
        "OrthogonalRegularizer(columns)": tfreg.OrthogonalRegularizer(STRENGTH, mode="columns"),
        "PNorm": tfreg.PNorm(STRENGTH, p=2),
        "GroupLasso": tfreg.GroupLasso(STRENGTH, axis=-1),
    }


def dense_only(name: str) -> bool:
    # Orthogonality is defined for rank-2 kernels; like Keras', the regularizer raises on a
    # Conv2D kernel. It goes on the Dense kernels as their kernel_regularizer, which Trainer also
    # adds once per update; the other penalties cover every kernel via Trainer(regularizer=...).
    return name.startswith("OrthogonalRegularizer")


def penalized(model: Any, name: str) -> list[Any]:
    import keras

    import tfreg

    if dense_only(name):
        return [layer.kernel for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    return tfreg.penalized_variables(model)


def penalty_cost(model: Any, name: str, regularizer: Any, max_calls: int) -> dict[str, float]:
    """Microseconds per evaluation of the penalty and its gradient, added into gradient-shaped
    sums as the update does, inside one graph loop (so no per-call dispatch is counted)."""
    import tensorflow as tf

    import tfreg

    variables = penalized(model, name)

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)], autograph=False)
    def repeated(n: tf.Tensor) -> Any:
        def body(i: tf.Tensor, total: tf.Tensor, sums: list[tf.Tensor]) -> Any:
            with tf.GradientTape() as tape:
                value = tfreg.penalty(variables, regularizer)
            grads = tape.gradient(value, variables)
            return i + 1, total + value, [s + g for s, g in zip(sums, grads, strict=True)]

        start = (tf.constant(0), tf.constant(0.0), [tf.zeros_like(v) for v in variables])
        return tf.while_loop(lambda i, *_: i < n, body, start)[1]

    def seconds(n: int) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        repeated(tf.constant(n)).numpy()
        return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}

    repeated(tf.constant(1))  # trace
    # About 0.2 s per reading: an expensive penalty (a large Gram matrix) needs few calls.
    calls = int(np.clip(0.2 / max(seconds(1)["wall"], 1e-6), 3, max_calls))
    per_call: dict[str, list[float]] = {c: [] for c in CLOCKS}
    for _ in range(3):
        empty, full = seconds(0), seconds(calls)
        for c in CLOCKS:
            per_call[c].append(1e6 * (full[c] - empty[c]) / calls)
    return {c: float(np.median(v)) for c, v in per_call.items()}


def bench_penalty_model(
    model: PenaltyModel, sizes: Sizes, repeats: int, clock: str
) -> dict[str, Any]:
    x, y = image_data(model.examples, model.input_size)
    template = keras_cnn(model.input_size)
    regs = regularizers()
    if sizes.penalties is not None:
        regs = {name: regs[name] for name in sizes.penalties}
    runs = {"none": tf_trainer(keras_copy(template), accumulation_steps=1)}
    for name, reg in regs.items():
        if name in model.untimed:
            continue
        if dense_only(name):
            copy_ = keras_copy(template, dense_regularizer=reg)
            runs[name] = tf_trainer(copy_, accumulation_steps=1)
        else:
            runs[name] = tf_trainer(keras_copy(template), accumulation_steps=1, regularizer=reg)
    times = interleave(
        {n: epoch_runner(t, x, y, model.batch_size) for n, t in runs.items()},
        repeats,
        model.rounds,
    )
    updates = updates_per_epoch(model.examples, model.batch_size, 1)
    update_us = {c: 1e6 * float(np.median(times["none"][c])) / updates for c in CLOCKS}
    timed = {
        r["numerator"]: r
        for r in ratio_results(
            times, [Ratio(f"{n} / no penalty", n, "none", PENALTY_GOAL) for n in regs], clock
        )
    }
    ratios = []
    for name, reg in regs.items():
        cost = penalty_cost(template, name, reg, sizes.penalty_calls)
        predicted = {c: 1 + cost[c] / update_us[c] for c in CLOCKS}
        entry = timed.get(name) or {
            "label": f"{name} / no penalty (predicted; not timed)",
            "numerator": name,
            "denominator": "none",
            "goal": PENALTY_GOAL,
            "verdict": "met" if predicted[clock] <= PENALTY_GOAL else "missed",
        }
        entry["timed"] = name in timed
        entry["evidence"] = {
            "scope": "Dense kernels (kernel_regularizer)" if dense_only(name) else "all kernels",
            "penalty_us": cost,
            "update_us_without_penalty": update_us,
            "predicted_ratio": predicted,
        }
        ratios.append(entry)
    labels = {"none": "no penalty", **{n: n for n in regs}}
    return {
        "config": {
            "model": "seed CNN, float32, Adam, tfreg.Trainer accumulation_steps=1",
            "input": f"{model.input_size}x{model.input_size}x1",
            "examples": model.examples,
            "batch_size": model.batch_size,
            "parameters": int(sum(np.prod(v.shape) for v in template.trainable_variables)),
            "strength": STRENGTH,
            "unit": f"{model.rounds} alternating epochs per variant per repeat",
            "not timed": ", ".join(model.untimed) or "—",
        },
        "variants": variant_results(times, labels, model.examples, dict.fromkeys(times, updates)),
        "ratios": ratios,
    }


def bench_penalty(sizes: Sizes, repeats: int, clock: str) -> dict[str, Any]:
    return {"models": [bench_penalty_model(m, sizes, repeats, clock) for m in sizes.penalty]}


# --------------------------------------------------------------------------------------------
# 3. Peak memory (fresh subprocess per configuration)
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec``'s configuration after a warm-up; the peak memory of the training alone."""
    framework, device = spec["framework"], spec["device"]
    setup_frameworks((framework,), spec["threads"])
    k, b = spec["accumulation_steps"], spec["batch_size"]
    x, y = image_data(spec["examples"], spec["input_size"], seed=1)
    if framework == "tf":
        trainer = tf_trainer(keras_cnn(spec["input_size"]), accumulation_steps=k)
    else:
        import torch

        trainer = torch_trainer(torch_cnn(spec["input_size"]).to(device), accumulation_steps=k)
        x, y = torch_data(x, y)
    # Two examples trace the steps and create every parameter-sized buffer (optimizer slots,
    # accumulator) while adding almost no batch-sized memory.
    trainer.fit(x[:2], y[:2], batch_size=2, epochs=1, verbose=0)
    gc.collect()
    cuda = framework == "torch" and device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    reset = _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    trainer.fit(x, y, batch_size=b, epochs=2, verbose=0)
    result = {
        "rss_delta_mib": (_status_kib("VmHWM") - rss_before) / 1024,
        "rss_before_mib": rss_before / 1024,
        "peak_reset": reset,
    }
    if cuda:
        torch.cuda.synchronize()
        result["cuda_delta_mib"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
    return result


def json_subprocess(command: Sequence[str], what: str) -> dict[str, Any]:
    """Run ``command`` (a Python script) in the repository; the JSON line it printed last."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, env=env, cwd=REPO, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    command = [str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec)]
    return json_subprocess(command, f"memory worker {spec}")


def memory_ratio(numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    # A tiny (smoke-test) run can peak at its baseline: 0 MiB is no denominator.
    pairs = zip(numerators, denominators, strict=True)
    return summarize([a / c if c > 0 else math.nan for a, c in pairs])


def memory_configs(sizes: Sizes) -> dict[str, tuple[int, int]]:
    """Label -> (accumulation_steps, batch_size)."""
    k, b = sizes.memory_steps, sizes.memory_batch_size
    return {"1×b": (1, b), "k×b": (k, b), "1×(k·b)": (1, k * b)}


def bench_memory(
    sizes: Sizes,
    repeats: int,
    frameworks: Sequence[str],
    device: str,
    threads: int | None,
    worker: Callable[[dict[str, Any]], dict[str, Any]] = run_worker,
    jobs: int = 2,
) -> dict[str, Any]:
    """Peak memory per configuration; ``jobs`` workers at a time (each is its own process, so
    concurrency does not change what any of them measures, only how long the section takes)."""
    configs = memory_configs(sizes)
    labels = list(configs)
    planned: list[tuple[str, str, dict[str, Any]]] = []
    for r in range(repeats):
        for framework in frameworks:
            shift = r % len(labels)
            for label in labels[shift:] + labels[:shift]:
                steps, batch = configs[label]
                spec = {
                    "framework": framework,
                    "device": device if framework == "torch" else "cpu",
                    "input_size": sizes.memory_input,
                    "batch_size": batch,
                    "accumulation_steps": steps,
                    "examples": sizes.memory_updates * sizes.memory_steps * sizes.memory_batch_size,
                    "threads": threads,
                }
                planned.append((framework, label, spec))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        measured = list(pool.map(worker, [spec for _, _, spec in planned]))
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        f: {label: [] for label in configs} for f in frameworks
    }
    for (framework, label, _), result in zip(planned, measured, strict=True):
        raw[framework][label].append(result)
    out: dict[str, Any] = {
        "config": {
            "model": "seed CNN, float32, Adam",
            "input": f"{sizes.memory_input}x{sizes.memory_input}x1",
            "batch_size": sizes.memory_batch_size,
            "accumulation_steps": sizes.memory_steps,
            "examples": sizes.memory_updates * sizes.memory_steps * sizes.memory_batch_size,
            "epochs": 2,
            "method": "fresh subprocess per configuration; peak RSS (VmHWM) reset after a "
            "two-example warm-up; delta = peak - RSS before training",
        },
        "frameworks": {},
    }
    for framework, by_label in raw.items():
        metrics = ["rss_delta_mib"] + (
            ["cuda_delta_mib"] if "cuda_delta_mib" in by_label["k×b"][0] else []
        )
        entry: dict[str, Any] = {
            "device": device if framework == "torch" else "cpu",
            "peak_reset": all(run["peak_reset"] for runs in by_label.values() for run in runs),
            "configs": {
                label: {m: summarize([run[m] for run in runs]) for m in metrics}
                for label, runs in by_label.items()
            },
            "ratios": {},
        }
        for m in metrics:
            per = {label: [run[m] for run in runs] for label, runs in by_label.items()}
            ratios: dict[str, Any] = {
                f"{a} / {c}": memory_ratio(per[a], per[c])
                for a, c in (("k×b", "1×b"), ("1×(k·b)", "k×b"), ("1×(k·b)", "1×b"))
            }
            ratios["goal"] = MEMORY_GOAL
            ratios["verdict"] = "met" if ratios["k×b / 1×b"]["median"] <= MEMORY_GOAL else "missed"
            entry["ratios"][m] = ratios
        out["frameworks"][framework] = entry
    return out


# --------------------------------------------------------------------------------------------
# 4. Retracing
# --------------------------------------------------------------------------------------------


class _StopAfter:
    """Stops ``fit`` once ``target`` updates have been applied in total."""

    def __init__(self) -> None:
        self.updates = 0
        self.target = 0

    def on_update_end(self, trainer: Any, record: dict[str, Any]) -> None:
        self.updates += 1
        if self.updates >= self.target:
            trainer.stop_training = True


def bench_retracing(sizes: Sizes) -> dict[str, Any]:
    b, k = sizes.trace_batch_size, 2
    # 12.5 micro-batches: every epoch ends with a short micro-batch and a one-micro-batch window.
    n = 12 * b + b // 2 or 1
    x, y = image_data(n, 8)
    trainer = tf_trainer(keras_cnn(8), accumulation_steps=k)
    stopper = _StopAfter()
    counts = {}
    for target in sizes.trace_updates:
        stopper.target = target
        trainer.fit(x, y, batch_size=b, epochs=10**9, verbose=0, callbacks=[stopper])
        counts[str(stopper.updates)] = trainer.trace_counts()
    values = list(counts.values())
    return {
        "config": {
            "model": "seed CNN 8x8x1, float32, Adam",
            "examples": n,
            "batch_size": b,
            "accumulation_steps": k,
            "note": "every epoch ends with a short micro-batch and a short window; fit is "
            "stopped and resumed mid-epoch between the two readings",
        },
        "trace_counts": counts,
        "constant": all(v == values[0] for v in values),
    }


# --------------------------------------------------------------------------------------------
# 5. Distributed accumulation (subprocess per configuration)
# --------------------------------------------------------------------------------------------


def bench_distributed(sizes: Sizes, repeats: int) -> dict[str, Any]:
    """``benchmarks/distributed_tf.py`` once per configuration, one after the other (each
    interleaves its own two variants; two at once would share the two cores)."""
    script = str(Path(__file__).resolve().parent / "distributed_tf.py")
    rows = []
    for c in sizes.distributed:
        command = [script, "--input", str(c.input_size), "--window", str(c.window)]
        command += ["--batch", str(c.batch_size), "--updates", str(c.updates)]
        command += ["--repeats", str(repeats)]
        rows.append(json_subprocess(command, f"distributed_tf.py {c}"))
    # The claim: per update one all-reduce per dtype (gradient sums; count and loss sums),
    # none per micro-batch.
    one_per_dtype = all(
        set(r["collectives_per_update"].values()) == {1} and r["collectives_per_micro_batch"] == 0
        for r in rows
    )
    return {
        "config": {
            "model": "seed CNN, float32, Adam, tfreg.Trainer",
            "devices": "MirroredStrategy over 2 logical CPU devices vs no strategy (one device)",
            "threads": "1 intra-op / 2 inter-op",
            "unit": "1 epoch per variant per repeat",
        },
        "rows": rows,
        "one_collective_per_dtype": one_per_dtype,
    }


# --------------------------------------------------------------------------------------------
# Machine, driver, CLI
# --------------------------------------------------------------------------------------------


def machine_info(frameworks: Sequence[str], device: str) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    if "tf" in frameworks:
        import keras
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        info["keras"] = keras.__version__
    if "torch" in frameworks:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
    return info


def run_benchmarks(
    *,
    sizes: Sizes,
    parts: Sequence[str],
    frameworks: Sequence[str],
    repeats: int,
    memory_repeats: int,
    device: str = "cpu",
    threads: int | None = 1,
    clock: str | None = None,
    memory_worker_fn: Callable[[dict[str, Any]], dict[str, Any]] = run_worker,
    memory_jobs: int = 2,
) -> dict[str, Any]:
    """Run ``parts``; the results dictionary that ``--json`` writes and ``report`` renders."""
    clock = clock or ("wall" if device == "cuda" else "cpu")
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "settings": {
            "sizes": asdict(sizes),
            "repeats": repeats,
            "memory_repeats": memory_repeats,
            "memory_jobs": memory_jobs,
            "frameworks": list(frameworks),
            "device_torch": device,
            "clock": clock,
            "threads": setup_frameworks(frameworks, threads),
        },
        "machine": machine_info(frameworks, device),
        "sections": {},
        "skipped": {},
    }
    started = time.perf_counter()
    for part in parts:
        section_started = time.perf_counter()
        if part in ("penalty", "retracing", "distributed") and "tf" not in frameworks:
            results["skipped"][part] = "measures tfreg: needs TensorFlow (--frameworks tf)"
        elif part == "accumulation":
            results["sections"][part] = bench_accumulation(
                sizes, repeats, frameworks, device, clock
            )
        elif part == "penalty":
            results["sections"][part] = bench_penalty(sizes, repeats, clock)
        elif part == "memory":
            results["sections"][part] = bench_memory(
                sizes, memory_repeats, frameworks, device, threads, memory_worker_fn, memory_jobs
            )
        elif part == "retracing":
            results["sections"][part] = bench_retracing(sizes)
        elif part == "distributed":
            results["sections"][part] = bench_distributed(sizes, repeats)
        if part in results["sections"]:
            results["sections"][part]["elapsed_s"] = round(time.perf_counter() - section_started, 1)
    results["machine"]["load_average_before"] = [round(v, 2) for v in load_before]
    results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    results["machine"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    return results


def _csv(value: str, allowed: Sequence[str], name: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"{name}: expected some of {allowed}, got {value!r}")
    return items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 5, quick 2)")
    parser.add_argument(
        "--memory-repeats", type=int, help="subprocess runs per configuration (default 2, quick 1)"
    )
    parser.add_argument("--memory-jobs", type=int, default=2, help="memory subprocesses at once")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {PARTS}")
    parser.add_argument("--frameworks", help="tf,torch (default: those installed)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="torch device (TensorFlow parts run on CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per framework; 0 keeps the defaults",
    )
    parser.add_argument("--clock", choices=CLOCKS, help="cpu on CPU, wall with --device cuda")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help=f"default {RESULTS_MD} (none with --quick)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = _csv(args.parts, PARTS, "--parts")
    args.frameworks = (
        installed_frameworks()
        if args.frameworks is None
        else _csv(args.frameworks, FRAMEWORKS, "--frameworks")
    )
    for name in ("repeats", "memory_repeats", "memory_jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return None
    missing = set(args.frameworks) - set(installed_frameworks())
    if missing:
        raise SystemExit(f"--frameworks names {sorted(missing)}, which is not installed")
    results = run_benchmarks(
        sizes=QUICK if args.quick else DEFAULT,
        parts=args.parts,
        frameworks=args.frameworks,
        repeats=args.repeats or (2 if args.quick else 5),
        memory_repeats=args.memory_repeats or (1 if args.quick else 2),
        device=args.device,
        threads=args.threads,
        clock=args.clock,
        memory_jobs=args.memory_jobs,
    )
    markdown = args.markdown or (None if args.quick else RESULTS_MD)
    if markdown is not None:
        markdown.write_text(report.render(results))
        print(f"wrote {markdown}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    print(report.summary(results))
    return results


if __name__ == "__main__":
    main()
