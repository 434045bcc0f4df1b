"""tfreg_harness.outputs: report files written atomically *and* durably."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tfreg_harness import outputs


def test_an_atomic_write_fsyncs_the_file_before_and_the_folder_after_the_rename(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # Before: os.replace only -- atomic, but after a power loss the name could point at an
    # empty file (data not flushed) or at the old one (the rename not flushed).
    target = tmp_path / "report.json"
    calls: list[tuple[str, bool]] = []

    def record(path: str) -> None:
        calls.append((str(path), target.exists()))

    monkeypatch.setattr(outputs, "fsync", record)
    outputs.write_text_atomic(target, '{"ok": true}')
    assert target.read_text() == '{"ok": true}'
    (file, renamed), (folder, after) = calls
    assert os.path.dirname(file) == str(tmp_path) and file != str(target) and not renamed
    assert folder == str(tmp_path) and after
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left
