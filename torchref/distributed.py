"""``torchref.Trainer`` on a ``torch.distributed`` process group: exact accumulation across ranks.

When the process group is initialised (``torchrun``, or ``init_process_group`` yourself) the
trainer runs distributed by itself; there is nothing to configure. Per update, over ``R`` ranks
of ``k`` micro-batches of ``b`` examples each (``batch_size`` is **per rank**, as torch users
expect)::

    g = (sum_{ranks} sum_{micro-batches} grad(w_i * l_i)) / N_global  +  grad(penalty)
    N_global = all-reduced count of the loss elements that count (ignore_index, class weights)

which is one step on the concatenated ``R*k*b`` window. Arrays: every rank passes the same
full arrays; the window plan is the one-device plan with micro-batches of ``R*b``, and rank
``r`` trains on its share of each (:mod:`tfreg_core.distributed`): no example is repeated or
dropped, and the last window may give a rank fewer examples, or none (it still joins the
collectives with zero gradients).

Communication per update: the gradients are all-reduced **once**, plus one small float64
vector (the count and the window's loss/metric sums, so every rank's ``History`` is the global
one). With the module wrapped in ``DistributedDataParallel`` every micro-batch but the window's
last runs under ``no_sync()`` and DDP's all-reduce (its buckets, its comm hook) runs on the
last one; DDP averages over ranks, so the trainer multiplies by ``R`` back to the sum before
dividing by ``N_global`` (exact for ``R`` a power of two; one rounding otherwise). A plain
module on an initialised group gets one all-reduce of its flattened gradient sums (one per
dtype). The penalty, clipping (the global norm of the reduced gradient), the non-finite check
and the optimizer step then run on every rank on identical values: weights stay bit-identical.
A non-finite gradient on any rank makes the reduced gradient non-finite on every rank (NaN and
inf survive the sum), so every rank skips (or raises) on the same update.

Refused before training: parameters that differ across ranks (DDP broadcasts rank 0's at
construction; a plain module must be built identically), ranks passing different arrays
(sizes or values -- each rank its own shard as arrays: compared by a digest, once per ``fit``;
a rank's own shard goes in a ``DataLoader``) or ``batch_size``/``accumulation_steps``; a
``DataLoader`` with the default sampler over the same dataset on every rank (each example
counted ``R`` times), or whose ``DistributedSampler`` pads (it repeats examples:
``drop_last=False`` on a length the world size does not divide); shards with different numbers
of micro-batches per epoch (checked when the loader has a length or ``steps_per_epoch`` is
given); and DDP over parameters whose
accumulator dtype differs from theirs (float16/bfloat16: DDP all-reduces ``.grad``, which the
trainer does not accumulate into then). A rank that raises leaves the others in a collective:
they fail with the backend's error (gloo: "connection closed by peer" when the process exits)
or after the process group's ``timeout`` (``init_process_group(timeout=timedelta(...))``)
when it hangs -- keep that timeout short in tests. Tested on CPU with gloo; the nccl path is the
same code (device tensors) but untested here.

BatchNorm normalises each rank's micro-batch (use ``SyncBatchNorm`` for global statistics) and
DDP broadcasts rank 0's buffers at each forward: neither is an exactness claim of this module.
Checkpoints are per rank (``trainer.state_dict()`` on each; the accumulator holds that rank's
local sums mid-window) and resume with the same world size and per-rank ``batch_size``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from tfreg_core.distributed import check_rank, digest, global_batch_size, rank_share
from tfreg_core.training import leading_dim, map_structure
from tfreg_core.validation import InvalidArgumentError
from torchref._compat import torch

__all__ = ["ProcessGroup", "loader_samplers", "process_group"]

dist = torch.distributed
_COLLECTIVE_FAILED = (
    "A collective of torchref.Trainer failed on rank {rank} of {world}: another rank raised, "
    "exited or timed out (see the process group's timeout). Original error: {error}"
)


def loader_samplers(loader: Any) -> list[Any]:
    """A ``DataLoader``'s samplers: its ``sampler`` and, given a ``batch_sampler`` (such as
    ``BatchSampler(DistributedSampler(...), ...)``), the sampler inside that -- where a
    ``DistributedSampler`` is, the loader's own ``sampler`` being then a default one."""
    candidates = [
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ]
    return list(dict.fromkeys(s for s in candidates if s is not None))


def _ddp_class() -> type:
    return torch.nn.parallel.DistributedDataParallel


class ProcessGroup:
    """What the trainer's engine asks the process group: its share of a global micro-batch, a
    context around each micro-batch (DDP's ``no_sync``), and the one reduction per update.

    Built by :func:`process_group` (``None`` when no group is initialised: one process)."""

    def __init__(
        self, model: torch.nn.Module, params: Sequence[torch.Tensor], *, group: Any = None
    ):
        self.group = group
        self.rank, self.world_size = check_rank(dist.get_rank(group), dist.get_world_size(group))
        self.ddp: Any = model if isinstance(model, _ddp_class()) else None
        self.params = list(params)
        self.per_rank_batch: int | None = None  # set for arrays: slice each global micro-batch

    # -- before training -------------------------------------------------------------------

    def global_batch(
        self, batch_size: int, accumulation_steps: int, num_examples: int, arrays: Sequence[Any]
    ) -> int:
        """Check that every rank trains on the same plan, the same ``arrays`` (``x, y,
        sample_weight``: a digest of their values, hashed on the host once per ``fit``) and
        identical parameters; return the global micro-batch ``R*b`` to plan the epoch with
        (each rank then takes its share). A rank passing its own shard of the arrays would
        train on its share of that shard only: part of every shard never seen, silently."""
        plan = torch.tensor(
            [num_examples, batch_size, accumulation_steps, *digest(arrays)],
            dtype=torch.float64,
            device=self._device,
        )
        if not self._same_everywhere(plan):
            raise InvalidArgumentError(
                "Every rank must call fit with the same arrays (num_examples and values), "
                "batch_size and accumulation_steps (not each rank its own shard as arrays: pass "
                "a DataLoader with a DistributedSampler for that). Received on rank "
                f"{self.rank}: num_examples={num_examples}, batch_size={batch_size}, "
                f"accumulation_steps={accumulation_steps}, and array values that may differ "
                "from another rank's"
            )
        # DDP broadcast rank 0's parameters when it was built; a plain module is checked (one
        # flattened copy per dtype, once per fit).
        if self.ddp is None and not all(
            self._same_everywhere(torch.cat([p.detach().reshape(-1) for p in group]))
            for group in _by_dtype(self.params).values()
        ):
            raise InvalidArgumentError(
                "The model's parameters differ across ranks: build the model identically on "
                "every rank (same seed) or wrap it in DistributedDataParallel, which broadcasts "
                f"rank 0's. Received on rank {self.rank}: parameters that differ from another "
                "rank's"
            )
        self.per_rank_batch = batch_size
        return global_batch_size(batch_size, self.world_size)

    def check_shards(self, loader: Any, steps_per_epoch: int | None) -> None:
        """A stream (each rank its own shard): refuse what would silently miscount, before
        training. A ``DataLoader`` with the default sampler over the same dataset on every rank
        (every rank the whole dataset, each example counted ``R`` times; a per-rank dataset is
        fine); a ``DistributedSampler`` that pads (``drop_last=False`` on a dataset whose length
        the world size does not divide) repeats examples; ranks whose epochs have different
        numbers of micro-batches would close windows at different micro-batches (mismatched
        collectives). One collective when the loader has a length (or ``steps_per_epoch`` is
        given); an iterable without either must yield the same number of micro-batches on
        every rank."""
        samplers = loader_samplers(loader)
        default = (torch.utils.data.SequentialSampler, torch.utils.data.RandomSampler)
        if (
            samplers
            and all(isinstance(s, default) for s in samplers)
            and self._same_dataset(loader)
        ):
            raise InvalidArgumentError(
                "Every rank would iterate the whole dataset (the DataLoader's default sampler): "
                f"each example would count {self.world_size} times in every window's sums and "
                "counts. Give each rank its shard with sampler=DistributedSampler(dataset), or "
                f"pass the full arrays. Received on rank {self.rank}: a DataLoader with "
                f"{type(samplers[0]).__name__}"
            )
        for sampler in samplers:
            if not isinstance(sampler, torch.utils.data.DistributedSampler):
                continue
            # DistributedSampler takes len(dataset) itself: its dataset is sized.
            size = len(sampler.dataset)  # type: ignore[arg-type]
            padded = sampler.total_size - size
            if padded > 0:
                raise InvalidArgumentError(
                    "DistributedSampler pads the dataset by repeating "
                    f"{padded} example(s) (drop_last=False, {size} examples "
                    f"over {sampler.num_replicas} ranks): they would count twice. Pass the full "
                    "arrays (every rank; nothing is padded) or DistributedSampler(drop_last=True). "
                    f"Received on rank {self.rank}: a DataLoader whose sampler pads {padded}"
                )
        length = steps_per_epoch
        if length is None and hasattr(loader, "__len__"):
            length = len(loader)
        if length is None:
            return
        counts = torch.tensor([float(length)], dtype=torch.float64, device=self._device)
        if not self._same_everywhere(counts):
            raise InvalidArgumentError(
                "Every rank's data must yield the same number of micro-batches per epoch (the "
                "windows close together). Received on rank "
                f"{self.rank}: {length} micro-batches per epoch"
            )

    def _same_dataset(self, loader: Any) -> bool:
        """Whether every rank's loader reads the same map-style dataset (its length and first
        example compared by a digest: one collective; no sampling, so no RNG is consumed). A
        dataset sharded per rank (``Subset``, per-rank files) differs."""
        dataset: Any = getattr(loader, "dataset", None)
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            return False
        size = len(dataset)
        limbs = torch.tensor(
            [float(size), *digest(dataset[0] if size else ())], dtype=torch.float64
        )
        return self._same_everywhere(limbs.to(self._device))

    def _same_everywhere(self, values: torch.Tensor) -> bool:
        # max(v) == -max(-v) == min(v) on every element: exact, and no MIN op needed.
        high, low = values.clone(), -values
        self._all_reduce(high, dist.ReduceOp.MAX)
        self._all_reduce(low, dist.ReduceOp.MAX)
        return bool(torch.equal(high, -low))

    @property
    def _device(self) -> torch.device:
        return self.params[0].device

    # -- per micro-batch -------------------------------------------------------------------

    def local(self, x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
        """This rank's share of a global micro-batch (arrays); unchanged for a rank's own
        shard (a DataLoader)."""
        if self.per_rank_batch is None:
            return x, y, sample_weight
        start, stop = rank_share(
            leading_dim(y),
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.per_rank_batch,
        )

        def share(value: Any) -> Any:
            return value[start:stop]

        # Nested inputs/targets (dicts/tuples of arrays) are sliced leaf by leaf.
        return (
            map_structure(share, x),
            map_structure(share, y),
            None if sample_weight is None else map_structure(share, sample_weight),
        )

    def micro_batch(self, closes: bool) -> contextlib.AbstractContextManager[Any]:
        """Around one micro-batch's forward and backward: DDP's ``no_sync()`` unless it closes
        the window (DDP all-reduces on the closing backward, once per update)."""
        if self.ddp is None or closes:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    # -- per update ------------------------------------------------------------------------

    def reduce(self, sums: Sequence[torch.Tensor], stats: Sequence[torch.Tensor]) -> None:
        """Turn each rank's local window into the global one, in place: ``stats`` (float64
        scalars: the count first, then loss/metric sums) are summed over ranks in one
        all-reduce; ``sums`` (the gradient sums) become the sum over ranks -- under DDP by
        undoing its average (the closing backward already reduced them), else by one
        all-reduce of the flattened sums per dtype."""
        with torch.no_grad():
            packed = torch.stack([s.reshape(()) for s in stats])
            self._all_reduce(packed, dist.ReduceOp.SUM)
            for target, value in zip(stats, packed, strict=True):
                target.copy_(value)
            if self.ddp is not None:
                if self.world_size > 1:
                    for s in sums:
                        s.mul_(self.world_size)  # DDP averaged: back to the sum over ranks
                return
            for group in _by_dtype(sums).values():
                flat = torch.cat([s.reshape(-1) for s in group])
                self._all_reduce(flat, dist.ReduceOp.SUM)
                offset = 0
                for s in group:
                    s.copy_(flat[offset : offset + s.numel()].view_as(s))
                    offset += s.numel()

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> None:
        try:
            dist.all_reduce(tensor, op=op, group=self.group)
        except RuntimeError as error:  # DistBackendError is a RuntimeError
            raise RuntimeError(
                _COLLECTIVE_FAILED.format(rank=self.rank, world=self.world_size, error=error)
            ) from error


def _by_dtype(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    # One flattened buffer per dtype: torch.cat needs a common dtype.
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


def process_group(
    model: torch.nn.Module, params: Sequence[torch.Tensor], *, accumulates_in_grad: bool
) -> ProcessGroup | None:
    """The trainer's :class:`ProcessGroup` when ``torch.distributed`` is initialised (the default
    group), else ``None``; a DDP module without an initialised group cannot exist. DDP needs the
    accumulator sums to be the parameters' ``.grad`` (``accumulates_in_grad``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if isinstance(model, _ddp_class()) and not accumulates_in_grad:
        dtypes = sorted({str(p.dtype) for p in params})
        raise InvalidArgumentError(
            "DistributedDataParallel all-reduces .grad, but parameters of dtype "
            f"{dtypes} are accumulated in float32 outside .grad: wrap the float32 module, or "
            "pass the plain module (the trainer all-reduces its sums itself). Received: a DDP "
            f"module with parameter dtypes {dtypes}"
        )
    return ProcessGroup(model, params)
