"""Per-update cost of torchref.Trainer on a process group, with and without ``no_sync``.

Run once per world size with the same examples per update (``--window``, split into
``window / (R * batch)`` micro-batches per rank)::

    torchrun --standalone --nproc-per-node 1 benchmarks/distributed_torch.py
    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_torch.py

Rank 0 prints one JSON line: seconds per update (median of ``--repeats`` timed epochs) of
``torchref.Trainer`` on the DDP-wrapped seed CNN (``no_sync`` on all micro-batches but the
window's last) and of a hand-written DDP loop that synchronises every micro-batch (no
``no_sync``: what a loop without it costs), and the gradient all-reduces per update of each
(DDP comm-hook calls; the model fits one bucket). CPU, gloo, float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script (torchrun)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _counting_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state["calls"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=128, help="examples per update")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    parser.add_argument("--updates", type=int, default=8, help="updates per timed epoch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import torchref
    from examples.cnn_weight_regularization import NOTEBOOK_CNN
    from tfreg_harness.torch_side.architecture import build_model

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    k = args.window // (world * args.batch)
    n = args.updates * args.window
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=n)

    def ddp() -> tuple[torch.nn.Module, dict[str, int]]:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            build_model(NOTEBOOK_CNN, (8, 8, 1), dtype="float32")
        )
        calls = {"calls": 0}
        model.register_comm_hook(calls, _counting_hook)
        return model, calls

    def trainer_epoch() -> tuple[float, int]:
        model, calls = ddp()
        t = torchref.Trainer(
            model,
            "cross_entropy",
            torch.optim.SGD(model.parameters(), lr=0.01),
            accumulation_steps=k,
        )
        start = time.perf_counter()
        t.fit(x, y, batch_size=args.batch, shuffle=False, verbose=0)
        return time.perf_counter() - start, calls["calls"]

    def sync_every_epoch() -> tuple[float, int]:
        model, calls = ddp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        per_rank = args.window // world
        start = time.perf_counter()
        for u in range(args.updates):
            base = u * args.window + rank * per_rank
            opt.zero_grad()
            for j in range(k):  # every backward all-reduces: no no_sync
                idx = slice(base + j * args.batch, base + (j + 1) * args.batch)
                loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx], reduction="sum")
                (loss / args.window).backward()
            opt.step()
        return time.perf_counter() - start, calls["calls"]

    out: dict[str, object] = {"world_size": world, "micro_batches_per_rank": k}
    for name, run in (("trainer_no_sync", trainer_epoch), ("ddp_sync_every", sync_every_epoch)):
        run()  # warm-up
        timed = [run() for _ in range(args.repeats)]
        out[f"{name}_s_per_update"] = statistics.median(t for t, _ in timed) / args.updates
        out[f"{name}_allreduces_per_update"] = timed[0][1] / args.updates
    if rank == 0:
        print(json.dumps(out))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
