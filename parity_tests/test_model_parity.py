"""Model-level parity: the seed MLP and CNN (and the dropout MLP) built in Keras and torch from
the same NumPy weights compute the same logits, loss and per-parameter gradients.

Tolerance: claim "model_cross" -- float64 <= 1e-10 rel (exactness up to round-off through several
layers; conv algorithms sum in different orders), float32 <= 1e-5 rel (realistic use).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tfreg._compat import keras, tf
from tfreg_harness.architecture import Dropout
from tfreg_harness.compare import Comparison, assert_close
from tfreg_harness.keras_side.models import (
    build_cnn,
    build_mlp,
    build_pair,
    dropout_masks_for,
    forward_keras,
    forward_torch,
    keras_loss,
    model_parity,
    torch_loss,
)
from tfreg_harness.keras_side.seeding import seed_everything
from tfreg_harness.tolerances import tolerance

BATCH = 32


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """32 NumPy-drawn 8x8 single-channel images in [0, 1) (NHWC) and labels 0..9: the harness
    needs no scikit-learn."""
    data = np.random.default_rng(32)
    return data.uniform(size=(BATCH, 8, 8, 1)), data.integers(0, 10, size=BATCH)


def _assert_all_pass(comparisons: list[Comparison]) -> None:
    failed = [str(c) for c in comparisons if not c.passed]
    assert not failed, "\n".join(failed)
    assert len(comparisons) >= 3  # logits, loss, and at least one gradient were compared


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_forward_loss_and_gradients_match(
    model: str, dtype: str, device: str, rng: np.random.Generator, digits
) -> None:
    tol = tolerance("model_cross", dtype)  # float64 1e-10 / float32 1e-5: see module docstring
    images, labels = digits
    if model == "mlp":
        pair = build_mlp(dtype=dtype, rng=rng, device=device)
        x = images.reshape(BATCH, -1).astype(dtype)
    else:
        pair = build_cnn(dtype=dtype, rng=rng, device=device)
        x = images.astype(dtype)
    comparisons = model_parity(pair, x, labels)
    assert all(c.rtol == tol.rtol for c in comparisons), tol.why
    _assert_all_pass(comparisons)
    names = [c.name for c in comparisons]
    assert names[:2] == ["logits", "loss"]
    assert len(names) == 2 + len(pair.keras.trainable_weights)


def test_untransposed_flatten_would_fail(rng: np.random.Generator, digits) -> None:
    """The Flatten permutation is load-bearing: undo it on the first Dense and parity breaks."""
    pair = build_cnn(dtype="float64", rng=rng)
    linear = pair.torch[6]
    assert isinstance(linear, nn.Linear)
    kernel = pair.keras.layers[6].kernel.numpy()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
    comparisons = model_parity(pair, digits[0].astype("float64"), digits[1])
    assert not comparisons[0].passed, comparisons[0]


def test_loss_hand_value(dtype: str) -> None:
    """Two examples: uniform logits over 3 classes (loss ln 3) and logits (0, ln 3) with label 1
    (loss ln 4/3); the mean is ln(3 * 4/3) / 2 = ln 2."""
    tol = tolerance("model_cross", dtype)
    logits = np.array([[0.0, 0.0, 0.0], [0.0, math.log(3.0), -50.0]], dtype=dtype)
    labels = np.array([0, 1])
    keras_value = keras_loss(tf.constant(logits), labels, dtype=dtype).numpy()
    torch_value = torch_loss(torch.from_numpy(logits), labels).numpy()
    assert keras_value.dtype == torch_value.dtype == np.dtype(dtype)
    assert_close(f"Keras loss ({dtype})", keras_value, math.log(2.0), rtol=tol.rtol)
    assert_close(f"torch loss ({dtype})", torch_value, math.log(2.0), rtol=tol.rtol)


def test_keras_loss_without_dtype_computes_in_float32(rng: np.random.Generator) -> None:
    """Documented Keras behaviour (the "loss dtype" row of tfreg_harness.differences): without
    dtype= a Keras loss casts float64 logits to floatx and returns float32 -- bit-identical to
    computing on float32 logits -- so it misses the float64 claim against torch. Hence dtype=
    everywhere."""
    logits = rng.normal(size=(BATCH, 10)) * 3.0
    labels = rng.integers(0, 10, size=BATCH)
    default = keras_loss(tf.constant(logits), labels, dtype=None).numpy()
    as_float32 = keras_loss(tf.constant(logits.astype("float32")), labels, dtype="float32")
    assert default.dtype == np.float32
    assert default == as_float32.numpy()  # the same float32 computation, bit for bit
    reference = torch_loss(torch.from_numpy(logits), labels).numpy()
    float64_claim = tolerance("model_cross", "float64").rtol
    float32_claim = tolerance("model_cross", "float32").rtol
    assert abs(default - reference) > float64_claim * abs(reference)
    assert_close("Keras default-dtype loss vs float64", default, reference, rtol=float32_claim)


# --- Dropout: the frameworks' RNGs differ, so masks are injected --------------------------


def test_dropout_masks_differ_between_frameworks_under_one_seed() -> None:
    """Why masks must be injected: the same seed gives different masks in TF and torch."""
    x = np.ones((64, 32), dtype="float32")
    seed_everything(7)
    keras_kept = keras.layers.Dropout(0.5, seed=7)(x, training=True).numpy() != 0
    seed_everything(7)
    torch_kept = nn.Dropout(0.5).train()(torch.from_numpy(x)).numpy() != 0
    assert not np.array_equal(keras_kept, torch_kept)


def test_injected_mask_reproduces_each_frameworks_own_dropout(dtype: str) -> None:
    """Injection uses each framework's own formula: taking the mask a native Dropout drew and
    injecting it gives that framework's output bit for bit (CPU; inputs never 0, so the mask is
    readable from the output)."""
    rng = seed_everything(11)
    x = (rng.uniform(0.5, 1.5, size=(16, 12)) * rng.choice([-1, 1], size=(16, 12))).astype(dtype)
    pair = build_pair((Dropout(0.3),), (12,), dtype=dtype)
    native = pair.keras(x, training=True).numpy()
    injected = forward_keras(pair, x, training=True, dropout_masks=[native != 0])[0].numpy()
    np.testing.assert_array_equal(injected, native)

    native = pair.torch.train()(torch.from_numpy(x)).numpy()
    injected = forward_torch(pair, x, training=True, dropout_masks=[native != 0])[0]
    np.testing.assert_array_equal(injected.detach().numpy(), native)


def test_dropout_mlp_matches_with_injected_masks(
    dtype: str, device: str, rng: np.random.Generator, digits
) -> None:
    tol = tolerance("model_cross", dtype)  # float64 1e-10 / float32 1e-5: see module docstring
    pair = build_mlp(dtype=dtype, rng=rng, dropout=0.3, device=device)
    x = digits[0].reshape(BATCH, -1).astype(dtype)
    masks = dropout_masks_for(pair.keras, x, rng)
    assert [m.shape for m in masks] == [(BATCH, 32), (BATCH, 32)]
    kept = np.mean(np.concatenate(masks))
    assert 0.55 < kept < 0.85  # ~0.7 of 2048 draws kept
    comparisons = model_parity(pair, x, digits[1], training=True, dropout_masks=masks)
    assert all(c.rtol == tol.rtol for c in comparisons)
    _assert_all_pass(comparisons)
    # The masks matter: eval mode (no dropout) gives other logits.
    eval_logits = forward_keras(pair, x, training=False)[0].numpy()
    train_logits = forward_keras(pair, x, training=True, dropout_masks=masks)[0].numpy()
    assert not np.allclose(eval_logits, train_logits)


def test_dropout_in_training_without_masks_is_refused(rng: np.random.Generator, digits) -> None:
    pair = build_mlp(dtype="float32", rng=rng, dropout=0.3)
    x = digits[0].reshape(BATCH, -1).astype("float32")
    with pytest.raises(ValueError, match="gives different masks"):
        model_parity(pair, x, digits[1], training=True)
    with pytest.raises(ValueError, match="one mask per Dropout layer"):
        model_parity(pair, x, digits[1], training=True, dropout_masks=[np.ones((BATCH, 32))])
    with pytest.raises(ValueError, match=r"mask for a torch Dropout has shape \(32, 31\)"):
        forward_torch(pair, x, training=True, dropout_masks=[np.ones((BATCH, 31))] * 2)
