"""Sparsity parity: identical reports for transferred weights (counts exactly, norms to
round-off), after proximal L1 has produced exact zeros."""

from __future__ import annotations

import numpy as np

from regcore.compare import Comparison, compare
from regcore.tolerances import tolerance
from tfreg._compat import tf
from tfreg.parity.checks import register
from tfreg.parity.devices import tf_device
from tfreg.parity.models import build_cnn
from tfreg.parity.seeding import seed_everything
from tfreg.parity.transfer import transfer_weights


def _reports(dtype: str, device: str) -> list[Comparison]:
    import tfreg
    import torchref

    pair = build_cnn(dtype=dtype, rng=seed_everything(13), device=device)
    # One large proximal step zeroes about a third of each kernel and leaves survivors just
    # above zero, so exact-zero and near-zero counts are both non-trivial.
    with tf.device(tf_device(device)):
        tfreg.apply_proximal_l1(pair.keras, l1=0.1, learning_rate=1.0)
    transfer_weights(pair.keras, pair.torch)
    kwargs = {"rel": 0.05, "atol": 1e-3}
    ours, theirs = (
        tfreg.sparsity_report(pair.keras, **kwargs),
        torchref.sparsity_report(pair.torch, **kwargs),
    )
    norms = tolerance("sparsity_norms", dtype).rtol
    out = []
    for k, t in zip(ours.parameters, theirs.parameters, strict=True):
        counts = (
            np.array([t.size, t.zeros, t.near_zeros]),
            np.array([k.size, k.zeros, k.near_zeros]),
        )
        out.append(compare(f"{k.name} size/zeros/near-zeros", *counts, rtol=0.0))  # equal
        out.append(compare(f"{k.name} l1, l2", [t.l1, t.l2], [k.l1, k.l2], rtol=norms))
    if not 0 < ours.zeros < ours.near_zeros < ours.size:
        raise AssertionError(f"degenerate sparsity scenario: {ours.zeros=} {ours.near_zeros=}")
    return out


register("sparsity report: counts equal, norms (transferred CNN)", "sparsity")(_reports)
