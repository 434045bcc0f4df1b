"""The README's streamed-data examples (the blocks marked ``runs: tests/test_readme_data.py``)
run as written, in a scratch directory (one writes ``ck.keras``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

MARKER = "<!-- runs: tests/test_readme_data.py -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[str]:
    pattern = re.escape(MARKER) + r"\s*```python\n(.*?)```"
    return re.findall(pattern, README.read_text(), flags=re.DOTALL)


def test_the_readme_marks_a_tf_data_and_a_dataloader_example() -> None:
    found = blocks()
    assert len(found) == 2
    assert "tf.data.Dataset" in found[0] and "DataLoader" in found[1]


# The tf.data block traces Trainer's and Keras' step functions once each (~5 s of tracing).
@pytest.mark.parametrize(
    "index",
    [pytest.param(0, id="tf-data", marks=pytest.mark.slow), pytest.param(1, id="dataloader")],
)
@pytest.mark.usefixtures("single_torch_thread")
def test_readme_example_runs(index: int, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks()[index], f"README block {index}", "exec"), {})
    if index == 0:
        assert "val_loss" in capsys.readouterr().out
        assert (tmp_path / "ck.keras").exists()
