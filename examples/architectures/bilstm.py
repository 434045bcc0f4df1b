"""A BiLSTM tagger, in Keras and as a torch port.

Keras: Embedding -> Bidirectional(LSTM) -> Bidirectional(LSTM) (both ``return_sequences``) ->
TimeDistributed(Dense) per-step tag logits. torch: ``nn.Embedding`` -> one
``nn.LSTM(num_layers=2, bidirectional=True, batch_first=True)`` -> ``nn.Linear``. Keras' LSTM has
one bias where torch adds ``bias_ih + bias_hh``: the transfer puts the bias in ``bias_ih`` and
zeros ``bias_hh``, which must then stay frozen or SGD moves the sum twice per step (the port
freezes it; the broken twin forgets to, and the report names ``lstm.bias_hh_l0``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from examples.architectures import DTYPE, pair_dict, randomize

VOCAB, LENGTH, EMBED, HIDDEN, TAGS, BATCH = 9, 5, 4, 3, 4, 4


def keras_model(dtype: str = DTYPE) -> Any:
    import keras

    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            L.Embedding(VOCAB, EMBED, dtype=dtype, name="emb"),
            L.Bidirectional(
                L.LSTM(HIDDEN, return_sequences=True, dtype=dtype), name="bi1", dtype=dtype
            ),
            L.Bidirectional(
                L.LSTM(HIDDEN, return_sequences=True, dtype=dtype), name="bi2", dtype=dtype
            ),
            L.TimeDistributed(L.Dense(TAGS, dtype=dtype), name="tags", dtype=dtype),
        ],
        name="bilstm_tagger",
    )


def torch_module(dtype: str = DTYPE, *, freeze_bias_hh: bool = True) -> Any:
    import torch
    from torch import nn

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, EMBED)
            self.lstm = nn.LSTM(EMBED, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
            self.tags = nn.Linear(2 * HIDDEN, TAGS)
            if freeze_bias_hh:  # Keras has one bias: bias_ih carries it, bias_hh stays 0
                for name, parameter in self.lstm.named_parameters():
                    if name.startswith("bias_hh"):
                        parameter.requires_grad_(False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.tags(self.lstm(self.emb(ids))[0])

    return Tagger().to(getattr(torch, dtype))


def data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(0, VOCAB, size=(BATCH, LENGTH)).astype("int32")
    return ids, rng.integers(0, TAGS, size=(BATCH, LENGTH))


def make_pair(
    device: str = "cpu", *, dtype: str = DTYPE, seed: int = 19, freeze_bias_hh: bool = True
) -> dict[str, Any]:
    from tfreg_harness.keras_side.devices import torch_device

    model = keras_model(dtype)
    x, y = data(randomize(model, seed))
    module = torch_module(dtype, freeze_bias_hh=freeze_bias_hh).to(torch_device(device))
    return pair_dict(model, module, x, y, device=device)


def make_broken_pair(*, dtype: str = DTYPE, seed: int = 19) -> dict[str, Any]:
    """torch's ``bias_hh`` left trainable: each step moves torch's effective bias twice."""
    return make_pair(dtype=dtype, seed=seed, freeze_bias_hh=False)
