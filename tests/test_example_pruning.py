"""Smoke test of examples/structured_pruning.py at a small size: the proximal group lasso leaves
exact zero groups, ``prune`` makes the model smaller, and the pruned model predicts the same."""

from __future__ import annotations

import sys
from pathlib import Path

# The examples package lives at the repository root, which plain `pytest` does not put on
# sys.path (only `python -m pytest` does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import _common, structured_pruning


def test_example_uses_the_shared_loader() -> None:
    assert structured_pruning.load_mnist is _common.load_mnist


def test_example_prunes_exactly(tmp_path, capsys) -> None:
    argv = ["--out", str(tmp_path), "--epochs", "3", "--limit", "512", "--strength", "0.05"]
    results = structured_pruning.main(argv)
    out = capsys.readouterr().out
    assert "zero" in out and "pruned:" in out and "test accuracy" in out
    assert sum(results["zero_groups"].values()) > 0  # whole groups exactly zero
    assert results["params_after"] < results["params_before"]
    assert results["accuracy_after"] == results["accuracy_before"]
    # float32 logits: prune only changes the order of float sums (and folds constants into
    # biases), so round-off of a few float32 ulps of logits of size ~10.
    assert results["max_logit_diff"] <= 1e-5
    assert (tmp_path / "structured_pruning.png").stat().st_size > 1000
