"""Structured pruning of the seed CNN end to end: proximal group lasso, report, ``prune``.

1. Train the seed CNN (conv 8 -> pool -> conv 16 -> dense 64 -> 10 logits, on 8x8 digits by
   default) with ``tfreg.Trainer(..., proximal=...)``: after every Adam update a group-lasso
   proximal step (``tfreg.ProximalGroupLasso``, the diagonal-preconditioned block prox for Adam)
   sets whole groups to *exactly* zero -- not small, zero. The groups are chosen so that each one
   is a unit ``prune`` can remove:

   - each conv's *filters* (kernel axes ``(0, 1, 2)``, the norm over a filter's weights);
   - the hidden Dense layer's *neurons* (axis ``0``, kernel columns).

   A filter or neuron with zero incoming weights outputs the constant ``relu(bias)``; ``prune``
   removes it and folds that constant into the next layer's bias -- exactly through ``Flatten``
   into a Dense layer, while before the zero-padded second conv a non-zero constant reaches the
   border through fewer taps, so such a first-conv filter is kept and ``result.notes`` says so.
   The logits layer is left alone (its columns are the classes). One ``ProximalGroupLasso``
   applies one ``axis`` to every kernel it is given, so :class:`LayerwiseGroupLasso` below hands
   each layer's kernel to its own operator (same strength, Adam-consistent threshold).
2. Print ``tfreg.sparsity_report`` (its group view: zero groups per kernel and axis).
3. ``tfreg.prune(model)``: a new, narrower model; parameters before/after.
4. Test accuracy of both models and the largest ``|logit difference|``: ``prune`` is exact in
   inference mode, so the accuracies are equal and the logits agree to float32 round-off.

Data: ``examples._common.load_mnist`` (MNIST from ``--mnist`` files, else scikit-learn's 8x8
digits). Run: ``python -m examples.structured_pruning [--full] [--epochs N] [--strength L]``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tfreg
from examples._common import load_mnist, make_parser, pyplot, save_figure, table
from tfreg.parity import seed_everything
from tfreg_harness.keras_side.models import build_cnn

LR = 3e-3


def group_axes(model: keras.Model) -> dict[str, tuple[int, ...]]:
    """Kernel path -> group-lasso ``axis`` (the norm runs over it; see the module docstring)."""
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    denses = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if len(convs) != 2 or len(denses) != 2:
        raise ValueError(f"expected the seed CNN (2 Conv2D, 2 Dense). Received: {model.layers}")
    axes = {conv.kernel.path: (0, 1, 2) for conv in convs}  # filters
    axes[denses[0].kernel.path] = (0,)  # hidden neurons
    return axes


class LayerwiseGroupLasso(tfreg.ProximalGroupLasso):
    """``ProximalGroupLasso(strength, axis=axes[path])`` applied to each listed kernel alone.

    ``tfreg.ProximalGroupLasso`` applies its one ``axis`` to every kernel of the model it is
    given; the seed CNN mixes rank-4 conv and rank-2 Dense kernels, so this subclass (accepted
    by ``Trainer(proximal=...)`` as the operator it extends) gives each kernel its own operator.
    Kernels not in ``axes`` (the logits) are not thresholded.
    """

    def __init__(self, strength: float, *, axes: dict[str, tuple[int, ...]]) -> None:
        super().__init__(strength, axis=0)
        self.operators = {
            path: tfreg.ProximalGroupLasso(strength, axis=a) for path, a in axes.items()
        }

    def get_config(self) -> dict[str, Any]:
        axes = {path: op.axis for path, op in self.operators.items()}
        return {"strength": self.strength, "axes": axes}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strength!r}, axes={self.get_config()['axes']!r})"

    def apply(self, model_or_variables: Any, learning_rate: Any) -> None:
        by_path = {v.path: v for v in model_or_variables.trainable_variables}
        for path, operator in self.operators.items():
            operator.apply([by_path[path]], learning_rate)


def accuracy_and_logits(model: keras.Model, x: np.ndarray, y: np.ndarray):
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    return float(np.mean(np.argmax(logits, -1) == y)), logits


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, help="directory with MNIST's IDX files or npz")
    parser.add_argument("--limit", type=int, help="training examples (default: all)")
    parser.add_argument("--epochs", type=int, help="epochs (default 30; full 60)")
    parser.add_argument("--batch", type=int, default=64, help="mini-batch size")
    parser.add_argument("--strength", type=float, default=3e-2, help="group-lasso lambda")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rng = seed_everything(args.seed)
    data = load_mnist(args.mnist).limited(args.limit, None)
    epochs = args.epochs or (60 if args.full else 30)
    x, y = data.x_train.astype(np.float32)[..., None], data.y_train
    x_test, y_test = data.x_test.astype(np.float32)[..., None], data.y_test
    model = build_cnn(dtype="float32", rng=rng, input_shape=x.shape[1:]).keras
    print(f"{data.source}: {len(x)} training images {x.shape[1:]}, {len(x_test)} test")
    print(f"float32, Adam lr {LR}, {epochs} epochs of batch {args.batch}, lambda {args.strength}")

    axes = group_axes(model)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float32")
    trainer = tfreg.Trainer(
        model,
        loss,
        keras.optimizers.Adam(LR),
        proximal=LayerwiseGroupLasso(args.strength, axes=axes),
        seed=args.seed,
    )
    history = trainer.fit(x, y, batch_size=args.batch, epochs=epochs, verbose=0)
    print(f"trained: final loss {history.history['loss'][-1]:.4f}")

    report = tfreg.sparsity_report(model)
    print("\nsparsity report (group view: exactly-zero groups per kernel and axis):")
    print(report)
    rows, zero_groups = [], {}
    for path, a in axes.items():
        shape = tuple(model.get_layer(path.split("/")[-2]).kernel.shape)
        kept_axes = [i for i in range(len(shape)) if i not in a]
        # The report counts groups of one kept axis; every kernel here keeps exactly one.
        (group_axis,) = kept_axes
        zero = report.zero_groups(path, group_axis)
        zero_groups[path] = zero
        rows.append([path, str(shape), f"norm over {a}", f"{zero} / {shape[group_axis]}"])
    print("\nthe groups the prox acted on:")
    print(table(["kernel", "shape", "group", "exactly zero"], rows))

    result = tfreg.prune(model)
    print(f"\n{result}")
    for note in result.notes:  # units prune kept although zero, and why
        print(f"  note: {note}")
    acc_before, logits_before = accuracy_and_logits(model, x_test, y_test)
    acc_after, logits_after = accuracy_and_logits(result.model, x_test, y_test)
    max_diff = float(np.max(np.abs(logits_before - logits_after)))
    print(
        f"parameters: {result.params_before} -> {result.params_after} "
        f"({result.params_after / result.params_before:.1%})"
    )
    print(f"test accuracy: original {acc_before:.4f}, pruned {acc_after:.4f}")
    print(f"max |logit difference| on the test set: {max_diff:.2e}")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for path, a in axes.items():
        kernel = keras.ops.convert_to_numpy(model.get_layer(path.split("/")[-2]).kernel)
        norms = np.sqrt(np.sum(kernel**2, axis=a))
        ax.plot(np.sort(norms)[::-1], "o-", label=f"{path} (norm over {a})")
    ax.set(xlabel="group (sorted)", ylabel="group norm", title="group norms after training")
    ax.legend()
    plot = save_figure(fig, args.out, "structured_pruning.png")
    print(f"plot: {plot}  ({time.perf_counter() - start:.1f} s)")
    return {
        "zero_groups": zero_groups,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "max_logit_diff": max_diff,
        "plot": plot,
    }


if __name__ == "__main__":
    main()
