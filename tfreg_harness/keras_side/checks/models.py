"""Model parity: forward output, loss and per-parameter gradients of transferred seed models."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tfreg_harness.compare import Comparison
from tfreg_harness.keras_side.checks import register
from tfreg_harness.keras_side.models import (
    ModelPair,
    build_cnn,
    build_mlp,
    dropout_masks_for,
    model_parity,
)
from tfreg_harness.keras_side.seeding import seed_everything

_BATCH = 16


def _images(dtype: str, image: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A batch of 8x8 single-channel "images" in [0, 1) and labels 0..9, drawn with NumPy (the
    harness needs no scikit-learn: no extra of ``tfreg[tensorflow-cpu,torch]`` declares it)."""
    x = rng.uniform(size=(_BATCH, 8, 8, 1)).astype(dtype)
    return (x if image else x.reshape(_BATCH, 64)), rng.integers(0, 10, size=_BATCH)


def _case(
    build: Callable[[str, str, np.random.Generator], ModelPair], *, image: bool, mode: str
) -> Callable[[str, str], list[Comparison]]:
    def run(dtype: str, device: str) -> list[Comparison]:
        rng = seed_everything(11)
        pair = build(dtype, device, rng)
        x, y = _images(dtype, image, rng)
        if mode == "dropout":
            masks = dropout_masks_for(pair.keras, x, rng)
            return model_parity(pair, x, y, training=True, dropout_masks=masks)
        return model_parity(pair, x, y, training=mode == "train")

    return run


register("model MLP: logits, loss, gradients", "models")(
    _case(lambda d, dev, r: build_mlp(dtype=d, rng=r, device=dev), image=False, mode="eval")
)
register("model seed CNN: logits, loss, gradients", "models")(
    _case(lambda d, dev, r: build_cnn(dtype=d, rng=r, device=dev), image=True, mode="eval")
)
register("model BatchNorm MLP (train mode)", "models")(
    _case(
        lambda d, dev, r: build_mlp(dtype=d, rng=r, device=dev, batchnorm=True),
        image=False,
        mode="train",
    )
)
register("model Dropout MLP (injected masks)", "models")(
    _case(
        lambda d, dev, r: build_mlp(dtype=d, rng=r, device=dev, dropout=0.3),
        image=False,
        mode="dropout",
    )
)
