"""Smoke test of examples/tf_gradient_accumulation.py. Its data come from examples/_common.py,
whose MNIST reader and digits fallback tests/test_examples.py covers."""

from __future__ import annotations

import sys
from pathlib import Path

# The examples package lives at the repository root, which plain `pytest` does not put on
# sys.path (only `python -m pytest` does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import _common, tf_gradient_accumulation


def test_example_uses_the_shared_loader() -> None:
    assert tf_gradient_accumulation.load_mnist is _common.load_mnist
    assert not hasattr(tf_gradient_accumulation, "read_idx")


def test_example_runs_and_saves_the_plot(tmp_path, capsys) -> None:
    threads = tf_gradient_accumulation.torch.get_num_threads()  # main() pins torch to one thread
    try:
        argv = ["--out", str(tmp_path), "--epochs", "1", "--limit", "300"]
        assert tf_gradient_accumulation.main(argv) == 0
    finally:
        tf_gradient_accumulation.torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "scikit-learn digits" in out and "300 training images (8, 8, 1), 297 test" in out
    assert "4x64" in out and "1x256" in out and "test accuracy" in out
    assert (tmp_path / "accumulation_loss.png").stat().st_size > 1000
