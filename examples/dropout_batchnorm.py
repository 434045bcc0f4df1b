"""Dropout and BatchNorm: three separate MLPs, train vs eval mode, curves in both frameworks.

The seed notebook compared a plain MLP (784-32-32-10), one with Dropout(0.3) and one with
BatchNorm, trained with Adam(0.01), batch 32, evaluating in ``model.eval()`` mode after every
epoch. Its bugs, fixed here: the BN and Dropout models were built from the *same* Linear objects
(two optimizers trained one set of weights), and one snippet used ``torch.nn.Linear`` where it
meant ReLU. Each model here is built on its own (``tfreg.parity.build_mlp``: a Keras model and
its torch twin with identical starting weights), so the three are independent.

Mode semantics, identical in both frameworks: in training mode Dropout zeroes a random 30% of
activations and scales the rest by 1/0.7, and BatchNorm normalises with the batch's own
statistics (updating its moving averages); in eval mode Dropout is the identity and BatchNorm
uses the moving averages. Keras selects the mode per call (``model(x, training=True)``; ``fit``
trains, ``evaluate``/``predict`` do not), torch per module state (``model.train()`` /
``model.eval()``). Framework differences handled by the builder: BN momentum m (Keras 0.99) is
torch's 1 - m, epsilon 1e-3 is passed to torch explicitly. Dropout masks come from each
framework's own RNG, so the curves of the two frameworks are alike, not equal.

Data: MNIST when ``--mnist DIR`` has its files, else scikit-learn's 8x8 digits.
Run: ``python -m examples.dropout_batchnorm [--full] [--mnist DIR] [--out DIR]``.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples._common import load_mnist, make_parser, pyplot, save_figure, table

MODELS = {"plain": {}, "dropout": {"dropout": 0.3}, "batchnorm": {"batchnorm": True}}
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def train_keras(model: Any, data: tuple[np.ndarray, ...], *, epochs: int, batch: int, lr: float):
    """``model.fit`` one epoch at a time, then eval-mode loss/accuracy on train and test sets."""
    import keras

    x, y, x_test, y_test = data
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    curves = []
    for _ in range(epochs):
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=True, verbose=0)
        train = model.evaluate(x, y, batch_size=len(x), verbose=0)  # training=False
        test = model.evaluate(x_test, y_test, batch_size=len(x_test), verbose=0)
        curves.append([*train, *test])
    return np.array(curves)


def train_torch(
    module: Any,
    data: tuple[np.ndarray, ...],
    *,
    epochs: int,
    batch: int,
    lr: float,
    rng: np.random.Generator,
):
    """The notebook's loop: ``train()`` for the epoch, ``eval()`` + ``no_grad`` to measure."""
    import torch

    x, y, x_test, y_test = (torch.as_tensor(a) for a in data)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    def measure(xs: torch.Tensor, ys: torch.Tensor) -> list[float]:
        logits = module(xs)
        return [loss_fn(logits, ys).item(), (logits.argmax(1) == ys).double().mean().item()]

    curves = []
    for _ in range(epochs):
        module.train()
        order = torch.as_tensor(rng.permutation(len(x)))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            optimizer.zero_grad()
            loss_fn(module(x[idx]), y[idx]).backward()
            optimizer.step()
        module.eval()
        with torch.no_grad():
            curves.append(measure(x, y) + measure(x_test, y_test))
    return np.array(curves)


def mode_differences(keras_model: Any, torch_module: Any, x: np.ndarray) -> dict[str, float]:
    """Largest |logit| difference: train mode vs eval mode, and two train-mode calls, in each
    framework. Works on copies: a training-mode call updates BatchNorm's moving statistics."""
    import torch

    saved = keras_model.get_weights()
    train_1 = keras_model(x, training=True).numpy()
    train_2 = keras_model(x, training=True).numpy()
    keras_model.set_weights(saved)
    evaluated = keras_model(x, training=False).numpy()

    module = copy.deepcopy(torch_module)
    xt = torch.as_tensor(x)
    with torch.no_grad():
        module.train()
        t_train_1, t_train_2 = module(xt).numpy(), module(xt).numpy()
        module.eval()
        t_eval = module(xt).numpy()
    return {
        "tfreg train vs eval": float(np.max(np.abs(train_1 - evaluated))),
        "tfreg train vs train": float(np.max(np.abs(train_1 - train_2))),
        "torch train vs eval": float(np.max(np.abs(t_train_1 - t_eval))),
        "torch train vs train": float(np.max(np.abs(t_train_1 - t_train_2))),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, help="directory with MNIST's IDX files or npz")
    parser.add_argument("--train", type=int, help="training examples (default: all)")
    parser.add_argument("--epochs", type=int, help="epochs (default 5; full 10)")
    parser.add_argument("--batch", type=int, default=32, help="mini-batch size (notebook 32)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (notebook)")
    args = parser.parse_args(argv)
    from tfreg.parity import build_mlp, seed_everything

    start = time.perf_counter()
    rng = seed_everything(args.seed)  # framework RNGs too: dropout masks, fit's shuffling
    images = load_mnist(args.mnist).limited(args.train, None)
    flat = [a.reshape(len(a), -1).astype(np.float32) for a in (images.x_train, images.x_test)]
    data = (flat[0], images.y_train, flat[1], images.y_test)
    epochs = args.epochs or (10 if args.full else 5)
    kw = {"epochs": epochs, "batch": args.batch, "lr": args.lr}
    print(f"{images.source}: {len(flat[0])} train / {len(flat[1])} test, {epochs} epochs")

    curves: dict[str, dict[str, np.ndarray]] = {"tfreg": {}, "torch": {}}
    modes = {}
    for name, options in MODELS.items():
        pair = build_mlp(dtype="float32", rng=rng, input_dim=flat[0].shape[1], **options)
        curves["tfreg"][name] = train_keras(pair.keras, data, **kw)
        curves["torch"][name] = train_torch(pair.torch, data, rng=rng, **kw)
        modes[name] = mode_differences(pair.keras, pair.torch, flat[1][:64])

    rows = [
        [name, framework, *(f"{v:.4f}" for v in curves[framework][name][-1])]
        for name in MODELS
        for framework in curves
    ]
    print(f"\nafter {epochs} epochs, measured in eval mode:")
    print(table(["model", "framework", *METRICS], rows))
    print("\nlargest logit change on 64 test images, train-mode vs eval-mode call:")
    print(
        table(
            ["model", *modes["plain"]],
            [[n, *(f"{v:.2e}" for v in m.values())] for n, m in modes.items()],
        )
    )

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (column, metric) in zip(axes.ravel(), enumerate(METRICS), strict=True):
        for color, name in zip(("C0", "C1", "C2"), MODELS, strict=True):
            for framework, style in (("tfreg", "-"), ("torch", "--")):
                ax.plot(
                    np.arange(1, epochs + 1),
                    curves[framework][name][:, column],
                    style,
                    color=color,
                    label=f"{name} ({framework})",
                )
        ax.set(xlabel="epoch", title=metric.replace("_", " ") + " (eval mode)")
    axes[0, 0].legend()
    results: dict[str, Any] = {"curves": curves, "modes": modes, "source": images.source}
    results["plot"] = save_figure(fig, args.out, "dropout_batchnorm.png")
    print(f"\nplot: {results['plot']}  ({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main()
