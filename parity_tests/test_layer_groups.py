"""One Keras layer <-> a group of consecutive torch leaves (``register_layer_pair(...,
torch_group=...)``): ``SeparableConv1D/2D`` ported as a depthwise ``nn.Conv`` (``groups=C``,
``C*m`` outputs, no bias) followed by a pointwise 1x1 ``nn.Conv`` holding the bias.

Tolerances (float64, the harness' table): logits, loss, gradients and every paired layer's
output <= 1e-10 rel ("model_cross"), weights after each SGD step <= 1e-9 rel ("trajectory").
A broken port (the pointwise kernel transposed, the depthwise kernel's spatial axes swapped)
fails naming the separable layer; a configuration mismatch is a failed pairing row naming the
field, before any weight moves.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import torch
from torch import nn

from tfreg.parity import assert_parity, check_parity, seed_everything, transfer_weights
from tfreg_harness.keras_side.registry import kind_list
from tfreg_harness.tolerances import tolerance

L = keras.layers
C, M, F = 2, 2, 4  # in channels, depth multiplier, filters (F == C*M: a transposed 1x1 fits)


def _keras(dims: int, dtype: str, **kw: Any) -> Any:
    spatial = (7, 6)[:dims]
    sep = (L.SeparableConv1D, L.SeparableConv2D)[dims - 1]
    config = {"depth_multiplier": M, "padding": "same", "activation": "relu", **kw}
    return keras.Sequential(
        [
            keras.Input((*spatial, C), dtype=dtype),
            sep(F, 3, dtype=dtype, name="sep", **config),
            L.Flatten(dtype=dtype, name="flat"),
            L.Dense(2, dtype=dtype, name="head"),
        ]
    )


def _torch(dims: int, *, multiplier: int = M, padding: int = 1, dw_bias: bool = False) -> Any:
    conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
    size = (7, 42)[dims - 1]
    return nn.Sequential(
        conv(C, C * multiplier, 3, padding=padding, groups=C, bias=dw_bias),  # depthwise
        conv(C * multiplier, F, 1),  # pointwise
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(F * size if padding else F * (size - 4 if dims == 2 else 5), 2),
    )


def _pair(dims: int, dtype: str, torch_module: Any = None) -> tuple[Any, Any, Any, Any]:
    rng = seed_everything(7)
    keras_model = _keras(dims, dtype)
    for variable in keras_model.trainable_weights:  # non-trivial biases too
        variable.assign(rng.uniform(-0.6, 0.6, size=tuple(variable.shape)).astype(dtype))
    x = rng.normal(size=(5, *keras_model.input_shape[1:])).astype(dtype)
    y = rng.integers(0, 2, size=5)
    module = _torch(dims) if torch_module is None else torch_module
    return keras_model, module.to(getattr(torch, dtype)), x, y


@pytest.mark.parametrize("dims", [1, 2])
def test_separable_conv_pairs_with_depthwise_then_pointwise(dims: int, dtype: str) -> None:
    keras_model, module, x, y = _pair(dims, dtype)
    report = assert_parity(keras_model, module, x, y)
    bound = tolerance("model_cross", dtype).rtol
    sep = [r for r in report.layers if r.name.startswith("sep ")]
    assert sep and "0+1" in sep[0].name, [r.name for r in report.layers]
    assert all(r.tolerance == bound for r in report.layers if r.rel)
    checks = {r.check.split("/", 1)[-1] for r in report.rows}  # model name left out
    for variable in ("depthwise_kernel", "pointwise_kernel", "bias"):  # both leaves' tensors
        assert f"sep/{variable}" in checks, report.to_text()
    assert all(r.status == "pass" for r in report.rows)


def test_separable_transfer_puts_each_kernel_in_its_leaf() -> None:
    """Hand-indexed: torch depthwise weight[c*m + j, 0, h, w] = Keras depthwise_kernel[h, w, c, j];
    pointwise weight[f, i, 0, 0] = Keras pointwise_kernel[0, 0, i, f]; the bias on the pointwise."""
    keras_model, module, x, _ = _pair(2, "float64")
    transfer_weights(keras_model, module, sample=x)
    sep = keras_model.get_layer("sep")
    depthwise, pointwise = (np.asarray(v) for v in (sep.depthwise_kernel, sep.pointwise_kernel))
    dw, pw = module[0].weight.detach().numpy(), module[1].weight.detach().numpy()
    for c in range(C):
        for j in range(M):
            assert dw[c * M + j, 0, 2, 1] == depthwise[2, 1, c, j]
    assert pw[3, 1, 0, 0] == pointwise[0, 0, 1, 3] and pw[1, 3, 0, 0] == pointwise[0, 0, 3, 1]
    np.testing.assert_array_equal(module[1].bias.detach().numpy(), np.asarray(sep.bias))


def _assert_three_sgd_steps(keras_model: Any, module: Any, x: Any, y: Any) -> None:
    """Weights after each of 3 SGD steps (lr 0.125, float32-exact) at "trajectory" (1e-9)."""
    report = assert_parity(
        keras_model,
        module,
        x,
        y,
        steps=3,
        keras_optimizer=keras.optimizers.SGD(0.125),
        torch_optimizer=torch.optim.SGD(module.parameters(), lr=0.125),
    )
    steps = [r for r in report.rows if r.check.startswith("step ")]
    assert steps and all(r.status == "pass" for r in steps)
    assert all(r.tolerance <= tolerance("trajectory", "float64").rtol for r in steps)


@pytest.mark.parametrize("dims", [1, 2])
def test_separable_conv_trajectory(dims: int) -> None:
    _assert_three_sgd_steps(*_pair(dims, "float64"))


def _transposed_pointwise(module: Any) -> Any:
    with torch.no_grad():  # a converter that forgot the (in, out) -> (out, in) transpose
        module[1].weight.copy_(module[1].weight.transpose(0, 1).clone())
    return module


def _transposed_depthwise(module: Any) -> Any:
    with torch.no_grad():  # kh/kw swapped in the depthwise kernel
        module[0].weight.copy_(module[0].weight.transpose(-1, -2).clone())
    return module


@pytest.mark.parametrize("breaks", [_transposed_pointwise, _transposed_depthwise])
def test_broken_separable_port_names_the_layer(breaks: Any) -> None:
    keras_model, module, x, y = _pair(2, "float64")
    transfer_weights(keras_model, module, sample=x)
    report = check_parity(keras_model, breaks(module), x, y, transfer=False)
    assert not report.ok
    assert report.first_diverging_layer is not None, report.to_text()
    assert report.first_diverging_layer.split(" ")[0] == "sep", report.to_text()


@pytest.mark.parametrize(
    ("keras_kw", "torch_kw", "says"),
    [
        (
            {},
            {"multiplier": 1},
            "depth_multiplier (depthwise out_channels / in_channels): Keras 2 vs torch 1",
        ),
        ({"padding": "valid"}, {}, "padding: Keras 'valid' pads"),
        ({}, {"dw_bias": True}, "depthwise bias"),
    ],
)
def test_separable_configuration_mismatch_fails_at_pairing(
    keras_kw: dict[str, Any], torch_kw: dict[str, Any], says: str
) -> None:
    rng = seed_everything(7)
    keras_model = _keras(2, "float64", **keras_kw)
    x = rng.normal(size=(5, 7, 6, C))
    module = _torch(2, **torch_kw).double()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    report = check_parity(keras_model, module, x, rng.integers(0, 2, size=5))
    assert [r.status for r in report.rows] == ["fail"], report.to_text()
    assert says in report.rows[0].detail and "'sep'" in report.rows[0].detail, report.rows[0].detail
    for key, value in module.state_dict().items():  # refused before any weight moved
        assert torch.equal(value, before[key]), key


def test_a_group_needs_its_consecutive_leaves() -> None:
    """A depthwise conv followed by something other than the pointwise conv: a failed row naming
    the missing part."""
    rng = seed_everything(7)
    keras_model = _keras(2, "float64")
    module = nn.Sequential(
        nn.Conv2d(C, C * M, 3, padding=1, groups=C, bias=False),
        nn.ReLU(),
        nn.Conv2d(C * M, F, 1),
        nn.Flatten(),
        nn.Linear(F * 42, 2),
    ).double()
    x = rng.normal(size=(5, 7, 6, C))
    report = check_parity(keras_model, module, x, rng.integers(0, 2, size=5))
    assert [r.status for r in report.rows] == ["fail"]
    assert "its pointwise leaf should be torch Conv2d" in report.rows[0].detail


def test_kind_list_shows_the_group() -> None:
    assert "- `SeparableConv2D` ↔ `Conv2d` (depthwise) + `Conv2d` (pointwise)" in kind_list()


# --- Keras MultiHeadAttention <-> a hand-written attention: four nn.Linear (q, k, v, out) ---


class HandAttention(nn.Module):
    """The attention most ports write: q/k/v/out ``nn.Linear``, heads split by ``view``,
    softmax(q k^T / sqrt(key_dim)) with padded keys masked out, heads merged, out projection."""

    def __init__(self, d: int, heads: int, key_dim: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim = heads, key_dim
        self.q = nn.Linear(d, heads * key_dim)
        self.k = nn.Linear(d, heads * key_dim)
        self.v = nn.Linear(d, heads * key_dim)
        self.o = nn.Linear(heads * key_dim, d)

    def forward(self, x: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.key_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = (q / self.key_dim**0.5) @ k.transpose(-1, -2)
        scores = scores.masked_fill(ignore[:, None, None, :], float("-inf"))
        h = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.o(h)


D, HEADS, KEY_DIM = 8, 2, 4  # 1/sqrt(4) = 0.5: float32-exact (the attention_scale note)


def _attention_keras(dtype: str) -> Any:
    x = keras.Input((5,), dtype="int32")
    keep = keras.ops.expand_dims(keras.ops.not_equal(x, 0), 1)
    h = L.Embedding(10, D, dtype=dtype, name="emb")(x)
    h = L.MultiHeadAttention(HEADS, KEY_DIM, dtype=dtype, name="attn")(h, h, attention_mask=keep)
    out = L.Dense(2, dtype=dtype, name="head")(
        L.GlobalAveragePooling1D(dtype=dtype, name="pool")(h)
    )
    return keras.Model(x, out)


class AttentionNet(nn.Module):
    def __init__(self, heads: int = HEADS, key_dim: int = KEY_DIM) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, D)
        self.attn = HandAttention(D, heads, key_dim)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.emb(x), x == 0)
        return self.head(h.mean(1))


def _attention_pair(dtype: str, module: Any = None) -> tuple[Any, Any, Any, Any]:
    rng = seed_everything(11)
    keras_model = _attention_keras(dtype)
    for variable in keras_model.trainable_weights:
        variable.assign(rng.uniform(-0.6, 0.6, size=tuple(variable.shape)).astype(dtype))
    x = rng.integers(1, 10, size=(4, 5))
    x[0, 3:] = 0  # padded keys
    x[2, 4:] = 0
    torch_module = AttentionNet() if module is None else module
    return keras_model, torch_module.to(getattr(torch, dtype)), x, rng.integers(0, 2, size=4)


def test_hand_written_attention_pairs_per_projection(dtype: str) -> None:
    keras_model, module, x, y = _attention_pair(dtype)
    report = assert_parity(keras_model, module, x, y)
    attn = [r for r in report.layers if r.name.startswith("attn ")]
    assert attn and attn[0].name == "attn <-> attn.q+attn.k+attn.v+attn.o", report.to_text()
    checks = " ".join(r.check for r in report.rows)
    for dense in ("query", "key", "value", "attention_output"):  # every projection compared
        for variable in ("kernel", "bias"):
            assert f"grad attn/{dense}/{variable}" in checks, report.to_text()
    assert all(r.status == "pass" for r in report.rows)
    assert all(r.tolerance == tolerance("model_cross", dtype).rtol for r in report.layers if r.rel)


def test_hand_written_attention_trajectory() -> None:
    _assert_three_sgd_steps(*_attention_pair("float64"))


def test_hand_written_attention_transfer_is_hand_indexed() -> None:
    """torch q.weight[h*key_dim + i, c] = Keras query kernel[c, h, i]; o.weight[c, h*key_dim + i]
    = Keras output kernel[h, i, c]; q.bias[h*key_dim + i] = Keras query bias[h, i]."""
    keras_model, module, x, _ = _attention_pair("float64")
    transfer_weights(keras_model, module, sample=x)
    attn = keras_model.get_layer("attn")
    q_kernel, q_bias = np.asarray(attn.query_dense.kernel), np.asarray(attn.query_dense.bias)
    o_kernel = np.asarray(attn.output_dense.kernel)
    q, o = module.attn.q, module.attn.o
    assert q.weight[1 * KEY_DIM + 3, 5].item() == q_kernel[5, 1, 3]
    assert q.bias[1 * KEY_DIM + 2].item() == q_bias[1, 2]
    assert o.weight[6, 1 * KEY_DIM + 0].item() == o_kernel[1, 0, 6]


def test_attention_with_q_and_k_swapped_names_the_layer() -> None:
    keras_model, module, x, y = _attention_pair("float64")
    transfer_weights(keras_model, module, sample=x)
    with torch.no_grad():  # a converter that copied Keras' key kernel into q and query into k
        q = module.attn.q.weight.clone()
        module.attn.q.weight.copy_(module.attn.k.weight)
        module.attn.k.weight.copy_(q)
    report = check_parity(keras_model, module, x, y, transfer=False)
    assert not report.ok
    assert report.first_diverging_layer is not None, report.to_text()
    assert report.first_diverging_layer.split(" ")[0] == "attn", report.to_text()


def test_attention_head_count_mismatch_fails_at_pairing() -> None:
    """Same Linear sizes (4 heads x 2 = 2 heads x 4): only the module's num_heads tells."""
    keras_model, module, x, y = _attention_pair("float64", AttentionNet(heads=4, key_dim=2))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    report = check_parity(keras_model, module, x, y)
    assert [r.status for r in report.rows] == ["fail"], report.to_text()
    assert "num_heads: Keras 2 vs torch 4" in report.rows[0].detail
    assert "'attn'" in report.rows[0].detail
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_nn_multihead_attention_still_pairs() -> None:
    """The single-module kind is untouched: Keras MHA <-> nn.MultiheadAttention(batch_first)."""

    class Mha(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, D)
            self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
            self.head = nn.Linear(D, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x)
            h = self.attn(h, h, h, key_padding_mask=x == 0, need_weights=False)[0]
            return self.head(h.mean(1))

    keras_model, module, x, y = _attention_pair("float64", Mha())
    report = assert_parity(keras_model, module, x, y)
    assert any(r.name == "attn <-> attn" for r in report.layers), report.to_text()


def test_torch_group_must_name_each_class_once() -> None:
    from tfreg.parity import register_layer_pair

    class Custom(L.Layer):
        pass

    with pytest.raises(ValueError, match="torch_group must name each class of torch_cls once"):
        register_layer_pair(Custom, (nn.Conv2d, nn.Conv2d), torch_group=("depthwise",))
    with pytest.raises(ValueError, match="torch_group must name each class of torch_cls once"):
        register_layer_pair(Custom, (nn.Conv2d, nn.Conv2d), torch_group=("a", "a"))


def test_layer_map_names_the_group_by_its_first_leaf() -> None:
    """layer_map={"sep": "dw"}: the group is dw and the leaf after it, wherever they sit."""

    class Ported(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(F * 42, 2)  # defined first: definition order alone would fail
            self.dw = nn.Conv2d(C, C * M, 3, padding=1, groups=C, bias=False)
            self.pw = nn.Conv2d(C * M, F, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.pw(self.dw(x))).flatten(1))

    keras_model, module, x, y = _pair(2, "float64", Ported())
    report = assert_parity(keras_model, module, x, y, layer_map={"sep": "dw", "head": "fc"})
    assert any(r.name == "sep <-> dw+pw" for r in report.layers), report.to_text()
