"""Smoke tests of the examples at small sizes, each asserting the example's key claim, plus the
MNIST reader on tiny files written here. Examples run in-process through ``main(argv)``."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

# The examples package lives at the repository root, which plain `pytest` does not put on
# sys.path (only `python -m pytest` does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import (
    _common,
    cnn_weight_regularization,
    dropout_batchnorm,
    lasso_logistic_regression,
    linear_regression,
)


def _idx(array: np.ndarray, type_code: int) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    return header + array.tobytes()


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5) * 4
    labels = np.array([7, 0, 9], np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images, 0x08)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(labels, 0x08))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(images[:1], 0x08))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels[:1], 0x08)))
    return tmp_path, images, labels


def test_load_mnist_reads_idx_files(tiny_mnist) -> None:
    path, images, labels = tiny_mnist
    data = _common.load_mnist(path)
    assert data.source.startswith("MNIST")
    assert data.x_train.shape == (3, 4, 5) and data.x_test.shape == (1, 4, 5)
    assert data.x_train[2, 3, 4] == 4 * 59 / 255.0
    np.testing.assert_array_equal(data.x_train, images / 255.0)
    np.testing.assert_array_equal(data.y_train, labels)
    np.testing.assert_array_equal(data.y_test, [7])
    assert data.limited(2, None).x_train.shape == (2, 4, 5)


def test_read_idx_other_types_and_errors(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.0]], ">f4")
    (tmp_path / "floats").write_bytes(_idx(values, 0x0D))
    out = _common.read_idx(tmp_path / "floats")
    np.testing.assert_array_equal(out, [[1.5, -2.0]])
    assert out.dtype == np.float32 and out.dtype.isnative
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        _common.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx(np.zeros(4, np.uint8), 0x08)[:-1])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        _common.read_idx(tmp_path / "short")


def test_load_mnist_npz_and_fallback(tmp_path: Path) -> None:
    x = np.full((2, 3, 3), 255, np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=[1, 2], x_test=x[:1], y_test=[3])
    data = _common.load_mnist(tmp_path)
    assert data.x_train.max() == 1.0 and data.y_test.tolist() == [3]
    assert _common.load_mnist(tmp_path / "mnist.npz").x_train.shape == (2, 3, 3)
    fallback = _common.load_mnist(tmp_path / "absent")
    assert fallback.source.startswith("scikit-learn digits")
    assert fallback.x_train.shape == (1500, 8, 8) and fallback.x_test.shape == (297, 8, 8)
    assert fallback.x_train.min() >= 0.0 and fallback.x_train.max() == 1.0


def test_lasso_example(tmp_path: Path) -> None:
    c_values = ["1", "0.3", "0.1", "0.05", "0.02"]
    argv = ["--n-data", "60", "--n-features", "120", "--steps", "80", "--out", str(tmp_path)]
    results = lasso_logistic_regression.main([*argv, "--c", *c_values])
    sklearn_nnz = [ref.fit.nonzeros for ref in results["sklearn"]]
    assert sklearn_nnz == sorted(sklearn_nnz, reverse=True)  # fewer non-zeros as C falls
    assert sklearn_nnz[0] > sklearn_nnz[-1]
    # The FISTA path converges: each row within 1e-6 relative of scikit-learn's objective (the
    # ISTA path this replaced stopped up to 1.5e-2 above it), with the same support.
    assert np.all(results["gaps"] <= lasso_logistic_regression.GAP_GOAL), results["gaps"]
    for framework in ("tfreg", "torchref"):
        for ref, fit in zip(results["sklearn"], results[framework], strict=True):
            np.testing.assert_array_equal(
                np.flatnonzero(fit.weights), np.flatnonzero(ref.fit.weights)
            )
    reports = results["reports"]
    for framework in ("tfreg", "torchref"):
        assert reports[f"proximal {framework}"].zeros > 0
        assert reports[f"subgradient {framework}"].zeros == 0
        # nnz counts NON-zeros: the complement of the exact zeros, not the near-zeros.
        fit = results["compare_fits"][f"proximal {framework}"]
        assert fit.nonzeros == reports[f"proximal {framework}"].nonzeros
    assert results["plot"].is_file()


def test_cnn_example_weight_decay_equals_l2(tmp_path: Path) -> None:
    argv = ["--train", "96", "--epochs", "1", "--batch", "32", "--out", str(tmp_path)]
    losses = cnn_weight_regularization.main(argv)["losses"]
    reference = losses["torch weight_decay"]
    # Equal up to Keras' float32 factor wd/2 (~1e-9 relative for wd = 0.1), amplified by 3 steps.
    for name in ("tfreg L2", "torchref L2"):
        np.testing.assert_allclose(losses[name], reference, rtol=1e-7, err_msg=name)
    notebook = losses["notebook c*sum||p||"]
    assert np.max(np.abs(notebook[:, 1] - reference[:, 1]) / reference[:, 1]) > 0.1


def test_cnn_example_torch_loop_does_not_sync_per_step(monkeypatch) -> None:
    import torch

    from tfreg_harness.torch_side.architecture import build_model

    module = build_model(cnn_weight_regularization.NOTEBOOK_CNN, (8, 8, 1), dtype="float64")
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1))
    y = np.array([0, 1, 2, 3])

    def no_item(self):
        raise AssertionError("Tensor.item() in the training loop: a host sync per step")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    losses = cnn_weight_regularization.train_torch(
        module, x, y, [np.array([0, 1]), np.array([2, 3])], 0.05, 0.1, "l2"
    )
    assert losses.shape == (2, 2) and losses.dtype == np.float64
    assert np.all(losses[:, 1] > losses[:, 0])  # objective = data loss + a positive penalty


def test_linear_regression_example_recovers_coefficients(tmp_path: Path) -> None:
    results = linear_regression.main(["--out", str(tmp_path)])
    for name, w in results["weights"].items():
        np.testing.assert_allclose(w, [1.0, 2.0, 3.0], atol=0.1, err_msg=name)
        np.testing.assert_allclose(w, results["least_squares"], atol=1e-4, err_msg=name)
    assert results["plot"].is_file()


def test_dropout_batchnorm_example_modes(tmp_path: Path) -> None:
    argv = ["--train", "128", "--epochs", "1", "--out", str(tmp_path)]
    results = dropout_batchnorm.main(argv)
    modes = results["modes"]
    for framework in ("tfreg", "torch"):
        assert modes["dropout"][f"{framework} train vs eval"] > 0.0
        assert modes["dropout"][f"{framework} train vs train"] > 0.0  # fresh masks per call
        assert modes["batchnorm"][f"{framework} train vs eval"] > 0.0  # batch vs moving stats
        assert modes["batchnorm"][f"{framework} train vs train"] == 0.0
        assert modes["plain"][f"{framework} train vs eval"] == 0.0
    assert results["curves"]["torch"]["dropout"].shape == (1, 4)
