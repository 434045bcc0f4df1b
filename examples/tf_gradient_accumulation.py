"""Gradient accumulation done right: 4 micro-batches of 64 == one batch of 256, TF and PyTorch.

The corrected version of the seed notebook (003): its loop applied the *current* micro-batch's
gradients instead of the accumulated ones, never added the micro-batch at ``step % 4 == 0``,
discarded the division by ``num_accum``, dropped the epoch's leftovers and put a softmax in
front of ``from_logits=True``. Here ``tfreg.Trainer`` / ``torchref.Trainer`` accumulate the
gradients of per-micro-batch loss *sums* and divide once by the window's example count, so an
accumulated update is the large-batch update up to float round-off -- the short last window of
each epoch included.

Data: MNIST from a local file when given (``--mnist mnist.npz`` or a directory with the four
idx files; nothing is downloaded), else scikit-learn's 8x8 digits. The model is the seed CNN
(logits out) built in both frameworks with the same NumPy weights.

    python examples/tf_gradient_accumulation.py --out out/accumulation
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import torch

import tfreg
import torchref
from tfreg.parity import seed_everything
from tfreg.parity.models import build_cnn
from tfreg.parity.transfer import to_torch_input

MICRO_BATCH, STEPS = 64, 4  # 4 x 64 accumulated vs one batch of 256
LR = 1e-3

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> np.ndarray:
    """One idx file (the MNIST format), gzipped or not: magic ``0x0000 dtype ndim``, big-endian
    uint32 dimensions, then the data."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, file holds {data.size} values")
    return data.reshape(shape)


def load_mnist(path: str | Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """``((x_train, y_train), (x_test, y_test))`` from Keras' ``mnist.npz`` or a directory with
    the four standard idx files (optionally ``.gz``). Images come back as float32 in [0, 1],
    shape ``(n, 28, 28, 1)``."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in _IDX_FILES}
    else:
        arrays = {}
        for key, name in _IDX_FILES.items():
            candidates = [path / name, path / f"{name}.gz"]
            found = next((c for c in candidates if c.exists()), None)
            if found is None:
                raise FileNotFoundError(f"{path}: none of {[c.name for c in candidates]}")
            arrays[key] = read_idx(found)
    images = {k: (arrays[k].astype(np.float32) / 255.0)[..., None] for k in ("x_train", "x_test")}
    return (images["x_train"], arrays["y_train"].astype(np.int64)), (
        images["x_test"],
        arrays["y_test"].astype(np.int64),
    )


def load_data(mnist: str | None, rng: np.random.Generator):
    """MNIST when a local file is given, else scikit-learn's 8x8 digits (80/20 split)."""
    if mnist:
        return load_mnist(mnist)
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = rng.permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def train_both(pair_weights, x, y, *, steps: int, batch: int, epochs: int, seed: int):
    """Train the Keras and the torch CNN from the same weights; return their histories and
    models."""
    pair = pair_weights()
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float32")
    common = {"accumulation_steps": steps, "metrics": ["sparse_categorical_accuracy"], "seed": seed}
    tf_trainer = tfreg.Trainer(pair.keras, keras_loss, keras.optimizers.Adam(LR), **common)
    tf_history = tf_trainer.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    # KerasAdamW(weight_decay=0) is Keras' Adam arithmetic: the curves differ by round-off only.
    optimizer = torchref.KerasAdamW(pair.torch.parameters(), lr=LR)
    torch_trainer = torchref.Trainer(pair.torch, "cross_entropy", optimizer, **common)
    torch_history = torch_trainer.fit(
        to_torch_input(x), y, batch_size=batch, epochs=epochs, verbose=0
    )
    return tf_history, torch_history, pair


def accuracy(pair, x, y) -> tuple[float, float]:
    keras_acc = float(np.mean(np.argmax(pair.keras(x, training=False), -1) == y))
    with torch.no_grad():
        pair.torch.eval()
        logits = pair.torch(torch.as_tensor(to_torch_input(x)))
    return keras_acc, float(np.mean(logits.argmax(-1).numpy() == y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/accumulation", help="directory for the PNG")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--mnist", help="mnist.npz or a directory of idx files (no download)")
    parser.add_argument("--limit", type=int, help="use only the first N training examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = seed_everything(args.seed)
    # A tiny CNN: torch's thread pool costs more than it saves (and the cores may be shared).
    torch.set_num_threads(1)
    (x, y), (x_test, y_test) = load_data(args.mnist, rng)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    weights_rng_state = rng.bit_generator.state

    def fresh_pair():  # identical initial weights for every run
        rng.bit_generator.state = weights_rng_state
        return build_cnn(dtype="float32", rng=rng, input_shape=x.shape[1:])

    print(f"{len(x)} training images {x.shape[1:]}, {len(x_test)} test; float32, Adam lr {LR}")
    runs = {}
    for label, steps, batch in [
        (f"{STEPS}x{MICRO_BATCH}", STEPS, MICRO_BATCH),
        (f"1x{STEPS * MICRO_BATCH}", 1, STEPS * MICRO_BATCH),
    ]:
        started = time.perf_counter()
        runs[label] = train_both(
            fresh_pair, x, y, steps=steps, batch=batch, epochs=args.epochs, seed=args.seed
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
    ends = [int(np.flatnonzero(epochs_of == e)[-1]) for e in range(args.epochs)]
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

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in zip(names, ["-", ":", "--", "-."], strict=True):
        ax.plot(curves[name], style, label=name)
    ax.set_xlabel("update")
    ax.set_ylabel("training loss (window)")
    ax.set_title("Exact accumulation: 4 x 64 == 1 x 256 (TF and PyTorch)")
    ax.legend()
    fig.tight_layout()
    png = out / "accumulation_loss.png"
    fig.savefig(png, dpi=100)
    print(f"saved {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
