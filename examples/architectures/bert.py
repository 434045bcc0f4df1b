"""A mini-BERT encoder classifier, in Keras and as a torch port.

Token embedding + learned position embedding (an ``Embedding`` over positions), one post-LN
Transformer block (MultiHeadAttention with a padding mask, residual Add, LayerNorm, GELU FFN,
residual Add, LayerNorm), a BERT pooler (first token -> Dense tanh) and a linear head. Token 0
is padding: Keras gets ``attention_mask = ids != 0`` (True = attend), torch
``key_padding_mask = ids == 0`` (True = ignore). The FFN's gelu is TensorFlow's (float32
constants, see ``torchref.architecture.KerasGELU``) so float64 agrees to round-off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from examples.architectures import DTYPE, pair_dict, randomize

VOCAB, LENGTH, WIDTH, HEADS, FFN, CLASSES, BATCH = 11, 6, 8, 2, 16, 3, 5


def keras_model(dtype: str = DTYPE) -> Any:
    import keras
    from keras import ops

    L = keras.layers
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    positions = ops.cumsum(ops.ones_like(ids), axis=1) - 1  # 0, 1, ..., LENGTH - 1
    x = L.Embedding(VOCAB, WIDTH, dtype=dtype, name="tok")(ids)
    x = L.Add(dtype=dtype, name="embed")(
        [x, L.Embedding(LENGTH, WIDTH, dtype=dtype, name="pos")(positions)]
    )
    keep = ops.expand_dims(ops.not_equal(ids, 0), 1)  # (batch, 1, keys): True = attend
    attended = L.MultiHeadAttention(HEADS, WIDTH // HEADS, dtype=dtype, name="attn")(
        x, x, attention_mask=keep
    )
    x = L.LayerNormalization(epsilon=1e-6, dtype=dtype, name="ln1")(
        L.Add(dtype=dtype)([x, attended])
    )
    h = L.Dense(FFN, activation="gelu", dtype=dtype, name="ff1")(x)
    h = L.Dense(WIDTH, dtype=dtype, name="ff2")(h)
    x = L.LayerNormalization(epsilon=1e-6, dtype=dtype, name="ln2")(L.Add(dtype=dtype)([x, h]))
    pooled = L.Dense(WIDTH, activation="tanh", dtype=dtype, name="pool")(x[:, 0])
    logits = L.Dense(CLASSES, dtype=dtype, name="head")(pooled)
    return keras.Model(ids, logits, name="mini_bert")


def torch_module(dtype: str = DTYPE, *, invert_mask: bool = False) -> Any:
    import torch
    from torch import nn

    from tfreg_harness.torch_side.architecture import KerasGELU

    class MiniBert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, WIDTH)
            self.pos = nn.Embedding(LENGTH, WIDTH)
            self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
            self.ln1 = nn.LayerNorm(WIDTH, eps=1e-6)
            self.ff1 = nn.Linear(WIDTH, FFN)
            self.act = KerasGELU("none")
            self.ff2 = nn.Linear(FFN, WIDTH)
            self.ln2 = nn.LayerNorm(WIDTH, eps=1e-6)
            self.pool = nn.Linear(WIDTH, WIDTH)
            self.pool_act = nn.Tanh()
            self.head = nn.Linear(WIDTH, CLASSES)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1], device=ids.device)
            x = self.tok(ids) + self.pos(positions)[None]
            ignore = (ids != 0) if invert_mask else (ids == 0)  # True = ignore this key
            attended = self.attn(x, x, x, key_padding_mask=ignore, need_weights=False)[0]
            x = self.ln1(x + attended)
            x = self.ln2(x + self.ff2(self.act(self.ff1(x))))
            return self.head(self.pool_act(self.pool(x[:, 0])))

    return MiniBert().to(getattr(torch, dtype))


def data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Token ids with trailing padding (0) of varying length; the first token is never padding."""
    ids = rng.integers(1, VOCAB, size=(BATCH, LENGTH))
    for row, valid in enumerate(rng.integers(2, LENGTH + 1, size=BATCH)):
        ids[row, valid:] = 0
    return ids.astype("int32"), rng.integers(0, CLASSES, size=BATCH)


def make_pair(
    device: str = "cpu", *, dtype: str = DTYPE, seed: int = 19, invert_mask: bool = False
) -> dict[str, Any]:
    from tfreg_harness.keras_side.devices import torch_device

    model = keras_model(dtype)
    x, y = data(randomize(model, seed))
    module = torch_module(dtype, invert_mask=invert_mask).to(torch_device(device))
    return (
        pair_dict(model, module, x, y, device=device)
        if device != "cpu"
        else pair_dict(model, module, x, y)
    )


def make_broken_pair(*, dtype: str = DTYPE, seed: int = 19) -> dict[str, Any]:
    """The classic porting slip: Keras' keep-mask passed as torch's key_padding_mask (whose True
    means *ignore*): the attention output diverges, and the report names ``attn``."""
    return make_pair(dtype=dtype, seed=seed, invert_mask=True)
