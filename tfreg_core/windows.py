"""Which micro-batches form which update: the window plan both trainers follow.

An epoch visits the examples in ``epoch_order`` (a permutation when shuffling), cuts them into
consecutive micro-batches of ``batch_size`` (the last one may be short) and groups every
``accumulation_steps`` consecutive micro-batches into one *window*; each window is one optimizer
update. The last window of an epoch is short when the micro-batch count is not a multiple of
``accumulation_steps`` or its last micro-batch is short. By default it is an update of its own,
scaled by its own example count (exactly one step on its concatenated examples);
``drop_remainder=True`` skips its examples instead. Windows never span epochs.

Both kinds of data reach the trainers as a sequence of :class:`Step` s, resume included, so the
fit loop reads top to bottom: :func:`array_steps` walks a plan over in-memory arrays;
:func:`stream_steps` cuts an iterable of micro-batches (a ``tf.data.Dataset``, a ``DataLoader``,
a generator) into windows of ``accumulation_steps`` consecutive micro-batches. A stream's length
need not be known: it looks one micro-batch ahead, so the micro-batch that ends the data closes
the short last window (``drop=True`` on it when ``drop_remainder``: its gradient is discarded,
since which window is short is only known once the data ends). For a stream, ``drop_remainder``
drops a window with fewer than ``accumulation_steps`` micro-batches; a full window whose last
micro-batch is short is kept (the stream does not know the intended batch size), as in
``AccumulatingModel``.

Plain Python/NumPy so that ``tfreg`` and ``torchref`` cannot disagree on the partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tfreg_core import validation

__all__ = ["Step", "Window", "array_steps", "epoch_order", "plan_epoch", "skip", "stream_steps"]


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
    windows: list[Window] = []
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


@dataclass(frozen=True)
class Step:
    """One micro-batch of an epoch and what follows it.

    ``item`` is the micro-batch: ``(start, stop)`` positions into the epoch's order
    (:func:`array_steps`) or the element the iterable yielded (:func:`stream_steps`).
    ``closes``: the window is complete after this micro-batch (apply it, or discard it when
    ``drop``). ``window_micro_batches``: how many micro-batches the window holds so far,
    this one included (earlier ones may predate a resume).
    """

    micro_batch: int
    window: int
    item: Any
    closes: bool
    window_micro_batches: int
    drop: bool = False


def array_steps(windows: Sequence[Window], *, start: int = 0) -> Iterator[Step]:
    """The steps of a planned epoch from micro-batch ``start`` on (a resumed epoch skips the
    micro-batches the checkpoint already holds; nothing is replayed).

    >>> [(s.micro_batch, s.closes) for s in array_steps(plan_epoch(5, batch_size=2,
    ...                                                            accumulation_steps=2), start=1)]
    [(1, True), (2, True)]
    """
    for window in windows:
        for offset, bounds in enumerate(window.micro_batches):
            micro_batch = window.first_micro_batch + offset
            if micro_batch >= start:
                closes = offset == len(window.micro_batches) - 1
                yield Step(micro_batch, window.index, bounds, closes, offset + 1)


_END = object()


def stream_steps(
    items: Iterable[Any] | Iterator[Any],
    *,
    accumulation_steps: int,
    drop_remainder: bool = False,
    start: int = 0,
    limit: int | None = None,
) -> Iterator[Step]:
    """Steps over ``items``: micro-batches ``start, start+1, ...`` of an epoch, windows of
    ``accumulation_steps`` consecutive ones, until ``items`` ends or ``limit`` micro-batches
    (the epoch's ``steps_per_epoch``) are reached. The element that ends the data closes the
    last window, found by reading one element ahead (never past ``limit``, so an iterator shared
    by consecutive epochs loses nothing). ``start`` only numbers the steps: the caller positions
    ``items`` (see ``skip``).

    >>> [(s.micro_batch, s.window, s.closes) for s in stream_steps("abcde", accumulation_steps=2)]
    [(0, 0, False), (1, 0, True), (2, 1, False), (3, 1, True), (4, 2, True)]
    >>> [s.drop for s in stream_steps("abc", accumulation_steps=2, drop_remainder=True)]
    [False, False, True]
    """
    k = validation.positive_int(accumulation_steps, "accumulation_steps")
    iterator = iter(items)
    micro_batch = start
    upcoming = _END if limit is not None and micro_batch >= limit else next(iterator, _END)
    while upcoming is not _END:
        item = upcoming
        # Never read ahead past `limit`: the next epoch's share of a shared stream.
        at_limit = limit is not None and micro_batch + 1 >= limit
        upcoming = _END if at_limit else next(iterator, _END)
        in_window = micro_batch % k + 1
        full = in_window == k
        ends = upcoming is _END
        yield Step(
            micro_batch,
            micro_batch // k,
            item,
            full or ends,
            in_window,
            drop=bool(drop_remainder and ends and not full),
        )
        micro_batch += 1


def skip(iterator: Iterator[Any], count: int) -> None:
    """Advance ``iterator`` past ``count`` micro-batches (a resumed epoch's consumed ones);
    raises ``InvalidArgumentError`` when it ends first."""
    for seen in range(count):
        if next(iterator, _END) is _END:
            raise validation.InvalidArgumentError(
                f"The data ended after {seen} micro-batches, but the checkpoint's epoch already "
                f"consumed {count}: resuming mid-epoch needs the same data. Received: an "
                f"iterable of {seen} micro-batches"
            )
