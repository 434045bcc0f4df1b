"""The one table of Keras <-> PyTorch differences, as data (no framework imported).

Every other module asks this one how a tensor, a hyperparameter or a statistic maps between the
frameworks; none re-derives a mapping. ``tfreg.parity`` (both frameworks) and ``torchref`` (torch
only) read the same table.

=====================  ==========================  ==========================================
what                   Keras 3                     PyTorch
=====================  ==========================  ==========================================
Dense / Linear         kernel ``(in, out)``        weight ``(out, in)``
ConvND / ConvNd        kernel ``(*k, in/g, out)``  weight ``(out, in/g, *k)``
DepthwiseConv2D        kernel ``(kh, kw, in, m)``  Conv2d(groups=in) weight ``(in*m, 1, kh, kw)``
LSTM / GRU             kernel ``(in, G*u)``,       weight_ih ``(G*u, in)``, weight_hh, two
                       recurrent ``(u, G*u)``      biases; LSTM gates i,f,c,o = torch i,f,g,o;
                                                   GRU gates z,r,h vs torch r,z,n
feature maps           channels last (N, ..., C)   channels first (N, C, ...)
Flatten after conv     ``(H, W, C)`` order         ``(C, H, W)`` order
"same" convolution     pads ``total // 2`` before  ``padding=`` is symmetric: an asymmetric
                       the rest after (any stride) pad needs an explicit ``ZeroPad*d``
BatchNorm momentum     ``m`` (default 0.99)        ``1 - m`` (default 0.1)
BatchNorm epsilon      1e-3                        1e-5
BN moving variance     biased batch variance       unbiased: biased × n/(n-1)
exact gelu (float64)   ``1/sqrt(2)`` as float32    exact ``1/sqrt(2)``: up to 5.0e-9 apart
tanh gelu (float64)    ``0.044715`` as float32     exact: up to 9.0e-10 apart
LeakyReLU slope        a float32 constant          a Python float: ~1.2e-8 apart at 0.2
MultiHeadAttention     q/k/v kernel ``(d, H, h)``  rows of ``in_proj_weight`` ``(3Hh, d)``
                       output ``(H, h, d)``        ``out_proj.weight`` ``(d, Hh)``
attention mask         True = attend               True = ignore (``key_padding_mask``)
Dropout masks          TF RNG stream               torch RNG stream (never equal: inject masks)
loss dtype             floatx unless ``dtype=``    the logits' dtype
=====================  ==========================  ==========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypedDict

import numpy as np

from tfreg_core.validation import InvalidArgumentError, positive_int


@dataclass(frozen=True)
class Layout:
    """How one kind of tensor is laid out in each framework.

    ``to_torch`` / ``to_keras`` are the ``np.transpose`` axes taking one layout to the other.
    """

    keras: str
    torch: str
    to_torch: tuple[int, ...]
    to_keras: tuple[int, ...]


@dataclass(frozen=True)
class BatchNormDifferences:
    """BatchNormalization (Keras) vs BatchNorm1d/2d (torch), the differences that change numbers.

    Both normalize a training batch with its *biased* variance ``mean((x - mean)**2)`` and compute
    ``gamma * (x - mean) / sqrt(var + eps) + beta``. They differ in the moving statistics:

    - Keras:  ``moving = m * moving + (1 - m) * batch_stat``
    - torch:  ``running = (1 - p) * running + p * batch_stat``, so ``p = 1 - m``;
    - torch feeds the *unbiased* variance (biased × n/(n-1), n = values per channel in the batch)
      into ``running_var``, Keras the biased one. Means agree; variances drift apart, and so do
      eval-mode outputs.
    """

    keras_momentum_default: float = 0.99
    torch_momentum_default: float = 0.1
    keras_epsilon_default: float = 1e-3
    torch_epsilon_default: float = 1e-5
    keras_moving_variance: str = "biased: sum((x - mean)**2) / n"
    torch_running_var: str = "unbiased: sum((x - mean)**2) / (n - 1)"

    @staticmethod
    def torch_momentum(keras_momentum: float) -> float:
        """torch's ``momentum`` (weight of the new batch) for Keras' ``momentum`` (weight of the
        old value)."""
        return 1.0 - keras_momentum

    @staticmethod
    def keras_momentum(torch_momentum: float) -> float:
        """Keras' ``momentum`` (weight of the old value) for torch's ``momentum``."""
        return 1.0 - torch_momentum

    @staticmethod
    def variance_correction(count: int) -> float:
        """torch's running-variance increment over Keras': ``n / (n - 1)`` for ``n`` values per
        channel in the batch (batch size for BatchNorm1d, batch × H × W for BatchNorm2d)."""
        n = positive_int(count, "count")
        if n < 2:
            raise InvalidArgumentError(
                f"Invalid value for argument count: torch's unbiased variance needs at least 2 "
                f"values per channel. Received: count={count!r}"
            )
        return n / (n - 1)


@dataclass(frozen=True)
class ActivationDifferences:
    """Constants TensorFlow keeps in float32 where torch computes with exact Python floats.

    In a float64 model these round-offs are visible (5e-9 .. 1.2e-8, far above the 1e-10 parity
    claim); in float32 they vanish. The *matching mode* computes torch's side with TensorFlow's
    constants (``torchref.architecture.KerasGELU``/``KerasLeakyReLU``) and agrees to round-off.
    """

    gelu_exact_inv_sqrt2: float = float(np.float32(1.0 / math.sqrt(2.0)))
    gelu_tanh_coefficient: float = float(np.float32(0.044715))
    gelu_exact_float64_gap: float = 5.0e-9  # measured max |TF - erf formula| on [-4, 4]
    gelu_tanh_float64_gap: float = 9.0e-10  # measured max |TF - tanh formula| on [-4, 4]

    @staticmethod
    def keras_slope(slope: float) -> float:
        """The LeakyReLU slope Keras actually multiplies by: the float32 nearest ``slope``."""
        return float(np.float32(slope))


@dataclass(frozen=True)
class FrameworkDifferences:
    """Every Keras/torch difference the harness knows, as data (see the module docstring).

    ``notes`` are the explanations the harness quotes in its refusals and report rows (see
    :func:`note`), so a failure says *why* the frameworks differ.
    """

    layouts: MappingProxyType[str, Layout]
    batchnorm: BatchNormDifferences
    activations: ActivationDifferences
    notes: MappingProxyType[str, str]


FRAMEWORK_DIFFERENCES = FrameworkDifferences(
    layouts=MappingProxyType(
        {
            "dense": Layout("(in, out)", "(out, in)", to_torch=(1, 0), to_keras=(1, 0)),
            "conv1d": Layout(
                "(k, in, out)", "(out, in, k)", to_torch=(2, 1, 0), to_keras=(2, 1, 0)
            ),
            "conv2d": Layout(
                "(kh, kw, in, out)",
                "(out, in, kh, kw)",
                to_torch=(3, 2, 0, 1),
                to_keras=(2, 3, 1, 0),
            ),
            "conv3d": Layout(
                "(kd, kh, kw, in, out)",
                "(out, in, kd, kh, kw)",
                to_torch=(4, 3, 0, 1, 2),
                to_keras=(2, 3, 4, 1, 0),
            ),
            "sequences": Layout("(N, L, C)", "(N, C, L)", to_torch=(0, 2, 1), to_keras=(0, 2, 1)),
            "images": Layout(
                "(N, H, W, C)", "(N, C, H, W)", to_torch=(0, 3, 1, 2), to_keras=(0, 2, 3, 1)
            ),
            "vector": Layout("(n,)", "(n,)", to_torch=(0,), to_keras=(0,)),
        }
    ),
    batchnorm=BatchNormDifferences(),
    activations=ActivationDifferences(),
    notes=MappingProxyType(
        {
            "flatten": "Keras flattens channels_last maps in (H, W, C) order, torch NCHW maps in "
            "(C, H, W) order: the first Dense/Linear after a Flatten needs its input rows "
            "permuted (flatten_permutation).",
            "same_padding": "Keras 'same' pads total = max((ceil(L/s) - 1) s + (k - 1) d + 1 - L, "
            "0) with total // 2 before and the rest after; torch's padding= is symmetric, so an "
            "odd total (even kernels, stride 2) needs an explicit nn.ZeroPad1d/2d before the conv.",
            "batchnorm_momentum": "Keras BatchNormalization(momentum=m, epsilon=e) is torch "
            "BatchNorm(momentum=1 - m, eps=e); torch's defaults (0.1, 1e-5) are not Keras' "
            "(0.99, 1e-3).",
            "batchnorm_variance": "Keras' moving variance averages the biased batch variance, "
            "torch's running_var the unbiased one (x n/(n-1)); eval outputs differ by that "
            "much. The harness predicts torch's value from Keras' "
            "(torch_running_var_from_keras) and compares eval outputs with Keras' statistic "
            "converted to torch's convention.",
            "dropout": "Keras draws masks from TensorFlow's RNG, torch from its own; seeding both "
            "with the same number gives different masks. Parity runs inject one NumPy mask into "
            "both (dropout_masks=). Both scale kept units by 1/(1 - rate).",
            "gelu": "TensorFlow's gelu keeps 1/sqrt(2) (exact) and 0.044715 (tanh) as float32 "
            "constants: in float64 it is up to 5.0e-9 (exact) / 9.0e-10 (tanh) off torch's "
            "formula. Matching mode: torchref.architecture.KerasGELU(approximate=...).",
            "leaky_relu": "Keras' LeakyReLU/leaky_relu multiplies by its slope rounded to float32 "
            "(0.2 -> 0.20000000298): in float64 ~1.2e-8 off nn.LeakyReLU(0.2). Matching mode: "
            "nn.LeakyReLU(ActivationDifferences.keras_slope(slope)) or KerasLeakyReLU(slope).",
            "lstm_bias": "Keras LSTM/GRU(reset_after=False) have one bias, torch two (bias_ih, "
            "bias_hh) that it adds: the transfer puts Keras' bias in bias_ih and zeros bias_hh. "
            "Train with bias_hh frozen (requires_grad_(False)), or torch updates the sum twice.",
            "gru_gates": "Keras GRU gates are ordered (z, r, h), torch's (r, z, n); Keras "
            "reset_after=True applies the reset gate after the recurrent matmul, as torch does.",
            "attention_mask": "Keras MultiHeadAttention's attention_mask is True where a query "
            "may attend; torch nn.MultiheadAttention's key_padding_mask (and a boolean attn_mask) "
            "is True where it may not: pass key_padding_mask=~keep for Keras' keep. A fully "
            "masked row is uniform in Keras (it adds -1e9) and NaN in torch (-inf).",
            "attention_scale": "Keras MultiHeadAttention scales queries by 1/sqrt(key_dim) "
            "rounded to float32, even in float64 (1/sqrt(2) -> 0.70710676908); torch uses the "
            "exact value: ~8e-9 apart on unit-size inputs. Float64 parity needs a key_dim whose "
            "1/sqrt is a float32 number (1, 4, 16, 64, 256); float32 runs are unaffected.",
            "transpose_padding": "Keras ConvTranspose 'same' crops k - s from the full output "
            "(n - 1) s + k, total // 2 before; torch crops padding from both ends and adds "
            "output_padding back at the end, so only an even k - s (padding=(k - s) // 2, "
            "output_padding=0) or k == s matches; an odd k - s has no torch equivalent.",
            "upsampling": "Keras UpSampling 'bilinear' resizes with half-pixel centres: torch "
            "nn.Upsample(mode='bilinear', align_corners=False); align_corners=True samples "
            "other points. 'nearest' repeats each value scale times in both. TensorFlow resizes "
            "bilinear in float32 even for float64 maps (~1e-8 apart): float64 parity needs "
            "'nearest'.",
            "pixel_shuffle": "Keras has no PixelShuffle layer; tf.nn.depth_to_space(x, r) "
            "reads input channel (i*r + j)*C + c for output channel c at block offset (i, j) "
            "(block-major), torch nn.PixelShuffle(r) reads c*r*r + i*r + j (channel-major): the "
            "same conv weights give differently ordered maps. The harness refuses it: there is no "
            "Keras layer to pair it with (a Lambda wrapping depth_to_space is of no kind).",
            "keras_normalization": "Keras Normalization computes (x - mean) / "
            "max(sqrt(variance), 1e-7) with adapt()'s statistics held as non-trainable weights "
            "(mean, variance, count); torch has no such layer (a port subtracts buffers in "
            "forward code), so there is no torch tensor to transfer them to and the harness "
            "refuses the layer: normalize the data before the model (x = layer(x)) and pair the "
            "rest.",
            "groupnorm_epsilon": "Keras GroupNormalization's epsilon defaults to 1e-3, torch "
            "GroupNorm's eps to 1e-5: pass eps explicitly.",
            "weight_decay": "torch SGD/Adam weight_decay=wd is coupled and equals Keras L2(wd/2); "
            "AdamW and every Keras optimizer's weight_decay are decoupled "
            "(tfreg_core.conversions). Not under torch's maximize=True: decay still shrinks the "
            "weights while the L2 penalty is maximized and grows them (2*lr*wd*w per SGD step).",
            "adam_epsilon": "Keras adds epsilon to sqrt(v) and folds bias correction into the "
            "learning rate; torch adds epsilon to sqrt(v_hat). Same formula only as eps -> 0.",
            "optimizer_hyperparameters": "Keras keeps learning rate, betas etc. as float32 "
            "variables even in a float64 model; torch uses Python floats.",
            "embedding_sparse_adam": "Keras' Embedding gradient is an IndexedSlices; Keras "
            "3.15's Adam/AdamW/RMSprop update_step scatter-adds m and v slice by slice without "
            "deduplicating (keras/src/optimizers/adam.py, backend/tensorflow/optimizer.py), so a "
            "token repeated in the batch updates its moments once per occurrence. torch (dense "
            "embedding gradient), tfreg.Trainer and AccumulatingModel step on the summed "
            "gradient: with repeated tokens the embedding rows differ from Keras fit (0.55 of "
            "the update in tests/test_training_edges.py), without them they agree. SGD agrees.",
            "float16_loss_scale": "tfreg differentiates each micro-batch as Keras' scaled "
            "batch mean (scale * S / N_micro): its float16 backward pass carries k times larger "
            "values than Keras' batch of k micro-batches, so it overflows at a k times smaller "
            "loss scale (one more skipped window, scale 2**16 where Keras keeps 2**17 at k=2). "
            "Applied updates are unaffected.",
        }
    ),
)
"""Every Keras <-> PyTorch difference the harness knows (see the module docstring); the
documentation's differences page is generated from it."""


def note(topic: str) -> str:
    """The explanation of one documented difference, for error messages and report rows."""
    try:
        return FRAMEWORK_DIFFERENCES.notes[topic]
    except KeyError:
        raise InvalidArgumentError(
            f"No framework-difference note {topic!r}. Known: {sorted(FRAMEWORK_DIFFERENCES.notes)}"
        ) from None


class TorchBatchNormKwargs(TypedDict):
    """:func:`torch_batchnorm_kwargs`' result: exactly the two keywords it sets (typed, so
    ``BatchNorm2d(c, **kwargs)`` is checked)."""

    momentum: float
    eps: float


def torch_batchnorm_kwargs(*, momentum: float, epsilon: float) -> TorchBatchNormKwargs:
    """``torch.nn.BatchNorm{1d,2d}`` keyword arguments computing the same function as Keras'
    ``BatchNormalization(momentum=momentum, epsilon=epsilon)`` (running variance aside)."""
    return {
        "momentum": FRAMEWORK_DIFFERENCES.batchnorm.torch_momentum(float(momentum)),
        "eps": float(epsilon),
    }


def keras_batchnorm_kwargs(*, momentum: float, eps: float) -> dict[str, float]:
    """Keras ``BatchNormalization`` keyword arguments matching ``torch.nn.BatchNorm*(momentum,
    eps)`` (moving variance aside)."""
    return {
        "momentum": FRAMEWORK_DIFFERENCES.batchnorm.keras_momentum(float(momentum)),
        "epsilon": float(eps),
    }


def _bn_closed_form(
    value: object, *, initial: object, momentum: float, count: int, steps: int, factor_power: int
) -> np.ndarray:
    value = np.asarray(value)
    decay = float(momentum) ** positive_int(steps, "steps")
    carried = decay * np.asarray(initial, dtype=value.dtype)
    factor = FRAMEWORK_DIFFERENCES.batchnorm.variance_correction(count) ** factor_power
    return carried + factor * (value - carried)


def torch_running_var_from_keras(
    moving_variance: object, *, initial: object, momentum: float, count: int, steps: int
) -> np.ndarray:
    """The ``running_var`` torch holds after the same ``steps`` train-mode batches that left
    Keras with ``moving_variance``.

    Both start from ``initial``; ``momentum`` is Keras' ``m``; every batch has ``count`` values per
    channel. Keras: ``v_N = m**N v0 + (1 - m) sum_i m**(N - i) b_i`` (b_i biased batch variances);
    torch adds ``b_i * n/(n-1)`` instead, so ``r_N = m**N v0 + n/(n-1) (v_N - m**N v0)``.
    """
    return _bn_closed_form(
        moving_variance,
        initial=initial,
        momentum=momentum,
        count=count,
        steps=steps,
        factor_power=1,
    )


def keras_moving_variance_from_torch(
    running_var: object, *, initial: object, momentum: float, count: int, steps: int
) -> np.ndarray:
    """Inverse of :func:`torch_running_var_from_keras` (``momentum`` is Keras' ``m``)."""
    return _bn_closed_form(
        running_var, initial=initial, momentum=momentum, count=count, steps=steps, factor_power=-1
    )


__all__ = [
    "FRAMEWORK_DIFFERENCES",
    "ActivationDifferences",
    "BatchNormDifferences",
    "FrameworkDifferences",
    "Layout",
    "keras_batchnorm_kwargs",
    "keras_moving_variance_from_torch",
    "note",
    "torch_batchnorm_kwargs",
    "torch_running_var_from_keras",
]
