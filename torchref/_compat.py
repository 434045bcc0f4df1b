"""Import torch once, with an actionable error when it is missing or too old."""

from __future__ import annotations

_INSTALL = (
    "Install it with: pip install 'tfreg[torch]' (or pip install torch==2.13.0 for the CPU build)."
)

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(f"torchref needs PyTorch >= 2.2. {_INSTALL}") from exc

_major, _minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
if (_major, _minor) < (2, 2):  # pragma: no cover
    raise ImportError(f"torchref needs PyTorch >= 2.2; found {torch.__version__}. {_INSTALL}")

__all__ = ["torch"]
