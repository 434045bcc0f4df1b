"""Record TensorFlow results into a reference bundle for ``python -m torchref.verify``.

Use when the torch side runs elsewhere (a GPU machine without TensorFlow): record here, copy the
``.npz``, verify there. Inputs are drawn from NumPy with fixed seeds, so the bundle is the whole
experiment.
"""

from __future__ import annotations

import platform
from pathlib import Path

from regcore.bundle import Case, save_bundle
from tfreg._compat import keras, tf
from tfreg.parity.checks.penalties import PENALTY_CASES, penalty_weights, tf_value_and_grad


def penalty_cases(dtypes: tuple[str, ...] = ("float32", "float64")) -> list[Case]:
    cases = []
    for dtype in dtypes:
        for spec in PENALTY_CASES:
            for i, shape in enumerate(spec.shapes):
                w = penalty_weights(dtype, shape, i)
                value, grad = tf_value_and_grad(spec.tfreg_regularizer, w, "cpu")
                cases.append(
                    Case(
                        name=f"penalty {spec.name}{shape}",
                        kind="penalty",
                        claim="penalty_cross",
                        dtype=dtype,
                        params={"torchref": list(spec.torchref), "transpose": spec.transpose},
                        arrays={"w": w, "value": value, "grad": grad},
                    )
                )
    return cases


def record_bundle(path: str | Path, *, dtypes: tuple[str, ...] = ("float32", "float64")) -> int:
    """Write the bundle; return the number of cases."""
    cases = penalty_cases(dtypes)
    meta = {
        "recorded_by": "tfreg",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "device": "cpu",
        "machine": platform.platform(),
    }
    save_bundle(path, cases, meta)
    return len(cases)
