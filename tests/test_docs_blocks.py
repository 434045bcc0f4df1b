"""Every Python code block of the README and of the documentation site (docs/**/*.md) runs.

One test per block, in page order; the blocks of a page share one namespace (a later block may use
what an earlier one defined), so selecting one block with ``-k`` runs the page's earlier blocks
first. A page runs in its own scratch directory (blocks may write files such as ``ck.keras``).

A block that cannot run here is marked by an HTML comment on the line before its fence, invisible
on GitHub and on the site::

    <!-- docs-test: skip: needs 2 processes (torchrun) -->

and is reported as skipped with that reason; nothing else is skipped. A block the page tells the
reader to save as a file (a module the CLI imports, a test file) carries ``<!-- docs-test: file:
NAME.py -->``: it is written to NAME.py in the page's directory and run on its own, as a module
(its own imports, nothing from the page's earlier blocks), with that directory importable; its
names are then visible to the page's later blocks. Only ``python`` fences run;
``bash``/``text``/``ini`` fences are shown, not executed.
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
MODULE_FILE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.py$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    source: str
    skip: str | None  # the reason, for a block marked ``skip``
    file: str | None = None  # the file name, for a block marked ``file``

    @property
    def id(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


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
        skip = file = None
        if directive:
            kind, _, value = directive.group(1).partition(": ")
            if kind == "skip" and value.strip():
                skip = value.strip()
            elif kind == "file" and MODULE_FILE.match(value):
                file = value
            else:
                raise ValueError(
                    f"{page}:{i}: unknown directive {directive.group(0)!r} (expected "
                    "'<!-- docs-test: skip: REASON -->' or '<!-- docs-test: file: NAME.py -->')"
                )
        if fence.group(1) == "python":
            source = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(page, i + 1, source, skip, file))
        elif directive:
            raise ValueError(f"{page}:{i}: a docs-test directive before a non-python block")
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in parse(page)]


def run(block: Block, namespace: dict[str, Any], directory: Path) -> None:
    code = compile(block.source, block.id, "exec")  # tracebacks name page:line
    if block.file is None:
        exec(code, namespace)
        return
    # A file the reader saves: standalone (a fresh namespace, as when Python imports it), and
    # importable by the page's later files (a test file importing the module beside it).
    directory.joinpath(block.file).write_text(block.source, encoding="utf-8")
    module: dict[str, Any] = {"__name__": block.file.removesuffix(".py")}
    sys.modules.pop(module["__name__"], None)  # another page's file of the same name
    exec(code, module)
    namespace.update({k: v for k, v in module.items() if not k.startswith("__")})


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
    page.write_text("<!-- docs-test: file: my pairs.py -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="unknown directive"):
        parse(page)
    page.write_text("- a list item:\n\n    ```python\n    x = 1\n    ```\n")
    with pytest.raises(ValueError, match="indented python fence"):
        parse(page)


def test_a_file_block_runs_on_its_own_and_later_blocks_import_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n\n<!-- docs-test: file: uses_x.py -->\n```python\ny = x\n```\n"
        "\n<!-- docs-test: file: pairs_mod.py -->\n```python\ndef two():\n    return 2\n```\n"
        "\n```python\nfrom pairs_mod import two as imported\n```\n"
    )
    first, uses_x, pairs, last = parse(page)
    assert (uses_x.file, pairs.file, last.file) == ("uses_x.py", "pairs_mod.py", None)
    namespace: dict[str, Any] = {}
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pairs_mod", raising=False)
    run(first, namespace, tmp_path)
    with pytest.raises(NameError, match="'x'"):  # a saved file does not see the page's names
        run(uses_x, namespace, tmp_path)
    run(pairs, namespace, tmp_path)
    run(last, namespace, tmp_path)
    assert namespace["two"]() == 2 and namespace["imported"]() == 2
    assert (tmp_path / "pairs_mod.py").read_text() == "def two():\n    return 2\n"


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
    monkeypatch.syspath_prepend(str(state.directory))
    page_blocks = [b for b in BLOCKS if b.page == block.page]
    index = page_blocks.index(block)
    for earlier in page_blocks[state.done : index]:  # a -k selection: the page's earlier blocks
        if earlier.skip is None:
            run(earlier, state.namespace, state.directory)
    state.done = index + 1
    if block.skip is not None:
        pytest.skip(block.skip)
    run(block, state.namespace, state.directory)
