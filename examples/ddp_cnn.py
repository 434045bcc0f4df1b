"""The seed notebook's CNN trained with torchref.Trainer on several processes (DDP).

Launch: ``torchrun --standalone --nproc-per-node 2 examples/ddp_cnn.py`` (CPU: gloo; CUDA: nccl,
one GPU per rank). Run without torchrun, it trains in one process. ``--batch`` is per rank,
as in torch: ``R`` ranks x ``--accumulation k`` micro-batches of ``b`` are one update on a
window of ``R*k*b`` examples, exactly (float64: 1 process with k=4 and 2 processes with k=2 give
the same losses to round-off; the smoke test checks it). Every rank passes the full arrays and
trains on its share of each window; rank 0 prints the updates and writes
``OUT/ddp_cnn.json`` (per-update losses, world size, a checksum of the final weights).

Data: scikit-learn's 8x8 digits (or MNIST with ``--mnist DIR``), as the other CNN example.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script (torchrun): make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples._common import distributed_cnn_parser, load_mnist
from examples.cnn_weight_regularization import NOTEBOOK_CNN


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = distributed_cnn_parser(__doc__.splitlines()[0], batch="PER RANK")
    args = parser.parse_args(argv)

    import torch

    import torchref
    from tfreg_harness.layouts import to_torch_input
    from tfreg_harness.torch_side.architecture import build_model

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60)
        )
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    device = torch.device("cuda") if distributed and torch.cuda.is_available() else "cpu"

    data = load_mnist(args.mnist)
    x = to_torch_input(data.x_train[: args.train, :, :, None].astype(np.float64))
    y = data.y_train[: args.train]
    torch.manual_seed(args.seed)  # DDP broadcasts rank 0's weights anyway
    model = build_model(NOTEBOOK_CNN, (*data.x_train.shape[1:], 1), dtype="float64").to(device)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    trainer = torchref.Trainer(
        model,
        "cross_entropy",
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        accumulation_steps=args.accumulation,
        regularizer=torchref.L2(1e-4),
    )
    history = trainer.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0)
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    result = {
        "world_size": world,
        "losses": [r["loss"] for r in history.records],
        "examples": [r["examples"] for r in history.records],
        "checksum": checksum,
    }
    if rank == 0:
        print(
            f"{data.source}: {len(x)} images, {world} process(es) x {args.accumulation} "
            f"micro-batches of {args.batch} = {world * args.accumulation * args.batch} "
            f"examples per update, {len(history)} updates"
        )
        print(f"loss: first {result['losses'][0]:.6f}, last {result['losses'][-1]:.6f}")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ddp_cnn.json").write_text(json.dumps(result))
    if distributed:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
