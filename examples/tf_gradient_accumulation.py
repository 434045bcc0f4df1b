"""Gradient accumulation done right: 4 micro-batches of 64 == one batch of 256, TF and PyTorch.

The corrected version of the seed notebook (003): its loop applied the *current* micro-batch's
gradients instead of the accumulated ones, never added the micro-batch at ``step % 4 == 0``,
discarded the division by ``num_accum``, dropped the epoch's leftovers and put a softmax in
front of ``from_logits=True``. Here ``tfreg.Trainer`` / ``torchref.Trainer`` accumulate the
gradients of per-micro-batch loss *sums* and divide once by the window's example count, so an
accumulated update is the large-batch update up to float round-off -- the short last window of
each epoch included.

Beside those exact curves (TF only, on the full training set after every update) the example
trains two set-ups that are *wrong on purpose*, so the plot shows what accumulation bias looks
like:

- ``seed loop (WRONG)``: a hand-written ``GradientTape`` loop with the seed notebook's bugs
  re-created: each window applies only its last micro-batch's gradient (the sum is built and
  thrown away), without the division, the epoch's leftover micro-batches are dropped, and a
  softmax sits in front of ``from_logits=True``.
- ``Keras built-in``: ``Adam(gradient_accumulation_steps=4)`` in plain ``model.fit``. It averages
  the micro-batch *means* (a short micro-batch weighs as much as a full one), carries an epoch's
  partial window into the next epoch, and evaluates a ``LearningRateSchedule`` at the micro-step
  counter: with ``PiecewiseConstantDecay`` its rate drops ``4x`` too early.

Data: ``examples._common.load_mnist`` -- MNIST from local files when ``--mnist`` points at them
(nothing is downloaded), else scikit-learn's 8x8 digits. The model is the seed CNN (logits out)
built in both frameworks with the same NumPy weights. By default the first 900 training images
(14 micro-batches of 64 and one of 4: every epoch ends in a short window) and 2 epochs;
``--full`` trains on all of them for 6 epochs.

    python -m examples.tf_gradient_accumulation --out out/accumulation
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
import torch

import tfreg
import torchref
from examples._common import load_mnist, make_parser, pyplot, save_figure
from tfreg.parity import seed_everything
from tfreg_harness.keras_side.models import build_cnn
from tfreg_harness.layouts import to_torch_input

MICRO_BATCH, STEPS = 64, 4  # 4 x 64 accumulated vs one batch of 256
LR = 1e-3
BIAS_LR = 1e-2  # the bias runs: a rate at which eight updates visibly move the loss


def keras_loss(*, from_logits: bool = True) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, dtype="float32")


def schedule(updates: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """BIAS_LR for the first half of the updates, BIAS_LR / 10 after: counted in updates."""
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [updates // 2], [BIAS_LR, BIAS_LR / 10]
    )


class FullSetLoss:
    """The training-set loss (no penalty) of ``model`` after every update, in every set-up."""

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
        self.model, self.x, self.y = model, x, y
        self.values = [self.measure()]  # before the first update
        self._last = self._fingerprint()

    def measure(self) -> float:
        return float(keras_loss()(self.y, self.model(self.x, training=False)))

    def _fingerprint(self) -> float:
        return float(np.sum(self.model.trainable_weights[0].numpy()))

    def on_update_end(self, trainer=None, record=None) -> None:  # tfreg.Trainer's hook
        self.values.append(self.measure())

    def after_micro_batch(self) -> None:
        """For loops that do not say when they update: record when the weights moved."""
        now = self._fingerprint()
        if now != self._last:
            self._last = now
            self.on_update_end()


class _KerasHook(keras.callbacks.Callback):
    def __init__(self, probe: FullSetLoss) -> None:
        super().__init__()
        self.probe = probe

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.probe.after_micro_batch()


def seed_loop_wrong(model: keras.Model, x, y, *, epochs: int, probe: FullSetLoss) -> None:
    """DELIBERATELY WRONG: the seed notebook's accumulation bugs, re-created for the plot."""
    optimizer = keras.optimizers.Adam(BIAS_LR)
    loss_fn = keras_loss(from_logits=True)  # ... fed probabilities: the softmax bug
    micro = [
        (x[i : i + MICRO_BATCH], y[i : i + MICRO_BATCH]) for i in range(0, len(x), MICRO_BATCH)
    ]
    usable = len(micro) - len(micro) % STEPS  # bug: an epoch's leftover micro-batches dropped
    for _ in range(epochs):
        summed = None
        for step, (xb, yb) in enumerate(micro[:usable]):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, tf.nn.softmax(model(xb, training=True)))
            grads = tape.gradient(loss, model.trainable_weights)
            if step % STEPS == 0:
                summed = [tf.zeros_like(g) for g in grads]  # bug: this micro-batch never added
            else:
                summed = [s + g for s, g in zip(summed, grads, strict=True)]
            if step % STEPS == STEPS - 1:
                _ = [s / STEPS for s in summed]  # bug: the division is computed and discarded
                # bug: the *current* micro-batch's gradient is applied, not the window's sum
                optimizer.apply(grads, model.trainable_weights)
                probe.on_update_end()


def bias_runs(fresh_pair, x, y, *, epochs: int, seed: int) -> dict[str, list[float]]:
    """Full-set loss after every update: exact (tfreg) vs the seed loop vs Keras' built-in."""
    windows = -(-len(x) // (STEPS * MICRO_BATCH))
    updates = windows * epochs
    curves = {}
    for label, lr in [("exact", BIAS_LR), ("exact, schedule", schedule(updates))]:
        model = fresh_pair().keras
        probe = FullSetLoss(model, x, y)
        tfreg.Trainer(
            model, keras_loss(), keras.optimizers.Adam(lr), accumulation_steps=STEPS, seed=seed
        ).fit(
            x, y, batch_size=MICRO_BATCH, epochs=epochs, shuffle=False, callbacks=[probe], verbose=0
        )
        curves[f"tfreg {STEPS}x{MICRO_BATCH} {label}"] = probe.values
    model = fresh_pair().keras
    probe = FullSetLoss(model, x, y)
    seed_loop_wrong(model, x, y, epochs=epochs, probe=probe)
    curves["seed loop (WRONG)"] = probe.values
    for label, lr in [("", BIAS_LR), (", schedule", schedule(updates))]:
        model = fresh_pair().keras
        probe = FullSetLoss(model, x, y)
        model.compile(keras.optimizers.Adam(lr, gradient_accumulation_steps=STEPS), keras_loss())
        model.fit(
            x,
            y,
            batch_size=MICRO_BATCH,
            epochs=epochs,
            shuffle=False,
            callbacks=[_KerasHook(probe)],
            verbose=0,
        )
        curves[f"Keras built-in{label} (biased)"] = probe.values
    return curves


class SaveEachEpoch:
    """A trainer callback: a crash-safe checkpoint after every epoch (``CheckpointManager``:
    written aside, renamed into place; ``manager.restore()`` resumes from the latest)."""

    def __init__(self, manager) -> None:
        self.manager = manager

    def on_epoch_end(self, trainer, epoch, history) -> None:
        self.manager.save()


def train_both(
    pair_weights, x, y, *, steps: int, batch: int, epochs: int, seed: int, checkpoints=None
):
    """Train the Keras and the torch CNN from the same weights; return their histories and
    models. With ``checkpoints`` (a directory) each trainer checkpoints every epoch there."""
    pair = pair_weights()
    common = {"accumulation_steps": steps, "metrics": ["sparse_categorical_accuracy"], "seed": seed}
    tf_trainer = tfreg.Trainer(pair.keras, keras_loss(), keras.optimizers.Adam(LR), **common)
    # KerasAdamW(weight_decay=0) is Keras' Adam arithmetic: the curves differ by round-off only.
    optimizer = torchref.KerasAdamW(pair.torch.parameters(), lr=LR)
    torch_trainer = torchref.Trainer(pair.torch, "cross_entropy", optimizer, **common)
    saving = {"tf": [], "torch": []}
    if checkpoints is not None:
        for name, manager in (
            ("tf", tfreg.CheckpointManager),
            ("torch", torchref.CheckpointManager),
        ):
            trainer = tf_trainer if name == "tf" else torch_trainer
            saving[name] = [SaveEachEpoch(manager(trainer, Path(checkpoints) / name))]
    tf_history = tf_trainer.fit(
        x, y, batch_size=batch, epochs=epochs, callbacks=saving["tf"], verbose=0
    )
    torch_history = torch_trainer.fit(
        to_torch_input(x), y, batch_size=batch, epochs=epochs, callbacks=saving["torch"], verbose=0
    )
    return tf_history, torch_history, pair


def accuracy(pair, x, y) -> tuple[float, float]:
    keras_acc = float(np.mean(np.argmax(pair.keras(x, training=False), -1) == y))
    with torch.no_grad():
        pair.torch.eval()
        logits = pair.torch(torch.as_tensor(to_torch_input(x)))
    return keras_acc, float(np.mean(logits.argmax(-1).numpy() == y))


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, help="epochs (default 2; full 6)")
    parser.add_argument("--mnist", type=Path, help="directory with MNIST's IDX files or npz")
    parser.add_argument("--limit", type=int, help="training examples (default 900; full: all)")
    parser.add_argument("--checkpoints", type=Path, help="checkpoint every epoch into this dir")
    args = parser.parse_args(argv)

    rng = seed_everything(args.seed)
    # A tiny CNN: torch's thread pool costs more than it saves (and the cores may be shared).
    torch.set_num_threads(1)
    data = load_mnist(args.mnist)
    data = data.limited(None if args.full and args.limit is None else (args.limit or 900), None)
    epochs = args.epochs or (6 if args.full else 2)
    # The CNNs take float32 NHWC images (Keras' layout; to_torch_input transposes for torch).
    x, y = data.x_train.astype(np.float32)[..., None], data.y_train
    x_test, y_test = data.x_test.astype(np.float32)[..., None], data.y_test
    weights_rng_state = rng.bit_generator.state

    def fresh_pair():  # identical initial weights for every run
        rng.bit_generator.state = weights_rng_state
        return build_cnn(dtype="float32", rng=rng, input_shape=x.shape[1:])

    print(f"{data.source}: {len(x)} training images {x.shape[1:]}, {len(x_test)} test")
    print(f"float32, Adam lr {LR}, {epochs} epochs")
    runs = {}
    for label, steps, batch in [
        (f"{STEPS}x{MICRO_BATCH}", STEPS, MICRO_BATCH),
        (f"1x{STEPS * MICRO_BATCH}", 1, STEPS * MICRO_BATCH),
    ]:
        started = time.perf_counter()
        runs[label] = train_both(
            fresh_pair,
            x,
            y,
            steps=steps,
            batch=batch,
            epochs=epochs,
            seed=args.seed,
            checkpoints=None if args.checkpoints is None else args.checkpoints / label,
        )
        print(f"  trained {label} in both frameworks: {time.perf_counter() - started:.1f}s")

    labels = list(runs)
    curves = {
        f"{fw} {label}": np.array(runs[label][i].history["loss"])
        for label in labels
        for i, fw in ((0, "tf"), (1, "torch"))
    }
    names = list(curves)
    print("\nper-update window loss, last update of each epoch:")
    print("update  " + "  ".join(f"{n:>14}" for n in names))
    epochs_of = np.array(runs[labels[0]][0].history["epoch"])
    ends = [int(np.flatnonzero(epochs_of == e)[-1]) for e in range(epochs)]
    for i in ends:
        print(f"{i:>6}  " + "  ".join(f"{curves[n][i]:>14.6f}" for n in names))
    gap = np.abs(curves[names[0]] - curves[names[2]])
    fw_gap = np.abs(curves[names[0]] - curves[names[1]])
    # float32 round-off differs between 4 sums of 64 and one of 256; Adam's 1/sqrt(v) then
    # amplifies it over the run, so the first updates show the exactness best.
    print(f"\n|loss(4x64) - loss(1x256)| (tf):  first 5 updates {gap[:5].max():.1e}, ", end="")
    print(f"whole run {gap.max():.1e}")
    print(f"|loss(tf) - loss(torch)| (4x64): first 5 updates {fw_gap[:5].max():.1e}, ", end="")
    print(f"whole run {fw_gap.max():.1e}")
    for label in labels:
        keras_acc, torch_acc = accuracy(runs[label][2], x_test, y_test)
        print(f"test accuracy {label}: tf {keras_acc:.4f}  torch {torch_acc:.4f}")

    started = time.perf_counter()
    bias = bias_runs(fresh_pair, x, y, epochs=epochs, seed=args.seed)
    print(f"\nbias runs (Adam lr {BIAS_LR}): {time.perf_counter() - started:.1f}s")
    print("training-set loss after the last update:")
    for name, values in bias.items():
        print(f"  {name:<36} {values[-1]:.6f}  ({len(values) - 1} updates)")

    plt = pyplot()
    fig, (ax, ax_bias) = plt.subplots(1, 2, figsize=(13, 4))
    for name, style in zip(names, ["-", ":", "--", "-."], strict=True):
        ax.plot(curves[name], style, label=name)
    ax.set_xlabel("update")
    ax.set_ylabel("training loss (window)")
    ax.set_title("Exact accumulation: 4 x 64 == 1 x 256 (TF and PyTorch)")
    ax.legend()
    for name, values in bias.items():
        wrong = "WRONG" in name or "biased" in name
        ax_bias.plot(values, "--" if wrong else "-", marker="." if wrong else None, label=name)
    ax_bias.set_xlabel("update")
    ax_bias.set_ylabel("training-set loss")
    ax_bias.set_title("What goes wrong: the seed loop, Keras' built-in accumulation")
    ax_bias.legend(fontsize="small")
    print(f"saved {save_figure(fig, args.out, 'accumulation_loss.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
