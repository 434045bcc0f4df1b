"""The README's list of built-in layer kinds is
``tfreg_harness.keras_side.registry.kind_list()``'s output, so a kind added to the registry (in
one place) cannot go undocumented, nor a listed kind vanish."""

from __future__ import annotations

import re
from pathlib import Path

from tfreg_harness.keras_side.registry import kind_list

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- kinds:start -->\n(.*?)<!-- kinds:end -->", re.DOTALL)


def test_readme_kind_list_is_the_registry() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    blocks = [
        m.group(1).strip() for p in pages if p.exists() for m in BLOCK.finditer(p.read_text())
    ]
    assert blocks, "no <!-- kinds:start --> ... <!-- kinds:end --> block in README.md or docs/"
    for block in blocks:
        assert block == kind_list(), f"paste kind_list() between the markers:\n{kind_list()}"
