"""A ResNet basic-block CNN: Keras, and a torch port written the torchvision way.

torchvision style: ``BasicBlock`` with one ``nn.ReLU(inplace=True)`` used twice in ``forward``,
a ``downsample`` (1x1 conv stride 2 + BN) on the projection shortcut, the residual ``out +=
identity`` in code, ``AdaptiveAvgPool2d(1)`` then ``torch.flatten(x, 1)`` and ``fc``. BatchNorm
in training mode (Keras momentum 0.9 / eps 1e-5 = torch's defaults). 9x9 inputs: a stride-2 3x3
"same" conv pads (1, 1) there, torch's ``padding=1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from examples.architectures import DTYPE, pair_dict, randomize

SIZE, CHANNELS, WIDTH, CLASSES, BATCH = 9, 3, 4, 3, 4


def keras_model(dtype: str = DTYPE) -> Any:
    import keras

    L = keras.layers

    def bn(name: str) -> Any:
        return L.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)

    def conv(filters: int, size: int, stride: int, name: str) -> Any:
        return L.Conv2D(filters, size, stride, "same", use_bias=False, dtype=dtype, name=name)

    def block(x: Any, filters: int, stride: int, name: str) -> Any:
        out = L.ReLU(dtype=dtype, name=f"{name}_relu1")(
            bn(f"{name}_bn1")(conv(filters, 3, stride, f"{name}_conv1")(x))
        )
        out = bn(f"{name}_bn2")(conv(filters, 3, 1, f"{name}_conv2")(out))
        if stride != 1 or x.shape[-1] != filters:
            x = bn(f"{name}_down_bn")(conv(filters, 1, stride, f"{name}_down")(x))
        return L.ReLU(dtype=dtype, name=f"{name}_relu2")(L.Add(dtype=dtype)([out, x]))

    images = keras.Input((SIZE, SIZE, CHANNELS), dtype=dtype)
    x = L.ReLU(dtype=dtype, name="relu")(bn("bn1")(conv(WIDTH, 3, 1, "conv1")(images)))
    x = block(x, WIDTH, 1, "b1")
    x = block(x, 2 * WIDTH, 2, "b2")
    x = L.GlobalAveragePooling2D(dtype=dtype, name="pool")(x)
    return keras.Model(images, L.Dense(CLASSES, dtype=dtype, name="fc")(x), name="resnet")


def torch_module(dtype: str = DTYPE, *, residual_before_bn: bool = False) -> Any:
    import torch
    from torch import nn

    def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = conv3x3(cin, cout, stride)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(cout, cout)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample: nn.Module | None = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            if residual_before_bn:  # the slip: the shortcut added to the conv, not the BN output
                out = self.bn2(self.conv2(out) + identity)
            else:
                out = self.bn2(self.conv2(out))
                out += identity
            return self.relu(out)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = conv3x3(CHANNELS, WIDTH)
            self.bn1 = nn.BatchNorm2d(WIDTH)
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = BasicBlock(WIDTH, WIDTH)
            self.layer2 = BasicBlock(WIDTH, 2 * WIDTH, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2 * WIDTH, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet().to(getattr(torch, dtype))


def data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(BATCH, SIZE, SIZE, CHANNELS)), rng.integers(0, CLASSES, size=BATCH)


def make_pair(
    device: str = "cpu", *, dtype: str = DTYPE, seed: int = 19, residual_before_bn: bool = False
) -> dict[str, Any]:
    from tfreg_harness.keras_side.devices import torch_device

    model = keras_model(dtype)
    x, y = data(randomize(model, seed))
    module = torch_module(dtype, residual_before_bn=residual_before_bn).to(torch_device(device))
    return pair_dict(model, module, x.astype(dtype), y, device=device, training=True)


def make_broken_pair(*, dtype: str = DTYPE, seed: int = 19) -> dict[str, Any]:
    """The shortcut added before ``bn2`` instead of after it: ``b1_bn2`` diverges first."""
    return make_pair(dtype=dtype, seed=seed, residual_before_bn=True)
