"""Smoke test of examples/distributed_cnn_tf.py: 2 localhost workers (MultiWorkerMirroredStrategy,
each started with its TF_CONFIG by the example's ``--workers 2``) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples import distributed_cnn_tf
from tfreg_harness import tolerance

ROOT = Path(__file__).resolve().parents[1]
# float64 losses of 2 workers x 2 micro-batches of 16 (global) vs 1 process x 4 of 8: the
# "accumulation" row, 1e-12 (the same windows of 32, summed in another order).
EXACT = tolerance("accumulation", "float64")
# 200 examples, windows of 32: 6 full windows, then 8 examples -- one global micro-batch of 8,
# 4 per worker.
ARGS = ["--train", "200", "--epochs", "1"]


def test_two_workers_equal_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TF_CONFIG", None)
    command = [sys.executable, str(ROOT / "examples" / "distributed_cnn_tf.py"), *ARGS]
    command += ["--batch", "16", "--accumulation", "2", "--out", str(tmp_path)]
    command += ["--workers", "2", "--timeout", "120"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / distributed_cnn_tf.RESULT).read_text())
    monkeypatch.delenv("TF_CONFIG", raising=False)  # one process, no strategy
    one = distributed_cnn_tf.main(
        [*ARGS, "--batch", "8", "--accumulation", "4", "--out", str(tmp_path / "one")]
    )
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["examples"] == one["examples"] == [32] * 6 + [8]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=EXACT.rtol)
    np.testing.assert_allclose(two["checksum"], one["checksum"], rtol=EXACT.rtol)
