"""The documentation's generated parts and the README's first screen (the site build itself,
``mkdocs build --strict``, runs in CI as ``make docs``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from tfreg_harness.differences import FRAMEWORK_DIFFERENCES
from tfreg_harness.tolerances import TOLERANCES

ROOT = Path(__file__).resolve().parents[1]


def hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hook", ROOT / "docs/_hooks/generated.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_starts_with_the_two_commands() -> None:
    first = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("\n```\n", 1)[0]
    assert first.splitlines()[0] == "```bash"
    assert [line.split()[:2] for line in first.splitlines()[1:]] == [
        ["make", "demo"],
        ["make", "test"],
    ]


def test_the_tolerance_page_is_the_table() -> None:
    table = hook().tolerances_markdown()
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in table.splitlines()
        if line.startswith("| `")
    }
    assert set(rows) == {claim for claim, _ in TOLERANCES}
    for (claim, dtype), entry in TOLERANCES.items():
        cells = [c.strip() for c in rows[claim].split("|")[1:-1]]
        rtol, why = cells[1:3] if dtype == "float64" else cells[3:5]
        assert (float(rtol), why) == (entry.rtol, entry.why), (claim, dtype)


def test_the_differences_page_quotes_every_note_and_layout() -> None:
    page = hook().differences_markdown()
    for topic in FRAMEWORK_DIFFERENCES.notes:
        assert f"| `{topic}` |" in page
    for kind, layout in FRAMEWORK_DIFFERENCES.layouts.items():
        assert f"| {kind} | `{layout.keras}` | `{layout.torch}` |" in page


def test_an_unknown_generated_section_is_a_warning_and_left_in_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    page = SimpleNamespace(file=SimpleNamespace(src_path="x.md"))
    text = "<!-- generated: nonsense -->"
    assert hook().on_page_markdown(text, page) == text
    assert "unknown generated section 'nonsense'" in caplog.text
