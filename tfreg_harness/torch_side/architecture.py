"""The torch side of the harness' framework-neutral model descriptions (no TensorFlow needed).

``build_model(spec, input_shape, dtype=...)`` builds an ``nn.Sequential`` from a
``tfreg_harness.architecture`` description;
``tfreg_harness.keras_side.architecture.build_model`` builds the Keras
twin from the same description. Inputs follow torch's convention (NCHW images); ``input_shape``
is Keras' channels-last shape, from which Linear/Conv input sizes follow.

Also the *matching mode* modules: torch modules that compute with TensorFlow's float32
constants (``tfreg_harness.differences.ActivationDifferences``), for float64 parity of models
using gelu or a LeakyReLU slope that is not a float32 number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tfreg_core.validation import choice
from tfreg_harness import architecture as A
from tfreg_harness.differences import FRAMEWORK_DIFFERENCES, torch_batchnorm_kwargs
from torchref._compat import torch

nn = torch.nn
_ACT = FRAMEWORK_DIFFERENCES.activations
DTYPES: tuple[str, ...] = ("float32", "float64")


def _module(layer: A.Layer, shape: tuple[int, ...]) -> torch.nn.Module:
    if isinstance(layer, A.Dense):
        return nn.Linear(shape[-1], layer.units)
    if isinstance(layer, A.Conv2D):
        return nn.Conv2d(shape[-1], layer.filters, layer.kernel_size, padding="same")
    if isinstance(layer, A.MaxPool2D):
        return nn.MaxPool2d(layer.size)
    if isinstance(layer, A.Flatten):
        return nn.Flatten()
    if isinstance(layer, A.ReLU):
        return nn.ReLU()
    if isinstance(layer, A.BatchNorm):
        norm = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
        return norm(
            shape[-1], **torch_batchnorm_kwargs(momentum=layer.momentum, epsilon=layer.epsilon)
        )
    if isinstance(layer, A.Dropout):
        return nn.Dropout(layer.rate)
    raise TypeError(f"No torch module for layer description {layer!r}")  # A.shapes() checked it


def build_model(
    spec: Sequence[A.Layer], input_shape: Sequence[int], *, dtype: str, device: str = "cpu"
) -> torch.nn.Sequential:
    """``nn.Sequential`` for ``spec`` (a ``tfreg_harness.architecture`` description), in
    ``dtype`` on torch ``device``, with torch's default initialisation. BatchNorm gets
    ``momentum = 1 - m`` and ``eps`` explicitly (torch's own defaults differ from Keras')."""
    choice(dtype, "dtype", DTYPES)
    sizes = A.shapes(spec, input_shape)
    modules = [_module(layer, shape) for layer, shape in zip(spec, sizes, strict=False)]
    return nn.Sequential(*modules).to(device=device, dtype=getattr(torch, dtype))


class KerasGELU(nn.Module):
    """GELU with TensorFlow's float32 constants (matching mode for float64 parity).

    Exact: ``0.5 x (1 + erf(x * c))`` with ``c = float32(1/sqrt(2))``; tanh:
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + k x³)))`` with ``k = float32(0.044715)``. ``nn.GELU`` uses
    the exact constants and is up to 5.0e-9 / 9.0e-10 off TensorFlow's gelu in float64.
    """

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = choice(approximate, "approximate", ("none", "tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh":
            inner = math.sqrt(2.0 / math.pi) * (x + _ACT.gelu_tanh_coefficient * x**3)
            return 0.5 * x * (1.0 + torch.tanh(inner))
        return 0.5 * x * (1.0 + torch.erf(x * _ACT.gelu_exact_inv_sqrt2))

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class KerasLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` with Keras' slope: ``negative_slope`` rounded to float32, as Keras
    stores it (matching mode; 0.2 becomes 0.20000000298). Default 0.3, as Keras' layer."""

    def __init__(self, negative_slope: float = 0.3) -> None:
        super().__init__(_ACT.keras_slope(negative_slope))


__all__ = ["DTYPES", "KerasGELU", "KerasLeakyReLU", "build_model"]
