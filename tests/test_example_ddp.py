"""Smoke test of examples/ddp_cnn.py: torchrun with 2 processes on localhost (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples import ddp_cnn
from tfreg_harness import tolerance

ROOT = Path(__file__).resolve().parents[1]
# float64 losses of 2 ranks x 2 micro-batches vs 1 process x 4: the "accumulation" row, 1e-12.
EXACT = tolerance("accumulation", "float64")
# 40 examples, windows of 2*2*8 = 32: the last window's 8 examples all go to rank 0.
ARGS = ["--train", "40", "--epochs", "1", "--batch", "8"]


@pytest.mark.usefixtures("single_torch_thread")
def test_torchrun_two_processes_equal_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(ROOT / "examples" / "ddp_cnn.py")]
    command += [*ARGS, "--accumulation", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "ddp_cnn.json").read_text())
    one = ddp_cnn.main([*ARGS, "--accumulation", "4", "--out", str(tmp_path / "one")])
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["examples"] == one["examples"] == [32, 8]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=EXACT.rtol)
    np.testing.assert_allclose(two["checksum"], one["checksum"], rtol=EXACT.rtol)
