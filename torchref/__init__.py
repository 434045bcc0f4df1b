"""torchref: the PyTorch reference implementations of tfreg -- same names, same semantics.

Never imports TensorFlow or tfreg; shared, framework-free logic lives in ``tfreg_core``.
"""

from tfreg_core._version import __version__
from torchref import accumulation
from torchref._compat import torch as _torch  # noqa: F401  (fails early with an install hint)
from torchref.checkpoint import CheckpointManager
from torchref.optimizers import KerasAdamW
from torchref.penalties import penalized_parameters, penalized_variables, penalty
from torchref.proximal import (
    ProximalChain,
    ProximalGroupLasso,
    block_soft_threshold,
    step_sizes,
)
from torchref.pruning import PruneResult, prune
from torchref.regularizers import (
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
from torchref.sparsity import (
    GroupSparsity,
    ParameterSparsity,
    ProximalL1,
    SparsityReport,
    apply_proximal_l1,
    soft_threshold,
    sparsity_report,
)
from torchref.training import History, PerElementLoss, Trainer, per_element

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "CheckpointManager",
    "GroupLasso",
    "GroupSparsity",
    "History",
    "KerasAdamW",
    "OrthogonalRegularizer",
    "PNorm",
    "ParameterSparsity",
    "PerElementLoss",
    "ProximalChain",
    "ProximalGroupLasso",
    "ProximalL1",
    "PruneResult",
    "Regularizer",
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
    "per_element",
    "pnorm_penalty",
    "prune",
    "serialize",
    "soft_threshold",
    "sparsity_report",
    "step_sizes",
]
