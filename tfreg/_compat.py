"""Import TensorFlow and Keras 3 once, with an actionable error when they are missing or too old."""

from __future__ import annotations

_INSTALL = (
    "Install one of: pip install 'tfreg[tensorflow]' (GPU-capable TensorFlow) or "
    "pip install 'tfreg[tensorflow-cpu]' (CPU-only, smaller)."
)


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = [*version.split("+")[0].split("."), "0"][:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


try:
    import tensorflow as tf
except ImportError as exc:  # pragma: no cover - exercised only without TensorFlow
    raise ImportError(f"tfreg needs TensorFlow >= 2.16 with Keras 3. {_INSTALL}") from exc

try:
    import keras
except ImportError as exc:  # pragma: no cover
    raise ImportError(f"tfreg needs Keras 3 (ships with TensorFlow >= 2.16). {_INSTALL}") from exc

if _version_tuple(tf.__version__) < (2, 16) or _version_tuple(keras.__version__) < (3, 0):
    raise ImportError(  # pragma: no cover
        f"tfreg needs TensorFlow >= 2.16 and Keras >= 3; found TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}. {_INSTALL}"
    )

__all__ = ["keras", "tf"]
