"""The architectures parity-CI teams port, each a Keras model and an independently written torch
module, as ``tfreg-parity --model`` factories (``make_pair(device="cpu")`` returns the dict
``check_parity`` takes: both models, a batch, labels, 3 SGD steps)::

    tfreg-parity --model examples.architectures.bert:make_pair

``bert`` (mini-BERT encoder: token + position embeddings, MultiHeadAttention with a padding mask,
residual Add, LayerNorm, GELU FFN, pooled head), ``resnet`` (basic-block CNN, torchvision style),
``unet`` (Conv2DTranspose / UpSampling2D, Concatenate skip, GroupNormalization), ``bilstm`` (stacked
Bidirectional LSTM tagger vs ``nn.LSTM(num_layers=2, bidirectional=True)``), ``twoheads`` (dict
outputs ``{"cls", "reg"}`` with a loss dict and ``loss_weights``). Each module also has
``make_broken_pair``: the same pair with one subtle porting mistake, which the report names.
``make_pair(dtype="float32", seed=3)`` gives the same pair in another dtype / weight draw (for
tolerance sweeps). Tiny sizes and float64 by default, so each runs in a second or two.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPE = "float64"
LR = 0.125  # float32-exact: Keras keeps the learning rate as a float32 variable
STEPS = 3


def randomize(keras_model: Any, seed: int) -> np.random.Generator:
    """Every Keras variable drawn from U(-0.6, 0.6) (non-zero biases and BN/LN parameters, so each
    path is exercised; the frameworks' initializers differ anyway); returns the generator for the
    data."""
    rng = np.random.default_rng(seed)
    for variable in keras_model.weights:
        low = 0.5 if "variance" in variable.path else -0.6  # a moving variance stays positive
        variable.assign(rng.uniform(low, 0.6 if low < 0 else 1.5, size=tuple(variable.shape)))
    return rng


def pair_dict(keras_model: Any, torch_module: Any, x: Any, y: Any, **extra: Any) -> dict[str, Any]:
    """The ``--model`` dict: both models, the batch, and ``STEPS`` SGD steps at ``LR``."""
    import keras
    import torch

    return {
        "keras_model": keras_model,
        "torch_module": torch_module,
        "x": x,
        "y": y,
        "steps": STEPS,
        "keras_optimizer": keras.optimizers.SGD(LR),
        "torch_optimizer": torch.optim.SGD(torch_module.parameters(), lr=LR),
        **extra,
    }
