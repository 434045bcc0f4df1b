"""Reference bundles: results recorded by one framework, verified by the other elsewhere.

TensorFlow and PyTorch often cannot share a machine (a GPU image without TensorFlow, a TF-only CI
runner). A bundle is one ``.npz`` file: each *case* has a kind (e.g. "penalty", "mlp"), JSON
parameters, input arrays and the recording framework's outputs. ``tfreg.parity.record`` writes
bundles; ``torchref.verify`` recomputes every case with torchref on any device and compares,
citing the same tolerance table. Only NumPy and JSON are involved, so either side can read it.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1


@dataclass
class Case:
    name: str
    kind: str
    claim: str
    dtype: str
    params: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def save_bundle(path: str | Path, cases: list[Case], meta: dict[str, Any]) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "cases": [
            {
                "name": c.name,
                "kind": c.kind,
                "claim": c.claim,
                "dtype": c.dtype,
                "params": c.params,
                "arrays": sorted(c.arrays),
            }
            for c in cases
        ],
    }
    arrays: dict[str, Any] = {
        f"{i}/{key}": value for i, c in enumerate(cases) for key, value in c.arrays.items()
    }
    np.savez_compressed(path, __manifest__=np.array(json.dumps(manifest)), **arrays)


def load_bundle(path: str | Path) -> tuple[list[Case], dict[str, Any]]:
    """Read a bundle written by :func:`save_bundle`.

    Raises ``OSError`` when the file cannot be opened and ``ValueError`` naming ``path`` when it
    is not a bundle of the supported format (not an ``.npz``, no manifest, missing arrays)."""
    with open(path, "rb") as file:
        # Checked first: for a non-zip file np.load would talk about pickles, which misleads.
        if file.read(4) != b"PK\x03\x04":
            raise ValueError(f"{path}: not a tfreg parity bundle (not an .npz archive)")
    try:
        return _load(path)
    except (KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{path}: not a tfreg parity bundle ({type(exc).__name__}: {exc})"
        ) from exc
    except ValueError as exc:
        raise ValueError(f"{path}: not a tfreg parity bundle ({exc})") from exc


def _load(path: str | Path) -> tuple[list[Case], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        manifest = json.loads(str(data["__manifest__"]))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: bundle format {manifest.get('format_version')!r} is not the supported "
                f"format {FORMAT_VERSION}"
            )
        cases = [
            Case(
                name=entry["name"],
                kind=entry["kind"],
                claim=entry["claim"],
                dtype=entry["dtype"],
                params=entry["params"],
                arrays={key: data[f"{i}/{key}"] for key in entry["arrays"]},
            )
            for i, entry in enumerate(manifest["cases"])
        ]
    return cases, manifest["meta"]
