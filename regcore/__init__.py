"""Framework-free core shared by ``tfreg`` (TensorFlow) and ``torchref`` (PyTorch).

Everything here is plain Python/NumPy so that both trees can import it without importing each
other's framework: argument validation and its messages, the weight-decay/L2 conversions, and the
tolerance table that parity tests cite.
"""

from regcore.compare import Comparison, assert_close, compare
from regcore.conversions import l2_to_torch_weight_decay, torch_weight_decay_to_l2
from regcore.tolerances import TOLERANCES, Tolerance, tolerance
from regcore.validation import InvalidArgumentError

__all__ = [
    "TOLERANCES",
    "Comparison",
    "InvalidArgumentError",
    "Tolerance",
    "assert_close",
    "compare",
    "l2_to_torch_weight_decay",
    "tolerance",
    "torch_weight_decay_to_l2",
]
