"""Which micro-batches form which update: the window plan both trainers follow.

An epoch visits the examples in ``epoch_order`` (a permutation when shuffling), cuts them into
consecutive micro-batches of ``batch_size`` (the last one may be short) and groups every
``accumulation_steps`` consecutive micro-batches into one *window*; each window is one optimizer
update. The last window of an epoch is short when the micro-batch count is not a multiple of
``accumulation_steps`` or its last micro-batch is short. By default it is an update of its own,
scaled by its own example count (exactly one step on its concatenated examples);
``drop_remainder=True`` skips its examples instead. Windows never span epochs.

Plain Python/NumPy so that ``tfreg`` and ``torchref`` cannot disagree on the partition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tfreg_core import validation

__all__ = ["Window", "epoch_order", "plan_epoch"]


@dataclass(frozen=True)
class Window:
    """One update: micro-batches as ``(start, stop)`` positions into the epoch's order."""

    index: int
    first_micro_batch: int
    micro_batches: tuple[tuple[int, int], ...]

    @property
    def examples(self) -> int:
        return sum(stop - start for start, stop in self.micro_batches)


def plan_epoch(
    num_examples: int, *, batch_size: int, accumulation_steps: int, drop_remainder: bool = False
) -> tuple[Window, ...]:
    """The windows of one epoch, in order (see module docstring).

    >>> [w.micro_batches for w in plan_epoch(10, batch_size=3, accumulation_steps=2)]
    [((0, 3), (3, 6)), ((6, 9), (9, 10))]
    >>> [w.examples for w in plan_epoch(10, batch_size=3, accumulation_steps=2,
    ...                                 drop_remainder=True)]
    [6]
    """
    n = validation.positive_int(num_examples, "num_examples")
    b = validation.positive_int(batch_size, "batch_size")
    k = validation.positive_int(accumulation_steps, "accumulation_steps")
    if not isinstance(drop_remainder, bool):
        raise validation.InvalidArgumentError(
            f"drop_remainder must be a bool. Received: drop_remainder={drop_remainder!r}"
        )
    bounds = [(start, min(start + b, n)) for start in range(0, n, b)]
    windows = []
    for first in range(0, len(bounds), k):
        micro = tuple(bounds[first : first + k])
        window = Window(index=len(windows), first_micro_batch=first, micro_batches=micro)
        if drop_remainder and window.examples < k * b:
            break
        windows.append(window)
    return tuple(windows)


def epoch_order(num_examples: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the examples.

    Shuffling draws from ``default_rng([seed, epoch])``: a pure function of (seed, epoch), so a
    run resumed from a checkpoint mid-epoch sees exactly the order the uninterrupted run saw.
    """
    n = validation.positive_int(num_examples, "num_examples")
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)
