"""Framework-free part of the parity harness: comparisons, the tolerance table, reports, bundles,
the table of framework differences (``differences``), the layout maps (``layouts``), the seed-model
descriptions both frameworks build (``architecture``), per-layer divergence records
(``divergence``), and what both command-line tools share: exit statuses (``exits``), outputs
checked before a run and written atomically (``outputs``), ``--timeout`` (``deadline``) and
importing ``pkg.module:function`` specs (``factories``).

Both ``tfreg.parity`` (which sees both frameworks) and ``torchref.verify`` (torch only) build on
it, so it imports neither framework, nor ``tfreg``/``torchref``. It depends on ``tfreg_core`` for
validation only. One documented exception: ``pytest_plugin``, the entry point that wires this
package to ``tfreg.parity``, imports ``tfreg.parity`` lazily when a test uses its fixture
(``tests/test_dependency_rule.py`` pins the rule and this one exception).
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
