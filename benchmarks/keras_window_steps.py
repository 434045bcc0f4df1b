"""Where ``tfreg.AccumulatingModel`` spends its time against Keras' built-in
``optimizer(gradient_accumulation_steps=k)``, micro-batch by micro-batch (issue 16).

Both train the seed CNN of ``benchmarks/run.py`` (8x8x1, batch b, k micro-batches per update,
Adam) through their own ``train_step``, traced once as a ``tf.function``. Prints

- the graph ops a micro-batch that does not close its window runs (the step's top level and
  the ``else`` branch of its conditionals; constants, placeholders, identities left out), by
  type where the two differ;
- the median process CPU time of a call at each position of a window (the last one applies
  the update), the two models alternating window by window.

Run from the repository root: ``python benchmarks/keras_window_steps.py [--rounds 60]``.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import (
    image_data,
    keras_adam,
    keras_copy,
    keras_loss,
    seed_cnns,
    setup_frameworks,
)

SKIPPED = ("Const", "Placeholder", "Identity", "NoOp")


def non_closing_ops(graph_def: Any) -> collections.Counter[str]:
    library = {f.signature.name: f for f in graph_def.library.function}
    ops = collections.Counter(n.op for n in graph_def.node if n.op not in SKIPPED)
    for node in graph_def.node:
        if node.op == "If":
            branch = library[node.attr["else_branch"].func.name]
            ops.update(f"[else] {n.op}" for n in branch.node_def if n.op not in SKIPPED)
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="windows per model (default 60)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="micro-batches per update")
    args = parser.parse_args()
    setup_frameworks(("tf",), 1)
    import tensorflow as tf

    import tfreg

    k, b = args.steps, args.batch
    x, y = image_data(k * b * 8, 8)
    template, _ = seed_cnns(8, ("tf",), "cpu")
    keras_fit = keras_copy(template)
    keras_fit.compile(keras_adam(gradient_accumulation_steps=k), keras_loss(), jit_compile=False)
    wrapped = tfreg.AccumulatingModel(keras_copy(template), accumulation_steps=k)
    wrapped.compile(keras_adam(), keras_loss(), jit_compile=False)
    models = {"Keras": keras_fit, "AccumulatingModel": wrapped}
    for model in models.values():  # builds optimizer slots; both end on a window boundary
        model.fit(x, y, batch_size=b, epochs=1, verbose=0)
    data = (tf.constant(x[:b]), tf.constant(y[:b]))
    steps = {n: tf.function(m.train_step).get_concrete_function(data) for n, m in models.items()}
    ops = {n: non_closing_ops(f.graph.as_graph_def()) for n, f in steps.items()}
    print("ops run by a micro-batch that does not close its window:")
    for name, counts in ops.items():
        print(f"  {name}: {sum(counts.values())}")
    for op in sorted(set().union(*ops.values())):
        row = "  ".join(f"{name} {counts.get(op, 0):3d}" for name, counts in ops.items())
        if len({counts.get(op, 0) for counts in ops.values()}) > 1:
            print(f"    {op:30s} {row}")
    times: dict[str, list[list[float]]] = {n: [[] for _ in range(k)] for n in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for position in range(k):
                start = time.process_time()
                step(data)
                times[name][position].append(time.process_time() - start)
    print("median us per call at each position of the window (the last applies the update):")
    for name, positions in times.items():
        medians = [1e6 * float(np.median(p)) for p in positions]
        print(f"  {name}: {[round(m) for m in medians]}, window {round(sum(medians))}")


if __name__ == "__main__":
    main()
