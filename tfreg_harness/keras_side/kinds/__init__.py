"""The built-in layer kinds, registered through the public ``register_layer_pair`` like any user
kind, one module per family. Each entry is the weight layout map (``tfreg_harness.layouts``)
plus the configuration that must agree; a disagreement is a failure naming both layers and the
field. The list of registered kinds is ``registry.kind_list`` (the README's
list is generated from it).
"""

from __future__ import annotations

from tfreg_harness.keras_side.kinds import (  # noqa: F401  (importing a family registers its kinds)
    attention,
    convolution,
    merging,
    normalization,
    recurrent,
    shaping,
)
from tfreg_harness.keras_side.kinds.activations import (
    TORCH_ACTIVATIONS,
    activation_problem,
    keras_activation,
    torch_activation,
)
from tfreg_harness.keras_side.kinds.normalization import CHANNEL_DROPOUT
from tfreg_harness.keras_side.registry import _BUILTIN, registered_kinds

_BUILTIN.extend(entry for _, entry in registered_kinds())  # for kind_list(builtin_only=True)

__all__ = [
    "CHANNEL_DROPOUT",
    "TORCH_ACTIVATIONS",
    "activation_problem",
    "keras_activation",
    "torch_activation",
]
