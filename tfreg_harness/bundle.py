"""Reference bundles: results recorded by one framework, verified by the other elsewhere.

TensorFlow and PyTorch often cannot share a machine (a GPU image without TensorFlow, a TF-only CI
runner). A bundle is one ``.npz`` file: each *case* has a kind (e.g. "penalty", "mlp", "pair"),
JSON parameters, input arrays and the recording framework's outputs. ``keras_side.record``
writes bundles; ``torchref.verify`` recomputes every case with torchref on any device and
compares, citing the same tolerance table. Only NumPy and JSON are involved, so either side can
read it.

A bundle is input from elsewhere, so :func:`load_bundle` trusts nothing in it: the uncompressed
sizes the zip directory declares are summed and bounded (``max_bytes``) before anything is
inflated, each array's ``.npy`` header (shape x itemsize) must fit the size its zip entry
declares before the array is allocated, only numeric/bool arrays are read (never pickles), and the
manifest is checked field by field (types, a known claim and dtype, every named array present).
Everything wrong raises :class:`BundleError` (a ``ValueError``) naming the file and the field.
What each *kind* needs (its parameters and array shapes) is checked by the verifier of that kind.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from tfreg_harness.exits import one_line
from tfreg_harness.outputs import atomic_path
from tfreg_harness.tolerances import TOLERANCES

__all__ = ["DTYPES", "FORMAT_VERSION", "MAX_BUNDLE_BYTES", "BundleError", "Case"]
__all__ += ["load_bundle", "save_bundle"]

FORMAT_VERSION = 1
DTYPES = ("float32", "float64")
# The built-in bundle is ~0.3 MB; a recorded user pair holds its weights, inputs, gradients and
# one copy of the weights per step. 1 GiB uncompressed covers a ~50M-parameter float32 model with
# a few steps and refuses a zip bomb before it is inflated (raise it with --max-bundle-mb).
MAX_BUNDLE_BYTES = 1 << 30
_MANIFEST = "__manifest__"
# What zipfile, zlib and numpy's .npy reader raise on damaged bytes (RuntimeError: an encrypted
# entry; NotImplementedError: an unsupported compression method; struct.error: a short header).
_CORRUPT = (
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    EOFError,
    ValueError,
    KeyError,
    OSError,
    RuntimeError,
    NotImplementedError,
    OverflowError,
)


class BundleError(ValueError):
    """The file is not a readable bundle of the supported format (or exceeds the size limit)."""


@dataclass
class Case:
    name: str
    kind: str
    claim: str
    dtype: str
    params: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def save_bundle(path: str | Path, cases: list[Case], meta: dict[str, Any]) -> None:
    """Write ``cases`` to ``path`` (exactly that name: no ``.npz`` is appended), atomically."""
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
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        arrays[_MANIFEST] = np.array(json.dumps(manifest))
        np.savez_compressed(file, **arrays)


def load_bundle(
    path: str | Path, *, max_bytes: int = MAX_BUNDLE_BYTES
) -> tuple[list[Case], dict[str, Any]]:
    """Read a bundle written by :func:`save_bundle`.

    Raises ``OSError`` when the file cannot be opened and :class:`BundleError` naming ``path``
    when it is not a bundle of the supported format, or declares more than ``max_bytes`` of
    uncompressed data."""
    with open(path, "rb") as file:
        # Checked first: for a non-zip file np.load would talk about pickles, which misleads.
        if file.read(4) != b"PK\x03\x04":
            raise BundleError(f"{path}: not a tfreg parity bundle (not an .npz archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = _read_arrays(archive, max_bytes)
        return _parse(arrays)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    except _CORRUPT as exc:
        # A corrupt archive or npy stream: the reader's own words, on one line.
        raise BundleError(f"{path}: not a tfreg parity bundle ({one_line(exc)})") from None


def _read_arrays(archive: zipfile.ZipFile, max_bytes: int) -> dict[str, np.ndarray]:
    entries = archive.infolist()
    declared = sum(info.file_size for info in entries)
    if declared > max_bytes:
        raise BundleError(
            f"declares {declared} bytes uncompressed, above the limit of {max_bytes} "
            "(not inflated; raise the limit with --max-bundle-mb if the bundle is genuine)"
        )
    arrays: dict[str, np.ndarray] = {}
    for info in entries:
        if not info.filename.endswith(".npy"):
            raise BundleError(f"not a tfreg parity bundle (unexpected entry {info.filename!r})")
        with archive.open(info) as member:
            name = info.filename.removesuffix(".npy")
            arrays[name] = _read_npy(member, info, text=name == _MANIFEST)
    return arrays


def _read_npy(member: Any, info: zipfile.ZipInfo, *, text: bool) -> np.ndarray:
    """One ``.npy`` entry, refusing before allocation an array larger than its entry declares
    (zipfile itself never inflates past the declared size) or of a non-numeric dtype (``text``:
    the manifest, a unicode string)."""
    version = npy_format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(member)
    else:
        raise BundleError(f"array {info.filename!r}: unsupported .npy version {version}")
    if dtype.hasobject or dtype.kind not in ("U" if text else "biuf"):
        raise BundleError(f"array {info.filename!r}: dtype {dtype} is not numeric")
    size = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if size > info.file_size:
        raise BundleError(
            f"array {info.filename!r}: its header claims {shape} {dtype} ({size} bytes), more "
            f"than the {info.file_size} bytes its entry declares"
        )
    data = member.read(size)
    if len(data) != size:
        raise BundleError(f"array {info.filename!r}: truncated")
    array = np.frombuffer(data, dtype=dtype)
    array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    result: np.ndarray = array.copy()  # writable, owns its memory
    return result


def _field(entry: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in entry:
        raise BundleError(f"{where}: no {key!r}")
    value = entry[key]
    if not isinstance(value, kind):
        raise BundleError(f"{where}: {key!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _parse(arrays: dict[str, np.ndarray]) -> tuple[list[Case], dict[str, Any]]:
    if _MANIFEST not in arrays:
        raise BundleError(f"not a tfreg parity bundle (no {_MANIFEST!r})")
    manifest_array = arrays.pop(_MANIFEST)
    raise_bad = BundleError(f"not a tfreg parity bundle ({_MANIFEST!r} is not a JSON text)")
    if manifest_array.shape != () or manifest_array.dtype.kind != "U":
        raise raise_bad
    try:
        manifest = json.loads(str(manifest_array))
    except (json.JSONDecodeError, RecursionError):
        raise raise_bad from None
    if not isinstance(manifest, dict):
        raise raise_bad
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(f"bundle format {version!r} is not the supported format {FORMAT_VERSION}")
    meta = _field(manifest, "meta", dict, "manifest")
    entries = _field(manifest, "cases", list, "manifest")
    cases = []
    for i, entry in enumerate(entries):
        where = f"case {i}"
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: must be an object, not {type(entry).__name__}")
        name = _field(entry, "name", str, where)
        where = f"case {i} ({name!r})"
        kind = _field(entry, "kind", str, where)
        claim = _field(entry, "claim", str, where)
        dtype = _field(entry, "dtype", str, where)
        params = _field(entry, "params", dict, where)
        keys = _field(entry, "arrays", list, where)
        if dtype not in DTYPES:
            raise BundleError(f"{where}: unknown dtype {dtype!r}; expected one of {DTYPES}")
        if (claim, dtype) not in TOLERANCES:
            known = sorted({c for c, _ in TOLERANCES})
            raise BundleError(f"{where}: unknown claim {claim!r}; known: {known}")
        if not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
            raise BundleError(f"{where}: 'arrays' must be distinct names")
        missing = [k for k in keys if f"{i}/{k}" not in arrays]
        if missing:
            raise BundleError(f"{where}: arrays {missing} are named but not in the file")
        cases.append(Case(name, kind, claim, dtype, params, {k: arrays[f"{i}/{k}"] for k in keys}))
    return cases, meta
