"""Shared helpers for the examples: command line, data (real MNIST when its files are present,
scikit-learn's digits otherwise), plots saved as PNG, and plain-text tables.

Nothing here is part of the tfreg/torchref API; the examples import it as ``examples._common``
(run them from the repository root: ``python -m examples.lasso_logistic_regression``).
"""

from __future__ import annotations

import argparse
import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_OUT = Path(__file__).resolve().parent / "output"

# (images, labels) file stems of the four standard MNIST IDX files, train then test.
_IDX_FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
# IDX type codes (the third byte of the magic number) -> NumPy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def make_parser(description: str) -> argparse.ArgumentParser:
    """``--full`` (the seed notebook's size), ``--out DIR`` (where the PNG goes), ``--seed``;
    examples add their own size options (used by the smoke tests)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--full", action="store_true", help="the seed notebook's size (slow)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    return parser


def distributed_cnn_parser(description: str, *, batch: str) -> argparse.ArgumentParser:
    """The options of the two-process seed-CNN examples (``ddp_cnn``, ``distributed_cnn_tf``):
    data size, epochs, micro-batch (``batch`` says per rank or global: the frameworks'
    conventions differ), accumulation steps and learning rate."""
    parser = make_parser(description)
    parser.add_argument("--mnist", type=Path, help="directory with MNIST's IDX files or npz")
    parser.add_argument("--train", type=int, default=512, help="training examples")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help=f"micro-batch size {batch}")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per update")
    parser.add_argument("--lr", type=float, default=0.05)
    return parser


@dataclass(frozen=True)
class ImageData:
    """Grey-scale images in ``[0, 1]``, shape ``(n, height, width)``, integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def limited(self, train: int | None, test: int | None) -> ImageData:
        """The first ``train``/``test`` examples (all when ``None``)."""
        return ImageData(
            self.x_train[:train],
            self.y_train[:train],
            self.x_test[:test],
            self.y_test[:test],
            self.source,
        )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX file (the MNIST format; ``.gz`` compressed or not) as a NumPy array.

    Layout: two zero bytes, a type code, the number of dimensions, one big-endian int32 per
    dimension, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes) but {len(data) - offset} "
            "bytes follow"
        )
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path | None:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (directory / name).is_file():
            return directory / name
    return None


def load_mnist(path: str | os.PathLike[str] | None = None) -> ImageData:
    """MNIST from ``path``, else scikit-learn's 8x8 digits.

    ``path`` may be a directory holding the four standard IDX files (``train-images-idx3-ubyte``
    etc., optionally ``.gz``), a directory holding ``mnist.npz``, or the ``.npz`` itself (Keras'
    format: ``x_train, y_train, x_test, y_test``). Without usable files -- these machines cannot
    download MNIST -- it falls back to ``sklearn.datasets.load_digits`` (1797 8x8 images, 16
    grey levels), split 1500 train / 297 test. ``source`` says which one you got.
    """
    if path is not None:
        root = Path(path)
        npz = root if root.suffix == ".npz" else root / "mnist.npz"
        if npz.is_file():
            with np.load(npz) as f:
                arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            return _images(*arrays, source=f"MNIST ({npz})")
        if root.is_dir():
            found = [(_find(root, i), _find(root, lab)) for i, lab in _IDX_FILES]
            if all(i is not None and lab is not None for i, lab in found):
                (xi, yi), (xt, yt) = found
                return _images(
                    read_idx(xi), read_idx(yi), read_idx(xt), read_idx(yt), source=f"MNIST ({root})"
                )
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images / 16.0
    return ImageData(
        images[:1500],
        digits.target[:1500],
        images[1500:],
        digits.target[1500:],
        source="scikit-learn digits (8x8; MNIST files not found)",
    )


def _images(x_train: Any, y_train: Any, x_test: Any, y_test: Any, *, source: str) -> ImageData:
    def scale(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)

    return ImageData(
        scale(x_train), y_train.astype(np.int64), scale(x_test), y_test.astype(np.int64), source
    )


def save_figure(fig: Any, out: Path, name: str) -> Path:
    """Save a matplotlib figure as ``out/name`` (PNG) and close it."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A right-aligned plain-text table."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
