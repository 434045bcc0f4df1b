"""tfreg: Keras-identical weight penalties, the penalties Keras lacks, exact gradient accumulation.

Importing tfreg needs TensorFlow >= 2.16 (Keras 3) and never imports torch; the cross-framework
harness lives in :mod:`tfreg.parity` and imports torch only when used.
"""

from tfreg import accumulation
from tfreg._compat import keras as _keras  # noqa: F401  (fails early with an install hint)
from tfreg.checkpoint import CheckpointManager
from tfreg.penalties import penalized_parameters, penalized_variables, penalty
from tfreg.proximal import (
    ProximalChain,
    ProximalGroupLasso,
    block_soft_threshold,
    step_sizes,
)
from tfreg.pruning import PruneResult, prune
from tfreg.regularizers import (
    L1,
    L1L2,
    L2,
    GroupLasso,
    OrthogonalRegularizer,
    PNorm,
    Regularizer,
    deserialize,
    get,
    group_lasso_penalty,
    l1_penalty,
    l2_penalty,
    orthogonal_penalty,
    pnorm_penalty,
    serialize,
)
from tfreg.sparsity import (
    GroupSparsity,
    ParameterSparsity,
    ProximalL1,
    SparsityCallback,
    SparsityReport,
    apply_proximal_l1,
    soft_threshold,
    sparsity_report,
)
from tfreg.training import AccumulatingModel, History, Trainer
from tfreg_core._version import __version__

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "AccumulatingModel",
    "CheckpointManager",
    "GroupLasso",
    "GroupSparsity",
    "History",
    "OrthogonalRegularizer",
    "PNorm",
    "ParameterSparsity",
    "ProximalChain",
    "ProximalGroupLasso",
    "ProximalL1",
    "PruneResult",
    "Regularizer",
    "SparsityCallback",
    "SparsityReport",
    "Trainer",
    "__version__",
    "accumulation",
    "apply_proximal_l1",
    "block_soft_threshold",
    "deserialize",
    "get",
    "group_lasso_penalty",
    "l1_penalty",
    "l2_penalty",
    "orthogonal_penalty",
    "penalized_parameters",
    "penalized_variables",
    "penalty",
    "pnorm_penalty",
    "prune",
    "serialize",
    "soft_threshold",
    "sparsity_report",
    "step_sizes",
]
