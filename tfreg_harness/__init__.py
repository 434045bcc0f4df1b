"""Framework-free part of the parity harness: comparisons, the tolerance table, reports, bundles,
the table of framework differences (``differences``), the layout maps (``layouts``), the seed-model
descriptions both frameworks build (``architecture``), per-layer divergence records
(``divergence``), and what both command-line tools share: exit statuses (``exits``), outputs
checked before a run and written atomically (``outputs``), ``--timeout`` (``deadline``) and
importing ``pkg.module:function`` specs (``factories``).

The harness' two sides build on it, each a subpackage: ``tfreg_harness.keras_side`` (sees both
frameworks; ``tfreg.parity`` re-exports its public names) and ``tfreg_harness.torch_side`` (torch
only: ``torchref.verify``). This core imports neither framework, nor ``tfreg``/``torchref``, nor
either side; it depends on ``tfreg_core`` for validation only (``tests/test_dependency_rule.py``
pins the rule).
"""

from tfreg_core._version import __version__
from tfreg_harness.compare import Comparison, assert_close, compare
from tfreg_harness.tolerances import TOLERANCES, Tolerance, tolerance

__all__ = [
    "TOLERANCES",
    "Comparison",
    "Tolerance",
    "__version__",
    "assert_close",
    "compare",
    "tolerance",
]
