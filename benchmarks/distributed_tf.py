"""Per-update cost of tfreg.Trainer under MirroredStrategy (2 logical CPUs) against one device.

The TensorFlow twin of ``benchmarks/distributed_torch.py``, in one process (TensorFlow splits
the CPU into 2 logical devices before it starts; a one-device ``MirroredStrategy`` cannot share
the process with the two-device one, so the one-device variant is the plain trainer)::

    python benchmarks/distributed_tf.py [--window 128 --batch 16 --updates 8 --repeats 5 --input 8]

Both variants train the seed CNN (float32, Adam) on the same ``--window`` examples per update
with the same per-device micro-batch ``b = --batch``: ``mirrored_2x`` accumulates ``k/2``
micro-batches per replica (``batch_size = 2*b``, the global micro-batch), ``one_device_1x``
accumulates ``k`` on one device, with ``k = window / b``. One JSON line: seconds per update of
each (median over ``--repeats`` interleaved repeats, ``benchmarks.run.interleave``: process
CPU time and wall clock), the per-repeat ratio mirrored / one device (``ratio_results``), and
the collectives per update read from the traced graphs: ``CollectiveReduceV2`` ops per replica
in the update function, by dtype (the claim: one per dtype -- the float32 gradient sums, the
float64 count and loss sums), and in the micro-batch function (the claim: none).

Threads: one intra-op thread (as ``run.py``) and two inter-op threads, so the two replicas'
ops can run on the two cores at once; the CPU-time ratio is the work per example, the
wall-clock ratio includes that parallelism.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import run

WORLD = 2
COLLECTIVE = "CollectiveReduceV2"  # what MirroredStrategy's all-reduce on CPUs lowers to


def collectives(function: Any) -> dict[str, int]:
    """``COLLECTIVE`` ops in a traced ``tf.function``'s graph, per replica, by dtype (every
    replica runs its own copy of each all-reduce)."""
    graph = function.get_concrete_function().graph
    counts = Counter(
        op.get_attr("T").name for op in graph.get_operations() if op.type == COLLECTIVE
    )
    return {dtype: n / WORLD for dtype, n in sorted(counts.items())}


def measure(window: int, batch: int, updates: int, repeats: int, size: int) -> dict[str, Any]:
    """Both variants, interleaved; the results dictionary the script prints."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * WORLD
    )
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(WORLD)
    k = window // batch
    if k % WORLD or k * batch != window:
        raise SystemExit(f"--window must be a multiple of {WORLD} * --batch; got {window}")
    x, y = run.image_data(updates * window, size)
    template = run.keras_cnn(size)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(WORLD)])
    with strategy.scope():
        mirrored = run.tf_trainer(run.keras_copy(template), accumulation_steps=k // WORLD)
    one_device = run.tf_trainer(run.keras_copy(template), accumulation_steps=k)
    runs = {
        "mirrored_2x": run.epoch_runner(mirrored, x, y, WORLD * batch),
        "one_device_1x": run.epoch_runner(one_device, x, y, batch),
    }
    times = run.interleave(runs, repeats)
    (ratio,) = run.ratio_results(
        times, [run.Ratio("mirrored 2 x (k/2) / one device 1 x k", *runs)], "cpu"
    )
    out: dict[str, Any] = {
        "replicas": strategy.num_replicas_in_sync,
        "micro_batches_per_replica": {"mirrored_2x": k // WORLD, "one_device_1x": k},
        "examples_per_update": window,
        "input": f"{size}x{size}x1",
    }
    for name in runs:
        for clock in run.CLOCKS:
            median = statistics.median(times[name][clock])
            out[f"{name}_s_per_update_{clock}"] = median / updates
    out["ratio"] = {c: ratio[c] for c in run.CLOCKS}  # run.summarize: median, spread, values
    engine = mirrored._engine  # the traced step functions (Trainer.trace_counts reads them too)
    out["collectives_per_update"] = collectives(engine.apply_fn)
    out["collectives_per_micro_batch"] = sum(
        sum(collectives(fn).values()) for fn in engine.micro_fns.values()
    )
    out["trace_counts"] = mirrored.trace_counts()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=128, help="examples per update")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per device")
    parser.add_argument("--updates", type=int, default=8, help="updates per timed epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--input", type=int, default=8, help="image side (8: digits-sized)")
    args = parser.parse_args(argv)
    out = measure(args.window, args.batch, args.updates, args.repeats, args.input)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
