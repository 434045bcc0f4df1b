"""Smoke test of examples/tf_gradient_accumulation.py, and its MNIST loaders on tiny local files."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tf_gradient_accumulation.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("tf_gradient_accumulation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_mnist():
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, size=(5, 28, 28)),
        "y_train": rng.integers(0, 10, size=5),
        "x_test": rng.integers(0, 256, size=(3, 28, 28)),
        "y_test": rng.integers(0, 10, size=3),
    }


def _check(loaded, arrays) -> None:
    (x_train, y_train), (x_test, y_test) = loaded
    assert x_train.shape == (5, 28, 28, 1) and x_test.shape == (3, 28, 28, 1)
    assert x_train.dtype == np.float32
    np.testing.assert_array_equal(x_train[..., 0] * 255.0, arrays["x_train"].astype(np.float32))
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    np.testing.assert_array_equal(y_train, arrays["y_train"])


def test_load_mnist_from_idx_files(example, tiny_mnist, tmp_path) -> None:
    for key, name in example._IDX_FILES.items():
        data = _idx_bytes(tiny_mnist[key])
        if key.startswith("x"):  # one gzipped, one plain of each kind
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (tmp_path / name).write_bytes(data)
    _check(example.load_mnist(tmp_path), tiny_mnist)


def test_load_mnist_from_npz(example, tiny_mnist, tmp_path) -> None:
    path = tmp_path / "mnist.npz"
    np.savez(path, **{k: v.astype(np.uint8) for k, v in tiny_mnist.items()})
    _check(example.load_mnist(path), tiny_mnist)


def test_read_idx_rejects_a_wrong_file(example, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        example.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 4) + b"\x01\x02")
    with pytest.raises(ValueError, match="holds 2 values"):
        example.read_idx(short)


def test_example_runs_and_saves_the_plot(example, tmp_path, capsys) -> None:
    threads = example.torch.get_num_threads()  # main() pins torch to one thread
    try:
        assert example.main(["--out", str(tmp_path), "--epochs", "1", "--limit", "300"]) == 0
    finally:
        example.torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "4x64" in out and "1x256" in out and "test accuracy" in out
    assert (tmp_path / "accumulation_loss.png").stat().st_size > 1000
