"""Linear regression ``y = 1 + 2 x1 + 3 x2 + noise``: the smallest training loop, by hand and
with layers, in TensorFlow and in PyTorch -- all four recover ~[1, 2, 3].

The seed notebook built ``X = [1, x1, x2]`` (the intercept as a constant feature), fitted ``w`` by
autograd with ``w.data -= gamma * w.grad``, then with ``nn.Linear(3, 1, bias=False)``,
``optim.SGD(lr=0.1)`` and ``MSELoss``, 100 full-batch steps each. Here:

- by hand: ``tf.GradientTape`` + ``w.assign_sub(lr * grad)``, and torch autograd with the update
  under ``torch.no_grad()`` (``.data`` bypasses autograd's version checks; ``no_grad`` is the
  supported way);
- with layers: Keras ``Dense(1, use_bias=False)`` + ``SGD(0.1)`` + ``"mse"``, one
  ``train_on_batch`` per full-batch step, and the notebook's torch loop.

All four start from the same NumPy initial ``w``; the least-squares solution is printed as the
reference the 100 gradient steps converge to. ``MSELoss``'s mean and Keras' ``"mse"`` are the
same loss, so the four runs agree to float32 round-off.

Run: ``python -m examples.linear_regression [--full] [--out DIR]`` (``--full`` changes nothing
here: the notebook's size is already tiny).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples._common import make_parser, pyplot, save_figure, table

TRUE_W = np.array([1.0, 2.0, 3.0])


def make_data(n: int, *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``X = [1, x1, x2]`` with ``x ~ N(0, 1)``, ``y = X @ [1, 2, 3] + N(0, 0.5^2)``, float32."""
    x = np.hstack([np.ones((n, 1)), rng.standard_normal((n, 2))])
    y = x @ TRUE_W + 0.5 * rng.standard_normal(n)
    return x.astype(np.float32), y.astype(np.float32)


def tf_by_hand(x: np.ndarray, y: np.ndarray, w0: np.ndarray, lr: float, steps: int):
    import tensorflow as tf

    w = tf.Variable(w0)
    xt, yt = tf.constant(x), tf.constant(y)
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(yt - tf.linalg.matvec(xt, w)))
        w.assign_sub(lr * tape.gradient(loss, w))
        losses.append(float(loss))
    return w.numpy(), losses


def torch_by_hand(x: np.ndarray, y: np.ndarray, w0: np.ndarray, lr: float, steps: int):
    import torch

    w = torch.tensor(w0, requires_grad=True)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    losses = []
    for _ in range(steps):
        loss = torch.mean((yt - xt @ w) ** 2)
        loss.backward()
        with torch.no_grad():
            w -= lr * w.grad
        w.grad = None
        losses.append(loss.item())
    return w.detach().numpy(), losses


def keras_layers(x: np.ndarray, y: np.ndarray, w0: np.ndarray, lr: float, steps: int):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(w0[:, None])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss="mse")
    # One full-batch step per call; model.fit(epochs=100) would spend its time on per-epoch setup.
    losses = [float(model.train_on_batch(x, y[:, None])) for _ in range(steps)]
    return model.layers[0].kernel.numpy()[:, 0], losses


def torch_layers(x: np.ndarray, y: np.ndarray, w0: np.ndarray, lr: float, steps: int):
    import torch

    net = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.as_tensor(w0[None, :]))
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = torch.nn.MSELoss()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(net(xt).view_as(yt), yt)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return net.weight.detach().numpy()[0], losses


RUNS = {
    "TF by hand": tf_by_hand,
    "torch by hand": torch_by_hand,
    "Keras Dense": keras_layers,
    "torch Linear": torch_layers,
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="samples (the notebook's 100)")
    parser.add_argument("--steps", type=int, default=100, help="full-batch steps")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x, y = make_data(args.n, rng=rng)
    w0 = rng.standard_normal(3).astype(np.float32)
    lstsq = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)[0]

    results: dict[str, Any] = {"least_squares": lstsq, "weights": {}, "losses": {}}
    for name, run in RUNS.items():
        results["weights"][name], results["losses"][name] = run(x, y, w0, args.lr, args.steps)
    rows = [
        [name, *(f"{c:.4f}" for c in w), f"{results['losses'][name][-1]:.4f}"]
        for name, w in results["weights"].items()
    ]
    rows.append(["least squares", *(f"{c:.4f}" for c in lstsq), ""])
    rows.append(["truth", *(f"{c:.4f}" for c in TRUE_W), ""])
    print(f"{args.n} samples, {args.steps} full-batch SGD steps at lr {args.lr}, one initial w")
    print(table(["fit", "w0 (intercept)", "w1", "w2", "final MSE"], rows))
    spread = max(
        float(np.max(np.abs(w - results["weights"]["TF by hand"])))
        for w in results["weights"].values()
    )
    print(
        f"largest difference between the four fits: {spread:.2e} (float32 runs; 0 = bit-identical)"
    )
    results["spread"] = spread

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, losses), style in zip(
        results["losses"].items(), ("-", "--", ":", "-."), strict=True
    ):
        ax.plot(losses, style, label=name)
    ax.set(yscale="log", xlabel="step", ylabel="MSE", title="y = 1 + 2 x1 + 3 x2 + noise")
    ax.legend()
    results["plot"] = save_figure(fig, args.out, "linear_regression.png")
    print(f"plot: {results['plot']}  ({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main()
