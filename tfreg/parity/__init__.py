"""Cross-framework parity harness: the only part of this project that sees TensorFlow and PyTorch.

torch is imported lazily (inside these modules' functions, or when the first layer pairing loads
the built-in kinds), so ``import tfreg.parity`` never needs it.

- :mod:`tfreg.parity.api`: ``check_parity`` / ``assert_parity`` for any Keras model and torch
  module.
- :mod:`tfreg.parity.registry`: ``register_layer_pair`` -- layer kinds as data;
  :mod:`tfreg.parity.kinds` registers the built-in ones.
- :mod:`tfreg.parity.pairing`: pairing layers in definition order, configuration checks.
- :mod:`tfreg.parity.transfer`: parameter pairs and weight transfer.
- :mod:`tfreg.parity.capture`: per-layer outputs and Dropout masks while a model runs.
- :mod:`tfreg.parity.models`: evaluation (logits, loss, gradients, per-layer outputs) and the
  seed model pairs. The framework differences and layout maps live in
  ``tfreg_harness.differences`` / ``tfreg_harness.layouts`` (no framework needed).
"""

from tfreg.parity.api import assert_parity, check_parity
from tfreg.parity.models import (
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
from tfreg.parity.pairing import LayerMatch, Pairing, PairingError, pair_layers
from tfreg.parity.registry import Context, LayerPair, Weight, register_layer_pair, registered
from tfreg.parity.seeding import disable_tf32, seed_everything
from tfreg.parity.transfer import (
    ParameterPair,
    load_weights,
    parameter_pairs,
    torch_gradients_in_keras_layout,
    torch_to_numpy,
    transfer_weights,
)
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
from tfreg_harness.layouts import (
    conv2d_kernel_to_keras,
    conv2d_kernel_to_torch,
    dense_kernel_to_keras,
    dense_kernel_to_torch,
    flatten_permutation,
    to_keras_output,
    to_torch_input,
)

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
