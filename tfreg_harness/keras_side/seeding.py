"""One place that seeds NumPy, Python, TensorFlow and torch and sets determinism flags."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np

from tfreg._compat import keras, tf


def _torch() -> Any:  # the torch module or None, without making torch a dependency of tfreg
    try:
        import torch
    except ImportError:
        return None
    return torch


def disable_tf32() -> None:
    """Full-precision float32 matmuls/convolutions in both frameworks.

    On Ampere+ GPUs TensorFlow uses TF32 (10-bit mantissa) by default and torch does not for
    matmuls, so float32 parity on a GPU is meaningless until both are off. No effect on CPUs.
    """
    tf.config.experimental.enable_tensor_float_32_execution(False)
    torch = _torch()
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def seed_everything(seed: int, *, deterministic: bool = True) -> np.random.Generator:
    """Seed every RNG, optionally make kernels deterministic, switch TF32 off; return a NumPy
    ``Generator`` from which parity tests draw initial weights and data (never from a framework's
    own initializers, which differ).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed must be a non-negative int. Received: seed={seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    torch = _torch()
    if torch is not None:
        torch.manual_seed(seed)
        if deterministic:
            # cuBLAS needs this before its first use to be deterministic.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
    disable_tf32()
    return np.random.default_rng(seed)
