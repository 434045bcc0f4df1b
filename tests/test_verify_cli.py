"""``python -m torchref.verify`` exit status: 2 for a bundle it cannot read, never a traceback."""

from __future__ import annotations

import numpy as np
import pytest

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
