"""``batchnorm="per_window"``: BatchNorm moving statistics updated once per window with the
window's pooled moments, equal (float64, <= 1e-12: Chan's pooling reassociates the big
batch's sums, a few ulps) to one plain training-mode pass on the concatenated window -- a
plain Keras ``fit`` step / a plain torch train-mode forward -- over several windows; the
default mode (per micro-batch) unchanged; a mid-window resume bitwise; refusals.

The models have one BatchNorm after a Linear/Dense layer and train at lr 0, so the layer's
inputs are the reference's: normalisation stays per micro-batch in both modes, so a BatchNorm
downstream of another one (or after an update) sees other inputs than the big batch would."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from tfreg_core.validation import InvalidArgumentError

SIZES = (5, 3, 4)  # one window of three uneven micro-batches
WINDOWS = 3
TOL = 1e-12  # float64: pooled vs direct moments, a few ulps of the moving statistics


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # float32-exact values: Keras fit's array adapter casts float64 arrays to floatx (float32).
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 2.0, (n, 3)).astype(np.float32).astype(np.float64)
    return x, rng.normal(size=(n, 1)).astype(np.float32).astype(np.float64)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------- torch


def _torch_model(momentum: float | None = 0.1) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=momentum), torch.nn.Linear(4, 1)
    ).double()


def _torch_stats(model: Any) -> list[np.ndarray]:
    bn = model[1]
    return [bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()]


def _torch_trained(batchnorm: str, momentum: float | None = 0.1) -> Any:
    import torch

    import torchref

    model = _torch_model(momentum)
    trainer = torchref.Trainer(
        model,
        torch.nn.MSELoss(),
        torch.optim.SGD(model.parameters(), lr=0.0),  # lr 0: the stats' inputs stay fixed
        accumulation_steps=len(SIZES),
        batchnorm=batchnorm,
    )
    x, y = _data(sum(SIZES) * WINDOWS)
    micro = [b for _ in range(WINDOWS) for b in SIZES]
    bounds = np.cumsum([0, *micro])
    batches = [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]
    trainer.fit(batches, verbose=0)
    return model


def _torch_reference(per_window: bool, momentum: float | None = 0.1) -> Any:
    import torch

    model = _torch_model(momentum)
    model.train()
    x, _ = _data(sum(SIZES) * WINDOWS)
    window = sum(SIZES)
    with torch.no_grad():
        for w in range(WINDOWS):
            xs = x[w * window : (w + 1) * window]
            if per_window:
                model(torch.as_tensor(xs))
            else:
                bounds = np.cumsum([0, *SIZES])
                for a, b in itertools.pairwise(bounds):
                    model(torch.as_tensor(xs[a:b]))
    return model


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_per_window_equals_big_batch(momentum: float | None) -> None:
    model = _torch_trained("per_window", momentum)
    ref = _torch_reference(True, momentum)
    for got, want in zip(_torch_stats(model), _torch_stats(ref), strict=True):
        assert _rel(got, want) <= TOL
    assert int(model[1].num_batches_tracked) == WINDOWS
    # The per-micro-batch statistics are measurably elsewhere (what the mode fixes).
    micro = _torch_reference(False, momentum)
    assert _rel(_torch_stats(micro)[1], _torch_stats(ref)[1]) > 1e-3


def test_torch_default_mode_unchanged() -> None:
    with pytest.warns(UserWarning, match="per_window"):
        model = _torch_trained("per_micro_batch")
    ref = _torch_reference(False)
    for got, want in zip(_torch_stats(model), _torch_stats(ref), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(model[1].num_batches_tracked) == WINDOWS * len(SIZES)


# ---------------------------------------------------------------- Keras


def _keras_model(momentum: float = 0.75) -> Any:
    # momentum float32-exact: Keras rounds it through float32 (0.9 would put fit 1e-8 off the
    # float64 arithmetic, on both sides of the comparison alike but not identically).
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, bias_initializer="ones", dtype="float64"),
            keras.layers.BatchNormalization(momentum=momentum, dtype="float64"),
            keras.layers.Dense(1, dtype="float64"),
        ]
    )
    return model


def _keras_stats(model: Any) -> list[np.ndarray]:
    import keras

    return [
        keras.ops.convert_to_numpy(v)
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        for v in (layer.moving_mean, layer.moving_variance)
    ]


def _micro_batches(x: np.ndarray, y: np.ndarray, windows: int = WINDOWS) -> list[Any]:
    micro = [b for _ in range(windows) for b in SIZES]
    bounds = np.cumsum([0, *micro])
    return [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]


def _tf_trainer(model: Any, batchnorm: str = "per_window") -> Any:
    import keras

    import tfreg

    return tfreg.Trainer(
        model,
        "mse",
        keras.optimizers.SGD(0.0),  # lr 0: the layer's inputs stay the reference's
        accumulation_steps=len(SIZES),
        batchnorm=batchnorm,
    )


def _keras_trained(front: str, x: np.ndarray, y: np.ndarray) -> Any:
    """Per-window mode: ``Trainer`` on the uneven micro-batches (5, 3, 4) x 3 windows, or
    ``AccumulatingModel.fit`` with micro-batches of 4 (windows 4+4+4, 4+4+4, 4+4+2)."""
    import keras

    import tfreg

    model = _keras_model()
    if front == "trainer":
        _tf_trainer(model).fit(_micro_batches(x, y), verbose=0)
    else:
        wrapper = tfreg.AccumulatingModel(model, accumulation_steps=3, batchnorm="per_window")
        wrapper.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        wrapper.fit(x, y, batch_size=4, shuffle=False, epochs=1, verbose=0)
    return model


@pytest.mark.parametrize(("front", "n"), [("trainer", 36), ("accumulating_model", 34)])
def test_keras_per_window_equals_fit_on_the_concatenated_window(front: str, n: int) -> None:
    import keras

    x, y = _data(n)
    model = _keras_trained(front, x, y)
    ref = _keras_model()
    ref.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    ref.fit(x, y, batch_size=sum(SIZES), shuffle=False, epochs=1, verbose=0)  # 3 windows
    for got, want in zip(_keras_stats(model), _keras_stats(ref), strict=True):
        assert _rel(got, want) <= TOL
    start = _keras_stats(_keras_model())
    assert all(_rel(a, b) > 1e-3 for a, b in zip(_keras_stats(model), start, strict=True))


def test_keras_default_mode_unchanged() -> None:
    import keras

    x, y = _data(sum(SIZES) * WINDOWS)
    model = _keras_model()
    with pytest.warns(UserWarning, match="per_window"):
        trainer = _tf_trainer(model, "per_micro_batch")
    trainer.fit(_micro_batches(x, y), verbose=0)
    ref = _keras_model()
    ref.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    for xb, yb in _micro_batches(x, y):
        ref.train_on_batch(xb, yb)
    for got, want in zip(_keras_stats(model), _keras_stats(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)  # float64, same arithmetic


# ---------------------------------------------------------------- resume, refusals


class _StopAt:
    def __init__(self, micro_batch: int) -> None:
        self.micro_batch = micro_batch

    def on_micro_batch_end(self, trainer: Any, epoch: int, micro_batch: int) -> None:
        if micro_batch == self.micro_batch:
            trainer.stop_training = True


class _Torch:
    def trainer(self, batchnorm: str = "per_window") -> Any:
        import torch

        import torchref

        model = _torch_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        return torchref.Trainer(
            model, torch.nn.MSELoss(), optimizer, accumulation_steps=3, batchnorm=batchnorm
        )

    def stats(self, trainer: Any) -> list[np.ndarray]:
        return [*_torch_stats(trainer.model), trainer.model[0].weight.detach().numpy().copy()]

    def resumed(self, trainer: Any, path: Any) -> Any:

        return self.resume(trainer, self.trainer(), path)

    def resume(self, trainer: Any, fresh: Any, path: Any) -> Any:
        import torch

        torch.save(trainer.state_dict(), path / "state.pt")
        fresh.load_state_dict(torch.load(path / "state.pt", weights_only=True))
        return fresh


class _Keras:
    def trainer(self, batchnorm: str = "per_window") -> Any:
        import keras

        import tfreg

        return tfreg.Trainer(
            _keras_model(),
            "mse",
            keras.optimizers.SGD(0.05),
            accumulation_steps=3,
            batchnorm=batchnorm,
        )

    def stats(self, trainer: Any) -> list[np.ndarray]:
        return [*_keras_stats(trainer.model), np.array(trainer.model.layers[0].kernel.numpy())]

    def resumed(self, trainer: Any, path: Any) -> Any:
        return self.resume(trainer, self.trainer(), path)

    def resume(self, trainer: Any, fresh: Any, path: Any) -> Any:
        saved = trainer.checkpoint().write(str(path / "ckpt"))
        fresh.checkpoint().restore(saved)
        return fresh


@pytest.mark.parametrize("twin", [_Torch(), _Keras()], ids=["torch", "tf"])
def test_mid_window_resume_is_bitwise(twin: Any, tmp_path: Any) -> None:
    x, y = _data(36)
    fit = {"batch_size": 4, "epochs": 2, "verbose": 0}
    whole = twin.trainer()
    whole.fit(x, y, **fit)
    first = twin.trainer()
    first.fit(x, y, callbacks=[_StopAt(4)], **fit)  # micro-batch 4: the second window's 2nd
    resumed = twin.resumed(first, tmp_path)
    resumed.fit(x, y, **fit)
    for got, want in zip(twin.stats(resumed), twin.stats(whole), strict=True):
        np.testing.assert_array_equal(got, want)


def test_unknown_mode_is_refused_by_both_twins() -> None:
    import keras
    import torch

    import tfreg
    import torchref

    model = _torch_model()
    with pytest.raises(InvalidArgumentError, match="batchnorm must be one of"):
        torchref.Trainer(model, "mse", torch.optim.SGD(model.parameters()), batchnorm="window")
    with pytest.raises(InvalidArgumentError, match="batchnorm must be one of"):
        tfreg.Trainer(_keras_model(), "mse", keras.optimizers.SGD(), batchnorm="window")
    with pytest.raises(InvalidArgumentError, match="batchnorm must be one of"):
        tfreg.AccumulatingModel(_keras_model(), accumulation_steps=2, batchnorm="window")


def test_torch_refuses_sync_batchnorm() -> None:
    import torch

    import torchref

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.SyncBatchNorm(4))
    with pytest.raises(InvalidArgumentError, match="SyncBatchNorm"):
        torchref.Trainer(model, "mse", torch.optim.SGD(model.parameters()), batchnorm="per_window")


def _weights(model: Any) -> list[np.ndarray]:
    import keras

    return [keras.ops.convert_to_numpy(v) for v in model.variables]


@pytest.mark.parametrize("case", ["renorm", "mask"])
def test_keras_refusals_before_any_update(case: str) -> None:
    import keras

    import tfreg

    keras.utils.set_random_seed(0)
    if case == "renorm":
        layers = [
            keras.Input((3,)),
            keras.layers.BatchNormalization(renorm=True),
            keras.layers.Dense(1),
        ]
        x, y = _data(12)
        match = "cannot pool batch renormalization"
    else:  # BatchNormalization takes the Embedding's mask
        layers = [
            keras.Input((4,)),
            keras.layers.Embedding(5, 3, mask_zero=True),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
        x = np.random.default_rng(0).integers(0, 5, (12, 4))
        y = np.zeros((12, 4, 1))
        match = "does not pool masked"
    model = keras.Sequential(layers)
    trainer = tfreg.Trainer(
        model, "mse", keras.optimizers.SGD(0.1), accumulation_steps=2, batchnorm="per_window"
    )
    before = _weights(model)
    with pytest.raises(InvalidArgumentError, match=match):
        trainer.fit(x, y, batch_size=4, verbose=0)
    for got, want in zip(_weights(model), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_keras_per_window_refused_under_a_strategy() -> None:
    import keras
    import tensorflow as tf

    import tfreg

    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = _keras_model()
        with pytest.raises(InvalidArgumentError, match=r"per_window.* under a tf\.distribute"):
            tfreg.Trainer(model, "mse", keras.optimizers.SGD(0.1), batchnorm="per_window")


@pytest.mark.parametrize("twin", [_Torch(), _Keras()], ids=["torch", "tf"])
def test_resume_in_the_other_mode_is_refused(twin: Any, tmp_path: Any) -> None:
    x, y = _data(36)
    first = twin.trainer()
    first.fit(x, y, batch_size=4, callbacks=[_StopAt(4)], verbose=0)
    other = twin.trainer("per_micro_batch")
    with pytest.raises(InvalidArgumentError, match="batchnorm='per_window' there"):
        twin.resume(first, other, tmp_path)


def test_torch_per_window_refused_on_a_process_group(tmp_path: Any) -> None:
    import torch

    import torchref

    model = _torch_model()
    store = f"file://{tmp_path / 'store'}"  # one local process: no network
    torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        with pytest.raises(InvalidArgumentError, match="not available on a process group"):
            torchref.Trainer(
                model, "mse", torch.optim.SGD(model.parameters()), batchnorm="per_window"
            )
    finally:
        torch.distributed.destroy_process_group()
