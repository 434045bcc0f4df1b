"""The seed notebook's CNN trained with tfreg.Trainer on several processes (multi-worker TF).

Launch on one machine: ``python examples/distributed_cnn_tf.py --workers 2`` starts 2 worker
processes on free localhost ports, each with its ``TF_CONFIG``, and waits for them. On several
machines start one process per machine yourself, each with the same cluster and its own index::

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}' python examples/distributed_cnn_tf.py

(``"index": 1`` on the second). Without ``TF_CONFIG`` (and without ``--workers``) it trains in
one process. ``--batch`` is the **global** micro-batch, as in Keras ``fit`` under a strategy:
``R`` workers x ``--accumulation k`` micro-batches of ``--batch`` (``--batch/R`` per worker) are
one update on a window of ``k * batch`` examples, exactly (float64: 1 process with k=4 and
batch 8 and 2 workers with k=2 and batch 16 give the same losses to round-off; the smoke test
checks it). Every worker passes the full arrays and trains on its share of each micro-batch;
worker 0 prints the updates and writes ``OUT/distributed_cnn_tf.json`` (per-update losses,
replica count, a checksum of the final weights). The torch twin is ``examples/ddp_cnn.py``
(``--batch`` per rank there, torch's convention).

Data: scikit-learn's 8x8 digits (or MNIST with ``--mnist DIR``), as the other CNN example.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples._common import distributed_cnn_parser, load_mnist
from examples.cnn_weight_regularization import NOTEBOOK_CNN
from tfreg_core.distributed import localhost_tf_configs

# A worker whose peer died or hangs fails after this long in a collective instead of waiting
# for ever (the strategy's CommunicationOptions); generous for a loaded machine.
COLLECTIVE_TIMEOUT_S = 60.0
RESULT = "distributed_cnn_tf.json"


def _parser() -> Any:
    parser = distributed_cnn_parser(__doc__.splitlines()[0], batch="GLOBAL")
    parser.add_argument(
        "--workers", type=int, default=1, help="start this many localhost worker processes"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="--workers: wait at most")
    return parser


def launch(argv: Sequence[str], workers: int, timeout: float, out: Path) -> dict[str, Any]:
    """Run this script as ``workers`` processes on localhost (each with its ``TF_CONFIG``; the
    same ``argv``), wait at most ``timeout`` seconds, return worker 0's result."""
    procs = []
    for config in localhost_tf_configs(workers):
        env = {**os.environ, "TF_CONFIG": config}
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise SystemExit(f"workers still running after {timeout} s: killed") from None
    if any(codes):
        raise SystemExit(f"worker exit codes {codes}")
    return json.loads((out / RESULT).read_text())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.workers > 1 and "TF_CONFIG" not in os.environ:
        return launch(argv, args.workers, args.timeout, args.out)

    import keras
    import tensorflow as tf

    import tfreg
    from tfreg_harness.keras_side.architecture import build_model

    if "TF_CONFIG" in os.environ:  # created before any other TensorFlow work
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=COLLECTIVE_TIMEOUT_S
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        worker = int(strategy.cluster_resolver.task_id or 0)
    else:
        strategy, worker = tf.distribute.get_strategy(), 0  # the default: one process

    data = load_mnist(args.mnist)
    x = data.x_train[: args.train, :, :, None].astype(np.float64)
    y = data.y_train[: args.train]
    keras.utils.set_random_seed(args.seed)  # the same initial weights everywhere
    with strategy.scope():  # model, optimizer and trainer: the strategy's variables
        model = build_model(NOTEBOOK_CNN, (*data.x_train.shape[1:], 1), dtype="float64")
        trainer = tfreg.Trainer(
            model,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            keras.optimizers.SGD(args.lr, momentum=0.9),
            accumulation_steps=args.accumulation,
            regularizer=tfreg.L2(1e-4),
        )
    history = trainer.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0)
    replicas = strategy.num_replicas_in_sync
    result = {
        "world_size": replicas,
        "losses": [r["loss"] for r in history.records],
        "examples": [r["examples"] for r in history.records],
        "checksum": float(sum(np.sum(w) for w in model.get_weights())),
    }
    if worker == 0:
        print(
            f"{data.source}: {len(x)} images, {replicas} replica(s) x {args.accumulation} "
            f"micro-batches; global micro-batch {args.batch} = "
            f"{args.accumulation * args.batch} examples per update, {len(history)} updates"
        )
        print(f"loss: first {result['losses'][0]:.6f}, last {result['losses'][-1]:.6f}")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / RESULT).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
