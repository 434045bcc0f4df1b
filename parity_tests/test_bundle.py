"""Record TensorFlow results to a bundle, verify them with torchref (the torch-only GPU path)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tfreg_harness.bundle import BundleError, Case, load_bundle, save_bundle
from tfreg_harness.keras_side.devices import torch_device
from tfreg_harness.keras_side.record import record_bundle
from tfreg_harness.torch_side.verify import main as verify_main
from tfreg_harness.torch_side.verify import verify_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("bundle") / "reference.npz"
    with pytest.MonkeyPatch.context() as patch:
        # Recording must not need scikit-learn: no extra of the parity install declares it.
        patch.setitem(sys.modules, "sklearn", None)
        assert record_bundle(path) > 0
    return str(path)


def test_torchref_verifies_tensorflow_bundle(bundle: str, device: str) -> None:
    report = verify_bundle(bundle, device=torch_device(device))
    cases, meta = load_bundle(bundle)
    assert meta["recorded_by"] == "tfreg"
    assert len(report.rows) == len(cases)
    assert report.ok, report.to_text()
    # Each kind is held to its claim in tfreg_harness.tolerances: penalties 1e-12 / 1e-6, the MLP's
    # forward and gradients (model_cross) 1e-10 / 1e-5, trained weights (trajectory) 1e-9 / 1e-3.
    expected = {
        ("penalty", "float64"): 1e-12,
        ("penalty", "float32"): 1e-6,
        ("mlp", "float64"): 1e-10,
        ("mlp", "float32"): 1e-5,
        ("Trainer", "float64"): 1e-9,
        ("Trainer", "float32"): 1e-3,
    }
    seen = {(r.check.split()[0], r.dtype): r.tolerance for r in report.rows}
    assert seen == expected


def test_a_tampered_bundle_fails(bundle: str, tmp_path) -> None:
    cases, meta = load_bundle(bundle)
    victim = next(c for c in cases if c.dtype == "float64")
    victim.arrays["grad"] = victim.arrays["grad"] * (1 + 1e-9)  # far above 1e-12
    tampered = tmp_path / "tampered.npz"
    save_bundle(tampered, cases, meta)
    report = verify_bundle(str(tampered))
    failed = [r for r in report.rows if r.status == "fail"]
    assert [r.check for r in failed] == [victim.name]
    assert failed[0].detail == f"{victim.name} grad"
    assert verify_main([str(tampered)]) == 1


def test_unknown_case_kind_is_refused_before_anything_runs(tmp_path) -> None:
    path = tmp_path / "odd.npz"
    save_bundle(path, [Case("mystery", "no-such-kind", "penalty_cross", "float64")], {})
    with pytest.raises(BundleError, match="mystery: unknown kind 'no-such-kind'"):
        verify_bundle(str(path))
    assert verify_main([str(path)]) == 2


def test_unsupported_format_version_is_rejected(tmp_path) -> None:
    path = tmp_path / "future.npz"
    manifest = {"format_version": 99, "meta": {}, "cases": []}
    np.savez(path, __manifest__=np.array(json.dumps(manifest)))
    with pytest.raises(ValueError, match="format 99"):
        load_bundle(path)
