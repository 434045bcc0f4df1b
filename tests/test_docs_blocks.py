"""Every Python code block of the README and of the documentation site (docs/**/*.md) runs.

One test per block, in page order; the blocks of a page share one namespace (a later block may use
what an earlier one defined), so selecting one block with ``-k`` runs the page's earlier blocks
first. A page runs in its own scratch directory (blocks may write files such as ``ck.keras``).

A block that cannot run here is marked by an HTML comment on the line before its fence, invisible
on GitHub and on the site::

    <!-- docs-test: skip: needs 2 processes (torchrun) -->

and is reported as skipped with that reason; nothing else is skipped. Only ``python`` fences
run; ``bash``/``text``/``ini`` fences are shown, not executed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\S*)[^\n]*$")
INDENTED_PYTHON = re.compile(r"^\s+```python")
DIRECTIVE = re.compile(r"^<!-- docs-test: (.+?) -->$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    source: str
    skip: str | None  # the reason, for a block marked ``skip``

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse(page: Path) -> list[Block]:
    """The page's ``python`` blocks in order, with their directives; a malformed directive or an
    unclosed fence is an error (a typo must not silently skip or swallow a block)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            if INDENTED_PYTHON.match(lines[i]):  # in a list or admonition: would never run
                raise ValueError(f"{page}:{i + 1}: indented python fence; start it at column 0")
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: code fence never closed")
        directive = DIRECTIVE.match(lines[i - 1]) if i else None
        skip = None
        if directive:
            kind, _, reason = directive.group(1).partition(": ")
            if kind != "skip" or not reason.strip():
                raise ValueError(
                    f"{page}:{i}: unknown directive {directive.group(0)!r} "
                    "(expected '<!-- docs-test: skip: REASON -->')"
                )
            skip = reason.strip()
        if fence.group(1) == "python":
            blocks.append(Block(page, i + 1, "\n".join(lines[i + 1 : end]) + "\n", skip))
        elif directive:
            raise ValueError(f"{page}:{i}: a docs-test directive before a non-python block")
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in parse(page)]


def run(block: Block, namespace: dict[str, Any]) -> None:
    code = compile(block.source, block.id, "exec")  # tracebacks name page:line
    exec(code, namespace)


@dataclass
class PageState:
    namespace: dict[str, Any]
    directory: Path
    done: int  # blocks of the page already run (or skipped), in order


@pytest.fixture(scope="module")
def pages() -> dict[Path, PageState]:
    """Each page's namespace, scratch directory and progress, for this module's run."""
    return {}


def test_the_pages_have_blocks_and_skips_say_why() -> None:
    assert len(BLOCKS) >= 20, [b.id for b in BLOCKS]
    readme = [b for b in BLOCKS if b.page.name == "README.md"]
    assert readme and all(b.skip is None for b in readme)
    assert all(b.skip for b in BLOCKS if b.skip is not None)


def test_a_malformed_directive_or_a_block_that_would_not_run_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: skipp: typo -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="unknown directive"):
        parse(page)
    page.write_text("```python\nx = 1\n")
    with pytest.raises(ValueError, match="never closed"):
        parse(page)
    page.write_text("- a list item:\n\n    ```python\n    x = 1\n    ```\n")
    with pytest.raises(ValueError, match="indented python fence"):
        parse(page)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
@pytest.mark.usefixtures("single_torch_thread")
def test_block_runs(
    block: Block,
    pages: dict[Path, PageState],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if block.page not in pages:
        if "keras" in sys.modules:  # fresh layer names per page, as a reader's new session has
            sys.modules["keras"].backend.clear_session()
        pages[block.page] = PageState(
            {"__name__": "__docs__"}, tmp_path_factory.mktemp(block.page.stem), 0
        )
    state = pages[block.page]
    monkeypatch.chdir(state.directory)
    page_blocks = [b for b in BLOCKS if b.page == block.page]
    index = page_blocks.index(block)
    for earlier in page_blocks[state.done : index]:  # a -k selection: the page's earlier blocks
        if earlier.skip is None:
            run(earlier, state.namespace)
    state.done = index + 1
    if block.skip is not None:
        pytest.skip(block.skip)
    run(block, state.namespace)
