"""Exact accumulation on a masked sequence model: Embedding(mask_zero) + LSTM, loss per timestep.

Padded steps (token 0) are masked by ``Embedding(mask_zero=True)``; Keras' loss then divides the
batch's summed per-step loss by the number of *valid* steps. Micro-batches hold different numbers
of valid steps, so averaging micro-batch means (what Keras' built-in
``gradient_accumulation_steps`` does) is not the large-batch update. ``tfreg.Trainer`` adds the
masked loss *sums* and divides once by the window's valid-step count: 3 micro-batches of 8
equal one ``model.fit`` batch of 24 -- the short last window (60 = 24 + 24 + 12) included.

Compared after training (float64, SGD, same initial weights), ``max|w - w_ref| / max|w_ref|``
against plain Keras ``fit(batch_size=24)``.

    python -m examples.masked_sequence_accumulation
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import tfreg
from examples._common import make_parser
from tfreg.parity import seed_everything

VOCAB, EMBED, HIDDEN, STEPS, CLASSES = 12, 4, 6, 7, 3
MICRO_BATCH, ACCUMULATION = 8, 3
LR = 0.5


def sequences(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Post-padded token sequences of random length; the label of a step is its token mod 3."""
    lengths = rng.integers(1, STEPS + 1, size=n)
    valid = np.arange(STEPS)[None, :] < lengths[:, None]
    x = np.where(valid, rng.integers(1, VOCAB, size=(n, STEPS)), 0).astype("int32")
    return x, (x % CLASSES).astype("int64")


def build(weights: list[np.ndarray] | None = None) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((STEPS,), dtype="int32"),
            keras.layers.Embedding(VOCAB, EMBED, mask_zero=True, dtype="float64"),
            keras.layers.LSTM(HIDDEN, return_sequences=True, dtype="float64"),
            keras.layers.Dense(CLASSES, dtype="float64"),
        ]
    )
    if weights is not None:
        model.set_weights(weights)
    return model


def loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")


def relative_gap(a: keras.Model, b: keras.Model) -> float:
    wa, wb = a.get_weights(), b.get_weights()
    return max(float(np.max(np.abs(u - v))) for u, v in zip(wa, wb, strict=True)) / max(
        float(np.max(np.abs(v))) for v in wb
    )


def run(*, n: int, epochs: int, seed: int) -> dict[str, float]:
    """Train four ways from the same weights; return each run's gap to plain Keras fit."""
    rng = seed_everything(seed)
    x, y = sequences(rng, n)
    initial = build().get_weights()
    window = MICRO_BATCH * ACCUMULATION
    fit = {"epochs": epochs, "shuffle": False, "verbose": 0}

    reference = build(initial)
    reference.compile(keras.optimizers.SGD(LR), loss())
    reference.fit(x, y, batch_size=window, **fit)

    accumulated = build(initial)
    tfreg.Trainer(
        accumulated, loss(), keras.optimizers.SGD(LR), accumulation_steps=ACCUMULATION
    ).fit(x, y, batch_size=MICRO_BATCH, **fit)

    # Keras' built-in accumulation: the mean of the micro-batches' masked means (biased).
    builtin = build(initial)
    builtin.compile(keras.optimizers.SGD(LR, gradient_accumulation_steps=ACCUMULATION), loss())
    builtin.fit(x, y, batch_size=MICRO_BATCH, **fit)

    moved = build(initial)  # how far training moved the weights: the scale of the gaps
    return {
        f"tfreg.Trainer {ACCUMULATION}x{MICRO_BATCH} (exact)": relative_gap(accumulated, reference),
        f"Keras built-in {ACCUMULATION}x{MICRO_BATCH} (biased)": relative_gap(builtin, reference),
        "initial weights (the size of the training's change)": relative_gap(moved, reference),
    }


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs (default 2)")
    parser.add_argument("--examples", type=int, default=60, help="sequences (default 60)")
    args = parser.parse_args(argv)
    gaps = run(n=args.examples, epochs=args.epochs, seed=args.seed)
    print(f"{args.examples} masked sequences of <= {STEPS} steps, float64 SGD lr {LR}")
    print(
        f"max|w - w_ref| / max|w_ref| against Keras fit(batch_size={MICRO_BATCH * ACCUMULATION}):"
    )
    for name, gap in gaps.items():
        print(f"  {name:<54} {gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
