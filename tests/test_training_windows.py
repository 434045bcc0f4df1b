"""tfreg_core.windows: the partition both trainers follow, and tfreg_core.training's option
checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tfreg_core import InvalidArgumentError
from tfreg_core.training import History, TrainerSpec
from tfreg_core.windows import array_steps, epoch_order, plan_epoch, skip, stream_steps


def test_hand_written_plan() -> None:
    windows = plan_epoch(10, batch_size=3, accumulation_steps=2)
    assert [w.micro_batches for w in windows] == [((0, 3), (3, 6)), ((6, 9), (9, 10))]
    assert [w.first_micro_batch for w in windows] == [0, 2]
    assert [w.examples for w in windows] == [6, 4]
    assert [
        w.examples for w in plan_epoch(10, batch_size=3, accumulation_steps=2, drop_remainder=True)
    ] == [6]
    # 12 = 3 x 4 exactly: nothing is short, nothing is dropped
    assert len(plan_epoch(12, batch_size=3, accumulation_steps=2, drop_remainder=True)) == 2


@given(
    n=st.integers(1, 200),
    batch_size=st.integers(1, 40),
    steps=st.integers(1, 6),
    drop=st.booleans(),
)
def test_windows_partition_the_epoch(n: int, batch_size: int, steps: int, drop: bool) -> None:
    windows = plan_epoch(n, batch_size=batch_size, accumulation_steps=steps, drop_remainder=drop)
    covered = [i for w in windows for start, stop in w.micro_batches for i in range(start, stop)]
    full = (n // (batch_size * steps)) * batch_size * steps
    # consecutive, no overlap; everything unless the short tail window was dropped
    assert covered == list(range(len(covered)))
    assert len(covered) == (full if drop else n)
    assert all(len(w.micro_batches) <= steps for w in windows)
    assert all(w.examples == batch_size * steps for w in windows[:-1])


def test_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a = epoch_order(50, shuffle=True, seed=3, epoch=2)
    np.testing.assert_array_equal(a, epoch_order(50, shuffle=True, seed=3, epoch=2))
    assert sorted(a) == list(range(50))
    assert not np.array_equal(a, epoch_order(50, shuffle=True, seed=3, epoch=3))
    np.testing.assert_array_equal(epoch_order(5, shuffle=False, seed=3, epoch=1), np.arange(5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accumulation_steps": True}, "accumulation_steps=True"),
        ({"global_clipnorm": 0.0}, "global_clipnorm=0.0"),
        ({"seed": -1}, "seed=-1"),
        ({"metrics": "binary_accuracy"}, "metrics='binary_accuracy'"),
    ],
    ids=["bool-steps", "zero-clip", "negative-seed", "metrics-string"],
)
def test_spec_rejects_bad_values(kwargs, match) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        TrainerSpec(**kwargs)


def test_spec_config_round_trip() -> None:
    spec = TrainerSpec(accumulation_steps=4, clipnorm=1.5, metrics=["binary_accuracy"])
    assert TrainerSpec(**spec.get_config()).get_config() == spec.get_config()


def test_plan_rejects_bad_sizes() -> None:
    with pytest.raises(InvalidArgumentError, match="batch_size=0"):
        plan_epoch(10, batch_size=0, accumulation_steps=1)
    with pytest.raises(InvalidArgumentError, match="drop_remainder='yes'"):
        plan_epoch(10, batch_size=2, accumulation_steps=1, drop_remainder="yes")


def test_history_columns() -> None:
    history = History()
    history.records += [{"loss": 1.0, "skipped": False}, {"loss": 2.0, "skipped": True}]
    assert history.history == {"loss": [1.0, 2.0], "skipped": [False, True]}
    assert history.skipped_updates == 1 and len(history) == 2


def test_array_steps_resume_at_a_micro_batch() -> None:
    windows = plan_epoch(10, batch_size=3, accumulation_steps=2)
    steps = list(array_steps(windows, start=1))
    assert [(s.micro_batch, s.window, s.item, s.closes) for s in steps] == [
        (1, 0, (3, 6), True),
        (2, 1, (6, 9), False),
        (3, 1, (9, 10), True),
    ]
    assert [s.window_micro_batches for s in steps] == [2, 1, 2]


def test_stream_steps_close_the_short_window_at_the_end_of_the_data() -> None:
    steps = list(stream_steps(iter(range(5)), accumulation_steps=2))
    assert [(s.item, s.window, s.closes, s.drop) for s in steps] == [
        (0, 0, False, False),
        (1, 0, True, False),
        (2, 1, False, False),
        (3, 1, True, False),
        (4, 2, True, False),
    ]
    dropped = list(stream_steps(range(5), accumulation_steps=2, drop_remainder=True))
    assert [s.drop for s in dropped] == [False, False, False, False, True]
    # an exact multiple drops nothing
    exact = stream_steps(range(4), accumulation_steps=2, drop_remainder=True)
    assert not any(s.drop for s in exact)


def test_stream_steps_never_read_past_the_limit() -> None:
    shared = iter(range(100))
    first = [s.item for s in stream_steps(shared, accumulation_steps=3, limit=5)]
    second = list(stream_steps(shared, accumulation_steps=3, limit=5))
    assert first == [0, 1, 2, 3, 4]
    assert [s.item for s in second] == [5, 6, 7, 8, 9]  # nothing lost to the look-ahead
    assert [s.closes for s in second] == [False, False, True, False, True]
    # a resumed epoch numbers its steps from `start` (windows keep their places)
    resumed = list(stream_steps(range(3), accumulation_steps=3, start=4, limit=7))
    assert [(s.micro_batch, s.window, s.window_micro_batches) for s in resumed] == [
        (4, 1, 2),
        (5, 1, 3),
        (6, 2, 1),
    ]


def test_skip_refuses_data_shorter_than_the_checkpoint() -> None:
    iterator = iter(range(3))
    skip(iterator, 2)
    assert next(iterator) == 2
    with pytest.raises(InvalidArgumentError, match=r"ended after 3 micro-batches.*consumed 4"):
        skip(iter(range(3)), 4)
