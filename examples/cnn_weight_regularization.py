"""Weight decay vs an L2 penalty on the seed notebook's CNN, in both frameworks.

The notebook trained an MNIST CNN with ``torch.optim.SGD(weight_decay=0.1)`` and then with a
hand-written "custom L2" ``loss += c * sum(torch.norm(p, p=2) for p in model.parameters())``,
``c = 0.1``, and wondered why the losses differ. Four runs here, from the same initial weights,
the same mini-batches in the same order, float64:

1. torch ``SGD(lr, weight_decay=wd)`` -- coupled decay: ``wd * p`` is added to every gradient;
2. tfreg: ``loss + tfreg.penalty(model, tfreg.L2.from_torch_weight_decay(wd), include_bias=True)``
   -- Keras' ``L2(l2) = l2 * sum(w^2)`` has no 1/2, so the matching factor is ``wd / 2``;
3. torchref: the same penalty on the torch model, plain ``SGD(lr)``;
4. the notebook's penalty, ``c * sum_p ||p||_2`` over every parameter (``torchref.PNorm(c, p=2)``).

Runs 1-3 minimise the same objective by the same steps: their losses agree to round-off
(tfreg's ``L2`` applies its factor through float32 like Keras, ~1e-9 relative on ``wd = 0.1``;
Keras stores the learning rate in float32, so torch is given ``float32(lr)`` too). Run 4 does
not: ``||p||`` is the *non-squared* norm, whose gradient ``c * p / ||p||`` has length ``c`` for
every tensor whatever its size, instead of ``wd * p``; and it sums over biases as well. No
choice of ``c`` makes it weight decay.

``include_bias=True`` because torch's ``weight_decay`` decays every parameter it is given; the
usual practice (and tfreg's default scope) exempts biases -- in torch, a param group with
``weight_decay=0`` for them. The per-parameter near-zero counts at the end are the notebook's
``check_weight`` (``|p| < 5e-4 * max|p|``), from ``torchref.sparsity_report``.

Data: real MNIST when ``--mnist DIR`` holds its files, else scikit-learn's 8x8 digits; the
notebook's architecture (conv 16-32, pool, conv 64, pool, dense 100, 10) works on both.
Run: ``python -m examples.cnn_weight_regularization [--full] [--mnist DIR] [--out DIR]``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tfreg_harness import architecture as A

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples._common import load_mnist, make_parser, pyplot, save_figure, table

# The notebook's CNN (padding "same" as its padding=1), ending in logits.
NOTEBOOK_CNN = (
    A.Conv2D(16, 3),
    A.ReLU(),
    A.Conv2D(32, 3),
    A.ReLU(),
    A.MaxPool2D(2),
    A.Conv2D(64, 3),
    A.ReLU(),
    A.MaxPool2D(2),
    A.Flatten(),
    A.Dense(100),
    A.ReLU(),
    A.Dense(10),
)
RUN_NAMES = ("torch weight_decay", "tfreg L2", "torchref L2", "notebook c*sum||p||")


def _batches(n: int, batch: int, epochs: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches, reshuffled each epoch, shared by every run (the last short one kept)."""
    return [
        order[i : i + batch]
        for order in (rng.permutation(n) for _ in range(epochs))
        for i in range(0, n, batch)
    ]


def train_keras(model: Any, x: np.ndarray, y: np.ndarray, batches, lr: float, wd: float):
    """tfreg: cross-entropy + the L2 penalty equivalent to ``weight_decay=wd``."""
    import keras
    import tensorflow as tf

    import tfreg

    penalty = tfreg.L2.from_torch_weight_decay(wd)
    optimizer = keras.optimizers.SGD(learning_rate=lr)
    # dtype: Keras losses compute in float32 unless told otherwise.
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")

    @tf.function(reduce_retracing=True)
    def step(xb: tf.Tensor, yb: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            data_loss = cross_entropy(yb, model(xb, training=True))
            objective = data_loss + tfreg.penalty(model, penalty, include_bias=True)
        grads = tape.gradient(objective, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return data_loss, objective

    losses = [step(tf.constant(x[b]), tf.constant(y[b])) for b in batches]
    return np.array([[float(d), float(o)] for d, o in losses])


def train_torch(
    module: Any, x: np.ndarray, y: np.ndarray, batches, lr: float, wd: float, kind: str
):
    """The three torch runs; ``kind`` is "weight_decay", "l2" or "notebook"."""
    import torch

    import torchref
    from tfreg_harness.layouts import to_torch_input

    decay = wd if kind == "weight_decay" else 0.0
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, weight_decay=decay)
    l2 = torchref.L2.from_torch_weight_decay(wd)
    notebook = torchref.PNorm(wd, p=2)  # c * ||p||_2, non-squared, as torch.norm(p, p=2)
    xt, yt = torch.as_tensor(to_torch_input(x)), torch.as_tensor(y)
    losses = []
    for b in batches:
        optimizer.zero_grad()
        data_loss = torch.nn.functional.cross_entropy(module(xt[b]), yt[b])
        if kind == "weight_decay":  # not part of the loss: logged for comparison only
            with torch.no_grad():
                objective = data_loss + torchref.penalty(module, l2, include_bias=True)
            data_loss.backward()
        else:
            reg = l2 if kind == "l2" else notebook
            objective = data_loss + torchref.penalty(module, reg, include_bias=True)
            objective.backward()
        optimizer.step()
        # Kept as tensors: one host transfer after the loop instead of two syncs per step.
        losses.append(torch.stack([data_loss.detach(), objective.detach()]))
    return torch.stack(losses).cpu().numpy()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, help="directory with MNIST's IDX files or npz")
    parser.add_argument("--train", type=int, help="training examples (default 512; full: all)")
    parser.add_argument("--epochs", type=int, help="epochs (default 2; full 10)")
    parser.add_argument("--batch", type=int, default=64, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate")
    parser.add_argument("--wd", type=float, default=0.1, help="weight decay (notebook: 0.1)")
    args = parser.parse_args(argv)
    from tfreg.parity import load_weights
    from tfreg_harness.keras_side.architecture import build_model as build_keras
    from tfreg_harness.torch_side.architecture import build_model as build_torch

    start = time.perf_counter()
    data = load_mnist(args.mnist)
    train = None if args.full and args.train is None else (args.train or 512)
    epochs = args.epochs or (10 if args.full else 2)
    x = data.x_train[:train, :, :, None].astype(np.float64)
    y = data.y_train[:train]
    rng = np.random.default_rng(args.seed)
    batches = _batches(len(x), args.batch, epochs, rng)
    lr = float(np.float32(args.lr))  # what Keras' float32 learning-rate variable holds
    print(
        f"{data.source}: {len(x)} images {x.shape[1:3]}, {len(batches)} SGD steps, "
        f"lr {lr:.6g}, weight decay {args.wd}"
    )

    shape = x.shape[1:]
    keras_model = build_keras(NOTEBOOK_CNN, shape, dtype="float64")
    weights = A.initial_weights(NOTEBOOK_CNN, shape, rng=rng, dtype="float64")
    modules = {
        k: build_torch(NOTEBOOK_CNN, shape, dtype="float64") for k in RUN_NAMES if "tfreg" not in k
    }
    for module in modules.values():
        load_weights(keras_model, module, weights)  # same start for all four runs

    losses = {
        "torch weight_decay": train_torch(
            modules["torch weight_decay"], x, y, batches, lr, args.wd, "weight_decay"
        ),
        "tfreg L2": train_keras(keras_model, x, y, batches, lr, args.wd),
        "torchref L2": train_torch(modules["torchref L2"], x, y, batches, lr, args.wd, "l2"),
        "notebook c*sum||p||": train_torch(
            modules["notebook c*sum||p||"], x, y, batches, lr, args.wd, "notebook"
        ),
    }
    reference = losses["torch weight_decay"]
    rows = []
    for name, curve in losses.items():
        rel = np.max(np.abs(curve - reference) / np.abs(reference), axis=0)
        rows.append(
            [name, f"{curve[-1, 0]:.6f}", f"{curve[-1, 1]:.6f}", f"{rel[0]:.1e}", f"{rel[1]:.1e}"]
        )
    print("\nfinal data loss / objective (= loss + wd/2 ||w||^2, or the notebook's penalty), and")
    print("the largest relative difference from the weight-decay run over all steps")
    print(table(["run", "data loss", "objective", "max rel diff loss", "max rel diff obj"], rows))
    print("(L2 applies wd/2 rounded to float32, as Keras does: ~1e-9 relative per step)")

    import torchref

    reports = {k: torchref.sparsity_report(m, include_bias=True) for k, m in modules.items()}
    names = [p.name for p in reports["torch weight_decay"].parameters]
    print("\nnear-zero entries per parameter (|p| < 5e-4 * max|p|, the notebook's check_weight):")
    print(
        table(
            ["parameter", *reports],
            [
                [n, *(r.parameters[i].near_zeros for r in reports.values())]
                for i, n in enumerate(names)
            ],
        )
    )

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # The first three curves coincide: draw them so that all three stay visible.
    styles = {
        "torch weight_decay": ("-", 5),
        "tfreg L2": ("--", 2.5),
        "torchref L2": (":", 2),
        "notebook c*sum||p||": ("-", 1.5),
    }
    for name, curve in losses.items():
        style, width = styles[name]
        for ax, column in zip(axes, (0, 1), strict=True):
            ax.plot(curve[:, column], style, linewidth=width, label=name)
    axes[0].set(xlabel="step", ylabel="cross-entropy", title="data loss")
    axes[1].set(xlabel="step", ylabel="loss + penalty", title="objective")
    axes[0].legend()
    results: dict[str, Any] = {"losses": losses, "reports": reports, "source": data.source}
    results["plot"] = save_figure(fig, args.out, "cnn_weight_regularization.png")
    print(f"\nplot: {results['plot']}  ({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main()
