"""``python -m torchref.verify``: every exit status, hostile bundles, bounded work, atomic outputs.

Exit status: 0 all passed (at least one case), 1 a case failed/errored, no case, --timeout;
2 usage error or unusable input (unreadable/malformed/oversized bundle, a torch factory that
cannot be imported, an unwritable output) -- one line, never a traceback; 130 SIGINT.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfreg_harness.bundle import BundleError, Case, load_bundle, save_bundle
from tfreg_harness.torch_side import verify
from tfreg_harness.torch_side.verify import main, validate_cases

# ---------------------------------------------------------------------------------------------
# Valid cases with hand-computed expected values
# ---------------------------------------------------------------------------------------------


def penalty_case() -> Case:
    # L1(0.5) of w = [[1, -2]] by hand: 0.5 * (1 + 2) = 1.5; gradient 0.5 * sign(w). Exact in
    # float64, so any rtol passes the right values and 1.5 -> 1.6 fails at the claim's 1e-12.
    return Case(
        "penalty L1",
        "penalty",
        "penalty_cross",
        "float64",
        {"torchref": ["L1", {"l1": 0.5}], "transpose": False},
        {"w": np.array([[1.0, -2.0]]), "value": np.array(1.5), "grad": np.array([[0.5, -0.5]])},
    )


def mlp_case() -> Case:
    # Linear(2 -> 2), W = I, b = 0, x = [[0, 0]]: logits [0, 0]; cross-entropy vs label 0 is
    # log 2; dL/dlogits = softmax - onehot = [-1/2, 1/2]; dW = outer(that, x) = 0, db = [-1/2, 1/2].
    return Case(
        "mlp",
        "mlp",
        "model_cross",
        "float64",
        {"layers": [["linear", 2, 2]]},
        {
            "x": np.zeros((1, 2)),
            "y": np.array([0]),
            "logits": np.zeros((1, 2)),
            "loss": np.array(np.log(2.0)),
            "param0": np.eye(2),
            "param1": np.zeros(2),
            "grad0": np.zeros((2, 2)),
            "grad1": np.array([-0.5, 0.5]),
        },
    )


def train_case() -> Case:
    # One SGD step (lr 1) of the case above, one window of one example: b <- b - db.
    case = mlp_case()
    arrays = {k: v for k, v in case.arrays.items() if k in ("x", "y", "param0", "param1")}
    arrays |= {
        "sample_weight": np.ones(1),
        "final0": np.eye(2),
        "final1": np.array([0.5, -0.5]),
    }
    params = {"layers": case.params["layers"], "lr": 1.0}
    params |= {"accumulation_steps": 1, "batch_size": 1, "epochs": 1}
    return Case("train", "train_mlp", "trajectory", "float64", params, arrays)


def pair_case(factory: str, steps: int = 1) -> Case:
    # torch_factory_example: Linear(2 -> 1), W = [[1, 2]], b = [0.5], x = [[1, 1]], y = [[3]]:
    # out = 3.5, mse = 0.25, dL/dout = 2 (out - y) = 1, dW = [[1, 1]], db = [1]; SGD lr 0.5:
    # W = [[0.5, 1.5]], b = [0].
    arrays = {
        "x": np.ones((1, 2)),
        "y": np.array([[3.0]]),
        "logits": np.array([[3.5]]),
        "loss": np.array(0.25),
        "state/weight": np.array([[1.0, 2.0]]),
        "state/bias": np.array([0.5]),
        "grad/weight": np.array([[1.0, 1.0]]),
        "grad/bias": np.array([1.0]),
    }
    if steps:
        arrays |= {"step1/weight": np.array([[0.5, 1.5]]), "step1/bias": np.array([0.0])}
    params = {"torch_factory": factory, "loss": "mse", "steps": steps, "rtol": None}
    return Case("model torch_factory_example", "pair", "model_cross", "float64", params, arrays)


_FACTORY = """
import torch

def make_torch(device="cpu"):
    module = torch.nn.Linear(2, 1).to(device=device, dtype=torch.float64)
    return {"torch_module": module,
            "torch_optimizer": torch.optim.SGD(module.parameters(), lr=0.5)}

def make_tanh():
    return torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Tanh()).double()

def make_crashing():
    class Crash(torch.nn.Linear):
        def forward(self, x):
            raise RuntimeError("boom in forward")
    return Crash(2, 1).double()

def make_hanging():
    import pathlib, time
    pathlib.Path("started").write_text("")
    time.sleep(60)
"""


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``torch_factory_example`` (above) and two broken factory modules, importable."""
    (tmp_path / "torch_factory_example.py").write_text(_FACTORY)
    (tmp_path / "factory_with_syntax_error.py").write_text("def make_torch(:\n")
    (tmp_path / "factory_raising.py").write_text("raise RuntimeError('no GPU driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _save(path: Path, cases: list[Case]) -> str:
    save_bundle(path, cases, {})
    return str(path)


# ---------------------------------------------------------------------------------------------
# 0 and 1
# ---------------------------------------------------------------------------------------------


def test_verify_writes_junit_and_exits_by_the_result(tmp_path, capsys) -> None:
    case = penalty_case()
    bundle, xml = tmp_path / "b.npz", tmp_path / "v.xml"
    save_bundle(bundle, [case], {})
    assert main([str(bundle), "--junit-xml", str(xml)]) == 0
    suite = ET.parse(xml).getroot().find("testsuite")
    assert [suite.get(k) for k in ("tests", "failures", "errors")] == ["1", "0", "0"]
    case.arrays["value"] = np.array(1.6)
    save_bundle(bundle, [case], {})
    assert main([str(bundle), "--junit-xml", str(xml)]) == 1
    failure = ET.parse(xml).getroot().find("testsuite/testcase/failure")
    assert failure is not None and "penalty L1 value" in failure.get("message")
    capsys.readouterr()


def test_hand_computed_mlp_and_training_cases_pass_and_a_changed_one_fails(tmp_path) -> None:
    path = tmp_path / "b.npz"
    assert main([_save(path, [mlp_case(), train_case()]), "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["exit_status"] == 0 and data["counts"]["pass"] == 2
    off = train_case()
    off.arrays["final1"] = np.array([0.5, -0.4])
    assert main([_save(path, [off]), "--json", str(tmp_path / "r.json")]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["exit_status"] == 1


def test_all_nan_bundle_is_not_a_pass(tmp_path) -> None:
    # Recorded NaN and recomputed NaN agree on nothing (the one compare function's rule).
    case = penalty_case()
    case.arrays["w"] = np.full((1, 2), np.nan)
    case.arrays |= {"value": np.array(np.nan), "grad": np.full((1, 2), np.nan)}
    assert main([_save(tmp_path / "nan.npz", [case])]) == 1


def test_a_bundle_with_no_case_exits_1(tmp_path, capsys) -> None:
    assert main([_save(tmp_path / "empty.npz", []), "--json", str(tmp_path / "r.json")]) == 1
    assert "nothing was verified" in capsys.readouterr().err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["exit_status"] == 1 and data["ok"] is False


def test_pair_case_rebuilds_the_named_torch_module(factories, capsys) -> None:
    good = _save(factories / "pair.npz", [pair_case("torch_factory_example:make_torch")])
    assert main([good]) == 0
    out = capsys.readouterr().out
    assert "1 passed, 0 failed" in out
    # A wrong port (tanh after the Linear) fails, its own factory named in the bundle.
    wrong = pair_case("torch_factory_example:make_tanh", steps=0)
    wrong.arrays = {k.replace("/", "/0.", 1) if "/" in k else k: v for k, v in wrong.arrays.items()}
    assert main([_save(factories / "tanh.npz", [wrong])]) == 1
    assert "logits" in capsys.readouterr().out


def test_a_crash_inside_the_users_module_is_an_error_row(factories, capsys) -> None:
    path = _save(factories / "crash.npz", [pair_case("torch_factory_example:make_crashing", 0)])
    assert main([path]) == 1
    assert "error: RuntimeError: boom in forward" in capsys.readouterr().out


def test_timeout_stops_a_hanging_case_with_exit_1(factories, capsys) -> None:
    path = _save(factories / "hang.npz", [pair_case("torch_factory_example:make_hanging", 0)])
    started = time.perf_counter()
    assert main([path, "--timeout", "0.5", "--json", str(factories / "r.json")]) == 1
    assert time.perf_counter() - started < 10
    assert "did not finish within 0.5 s" in capsys.readouterr().err
    assert not (factories / "r.json").exists()


# ---------------------------------------------------------------------------------------------
# 2: unusable input, one line, nothing ran
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.npz", None, "No such file or directory"),
        ("garbage.npz", b"not a bundle at all\n", "not an .npz archive"),
        ("truncated.npz", b"PK\x03\x04 and then nothing", "BadZipFile"),
        ("plain.npz", "savez", "__manifest__"),
    ],
)
def test_unreadable_bundle_is_exit_2_with_a_message(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content == "savez":
        np.savez(path, a=np.zeros(2))  # an .npz, but no manifest: not a tfreg bundle
    elif content is not None:
        path.write_bytes(content)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m torchref.verify: error: cannot read the bundle")
    assert message in err and name in err


def _manifest(cases: list[Case]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    manifest = {
        "format_version": 1,
        "meta": {},
        "cases": [
            {"name": c.name, "kind": c.kind, "claim": c.claim, "dtype": c.dtype}
            | {"params": c.params, "arrays": sorted(c.arrays)}
            for c in cases
        ],
    }
    arrays = {f"{i}/{k}": v for i, c in enumerate(cases) for k, v in c.arrays.items()}
    return manifest, arrays


def _write_raw(path: Path, manifest: Any, arrays: dict[str, Any]) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    np.savez(path, __manifest__=np.array(text), **arrays)


def _case_field(i: int, key: str, value: Any):
    def edit(manifest: dict[str, Any], arrays: dict[str, Any]) -> None:
        manifest["cases"][i][key] = value

    return edit


def _param(i: int, key: str, value: Any):
    def edit(manifest: dict[str, Any], arrays: dict[str, Any]) -> None:
        manifest["cases"][i]["params"][key] = value

    return edit


def _array_value(name: str, value: Any):
    def edit(manifest: dict[str, Any], arrays: dict[str, Any]) -> None:
        arrays[name] = value

    return edit


def _top(key: str, value: Any):
    def edit(manifest: dict[str, Any], arrays: dict[str, Any]) -> None:
        manifest[key] = value

    return edit


def _drop_array(name: str):
    def edit(manifest: dict[str, Any], arrays: dict[str, Any]) -> None:
        del arrays[name]

    return edit


def _forget_array(i: int, name: str):
    def edit(manifest: dict[str, Any], arrays: dict[str, Any]) -> None:
        manifest["cases"][i]["arrays"].remove(name)
        del arrays[f"{i}/{name}"]

    return edit


# Cases 0: penalty, 1: mlp, 2: train_mlp, 3: pair. Each row breaks one thing.
HOSTILE = {
    "manifest not JSON": (lambda m, a: m.update(_text="{"), "not a JSON text"),
    "format_version as text": (_top("format_version", "1"), "bundle format '1'"),
    "meta a list": (_top("meta", []), "'meta' must be dict"),
    "cases an object": (_top("cases", {}), "'cases' must be list"),
    "case a string": (lambda m, a: m["cases"].__setitem__(0, "x"), "case 0: must be an object"),
    "case without name": (lambda m, a: m["cases"][0].pop("name"), "case 0: no 'name'"),
    "name a number": (_case_field(0, "name", 7), "'name' must be str"),
    "unknown dtype": (_case_field(0, "dtype", "float16"), "unknown dtype 'float16'"),
    "unknown claim": (_case_field(0, "claim", "anything goes"), "unknown claim 'anything goes'"),
    "unknown kind": (_case_field(1, "kind", "conv"), "unknown kind 'conv'"),
    "params a list": (_case_field(0, "params", []), "'params' must be dict"),
    "arrays not names": (_case_field(0, "arrays", [1]), "'arrays' must be distinct names"),
    "named array missing": (_drop_array("0/grad"), "arrays ['grad'] are named but not in"),
    "unknown regularizer": (_param(0, "torchref", ["os.system", {}]), "unknown regularizer"),
    "invalid regularizer kwargs": (_param(0, "torchref", ["L1", {"l1": -1}]), "is invalid"),
    "transpose a string": (_param(0, "transpose", "yes"), "transpose='yes' is not bool"),
    "grad of another shape": (_array_value("0/grad", np.zeros((2, 1))), "expected (1, 2)"),
    "float32 value in a float64 case": (
        _array_value("0/value", np.array(1.5, "float32")),
        "is float32, not float64",
    ),
    "object array (a pickle)": (
        _array_value("0/w", np.array([None, {}], dtype=object)),
        "dtype object is not numeric",
    ),
    "unknown layer": (_param(1, "layers", [["conv", 2, 2]]), "unknown layer ['conv', 2, 2]"),
    "layer widths that do not chain": (
        _param(1, "layers", [["linear", 2, 2], ["linear", 3, 2]]),
        "does not follow width 2",
    ),
    "weight of another shape": (_array_value("1/param0", np.eye(3)), "'param0' has shape (3, 3)"),
    "x of another width": (_array_value("1/x", np.zeros((1, 3))), "expected (n, 2)"),
    "float labels": (_array_value("1/y", np.array([0.0])), "not an integer array"),
    "label out of range": (_array_value("1/y", np.array([2])), "labels in 'y' outside [0, 2)"),
    "epochs=1e9": (_param(2, "epochs", 10**9), "epochs=1000000000 is outside [1, 1000]"),
    "epochs a float": (_param(2, "epochs", 2.5), "epochs=2.5 is not int"),
    "epochs a bool": (_param(2, "epochs", True), "epochs=True is not int"),
    "lr as text": (_param(2, "lr", "0.1"), "lr='0.1' is not int/float"),
    "lr NaN": (_param(2, "lr", float("nan")), "lr=nan is not a finite number > 0"),
    "batch_size 0": (_param(2, "batch_size", 0), "batch_size=0 is outside"),
    "steps=1e6": (_param(3, "steps", 10**6), "steps=1000000 is outside [0, 1000]"),
    "unknown loss": (_param(3, "loss", "hinge"), "loss 'hinge' is not one of"),
    "factory not importable": (
        _param(3, "torch_factory", "no_such_team_module:make"),
        "cannot import 'no_such_team_module': ModuleNotFoundError",
    ),
    "factory with a SyntaxError": (
        _param(3, "torch_factory", "factory_with_syntax_error:make_torch"),
        "cannot import 'factory_with_syntax_error': SyntaxError",
    ),
    "factory raising at import": (
        _param(3, "torch_factory", "factory_raising:make_torch"),
        "RuntimeError: no GPU driver",
    ),
    "factory not callable": (
        _param(3, "torch_factory", "torch_factory_example:torch"),
        "has no callable 'torch'",
    ),
    "factory spec without colon": (
        _param(3, "torch_factory", "torch_factory_example"),
        "torch factory must look like pkg.module:function",
    ),
    "step arrays missing": (_forget_array(3, "step1/bias"), "step 1 must record the parameters"),
}


@pytest.mark.parametrize(("edit", "message"), HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_bundle_is_exit_2_with_one_line(factories, capsys, edit, message) -> None:
    cases = [
        penalty_case(),
        mlp_case(),
        train_case(),
        pair_case("torch_factory_example:make_torch"),
    ]
    manifest, arrays = _manifest(cases)
    edit(manifest, arrays)
    path = factories / "hostile.npz"
    _write_raw(path, manifest.pop("_text", manifest), arrays)
    ran = []
    with pytest.MonkeyPatch.context() as patch:  # nothing may run before the refusal
        patch.setattr(verify, "verify_cases", lambda *a, **k: ran.append(1))
        assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert not ran and captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.err.startswith("python -m torchref.verify: error: ")
    assert message in captured.err, captured.err


def test_the_unedited_table_base_passes(factories) -> None:
    # The hostile table's base bundle is valid and green: each row fails for its one edit only.
    cases = [
        penalty_case(),
        mlp_case(),
        train_case(),
        pair_case("torch_factory_example:make_torch"),
    ]
    manifest, arrays = _manifest(cases)
    _write_raw(factories / "base.npz", manifest, arrays)
    assert main([str(factories / "base.npz")]) == 0


def test_zip_bomb_is_refused_before_it_is_inflated(tmp_path, capsys) -> None:
    # 1 GiB of zeros deflates to ~1 MB; the limit is checked on the sizes the zip declares.
    path = tmp_path / "bomb.npz"
    manifest, arrays = _manifest([penalty_case()])
    _write_raw(path, manifest, arrays)
    chunk = bytes(1 << 24)
    bomb = zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1)
    with bomb, bomb.open("0/bomb.npy", "w", force_zip64=True) as member:
        for _ in range(64):
            member.write(chunk)
    assert path.stat().st_size < 8 << 20
    started = time.perf_counter()
    assert main([str(path)]) == 2  # the default limit: 1 GiB
    assert time.perf_counter() - started < 2.0  # nothing was inflated
    err = capsys.readouterr().err
    declared = int(err.split("declares ")[1].split()[0])
    assert 1 << 30 < declared < (1 << 30) + 4096 and "above the limit of 1073741824" in err


def test_an_npy_header_larger_than_its_entry_is_refused_before_allocation(tmp_path) -> None:
    # A valid 16-byte entry whose header claims 10**12 float64s: np.load would allocate 8 TB.
    path = tmp_path / "liar.npz"
    manifest, arrays = _manifest([penalty_case()])
    _write_raw(path, manifest, arrays)
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    from numpy.lib import format as npy_format

    with zipfile.ZipFile(path, "a") as z, z.open("0/extra.npy", "w") as member:
        npy_format.write_array_header_1_0(member, header)
        member.write(bytes(16))
    with pytest.raises(BundleError, match=r"claims \(1000000000000,\) float64"):
        load_bundle(path)


def test_bundle_size_limit_is_an_option(tmp_path, capsys) -> None:
    path = _save(tmp_path / "b.npz", [penalty_case()])
    assert main([path, "--max-bundle-mb", "0.0001"]) == 2
    assert "above the limit of 104 " in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([path, "--max-bundle-mb", "0"])
    assert usage.value.code == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    manifest=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    ),
    path=st.lists(st.sampled_from(["cases", 0, "params", "arrays", "meta", "dtype"]), max_size=3),
)
def test_property_any_manifest_is_read_or_refused_with_bundle_error(manifest, path) -> None:
    """Whatever JSON sits in the manifest -- wholesale or grafted into a valid one -- the reader
    and the validation either accept it or raise BundleError: no other exception escapes."""
    base, arrays = _manifest([penalty_case(), mlp_case(), train_case()])
    document: Any = copy.deepcopy(base)
    if path:
        target = document
        for key in path[:-1]:
            try:
                target = target[key]
            except (KeyError, IndexError, TypeError):
                break
        try:
            target[path[-1]] = manifest
        except (IndexError, TypeError):
            document = manifest
    else:
        document = manifest
    bundle = Path(os.environ.get("TMPDIR", "/tmp")) / f"tfreg-prop-{os.getpid()}.npz"
    try:
        _write_raw(bundle, document, arrays)
        try:
            cases, _ = load_bundle(bundle)
            validate_cases(cases)
        except BundleError:
            pass
    finally:
        bundle.unlink(missing_ok=True)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=512), cut=st.integers(min_value=0, max_value=4096))
def test_property_corrupted_archives_are_bundle_errors(tmp_path_factory, data, cut) -> None:
    """Bytes spliced into or cut from a valid bundle: read (when the damage missed everything
    that matters) or BundleError -- never a traceback from zipfile/numpy."""
    raw = tmp_path_factory.getbasetemp() / "valid.npz"
    if not raw.exists():
        save_bundle(raw, [penalty_case()], {})
    valid = raw.read_bytes()
    damaged = tmp_path_factory.getbasetemp() / "damaged.npz"
    at = cut % len(valid)
    damaged.write_bytes(valid[:at] + data + valid[at + len(data) :])
    with contextlib.suppress(BundleError):
        load_bundle(damaged)


# ---------------------------------------------------------------------------------------------
# Outputs: checked before the run, written atomically; usage errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "target", "message"),
    [
        ("--json", "", "--json: an empty path"),
        ("--junit-xml", "no/such/folder/v.xml", "does not exist"),
        ("--markdown", ".", "is a directory"),
        ("--json", "readonly/r.json", "cannot write in"),
        ("--json", "/proc/r.json", "cannot write in"),  # a folder no one writes in, even root
    ],
)
def test_unwritable_output_is_exit_2_before_anything_runs(
    tmp_path, monkeypatch, capsys, option, target, message
) -> None:
    if target.startswith("readonly") and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "readonly").mkdir()
    (tmp_path / "readonly").chmod(0o500)
    monkeypatch.chdir(tmp_path)
    bundle = _save(tmp_path / "b.npz", [penalty_case()])
    ran = []
    monkeypatch.setattr(verify, "verify_cases", lambda *a, **k: ran.append(1))
    assert main([bundle, option, target]) == 2
    assert not ran and message in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "abc", "1e12"])
def test_usage_errors_exit_2(timeout: str, capsys) -> None:
    # Before: --timeout 1e12 passed the check, then setitimer raised OverflowError (traceback,
    # exit 1).
    for argv in ([], ["b.npz", "--timeout", timeout]):
        with pytest.raises(SystemExit) as usage:
            main(argv)
        assert usage.value.code == 2
    assert f"--timeout: must be a number of seconds > 0 and <= 1e+09. Received: '{timeout}'" in (
        capsys.readouterr().err
    )


def test_cuda_without_cuda_is_a_usage_error(tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as usage:
        main([_save(tmp_path / "b.npz", [penalty_case()]), "--device", "cuda"])
    assert usage.value.code == 2


def test_help_documents_every_exit_status() -> None:
    text = verify.build_parser().format_help()
    assert all(f"\n  {code}" in text for code in ("0 ", "1 ", "2 ", "130"))
    assert "--timeout" in text and "--max-bundle-mb" in text


def test_interrupt_exits_130_and_leaves_no_output(tmp_path, monkeypatch, capsys) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify_cases", interrupted)
    bundle = _save(tmp_path / "b.npz", [penalty_case()])
    assert main([bundle, "--json", str(tmp_path / "r.json")]) == 130
    assert capsys.readouterr().err == "python -m torchref.verify: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz"]


def test_sigint_in_a_real_process_exits_130_without_a_traceback(factories) -> None:
    path = _save(factories / "hang.npz", [pair_case("torch_factory_example:make_hanging", 0)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factories), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchref.verify", path, "--json", "r.json"],
        cwd=factories,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (factories / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.endswith("interrupted\n")
    assert not (factories / "r.json").exists()
    assert not [p for p in factories.iterdir() if p.name.startswith(".r.json")]


def test_outputs_are_written_with_the_permissions_a_plain_write_gives(tmp_path) -> None:
    # The temporary file of an atomic write is private (0600); the report must not stay so.
    bundle = _save(tmp_path / "b.npz", [penalty_case()])
    umask = os.umask(0o022)
    try:
        assert main([bundle, "--json", str(tmp_path / "r.json")]) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.npz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_late_write_failure_is_exit_2_and_the_json_says_so(tmp_path, monkeypatch, capsys):
    from tfreg_harness import junit

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(junit, "write_junit_xml", disk_full)
    bundle = _save(tmp_path / "b.npz", [penalty_case()])
    argv = [bundle, "--junit-xml", str(tmp_path / "v.xml"), "--json", str(tmp_path / "r.json")]
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["exit_status"] == 2 and data["counts"]["pass"] == 1
