"""Checkpoints of both trainers: a resume is the same run or it is refused before anything is
restored; ``CheckpointManager`` round trips bitwise (tables run on both twins)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _twins import D, Twin, torch_twin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfreg_core import InvalidArgumentError
from tfreg_core import checkpoint as core

N = 11
X = np.random.default_rng(1).normal(size=(N, D)).astype(np.float32)
Y = np.random.default_rng(2).normal(size=(N, 1)).astype(np.float32)


class StopAt:
    """Stops ``fit`` after micro-batch ``micro_batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, micro_batch: int) -> None:
        self.at = (epoch, micro_batch)

    def on_micro_batch_end(self, trainer: Any, epoch: int, micro_batch: int) -> None:
        if (epoch, micro_batch) == self.at:
            trainer.stop_training = True


def make(
    twin: Twin,
    *,
    accumulation_steps: int = 2,
    seed: int = 3,
    optimizer: str = "sgd",
    width: int = 1,
    loss: Any = "mse",
) -> Any:
    model = twin.seeded_linear(width, 5)
    options = {"momentum": 0.9} if optimizer == "sgd" else {}
    opt = twin.optimizer(model, 0.05, optimizer, **options)
    return twin.pkg.Trainer(model, loss, opt, accumulation_steps=accumulation_steps, seed=seed)


def _saved_mid_window(twin: Twin, directory: Any) -> Any:
    trainer = make(twin)
    trainer.fit(X, Y, batch_size=2, epochs=2, callbacks=[StopAt(1, 2)], verbose=0)
    assert trainer.accumulator.micro_batches == 1  # mid-window: 3 micro-batches, windows of 2
    return twin.pkg.CheckpointManager(trainer, directory).save()


@pytest.mark.parametrize(
    ("change", "field", "there", "here"),
    [
        ({"accumulation_steps": 3}, "accumulation_steps", "2", "3"),
        ({"seed": 4}, "seed", "3", "4"),
        ({"optimizer": "adam"}, "optimizer", "SGD", "Adam"),
        ({"width": 2}, "model", "1", "2"),
        # Before: silently accepted; the open window's mse sums closed as an mae update.
        ({"loss": "mae"}, "loss", "mse", "mae"),
    ],
    ids=["accumulation_steps", "seed", "optimizer", "model", "loss"],
)
def test_a_resume_into_another_run_is_refused_before_anything_is_restored(
    twin: Twin, tmp_path: Any, change: dict[str, Any], field: str, there: str, here: str
) -> None:
    # Before: accumulation_steps / seed silently accepted (not bitwise); torch optimizer:
    # KeyError 'momentum' in fit; tf optimizer: Adam slots silently dropped; torch model:
    # parameters overwritten before the error.
    _saved_mid_window(twin, tmp_path)
    other = make(twin, **change)
    before = twin.state(other)
    with pytest.raises(InvalidArgumentError, match=rf"another run: {field}=.*{there}.*{here}"):
        twin.pkg.CheckpointManager(other, tmp_path).restore()
    for a, b in zip(twin.state(other), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_manager_resume_mid_window_is_bitwise(twin: Twin, tmp_path: Any) -> None:
    reference = make(twin)
    reference.fit(X, Y, batch_size=2, epochs=3, verbose=0)
    _saved_mid_window(twin, tmp_path)
    resumed = make(twin)
    assert twin.pkg.CheckpointManager(resumed, tmp_path).restore() is not None
    resumed.fit(X, Y, batch_size=2, epochs=3, verbose=0)
    for a, b in zip(twin.state(resumed), twin.state(reference), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: the same run, same order of operations


class SaveAtUpdate:
    """Saves the trainer (the framework's own format) from ``on_update_end`` of update
    ``update`` of epoch 1, then stops."""

    def __init__(self, twin: Twin, directory: Any) -> None:
        self.twin, self.directory, self.path = twin, directory, None

    def on_update_end(self, trainer: Any, record: dict[str, Any]) -> None:
        if (record["epoch"], record["update"]) == (1, 1):
            self.path = self.twin.save(trainer, self.directory)
            trainer.stop_training = True


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_a_checkpoint_saved_when_an_update_ends_resumes_after_that_update(
    twin: Twin, tmp_path: Any, accumulation_steps: int
) -> None:
    # Before: the position was moved past the window only after on_update_end, so a checkpoint
    # written there said the closing micro-batch was still to come: with windows of 1 (torchref;
    # tfreg under a strategy) the resume trained on it a second time (0.05 off, silently);
    # with windows of 2 it was refused as inconsistent.
    reference = make(twin, accumulation_steps=accumulation_steps)
    reference.fit(X, Y, batch_size=2, epochs=2, verbose=0)
    saver = SaveAtUpdate(twin, tmp_path)
    make(twin, accumulation_steps=accumulation_steps).fit(
        X, Y, batch_size=2, epochs=2, callbacks=[saver], verbose=0
    )
    resumed = make(twin, accumulation_steps=accumulation_steps)
    twin.restore(resumed, saver.path)
    resumed.fit(X, Y, batch_size=2, epochs=2, verbose=0)
    for a, b in zip(twin.state(resumed), twin.state(reference), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: the same run, same order of operations


@pytest.mark.parametrize("dropout", [False, True], ids=["mlp", "dropout"])
def test_the_frameworks_own_format_resumes_mid_window_bit_identically(
    twin: Twin, tmp_path: Any, dropout: bool
) -> None:
    # tfreg's trainer.checkpoint(), torchref's state_dict() through torch.save/torch.load;
    # Adam's slots and step count included. With Dropout, the checkpoint's RNG state makes
    # the resumed masks the uninterrupted ones (measured: a generator moved on after the
    # restore moved the final weights by 7.6e-2 (tf) / 4.9e-2 (torch)).
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(23, 4)), rng.integers(0, 3, size=23)

    def classifier_trainer() -> Any:
        model = twin.classifier(5, dropout)
        opt = twin.optimizer(model, 0.01, "adam")
        return twin.pkg.Trainer(model, twin.cross_entropy(), opt, accumulation_steps=3, seed=9)

    reference = classifier_trainer()
    reference.fit(x, y, batch_size=4, epochs=3, verbose=0)
    first = classifier_trainer()
    first.fit(x, y, batch_size=4, epochs=3, callbacks=[StopAt(1, 4)], verbose=0)
    assert int(first.accumulator.micro_batches) == 2  # 2 of window 1's 3 micro-batches are in
    saved = twin.save(first, tmp_path)
    twin.draw_random()  # whatever runs between saving and resuming moves the generator on
    resumed = classifier_trainer()
    twin.restore(resumed, saved)
    restored = twin.state(resumed)
    for other_plan, match in [
        ((x, y, 5), r"batch_size=4.*Received.*batch_size=5"),
        ((x[:22], y[:22], 4), r"num_examples=23.*Received: num_examples=22"),
    ]:
        xs, ys, batch_size = other_plan
        with pytest.raises(InvalidArgumentError, match=match):  # another plan: refused
            resumed.fit(xs, ys, batch_size=batch_size, epochs=3, verbose=0)
        for a, b in zip(twin.state(resumed), restored, strict=True):
            np.testing.assert_array_equal(a, b)
    resumed.fit(x, y, batch_size=4, epochs=3, verbose=0)
    for a, b in zip(twin.state(resumed), twin.state(reference), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: the same run, same order of operations


# Same size (the plan matches), other values: the position alone cannot tell them apart.
X_OTHER = X + np.float32(1.0)


def test_a_mid_epoch_resume_on_other_data_is_refused_before_any_update(
    twin: Twin, tmp_path: Any
) -> None:
    # Before: accepted silently; the rest of epoch 1 trained on X_OTHER.
    _saved_mid_window(twin, tmp_path)
    resumed = make(twin)
    twin.pkg.CheckpointManager(resumed, tmp_path).restore()
    before = twin.state(resumed)
    with pytest.raises(InvalidArgumentError, match=r"saved while training on other data.*digest"):
        resumed.fit(X_OTHER, Y, batch_size=2, epochs=3, verbose=0)
    for a, b in zip(twin.state(resumed), before, strict=True):
        np.testing.assert_array_equal(a, b)  # weights and optimizer slots untouched
    resumed.fit(X.copy(), Y.copy(), batch_size=2, epochs=3, verbose=0)  # equal values: accepted


def test_a_resume_at_an_epoch_boundary_may_train_on_new_data(twin: Twin, tmp_path: Any) -> None:
    # Reference: one trainer, uninterrupted, epoch 0 on X then epoch 1 on X_OTHER.
    reference = make(twin)
    reference.fit(X, Y, batch_size=2, epochs=1, verbose=0)
    reference.fit(X_OTHER, Y, batch_size=2, epochs=2, verbose=0)
    first = make(twin)
    first.fit(X, Y, batch_size=2, epochs=1, verbose=0)
    twin.pkg.CheckpointManager(first, tmp_path).save()
    resumed = make(twin)
    twin.pkg.CheckpointManager(resumed, tmp_path).restore()
    resumed.fit(X_OTHER, Y, batch_size=2, epochs=2, verbose=0)
    for a, b in zip(twin.state(resumed), twin.state(reference), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.usefixtures("single_torch_thread")
def test_a_run_record_without_a_data_digest_is_not_checked() -> None:
    # Written before the field existed: the data is unknown, as for a stream.
    twin, state = _torch_state()
    del state["run"]["data"]
    resumed = make(twin)
    resumed.load_state_dict(state)
    assert resumed.data_digest == ""
    resumed.fit(X_OTHER, Y, batch_size=2, epochs=2, verbose=0)
    assert resumed.data_digest not in ("", state["run"].get("data"))


def test_manager_with_nothing_saved_restores_nothing(twin: Twin, tmp_path: Any) -> None:
    assert twin.pkg.CheckpointManager(make(twin), tmp_path / "empty").restore() is None


def _corrupt_position(trainer: Any, position: tuple[int, ...]) -> None:
    trainer._engine.set_position(position)


@pytest.mark.parametrize(
    ("position", "match"),
    [
        ((1, 10**6, N, 2, 1, 0), r"position.micro_batch must be in \[0, 6\]"),
        ((1, 2, N, 2, 1, 10**6), r"position.window_examples must be in \[0, 11\]"),
        ((1, 2, N, 2, 1, 0), r"accumulator holds 1 micro-batch\(es\) but its position"),
        ((1, 2, N, 0, 1, 0), r"invalid plan"),
    ],
)
def test_a_position_outside_its_plan_is_refused(
    twin: Twin, tmp_path: Any, position: tuple[int, ...], match: str
) -> None:
    # Before: accepted; the rest of the epoch was skipped silently.
    trainer = make(twin)
    trainer.fit(X, Y, batch_size=2, epochs=2, callbacks=[StopAt(1, 2)], verbose=0)
    _corrupt_position(trainer, position)
    twin.pkg.CheckpointManager(trainer, tmp_path).save()
    fresh = make(twin)
    before = twin.state(fresh)
    with pytest.raises(InvalidArgumentError, match=match):
        twin.pkg.CheckpointManager(fresh, tmp_path).restore()
    for a, b in zip(twin.state(fresh), before, strict=True):
        np.testing.assert_array_equal(a, b)


# --- torchref: the whole state dict is checked before anything is applied -------------------


def _torch_state() -> tuple[Twin, dict[str, Any]]:
    twin = torch_twin()
    trainer = make(twin)
    trainer.fit(X, Y, batch_size=2, epochs=2, callbacks=[StopAt(1, 2)], verbose=0)
    return twin, trainer.state_dict()


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(state: dict[str, Any]) -> None:
        *parents, last = path
        target: Any = state
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


_DELETE = object()


def _torch_mutations() -> list[Any]:
    import torch

    return [
        pytest.param(_set(("optimizer",), _DELETE), r"missing \['optimizer'\]", id="no-optimizer"),
        pytest.param(_set(("accumulator",), _DELETE), r"missing \['accumulator'\]", id="no-acc"),
        pytest.param(_set(("rng",), _DELETE), r"missing \['rng'\]", id="no-rng"),
        pytest.param(_set(("run",), _DELETE), r"missing \['run'\]", id="no-run"),
        pytest.param(
            _set(("window", "position", 1), 10**6), r"micro_batch must be in", id="micro-batch"
        ),
        pytest.param(
            _set(("window", "position", 0), "1"), r"position.epoch must be an int", id="str-epoch"
        ),
        pytest.param(
            _set(("accumulator", "count"), torch.tensor(-1e9, dtype=torch.float64)),
            r"count must be a finite number >= 0",
            id="negative-count",
        ),
        pytest.param(
            _set(("accumulator", "count"), torch.tensor(math.nan, dtype=torch.float64)),
            r"count must be a finite number >= 0",
            id="nan-count",
        ),
        pytest.param(
            _set(("accumulator", "micro_batches"), 7),
            r"micro_batches must be in \[0, 1\]",
            id="micro-batches",
        ),
        pytest.param(
            _set(("accumulator", "sums", 0), torch.zeros(2, 2)),
            r"accumulator.sums\[0\] must have shape \(1, 3\)",
            id="sum-shape",
        ),
        pytest.param(
            _set(("model", "weight"), torch.zeros(1, D, dtype=torch.float64)),
            r"dtype torch.float32",
            id="param-dtype",
        ),
        pytest.param(
            _set(("optimizer", "state", 0, "momentum_buffer"), torch.zeros(5)),
            r"momentum_buffer'\] must have the parameter's shape",
            id="slot-shape",
        ),
        pytest.param(
            _set(("window", "metric_sums"), [torch.zeros((), dtype=torch.float64)]),
            r"one 0-d tensor per metric",
            id="metric-sums",
        ),
        pytest.param(_set(("run", "seed"), 99), r"another run: seed=99", id="seed"),
        pytest.param(_set(("run", "data"), 5), r"malformed data digest", id="data-digest"),
        # Before (the rows below): accepted, or refused by torch after the model was loaded.
        pytest.param(
            _set(("window", "touched"), "xyz"),
            r"window.touched must be a list of 2 bools",
            id="touched-str",
        ),
        pytest.param(
            _set(("window", "touched"), [True] * 7),
            r"window.touched must be a list of 2 bools",
            id="touched-len",
        ),
        pytest.param(
            _set(("rng", "cpu"), torch.zeros(3, dtype=torch.uint8)),
            r"rng\['cpu'\] must have shape \(\d+,\)",
            id="rng-size",
        ),
        pytest.param(
            _set(("optimizer", "param_groups", 0, "lr"), "abc"),
            r"param_groups\[0\]\['lr'\] must be a number",
            id="lr-str",
        ),
        pytest.param(
            _set(("optimizer", "state", 0, "momentum_buffer"), "x"),
            r"must be a tensor, a number or None",
            id="slot-str",
        ),
    ]


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize(("mutate", "match"), _torch_mutations())
def test_torch_state_is_checked_whole_before_it_is_applied(mutate: Any, match: str) -> None:
    # Before: missing parts raised KeyError after the model's parameters were overwritten;
    # positions/counts/strings out of range were accepted.
    twin, state = _torch_state()
    mutate(state)
    fresh = make(twin)
    before = twin.state(fresh)
    with pytest.raises(InvalidArgumentError, match=match):
        fresh.load_state_dict(state)
    for a, b in zip(twin.state(fresh), before, strict=True):
        np.testing.assert_array_equal(a, b)


_values = st.one_of(
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(-3, 3), max_size=7),
)


@pytest.mark.usefixtures("single_torch_thread")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    where=st.sampled_from(
        [
            ("window", "position", 0),
            ("window", "position", 1),
            ("window", "position", 5),
            ("window", "position"),
            ("accumulator", "micro_batches"),
            ("accumulator", "count"),
            ("window", "loss_sum"),
            ("metrics",),
            ("run", "accumulation_steps"),
            ("optimizer", "param_groups"),
        ]
    ),
    value=_values,
)
def test_any_corrupted_torch_state_is_refused_whole_or_accepted_valid(
    where: tuple[Any, ...], value: Any
) -> None:
    twin, saved = _torch_state()
    state = copy.deepcopy(saved)
    _set(where, value)(state)
    fresh = make(twin)
    before = twin.state(fresh)
    try:
        fresh.load_state_dict(state)
    except InvalidArgumentError:
        for a, b in zip(twin.state(fresh), before, strict=True):
            np.testing.assert_array_equal(a, b)
        return
    # Accepted: only a value the checks allow (a position inside the plan, a valid counter).
    position = core.check_position(fresh._engine.get_position())
    core.check_window(position, fresh.accumulator.micro_batches, 0.0, 2)


def test_the_recorded_loss_tells_settings_apart_and_reads_alike_across_instances() -> None:
    # Before: the loss was not recorded; a resume with label smoothing or from_logits changed
    # was accepted silently.
    import functools

    import keras
    import torch

    describe = core.describe
    assert describe(torch.nn.CrossEntropyLoss()) == describe(torch.nn.CrossEntropyLoss())
    assert describe(torch.nn.CrossEntropyLoss()) != describe(
        torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    )
    assert "label_smoothing=0.1" in describe(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    assert "training" not in describe(torch.nn.MSELoss().eval())  # a mode, not a setting
    sparse = keras.losses.SparseCategoricalCrossentropy
    assert describe(sparse()) == describe(sparse())
    assert describe(sparse(from_logits=True)) != describe(sparse())
    assert describe("mse") == "mse"
    f = torch.nn.functional.cross_entropy
    assert describe(functools.partial(f, label_smoothing=0.1)) != describe(f)


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({}, r"loss_scale must hold exactly"),
        ({"scale": math.nan, "growth_tracker": 0, "unit": 4.0}, r"'scale'\] must be a finite"),
        ({"scale": 1.0, "growth_tracker": -5, "unit": 4.0}, r"'growth_tracker'\] must be an int"),
        ({"scale": 1.0, "growth_tracker": 0, "unit": "x"}, r"'unit'\] must be a finite"),
    ],
    ids=["empty", "nan-scale", "negative-tracker", "str-unit"],
)
def test_a_torch_loss_scale_is_checked_before_the_model_is_loaded(value: Any, match: str) -> None:
    # Before: KeyError / ValueError from LossScale.load_state_dict, after the model, the
    # optimizer and the accumulator were already restored.
    import torch

    import torchref

    def make() -> Any:
        torch.manual_seed(5)
        model = torch.nn.Linear(D, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return torchref.Trainer(model, "mse", opt, accumulation_steps=2, autocast="bfloat16")

    saved = make()
    saved.fit(X, Y, batch_size=2, epochs=1, verbose=0)
    state = saved.state_dict()
    state["loss_scale"] = value
    fresh = make()
    before = [p.detach().clone() for p in fresh.model.parameters()]
    with pytest.raises(InvalidArgumentError, match=match):
        fresh.load_state_dict(state)
    for a, b in zip(fresh.model.parameters(), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "delete"])
def test_an_unreadable_checkpoint_file_is_the_librarys_error_and_restores_nothing(
    twin: Twin, tmp_path: Any, damage: str
) -> None:
    # Before: IndexError / OpError / NotFoundError from TF's reader, RuntimeError /
    # UnpicklingError (advising weights_only=False) / FileNotFoundError from torch.load.
    import os

    path = _saved_mid_window(twin, tmp_path)
    files = sorted((os.path.join(path, f) for f in os.listdir(path)), key=os.path.getsize)
    largest = files[-1]
    if damage == "truncate":
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    elif damage == "flip":  # one byte in the middle: a checksum (TF) or the zip (torch) says so
        with open(largest, "r+b") as f:
            f.seek(os.path.getsize(largest) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    for file in files:
        if damage == "garbage":
            with open(file, "wb") as f:
                f.write(b"not a checkpoint")
        elif damage == "delete":
            os.remove(file)
    fresh = make(twin)
    before = twin.state(fresh)
    with pytest.raises(InvalidArgumentError, match=r"cannot be read \(missing, truncated"):
        twin.pkg.CheckpointManager(fresh, tmp_path).restore()
    for a, b in zip(twin.state(fresh), before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.usefixtures("single_torch_thread")
def test_a_manager_of_something_else_than_its_trainer_is_refused(tmp_path: Any) -> None:
    # Before: torchref.CheckpointManager(nn.Module).save() wrote the module's state_dict as a
    # checkpoint without a word; tfreg's failed with AttributeError at save().
    import torch

    import tfreg
    import torchref

    with pytest.raises(InvalidArgumentError, match=r"trainer must be a torchref.Trainer"):
        torchref.CheckpointManager(torch.nn.Linear(2, 1), tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"trainer must be a tfreg.Trainer"):
        tfreg.CheckpointManager(make(torch_twin()), tmp_path)
    assert not any(tmp_path.iterdir())
