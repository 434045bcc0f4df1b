"""Issue 16's proximal and penalty ratios, side by side in one process (interleaved rounds):

prox       the Adam-consistent prox per update: ``Trainer(proximal=ProximalGroupLasso(...))``
           (the preconditioned block prox, a fixed-iteration Newton solve) over the same
           Trainer without prox, tfreg and torchref, on the seed CNN. ``--baseline-core`` adds
           the same trainers running the ``preconditioned_block_prox`` of another
           ``tfreg_core/proximal.py`` once per kernel (e.g. ``git show
           main:tfreg_core/proximal.py > /tmp/old.py``): before and after in one run.
ista       full-batch ISTA (SGD + ``ProximalL1``) on scikit-learn's diabetes data: tfreg.Trainer
           over torchref.Trainer per update, and the same update hand-written (one
           ``tf.function`` step / a plain torch step) to separate the trainers' per-update cost
           from the prox.
orthogonal ``tfreg.OrthogonalRegularizer`` against ``keras.regularizers.OrthogonalRegularizer``
           (same factor, mode, Dense kernels) in the same Trainer: the cost of our regularizer
           relative to Keras' Gram-matrix formula, not relative to no penalty.

Prints a Markdown section (machine, load average before/after, median ratio, IQR, min-max) for
``benchmarks/RESULTS.md``; ``--json PATH`` also writes the raw repeats. Clock: process CPU
time with one intra-op thread per framework (see ``benchmarks/run.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import (
    CLOCKS,
    LEARNING_RATE,
    epoch_runner,
    image_data,
    interleave,
    keras_cnn,
    keras_copy,
    keras_loss,
    machine_info,
    setup_frameworks,
    summarize,
    torch_data,
)

PARTS = ("prox", "ista", "orthogonal")
PROX_STRENGTH = 1e-4
ISTA_L1 = 0.05
ORTHOGONAL_FACTOR = 1e-4


def _ratio(times: dict[str, dict[str, list[float]]], num: str, den: str) -> dict[str, Any]:
    return {
        c: summarize([a / b for a, b in zip(times[num][c], times[den][c], strict=True)])
        for c in CLOCKS
    }


def _load_core(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("baseline_core", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _kernel(function: Callable[..., Any]) -> Iterator[None]:
    # Both twins call the solve through tfreg_core.proximal.preconditioned_block_proxes; the
    # baseline's single-tensor kernel replaces it, called once per tensor (as before batching).
    from tfreg_core import proximal as core

    def per_tensor(zs: Any, steps: Any, taus: Any, axes: Any, ops: Any) -> list[Any]:
        return [function(*args, ops) for args in zip(zs, steps, taus, axes, strict=True)]

    saved = core.preconditioned_block_proxes
    core.preconditioned_block_proxes = per_tensor
    try:
        yield
    finally:
        core.preconditioned_block_proxes = saved


def _with_kernel(run: Callable[[], None], function: Callable[..., Any]) -> Callable[[], None]:
    def wrapped() -> None:
        with _kernel(function):
            run()

    return wrapped


def bench_prox(
    size: int, examples: int, batch: int, repeats: int, rounds: int, baseline: str | None
) -> dict[str, Any]:
    import keras
    import torch

    import tfreg
    import torchref
    from benchmarks.run import torch_cnn

    x, y = image_data(examples, size)
    xt, yt = torch_data(x, y)
    template = keras_cnn(size)
    runs: dict[str, Callable[[], None]] = {}
    kernels = {"": None}
    if baseline:
        kernels[" (baseline kernel)"] = _load_core(baseline).preconditioned_block_prox

    def tf_run(proximal: Any) -> Callable[[], None]:
        trainer = tfreg.Trainer(
            keras_copy(template),
            keras_loss(),
            keras.optimizers.Adam(LEARNING_RATE),
            proximal=proximal,
        )
        return epoch_runner(trainer, x, y, batch)

    def torch_run(proximal: Any) -> Callable[[], None]:
        model = torch_cnn(size)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        trainer = torchref.Trainer(model, "cross_entropy", optimizer, proximal=proximal)
        return epoch_runner(trainer, xt, yt, batch)

    # Keras kernels end with the output axis, torch's start with it: the same groups (one per
    # input row of each kernel, the norm over the outputs) are axis=-1 and axis=0.
    runs["tf none"] = tf_run(None)
    runs["torch none"] = torch_run(None)
    for suffix, function in kernels.items():
        tf_prox = tf_run(tfreg.ProximalGroupLasso(PROX_STRENGTH, axis=-1))
        torch_prox = torch_run(torchref.ProximalGroupLasso(PROX_STRENGTH, axis=0))
        if function is not None:
            tf_prox, torch_prox = (
                _with_kernel(tf_prox, function),
                _with_kernel(torch_prox, function),
            )
        runs[f"tf prox{suffix}"] = tf_prox
        runs[f"torch prox{suffix}"] = torch_prox
    times = interleave(runs, repeats, rounds)
    ratios = {}
    for fw, name in (("tf", "tfreg"), ("torch", "torchref")):
        for suffix in kernels:
            ratios[f"{name} Adam prox{suffix} / no prox"] = _ratio(
                times, f"{fw} prox{suffix}", f"{fw} none"
            )
        if baseline:
            ratios[f"{name} Adam prox / Adam prox (baseline kernel)"] = _ratio(
                times, f"{fw} prox", f"{fw} prox (baseline kernel)"
            )
    return {
        "config": f"seed CNN {size}x{size}x1, float32, Adam lr {LEARNING_RATE}, {examples} "
        f"examples, batch {batch}, ProximalGroupLasso({PROX_STRENGTH}) on every kernel "
        "(groups: the input rows, norm over outputs); unit: one epoch",
        "ratios": ratios,
        "times": times,
    }


def bench_ista(repeats: int, rounds: int, updates: int) -> dict[str, Any]:
    import keras
    import tensorflow as tf
    import torch
    from sklearn.datasets import load_diabetes

    import tfreg
    import torchref

    x, y = load_diabetes(return_X_y=True)
    y = (y - y.mean())[:, None]
    n, d = x.shape
    # 1/L for the mean squared error of the model with its intercept (L = 2 lambda_max(A^T A / n),
    # A = [X 1]), float32-exact as Keras keeps it. X's alone (the bias left out) was ~45 times too
    # large a step for the bias: the run diverged, and after ~600 updates every timed update was
    # a skipped non-finite one.
    design = np.hstack([x, np.ones((n, 1))])
    lr = float(np.float32(n / (2 * np.linalg.eigvalsh(design.T @ design).max())))

    def keras_linear() -> Any:
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((d,), dtype="float64"),
                keras.layers.Dense(1, kernel_initializer="zeros", dtype="float64"),
            ]
        )

    def torch_linear() -> Any:
        linear = torch.nn.Linear(d, 1, dtype=torch.float64)
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
        return linear

    def trainer_runs(trainer: Any) -> Callable[[], None]:
        done = 0

        def run() -> None:
            nonlocal done
            done += updates
            trainer.fit(x, y, batch_size=n, epochs=done, verbose=0, shuffle=False)

        return run

    tf_trainer = tfreg.Trainer(
        keras_linear(),
        keras.losses.MeanSquaredError(),
        keras.optimizers.SGD(lr),
        proximal=tfreg.ProximalL1(l1=ISTA_L1),
    )
    linear = torch_linear()
    torch_trainer = torchref.Trainer(
        linear,
        "mse",
        torch.optim.SGD(linear.parameters(), lr=lr),
        proximal=torchref.ProximalL1(l1=ISTA_L1),
    )

    model = keras_linear()
    optimizer = keras.optimizers.SGD(lr)
    xt, yt = tf.constant(x), tf.constant(y)

    @tf.function
    def tf_step() -> None:
        with tf.GradientTape() as tape:
            residual = model(xt) - yt
            loss = tf.reduce_mean(residual * residual)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        tfreg.apply_proximal_l1(model, l1=ISTA_L1, learning_rate=optimizer)

    hand = torch_linear()
    hand_optimizer = torch.optim.SGD(hand.parameters(), lr=lr)
    xh, yh = torch.as_tensor(x), torch.as_tensor(y)

    def torch_step() -> None:
        hand_optimizer.zero_grad()
        torch.nn.functional.mse_loss(hand(xh), yh).backward()
        hand_optimizer.step()
        torchref.apply_proximal_l1(hand, l1=ISTA_L1, learning_rate=hand_optimizer)

    def repeated(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(updates):
                step()

        return run

    times = interleave(
        {
            "tfreg.Trainer": trainer_runs(tf_trainer),
            "torchref.Trainer": trainer_runs(torch_trainer),
            "tf.function step": repeated(tf_step),
            "torch step": repeated(torch_step),
        },
        repeats,
        rounds,
    )
    ratios = {
        "tfreg.Trainer / torchref.Trainer": _ratio(times, "tfreg.Trainer", "torchref.Trainer"),
        "hand-written tf.function step / hand-written torch step": _ratio(
            times, "tf.function step", "torch step"
        ),
        "tfreg.Trainer / hand-written tf.function step": _ratio(
            times, "tfreg.Trainer", "tf.function step"
        ),
        "torchref.Trainer / hand-written torch step": _ratio(
            times, "torchref.Trainer", "torch step"
        ),
    }
    per_update = {
        name: {c: 1e6 * float(np.median(t[c])) / updates for c in CLOCKS}
        for name, t in times.items()
    }
    return {
        "config": f"diabetes {n}x{d}, float64, full batch, SGD lr 1/L, ProximalL1(l1={ISTA_L1}); "
        f"unit: {updates} updates",
        "ratios": ratios,
        "us_per_update": per_update,
        "times": times,
    }


def bench_orthogonal(size: int, examples: int, batch: int, repeats: int, rounds: int) -> Any:
    import keras

    import tfreg

    x, y = image_data(examples, size)
    template = keras_cnn(size)
    runs = {}
    for mode in ("rows", "columns"):
        for name, reg in (
            ("tfreg", tfreg.OrthogonalRegularizer(ORTHOGONAL_FACTOR, mode=mode)),
            ("keras", keras.regularizers.OrthogonalRegularizer(ORTHOGONAL_FACTOR, mode=mode)),
        ):
            trainer = tfreg.Trainer(
                keras_copy(template, dense_regularizer=reg),
                keras_loss(),
                keras.optimizers.Adam(LEARNING_RATE),
            )
            runs[f"{name} {mode}"] = epoch_runner(trainer, x, y, batch)
    times = interleave(runs, repeats, rounds)
    ratios = {
        f"tfreg / Keras OrthogonalRegularizer({mode})": _ratio(
            times, f"tfreg {mode}", f"keras {mode}"
        )
        for mode in ("rows", "columns")
    }
    return {
        "config": f"seed CNN {size}x{size}x1, float32, Adam, tfreg.Trainer, Dense "
        f"kernel_regularizer factor {ORTHOGONAL_FACTOR}, {examples} examples, batch {batch}; "
        "unit: one epoch",
        "ratios": ratios,
        "times": times,
    }


def markdown(results: dict[str, Any], clock: str) -> str:
    info, load = results["machine"], results["load"]
    lines = [
        f"Measured {info['date']} on {info['cpu']} ({info['usable_cores']} usable cores), "
        f"TensorFlow {info.get('tensorflow')} / Keras {info.get('keras')}, torch "
        f"{info.get('torch')}, one intra-op thread per framework; load average (1/5/15 min) "
        f"{load['before']} before, {load['after']} after; {results['repeats']} repeats x "
        f"{results['rounds']} interleaved rounds; clock {clock}.",
        "",
    ]
    for part in PARTS:
        if part not in results:
            continue
        lines += [
            f"**{part}**: {results[part]['config']}",
            "",
            "| ratio | median (cpu) | IQR | min–max | median (wall) |",
            "|---|---|---|---|---|",
        ]
        for label, r in results[part]["ratios"].items():
            s = r[clock]
            lines.append(
                f"| {label} | {s['median']:.3f}× | {s['q1']:.3f}–{s['q3']:.3f} | "
                f"{s['min']:.3f}–{s['max']:.3f} | {r['wall']['median']:.3f}× |"
            )
        if "us_per_update" in results[part]:
            lines += ["", "| variant | µs / update (cpu) | µs / update (wall) |", "|---|---|---|"]
            for name, us in results[part]["us_per_update"].items():
                lines.append(f"| {name} | {us['cpu']:.0f} | {us['wall']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--size", type=int, default=8, help="seed CNN input size (prox)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ista-updates", type=int, default=50)
    parser.add_argument("--baseline-core", default=None, help="another tfreg_core/proximal.py")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    setup_frameworks(("tf", "torch"), 1)
    results: dict[str, Any] = {
        "machine": machine_info(("tf", "torch"), "cpu"),
        "load": {"before": [round(v, 2) for v in os.getloadavg()]},
        "repeats": args.repeats,
        "rounds": args.rounds,
    }
    if "prox" in parts:
        results["prox"] = bench_prox(
            args.size, args.examples, args.batch, args.repeats, args.rounds, args.baseline_core
        )
    if "ista" in parts:
        results["ista"] = bench_ista(args.repeats, args.rounds, args.ista_updates)
    if "orthogonal" in parts:
        results["orthogonal"] = bench_orthogonal(
            args.size, args.examples, args.batch, args.repeats, args.rounds
        )
    results["load"]["after"] = [round(v, 2) for v in os.getloadavg()]
    print(markdown(results, "cpu"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
