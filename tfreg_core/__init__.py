"""Framework-free runtime shared by ``tfreg`` (TensorFlow) and ``torchref`` (PyTorch).

Everything here is plain Python/NumPy so that both trees can import it without importing each
other's framework: argument validation and its messages, regularizer specs and configs, the
weight-decay/L2 conversions, window planning and the fit driver. The parity harness's own
framework-free code (comparisons, the tolerance table, reports, reference bundles) lives in
``tfreg_harness``.
"""

from tfreg_core._version import __version__
from tfreg_core.conversions import l2_to_torch_weight_decay, torch_weight_decay_to_l2
from tfreg_core.validation import InvalidArgumentError

__all__ = [
    "InvalidArgumentError",
    "__version__",
    "l2_to_torch_weight_decay",
    "torch_weight_decay_to_l2",
]
