"""Model parity: forward output, loss and per-parameter gradients of transferred seed models."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tfreg.parity.checks import register
from tfreg.parity.models import ModelPair, build_cnn, build_mlp, dropout_masks_for, model_parity
from tfreg.parity.seeding import seed_everything
from tfreg_harness.compare import Comparison
from tfreg_harness.data import digit_like_images

_BATCH = 16


def _digits(dtype: str, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """8x8 digits-like images in [0, 1], drawn with NumPy (scikit-learn is no declared extra)."""
    x, y = digit_like_images(_BATCH, dtype=dtype, seed=5)
    return (x[..., None] if image else x.reshape(_BATCH, 64)), y


def _case(
    build: Callable[[str, str, np.random.Generator], ModelPair], *, image: bool, mode: str
) -> Callable[[str, str], list[Comparison]]:
    def run(dtype: str, device: str) -> list[Comparison]:
        rng = seed_everything(11)
        pair = build(dtype, device, rng)
        x, y = _digits(dtype, image)
        if mode == "dropout":
            masks = dropout_masks_for(pair.keras, _BATCH, rng)
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
