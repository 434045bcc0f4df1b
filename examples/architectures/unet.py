"""A small U-Net segmenter, in Keras and as a torch port.

Encoder: Conv2D -> GroupNormalization -> ReLU, MaxPooling; bottleneck Conv2D -> GroupNorm ->
ReLU; decoder: Conv2DTranspose (stride 2) upsampling, Concatenate with the encoder's skip (torch:
``torch.cat(dim=1)`` in ``forward``), Conv2D -> ReLU, then UpSampling2D-free 1x1 per-pixel class
logits. GroupNorm's epsilon is passed explicitly (Keras 1e-3, torch 1e-5 by default).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from examples.architectures import DTYPE, pair_dict, randomize

SIZE, CHANNELS, WIDTH, CLASSES, BATCH = 8, 2, 4, 3, 3


def keras_model(dtype: str = DTYPE) -> Any:
    import keras

    L = keras.layers

    def block(x: Any, filters: int, name: str) -> Any:
        x = L.Conv2D(filters, 3, padding="same", dtype=dtype, name=f"{name}_conv")(x)
        x = L.GroupNormalization(2, dtype=dtype, name=f"{name}_gn")(x)
        return L.ReLU(dtype=dtype, name=f"{name}_relu")(x)

    images = keras.Input((SIZE, SIZE, CHANNELS), dtype=dtype)
    skip = block(images, WIDTH, "enc")
    x = L.MaxPooling2D(2, dtype=dtype, name="pool")(skip)
    x = block(x, 2 * WIDTH, "mid")
    x = L.Conv2DTranspose(WIDTH, 2, strides=2, dtype=dtype, name="up")(x)
    x = L.Concatenate(dtype=dtype, name="skip")([x, skip])
    x = L.Conv2D(WIDTH, 3, padding="same", activation="relu", dtype=dtype, name="dec")(x)
    logits = L.Conv2D(CLASSES, 1, dtype=dtype, name="seg")(x)
    return keras.Model(images, logits, name="unet")


def torch_module(dtype: str = DTYPE, *, skip_first: bool = False) -> Any:
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(2, cout, eps=1e-3), nn.ReLU()]

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(*block(CHANNELS, WIDTH))
            self.pool = nn.MaxPool2d(2)
            self.mid = nn.Sequential(*block(WIDTH, 2 * WIDTH))
            self.up = nn.ConvTranspose2d(2 * WIDTH, WIDTH, 2, stride=2)
            self.dec = nn.Conv2d(2 * WIDTH, WIDTH, 3, padding=1)
            self.dec_act = nn.ReLU()
            self.seg = nn.Conv2d(WIDTH, CLASSES, 1)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            skip = self.enc(images)
            up = self.up(self.mid(self.pool(skip)))
            parts = [skip, up] if skip_first else [up, skip]  # Keras: [up, skip]
            return self.seg(self.dec_act(self.dec(torch.cat(parts, dim=1))))

    return UNet().to(getattr(torch, dtype))


def data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    images = rng.normal(size=(BATCH, SIZE, SIZE, CHANNELS))
    return images, rng.integers(0, CLASSES, size=(BATCH, SIZE, SIZE))


def make_pair(
    device: str = "cpu", *, dtype: str = DTYPE, seed: int = 19, skip_first: bool = False
) -> dict[str, Any]:
    from tfreg_harness.keras_side.devices import torch_device

    model = keras_model(dtype)
    x, y = data(randomize(model, seed))
    module = torch_module(dtype, skip_first=skip_first).to(torch_device(device))
    return pair_dict(model, module, x.astype(dtype), y, device=device)


def make_broken_pair(*, dtype: str = DTYPE, seed: int = 19) -> dict[str, Any]:
    """The skip concatenated before the upsampled map (Keras has [up, skip]): the decoder conv
    after the Concatenate is the first paired layer to diverge."""
    return make_pair(dtype=dtype, seed=seed, skip_first=True)
