"""Weight transfer: the layout table against hand-derived layouts and against both frameworks' own
layers, and every way ``transfer_weights`` refuses a pair it cannot map."""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from tfreg._compat import keras
from tfreg_core.validation import InvalidArgumentError
from tfreg_harness.architecture import (
    BatchNorm,
    Dense,
    ReLU,
    cnn_spec,
    initial_weights,
    mlp_spec,
)
from tfreg_harness.compare import assert_close
from tfreg_harness.differences import FRAMEWORK_DIFFERENCES
from tfreg_harness.keras_side.architecture import build_model as build_keras
from tfreg_harness.keras_side.models import build_cnn, build_mlp, build_pair
from tfreg_harness.keras_side.transfer import (
    load_weights,
    parameter_pairs,
    torch_to_numpy,
    transfer_weights,
)
from tfreg_harness.layouts import (
    conv2d_kernel_to_keras,
    conv2d_kernel_to_torch,
    dense_kernel_to_keras,
    dense_kernel_to_torch,
    flatten_permutation,
    to_torch_input,
)
from tfreg_harness.tolerances import tolerance
from tfreg_harness.torch_side.architecture import build_model as build_torch


def test_dense_kernel_layout_hand_example() -> None:
    # Keras y = x @ K with K (in=2, out=3); torch y = x @ W.T with W (out=3, in=2).
    kernel = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    expected = np.array([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]])
    np.testing.assert_array_equal(dense_kernel_to_torch(kernel), expected)
    np.testing.assert_array_equal(dense_kernel_to_keras(expected), kernel)


def test_conv2d_kernel_layout_hand_example() -> None:
    # Encode each index in the value: 1000*out + 100*in + 10*row + col.
    kh, kw, cin, cout = 2, 3, 2, 4
    i, j, c, o = np.meshgrid(*(np.arange(n) for n in (kh, kw, cin, cout)), indexing="ij")
    keras_kernel = 1000 * o + 100 * c + 10 * i + j
    o, c, i, j = np.meshgrid(*(np.arange(n) for n in (cout, cin, kh, kw)), indexing="ij")
    torch_weight = 1000 * o + 100 * c + 10 * i + j
    np.testing.assert_array_equal(conv2d_kernel_to_torch(keras_kernel), torch_weight)
    np.testing.assert_array_equal(conv2d_kernel_to_keras(torch_weight), keras_kernel)


def test_flatten_permutation_hand_example() -> None:
    # (H, W, C) = (2, 2, 3): Keras position (h*2 + w)*3 + c, torch position c*4 + h*2 + w.
    expected = [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
    np.testing.assert_array_equal(flatten_permutation((2, 2, 3)), expected)
    np.testing.assert_array_equal(flatten_permutation((4, 3)), expected)


def test_flatten_permutation_is_what_the_frameworks_do(rng: np.random.Generator) -> None:
    x = rng.normal(size=(2, 3, 4, 5))  # NHWC
    keras_flat = keras.layers.Flatten(dtype="float64")(x).numpy()
    torch_flat = nn.Flatten()(torch.from_numpy(to_torch_input(x))).numpy()
    assert not np.array_equal(keras_flat, torch_flat)
    np.testing.assert_array_equal(keras_flat[:, flatten_permutation((3, 4, 5))], torch_flat)


def test_dense_after_flatten_kernel_roundtrip(rng: np.random.Generator) -> None:
    kernel = rng.normal(size=(3 * 4 * 5, 7))
    weight = dense_kernel_to_torch(kernel, flatten_from=(3, 4, 5))
    np.testing.assert_array_equal(weight, kernel[flatten_permutation((3, 4, 5))].T)
    np.testing.assert_array_equal(dense_kernel_to_keras(weight, flatten_from=(3, 4, 5)), kernel)


def test_layout_table_entries_are_inverse_pairs() -> None:
    for name, layout in FRAMEWORK_DIFFERENCES.layouts.items():
        composed = [layout.to_torch[i] for i in layout.to_keras]
        assert composed == list(range(len(layout.to_torch))), name


def test_initial_weights_match_keras_variables(rng: np.random.Generator) -> None:
    pair = build_cnn(dtype="float32")
    weights = initial_weights(cnn_spec(), (8, 8, 1), rng=rng, dtype="float32")
    assert [(w.shape, w.dtype) for w in weights] == [
        (tuple(v.shape), np.dtype(v.dtype)) for v in pair.keras.weights
    ]


@pytest.mark.parametrize(
    ("builder", "spec", "shape"),
    [(build_mlp, mlp_spec(), (64,)), (build_cnn, cnn_spec(), (8, 8, 1))],
    ids=["mlp", "cnn"],
)
def test_load_weights_puts_the_same_numbers_in_both(
    builder, spec, shape, rng: np.random.Generator
) -> None:
    pair = builder(dtype="float64")
    weights = initial_weights(spec, shape, rng=rng, dtype="float64")
    load_weights(pair.keras, pair.torch, weights)
    linears = [m for m in pair.torch if isinstance(m, (nn.Linear, nn.Conv2d))]
    kernels = weights[0::2]  # kernel, bias, kernel, bias, ...
    last = linears[-1].weight.detach().numpy()
    np.testing.assert_array_equal(last, kernels[-1].T)
    first_bias = linears[0].bias.detach().numpy()
    np.testing.assert_array_equal(first_bias, weights[1])


@pytest.mark.parametrize(
    "builder", [build_cnn, partial(build_mlp, batchnorm=True)], ids=["cnn", "bn-mlp"]
)
def test_torch_to_keras_then_back_is_exact(builder, rng: np.random.Generator) -> None:
    source = builder(dtype="float64", rng=rng)
    target = builder(dtype="float64")
    transfer_weights(target.keras, source.torch, direction="torch_to_keras")
    transfer_weights(target.keras, target.torch, direction="keras_to_torch")
    for (name, a), b in zip(
        source.torch.state_dict().items(), target.torch.state_dict().values(), strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    for a, b in zip(source.keras.get_weights(), target.keras.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_torch_to_keras_direction_gives_the_same_function(
    dtype: str, rng: np.random.Generator
) -> None:
    tol = tolerance("model_cross", dtype)  # forward of a transferred CNN: conv sum order differs
    pair = build_cnn(dtype=dtype)
    with torch.no_grad():
        for p in pair.torch.parameters():
            p.copy_(torch.from_numpy(rng.uniform(-0.3, 0.3, size=tuple(p.shape))))
    transfer_weights(pair.keras, pair.torch, direction="torch_to_keras")
    x = rng.uniform(size=(5, 8, 8, 1)).astype(dtype)
    expected = pair.keras(x).numpy()
    actual = torch_to_numpy(pair.torch(torch.from_numpy(to_torch_input(x))))
    assert_close(f"CNN logits after torch->keras ({dtype})", actual, expected, rtol=tol.rtol)


def test_pairs_cover_every_keras_variable_once() -> None:
    pair = build_mlp(dtype="float64", batchnorm=True)
    pairs = parameter_pairs(pair.keras, pair.torch)
    assert [p.keras_variable.path for p in pairs] == [v.path for v in pair.keras.weights]
    assert [p.torch_name for p in pairs] == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "3.weight", "3.bias", "4.weight", "4.bias", "4.running_mean", "4.running_var",
        "6.weight", "6.bias",
    ]  # fmt: skip


# --- refusals: each names the problem, and nothing is half-applied -------------------------


def _snapshot(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().clone().numpy() for k, v in module.state_dict().items()}


def _assert_untouched(module: nn.Module, before: dict[str, np.ndarray]) -> None:
    for k, v in module.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)


def test_unsupported_keras_layer_is_named(rng: np.random.Generator) -> None:
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), keras.layers.GaussianNoise(0.1, name="un")]
    )
    module = nn.Sequential(nn.Linear(6, 4))
    before = _snapshot(module)
    with pytest.raises(ValueError, match=r"Keras layer 'un' \(GaussianNoise\) is of no registered"):
        transfer_weights(model, module)
    _assert_untouched(module, before)


def test_unsupported_torch_module_is_named() -> None:
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    module = nn.Sequential(nn.Linear(6, 4), nn.Hardshrink())
    with pytest.raises(ValueError, match=r"torch module '1' \(Hardshrink\) is of no registered"):
        transfer_weights(model, module)


def test_shape_mismatch_is_refused_before_any_copy() -> None:
    keras_model = build_keras((Dense(8), ReLU(), Dense(3)), (5,), dtype="float64")
    torch_module = build_torch((Dense(8), ReLU(), Dense(4)), (5,), dtype="float64")
    before = _snapshot(torch_module)
    with pytest.raises(ValueError, match=r"maps to \(3, 8\).*has shape \(4, 8\)"):
        transfer_weights(keras_model, torch_module)
    _assert_untouched(torch_module, before)


def test_dtype_mismatch_is_refused() -> None:
    keras_model = build_keras((Dense(3),), (5,), dtype="float64")
    torch_module = build_torch((Dense(3),), (5,), dtype="float32")
    with pytest.raises(ValueError, match="same dtype"):
        transfer_weights(keras_model, torch_module)


def test_layer_count_mismatch_is_refused() -> None:
    keras_model = build_keras((Dense(3), Dense(3)), (5,), dtype="float32")
    torch_module = build_torch((Dense(3),), (5,), dtype="float32")
    with pytest.raises(ValueError, match="holds weights but the torch module has no layer left"):
        transfer_weights(keras_model, torch_module)


def test_conv_padding_mismatch_is_refused() -> None:
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, padding="same")])
    module = nn.Sequential(nn.Conv2d(1, 2, 3, padding=0))
    with pytest.raises(ValueError, match="padding"):
        transfer_weights(model, module)
    ok = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    transfer_weights(model, ok)  # odd kernel at stride 1: symmetric padding 1 is Keras "same"


def test_batchnorm_hyperparameter_mismatch_is_refused() -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match=r"momentum 1 - m, eps passed explicitly"):
        transfer_weights(model, nn.Sequential(nn.BatchNorm1d(4)))  # torch defaults
    transfer_weights(model, nn.Sequential(nn.BatchNorm1d(4, momentum=0.01, eps=1e-3)))


def test_batchnorm_on_feature_maps_needs_batchnorm2d() -> None:
    keras_model = build_keras((BatchNorm(),), (4, 4, 3), dtype="float32")
    with pytest.raises(ValueError, match="pairs with torch BatchNorm2d, found BatchNorm1d"):
        transfer_weights(keras_model, nn.Sequential(nn.BatchNorm1d(3, momentum=0.01, eps=1e-3)))


def test_dense_on_a_feature_map_is_refused() -> None:
    # After a conv torch holds the map NCHW: nn.Linear would mix widths where Dense mixes channels.
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Conv2D(3, 1), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="torch holds channels first"):
        transfer_weights(model, nn.Sequential(nn.Conv2d(3, 3, 1), nn.Linear(3, 2)))


def test_unbuilt_keras_model_is_refused() -> None:
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="has no symbolic inputs"):
        transfer_weights(model, nn.Sequential(nn.Linear(3, 2)))


def test_load_weights_checks_shapes_before_loading(rng: np.random.Generator) -> None:
    pair = build_mlp(dtype="float64")
    before = [w.copy() for w in pair.keras.get_weights()]
    weights = initial_weights(mlp_spec(), (64,), rng=rng, dtype="float64")
    with pytest.raises(ValueError, match=r"must match keras_model\.weights"):
        load_weights(pair.keras, pair.torch, weights[:-1])
    for a, b in zip(pair.keras.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_direction_names_the_argument() -> None:
    pair = build_pair((Dense(2),), (3,), dtype="float32")
    with pytest.raises(InvalidArgumentError, match="direction=sideways"):
        transfer_weights(pair.keras, pair.torch, direction="sideways")


def test_bad_flatten_hint_names_the_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="flatten_from"):
        dense_kernel_to_torch(np.zeros((10, 2)), flatten_from=(2, 2, 3))


_BLOCK_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked for this test")
sys.meta_path.insert(0, NoTorch())
"""


_BLOCK_TF = """
import importlib.abc, sys
class NoTF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras"):
            raise ImportError("TensorFlow is blocked for this test")
sys.meta_path.insert(0, NoTF())
"""


def test_torch_side_builds_without_tensorflow() -> None:
    """torchref.verify and the benchmarks build the seed models from the shared description on a
    torch-only machine: the torch side must not import TensorFlow."""
    code = _BLOCK_TF + (
        "from tfreg_harness.architecture import cnn_spec\n"
        "import importlib, pkgutil, tfreg_harness.torch_side as side\n"
        "for m in pkgutil.iter_modules(side.__path__, side.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "import torchref.architecture, torchref.verify\n"
        "assert torchref.verify is sys.modules['tfreg_harness.torch_side.verify']\n"
        "from torchref.architecture import build_model\n"
        "m = build_model(cnn_spec(), (8, 8, 1), dtype='float32')\n"
        "assert [type(x).__name__ for x in m][:3] == ['Conv2d', 'ReLU', 'MaxPool2d']\n"
        "assert m[6].in_features == 4 * 4 * 16\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_parity_imports_without_torch() -> None:
    code = _BLOCK_TORCH + (
        "import tfreg.parity, tfreg.parity.transfer, tfreg.parity.models, tfreg.architecture\n"
        "assert 'torch' not in sys.modules\n"
        "import tfreg_harness.keras_side as side\n"
        "assert tfreg.parity.models is side.models and tfreg.parity.transfer is side.transfer\n"
        "assert tfreg.architecture is side.architecture\n"
        "import tfreg.parity.checks.models\n"  # a nested module: the same object, loaded once
        "assert tfreg.parity.checks.models is side.checks.models\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('tfreg.parity.no_such_module') is None\n"
        "assert side.models.__spec__.name == 'tfreg_harness.keras_side.models'\n"
        "assert tfreg.parity.flatten_permutation((1, 2)).tolist() == [0, 1]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_model_checks_run_without_scikit_learn() -> None:
    """`pip install "tfreg[tensorflow-cpu,torch]"` brings no scikit-learn: the harness' model
    checks must draw their data with NumPy (they used to load sklearn's digits)."""
    code = (
        "import importlib.abc, sys, traceback\n"
        "OURS = ('/tfreg/', '/tfreg_harness/', '/tfreg_core/', '/torchref/')\n"
        "class NoSklearn(importlib.abc.MetaPathFinder):\n"
        "    # only imports this project makes are blocked: Keras and torch probe for it\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        frames = traceback.extract_stack()[:-1]\n"
        "        importer = [f for f in frames if 'importlib' not in f.filename][-1].filename\n"
        "        if name.split('.')[0] == 'sklearn' and any(o in importer for o in OURS):\n"
        "            raise ImportError('scikit-learn is blocked for this test')\n"
        "sys.meta_path.insert(0, NoSklearn())\n"
        "from tfreg_harness.keras_side.checks import run_one, selected\n"
        "first = selected(full=False, groups=['models'])[:1]  # one check: the data path\n"
        "rows = [run_one(c, 'float64', 'cpu') for c in first]\n"
        "assert rows and all(r.status == 'pass' for r in rows), rows\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
