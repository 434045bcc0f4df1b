"""Which examples of a global micro-batch each rank (replica) trains on: the framework-free half
of distributed accumulation.

With ``R`` ranks and a per-rank micro-batch of ``b``, an epoch is planned exactly as on one
device with micro-batches of ``R*b`` (:func:`tfreg_core.windows.plan_epoch` with
``batch_size=R*b``): every rank sees the same windows of ``R*k*b`` examples in the same order.
Rank ``r`` takes positions ``[r*b, (r+1)*b)`` of each global micro-batch, clipped to its size,
so the ranks' shares partition the window: no example is repeated (``DistributedSampler``
pads by repeating) and none is dropped. A short last micro-batch gives the first ranks full
shares and the later ones short or empty shares; an empty share still takes part in the
collectives (with zero gradients), so every rank runs the same number of micro-batches.

>>> [rank_share(7, rank=r, world_size=2, batch_size=4) for r in range(2)]
[(0, 4), (4, 7)]
>>> [rank_share(3, rank=r, world_size=2, batch_size=4) for r in range(2)]
[(0, 3), (3, 3)]
"""

from __future__ import annotations

import json
import numbers
import socket

from tfreg_core import validation
from tfreg_core.training import digest

__all__ = ["check_rank", "digest", "global_batch_size", "localhost_tf_configs", "rank_share"]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_rank(rank: int, world_size: int) -> tuple[int, int]:
    """``(rank, world_size)`` validated: ``0 <= rank < world_size``."""
    world_size = validation.positive_int(world_size, "world_size")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise validation.InvalidArgumentError(
            f"rank must be an int in [0, world_size={world_size}). Received: rank={rank!r}"
        )
    return int(rank), world_size


def global_batch_size(batch_size: int, world_size: int) -> int:
    """The global micro-batch ``R*b`` the window plan is cut with (``batch_size`` per rank)."""
    return validation.positive_int(batch_size, "batch_size") * validation.positive_int(
        world_size, "world_size"
    )


def rank_share(size: int, *, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """``(start, stop)``: rank ``rank``'s positions in a global micro-batch of ``size`` examples
    (at most ``world_size * batch_size``); empty (``start == stop``) when the micro-batch is too
    short to reach the rank."""
    rank, world_size = check_rank(rank, world_size)
    b = validation.positive_int(batch_size, "batch_size")
    if not _is_int(size) or not 0 <= size <= world_size * b:
        raise validation.InvalidArgumentError(
            f"size must be an int in [0, world_size * batch_size = {world_size * b}]. "
            f"Received: size={size!r}"
        )
    start = min(rank * b, int(size))
    return start, min(start + b, int(size))


def localhost_tf_configs(workers: int) -> list[str]:
    """``TF_CONFIG`` values (JSON) for a ``MultiWorkerMirroredStrategy`` cluster of ``workers``
    processes on free localhost ports, one per worker index: to try or test multi-worker
    training on one machine (TensorFlow's server listens on ``[::]:port`` whatever the
    address; the ports are picked free on 127.0.0.1)."""
    sockets = [socket.socket() for _ in range(validation.positive_int(workers, "workers"))]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    return [
        json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        for index in range(len(ports))
    ]
