"""The trainer's window rules, written once and run against both twins (``tf`` and ``torch``).

torch's ``OptimizerInfo`` pattern: one adapter per framework (``tests/_twins.py``: models from
a spec, optimizers whose steps are counted, weights read back as NumPy), the same public names
in ``tfreg`` and ``torchref`` (``twin.pkg.Trainer``, ``.L2``, ...), and each case written once.
The reference is NumPy least squares with its windows spelled out by hand (indices, not
``tfreg_core.windows``) and its gradient in closed form, so a wrong plan, a wrong scale or a
per-micro-batch step all show up; records are checked against hand-computed values. Each
twin's framework is imported only when its parameter runs (``-k torch`` never imports
TensorFlow).

Checkpoints of both twins run in ``test_checkpoint.py``, loss cases in
``test_trainer_loss_cases.py``. What each framework alone has (Keras fit and model checks,
tracing and XLA, torch loss modules and optimizer state, KerasAdamW) stays in
``test_training.py`` / ``test_training_torch.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _twins import B0, EXACT, LR, WINDOWS, D, N, Twin, numpy_sgd, window_data

from tfreg_core import InvalidArgumentError
from tfreg_harness import assert_close


@pytest.fixture
def data() -> tuple[np.ndarray, ...]:
    return window_data()


def make_trainer(twin: Twin, model: Any, **kwargs: Any) -> Any:
    return twin.pkg.Trainer(model, "mse", twin.optimizer(model, LR), accumulation_steps=3, **kwargs)


# name -> (l2, clipping, drop_remainder)
WINDOW_CASES: dict[str, tuple[float, dict[str, float], bool]] = {
    "flush": (0.0, {}, False),
    # the clip binds: penalty and clipping once per update
    "l2-clip": (0.25, {"global_clipnorm": 0.5}, False),
    # per variable: the kernel's norm (1.4 to 3.4) is clipped at every update, the bias'
    # (0.1 to 0.9) never, so the global rule would give another update
    "l2-clipnorm": (0.25, {"clipnorm": 1.0}, False),
    "l2-drop": (0.25, {}, True),
}


@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_windows_penalty_clipping_and_short_window_match_numpy(twin, data, case) -> None:
    l2, clipping, drop = WINDOW_CASES[case]
    x, y, sw, w = data
    model = twin.linear(w, B0)
    options: dict[str, Any] = {"drop_remainder": drop, **clipping}
    if l2:
        options["regularizer"] = twin.pkg.L2(l2)
    t = make_trainer(twin, model, **options)
    history = t.fit(x, y, batch_size=4, epochs=2, shuffle=False, sample_weight=sw, verbose=0)
    windows = WINDOWS[:1] if drop else WINDOWS
    expected_w, expected_b = numpy_sgd(
        x, y, sw, w, B0, epochs=2, windows=windows, l2=l2, **clipping
    )
    assert_close("kernel", twin.kernel(model), expected_w, rtol=EXACT.rtol)
    assert_close("bias", twin.bias(model), expected_b, rtol=EXACT.rtol)
    assert [r["examples"] for r in history.records] == [len(i) for i in windows] * 2
    assert len(history) == t_updates(windows) == twin.steps(t)  # updates, not micro-batches
    if l2:
        assert history.records[0]["penalty"] == pytest.approx(l2 * np.sum(w**2), rel=1e-15)


def t_updates(windows: list[np.ndarray]) -> int:
    return 2 * len(windows)  # two epochs


def test_proximal_l1_once_per_update(twin, data) -> None:
    x, y, sw, w = data
    model = twin.linear(w, B0)
    t = make_trainer(twin, model, proximal=twin.pkg.ProximalL1(l1=0.3))
    t.fit(x, y, batch_size=4, epochs=2, shuffle=False, sample_weight=sw, verbose=0)
    expected_w, expected_b = numpy_sgd(x, y, sw, w, B0, epochs=2, prox_l1=0.3)
    assert_close("kernel", twin.kernel(model), expected_w, rtol=EXACT.rtol)
    assert_close("bias", twin.bias(model), expected_b, rtol=EXACT.rtol)
    assert np.count_nonzero(expected_w == 0.0) >= 1  # the case exercises real zeros
    np.testing.assert_array_equal(twin.kernel(model) == 0.0, expected_w == 0.0)


class DoubleInPlace:
    """At each epoch end, doubles ``x`` in place: the next epoch trains on the new values (noise
    or curriculum schedules written as in-place updates)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def on_epoch_end(self, trainer: Any, epoch: int, history: Any) -> None:
        self.x *= 2.0


@pytest.mark.parametrize("batch_size", [N, 4], ids=["full-batch", "micro-batches"])
def test_arrays_changed_in_place_between_epochs_are_trained_on(twin, data, batch_size) -> None:
    # Before: tfreg's full-batch fit converted the arrays to tensors once per fit, so the
    # second epoch trained on the first epoch's x (0.73 off on a 3-feature least squares).
    x, y, sw, w = data
    model = twin.linear(w, B0)
    t = twin.pkg.Trainer(model, "mse", twin.optimizer(model, LR))
    trained = x.copy()
    t.fit(
        trained,
        y,
        batch_size=batch_size,
        epochs=2,
        shuffle=False,
        sample_weight=sw,
        callbacks=[DoubleInPlace(trained)],
        verbose=0,
    )
    windows = [np.arange(i, min(i + batch_size, N)) for i in range(0, N, batch_size)]
    expected_w, expected_b = numpy_sgd(x, y, sw, w, B0, epochs=1, windows=windows)
    expected_w, expected_b = numpy_sgd(
        2 * x, y, sw, expected_w, expected_b, epochs=1, windows=windows
    )
    assert_close("kernel", twin.kernel(model), expected_w, rtol=EXACT.rtol)
    assert_close("bias", twin.bias(model), expected_b, rtol=EXACT.rtol)


def test_nonfinite_window_is_skipped_and_counted(twin, data, capsys) -> None:
    x, y, _, w = data
    y = y.copy()
    y[14] = np.nan  # poisons the second window only
    model = twin.linear(w, B0)
    t = make_trainer(twin, model)
    history = t.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=2)
    assert "1 of 2 updates skipped" in capsys.readouterr().out
    expected_w, _ = numpy_sgd(x, y, np.ones(N), w, B0, epochs=1, windows=WINDOWS[:1])
    assert_close("kernel", twin.kernel(model), expected_w, rtol=EXACT.rtol)
    assert [r["skipped"] for r in history.records] == [False, True]
    assert history.skipped_updates == 1
    assert twin.steps(t) == 1


# name -> (examples whose target is poisoned, windows applied before the raise)
RAISE_CASES: dict[str, tuple[slice, list[np.ndarray]]] = {
    "every-window": (slice(None), []),  # nothing applied at all
    "second-window": (slice(14, 15), WINDOWS[:1]),  # window 0 applied, window 1 untouched
}


@pytest.mark.parametrize("case", list(RAISE_CASES))
def test_nonfinite_raise_leaves_the_window_untouched(twin, data, case) -> None:
    poisoned, applied = RAISE_CASES[case]
    x, y, _, w = data
    y = y.copy()
    y[poisoned] = np.inf
    model = twin.linear(w, B0)
    t = make_trainer(twin, model, on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="untouched"):
        t.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    expected_w, _ = numpy_sgd(x, y, np.ones(N), w, B0, epochs=1, windows=applied)
    assert_close("kernel", twin.kernel(model), expected_w, rtol=EXACT.rtol)
    if not applied:
        np.testing.assert_array_equal(twin.kernel(model), w)
    assert twin.steps(t) == len(applied)


def test_nonfinite_raise_consumes_the_window_and_a_later_fit_continues(twin, data) -> None:
    x, y, _, w = data
    bad = y.copy()
    bad[3] = np.nan  # poisons window 0 only
    model = twin.linear(w, B0)
    t = make_trainer(twin, model, on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="window is consumed"):
        t.fit(x, bad, batch_size=4, epochs=1, shuffle=False, verbose=0)
    history = t.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    # Only window 1 runs, from the untouched weights: nothing of the NaN window is carried over.
    expected_w, _ = numpy_sgd(x, y, np.ones(N), w, B0, epochs=1, windows=WINDOWS[1:])
    assert_close("kernel", twin.kernel(model), expected_w, rtol=EXACT.rtol)
    idx = WINDOWS[1]
    expected_loss = np.mean((x[idx] @ w + B0 - y[idx, 0]) ** 2)
    assert [r["examples"] for r in history.records] == [7]
    assert_close("loss", history.records[0]["loss"], expected_loss, rtol=EXACT.rtol)
    assert twin.steps(t) == 1


def test_weights_and_optimizer_change_only_when_a_window_closes(twin, data) -> None:
    x, y, sw, w = data
    model = twin.linear(w, B0)
    t = make_trainer(twin, model)
    seen = []

    class Record:
        def on_micro_batch_end(self, trainer: Any, epoch: int, micro_batch: int) -> None:
            seen.append((twin.kernel(model), twin.steps(trainer)))

    t.fit(
        x,
        y,
        batch_size=4,
        epochs=1,
        shuffle=False,
        sample_weight=sw,
        callbacks=[Record()],
        verbose=0,
    )
    # micro-batches 0..4; windows close at 2 (full) and 4 (short)
    kernels = [w] + [k for k, _ in seen]
    changed = [i for i in range(5) if not np.array_equal(kernels[i], kernels[i + 1])]
    assert changed == [2, 4]
    assert [it for _, it in seen] == [0, 0, 1, 1, 2]


def test_loss_and_metric_records_are_window_values(twin) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 2))
    y = rng.integers(0, 2, size=10)
    kernel = rng.normal(size=(2, 2))
    model = twin.dense(kernel, None)
    t = twin.pkg.Trainer(
        model,
        twin.cross_entropy(),
        twin.optimizer(model, 0.0),  # weights stay put: every window sees `kernel`
        accumulation_steps=2,
        metrics=["sparse_categorical_accuracy"],
    )
    history = t.fit(x, y, batch_size=3, epochs=1, shuffle=False, verbose=0)
    logits = x @ kernel
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = -log_p[np.arange(10), y]
    hits = logits.argmax(axis=1) == y
    for record, idx in zip(history.records, [np.arange(0, 6), np.arange(6, 10)], strict=True):
        assert record["data_loss"] == pytest.approx(nll[idx].mean(), rel=1e-14)
        assert record["sparse_categorical_accuracy"] == pytest.approx(hits[idx].mean())


def test_binary_accuracy_brings_the_targets_to_the_predictions_rank(twin) -> None:
    # Before: targets of shape (N,) against predictions (N, 1) were broadcast to (N, N), so
    # the record averaged every pair (0.56 where the hand count gives 0.8).
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 2)), rng.integers(0, 2, size=10).astype(np.float64)
    w = np.array([0.8, -0.6])
    model = twin.dense(w.reshape(2, 1), np.array([0.5]))
    if twin.name == "tf":
        loss: Any = "mse"  # Keras' losses bring the targets to the predictions' rank
    else:
        loss = twin.pkg.per_element(lambda p, t: (p[:, 0] - t) ** 2)
    t = twin.pkg.Trainer(model, loss, twin.optimizer(model, 0.0), metrics=["binary_accuracy"])
    history = t.fit(x, y, batch_size=5, epochs=1, shuffle=False, verbose=0)
    hits = (x @ w + 0.5 > 0.5) == y
    for record, idx in zip(history.records, [np.arange(0, 5), np.arange(5, 10)], strict=True):
        assert record["binary_accuracy"] == pytest.approx(hits[idx].mean(), rel=1e-15)


def test_verbose_levels(twin, data, capsys) -> None:
    x, y, _, w = data
    make_trainer(twin, twin.linear(w, B0)).fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert capsys.readouterr().out == ""
    make_trainer(twin, twin.linear(w, B0)).fit(x, y, batch_size=4, epochs=2, verbose=1)
    assert "Epoch 2/2 loss" in capsys.readouterr().out  # rich's bar, with each update's loss
    t = make_trainer(twin, twin.linear(w, B0))
    t.fit(x, y, batch_size=4, epochs=2, verbose=2)
    out = capsys.readouterr().out
    assert "Epoch 1/2: 2 updates" in out and "Epoch 2/2" in out
    # epochs is the final epoch index: a repeated call has nothing left to do, and warns
    # (at every verbosity)
    with pytest.warns(UserWarning, match="Nothing to train: the trainer is at epoch 2"):
        assert len(t.fit(x, y, batch_size=4, epochs=2, verbose=0)) == 0
    assert len(t.fit(x, y, batch_size=4, epochs=3, verbose=0)) == 2


def test_bad_fit_data_changes_nothing(twin, data) -> None:
    x, y, _, w = data
    model = twin.linear(w, B0)
    t = make_trainer(twin, model)
    with pytest.raises(InvalidArgumentError, match=r"sample_weight.shape=\(3,\)"):
        t.fit(x, y, batch_size=4, sample_weight=np.ones(3), verbose=0)
    with pytest.raises(InvalidArgumentError, match="batch_size=0"):
        t.fit(x, y, batch_size=0, verbose=0)
    with pytest.raises(InvalidArgumentError, match=r"y.shape=\(5, 1\)"):
        t.fit(x, y[:5], batch_size=4, verbose=0)
    np.testing.assert_array_equal(twin.kernel(model), w)
    assert twin.steps(t) == 0


BAD_OPTIONS = {
    "steps-zero": ({"accumulation_steps": 0}, "accumulation_steps=0"),
    "steps-negative": ({"accumulation_steps": -1}, "accumulation_steps=-1"),
    "steps-float": ({"accumulation_steps": 2.0}, "accumulation_steps=2.0"),
    "nonfinite-mode": ({"on_nonfinite": "ignore"}, "on_nonfinite=ignore"),
    "clip-negative": ({"clipnorm": -1.0}, "clipnorm=-1.0"),
    "two-clips": ({"clipnorm": 1.0, "global_clipnorm": 1.0}, "Only one of clipnorm"),
    "metric": ({"metrics": ["accuracy"]}, "metrics=accuracy"),
    "drop": ({"drop_remainder": 1}, "drop_remainder=1"),
}


@pytest.mark.parametrize("option", list(BAD_OPTIONS))
def test_bad_options_name_the_argument(twin, option) -> None:
    kwargs, match = BAD_OPTIONS[option]
    model = twin.linear(np.zeros(D), 0.0)
    with pytest.raises(InvalidArgumentError, match=match):
        twin.pkg.Trainer(model, "mse", twin.optimizer(model, LR), **kwargs)


# float32-exact factors: L1 keeps Keras' float32 factor in both twins (L1(0.1) reads back
# 0.10000000149), L2 its float64 one
PENALTIES = {"L2": 0.1, "L1": 0.5}


@pytest.mark.parametrize("penalty", list(PENALTIES))
def test_get_config_returns_the_keyword_arguments(twin, penalty) -> None:
    model = twin.linear(np.zeros(D), 0.0)
    sgd = twin.optimizer(model, LR)
    t = twin.pkg.Trainer(
        model,
        "mse",
        sgd,
        accumulation_steps=4,
        clipnorm=2.0,
        seed=3,
        regularizer=getattr(twin.pkg, penalty)(PENALTIES[penalty]),
        proximal=twin.pkg.ProximalL1(l1=0.01),
    )
    config = t.get_config()
    assert config["regularizer"] == {
        "class_name": penalty,
        "config": {penalty.lower(): PENALTIES[penalty]},
    }
    assert config["proximal"] == {
        "class_name": "ProximalL1",
        "config": {"l1": 0.01, "include_bias": False, "threshold": "auto"},
    }
    assert config["accumulation_steps"] == 4 and config["clipnorm"] == 2.0 and config["seed"] == 3
    assert twin.pkg.Trainer(model, "mse", sgd, **config).get_config() == config
