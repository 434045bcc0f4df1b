"""``python -m torchref.verify`` exit status: 2 for a bundle it cannot read, never a traceback."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from tfreg_harness.bundle import Case, save_bundle
from torchref.verify import main


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


def test_verify_writes_junit_and_exits_by_the_result(tmp_path, capsys) -> None:
    # L1(0.5) of w = [[1, -2]] by hand: 0.5 * (1 + 2) = 1.5; gradient 0.5 * sign(w). Exact in
    # float64, so any rtol passes the right values and 1.5 -> 1.6 fails at the claim's 1e-12.
    w = np.array([[1.0, -2.0]])
    case = Case(
        "penalty L1",
        "penalty",
        "penalty_cross",
        "float64",
        {"torchref": ["L1", {"l1": 0.5}], "transpose": False},
        {"w": w, "value": np.array(1.5), "grad": np.array([[0.5, -0.5]])},
    )
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
