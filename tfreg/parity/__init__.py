"""Cross-framework parity harness, the public names: ``check_parity`` / ``assert_parity``,
``register_layer_pair``, the seed model pairs, weight transfer and layout maps.

The harness lives in :mod:`tfreg_harness` (framework-neutral core), :mod:`tfreg_harness.keras_side`
(this package's modules: ``api``, ``models``, ``pairing``, ``registry``, ``kinds``, ``transfer``,
``checks``, ``cli``, ...) and :mod:`tfreg_harness.torch_side`. ``tfreg.parity`` stays the name
users import, ``python -m tfreg.parity`` runs ``tfreg-parity``, and ``tfreg.parity.<module>`` is
``tfreg_harness.keras_side.<module>`` -- the same module object, imported on first use.

torch is imported lazily (inside those modules' functions, or when the first layer pairing loads
the built-in kinds), so ``import tfreg.parity`` never needs it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

from tfreg_harness.differences import (
    FRAMEWORK_DIFFERENCES,
    BatchNormDifferences,
    FrameworkDifferences,
    Layout,
    keras_batchnorm_kwargs,
    keras_moving_variance_from_torch,
    torch_batchnorm_kwargs,
    torch_running_var_from_keras,
)
from tfreg_harness.divergence import LayerRecord, ParityReport
from tfreg_harness.keras_side.api import assert_parity, check_parity
from tfreg_harness.keras_side.models import (
    LOSS_PAIRS,
    Evaluation,
    ModelPair,
    build_cnn,
    build_mlp,
    build_pair,
    compare_evaluations,
    compare_layers,
    dropout_masks_for,
    evaluate_keras,
    evaluate_torch,
    forward_keras,
    forward_torch,
    keras_loss,
    model_parity,
    torch_loss,
)
from tfreg_harness.keras_side.pairing import LayerMatch, Pairing, PairingError, pair_layers
from tfreg_harness.keras_side.registry import (
    Context,
    LayerPair,
    Weight,
    register_layer_pair,
    registered,
)
from tfreg_harness.keras_side.seeding import disable_tf32, seed_everything
from tfreg_harness.keras_side.transfer import (
    ParameterPair,
    load_weights,
    parameter_pairs,
    torch_gradients_in_keras_layout,
    torch_to_numpy,
    transfer_weights,
)
from tfreg_harness.layouts import (
    conv2d_kernel_to_keras,
    conv2d_kernel_to_torch,
    dense_kernel_to_keras,
    dense_kernel_to_torch,
    flatten_permutation,
    to_keras_output,
    to_torch_input,
)

_HOME = "tfreg_harness.keras_side"


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``tfreg.parity.X[.Y]`` to the module ``tfreg_harness.keras_side.X[.Y]`` itself
    (one module object under both names: one layer registry, and a patched attribute is seen
    through either name)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(__name__ + ".") or fullname == __name__ + ".__main__":
            return None
        if importlib.util.find_spec(_HOME + fullname.removeprefix(__name__)) is None:
            return None  # no such module: the import fails under the name it was asked by
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(_HOME + spec.name.removeprefix(__name__))
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # importlib stamped the alias' spec on the module: give it back its own
        assert module.__spec__ is not None
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())

__all__ = [
    "FRAMEWORK_DIFFERENCES",
    "LOSS_PAIRS",
    "BatchNormDifferences",
    "Context",
    "Evaluation",
    "FrameworkDifferences",
    "LayerMatch",
    "LayerPair",
    "LayerRecord",
    "Layout",
    "ModelPair",
    "Pairing",
    "PairingError",
    "ParameterPair",
    "ParityReport",
    "Weight",
    "assert_parity",
    "build_cnn",
    "build_mlp",
    "build_pair",
    "check_parity",
    "compare_evaluations",
    "compare_layers",
    "conv2d_kernel_to_keras",
    "conv2d_kernel_to_torch",
    "dense_kernel_to_keras",
    "dense_kernel_to_torch",
    "disable_tf32",
    "dropout_masks_for",
    "evaluate_keras",
    "evaluate_torch",
    "flatten_permutation",
    "forward_keras",
    "forward_torch",
    "keras_batchnorm_kwargs",
    "keras_loss",
    "keras_moving_variance_from_torch",
    "load_weights",
    "model_parity",
    "pair_layers",
    "parameter_pairs",
    "register_layer_pair",
    "registered",
    "seed_everything",
    "to_keras_output",
    "to_torch_input",
    "torch_batchnorm_kwargs",
    "torch_gradients_in_keras_layout",
    "torch_loss",
    "torch_running_var_from_keras",
    "torch_to_numpy",
    "transfer_weights",
]
