"""One version source: ``tfreg_core/_version.py``, read by setuptools and re-exported as
``__version__`` by each package; the installed distribution's metadata and the CHANGELOG agree."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tfreg_core", "tfreg_harness", "tfreg", "torchref")


@pytest.mark.parametrize("name", PACKAGES)
def test_version_is_the_installed_distributions(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__version__ == importlib.metadata.version("tfreg")
    assert "__version__" in module.__all__


def test_pyproject_reads_the_version_from_its_one_source() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "tfreg_core._version.__version__"
    }
    # PEP 639 metadata (an SPDX string, not the deprecated {text = ...} table).
    assert config["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").is_file()


def test_changelog_has_an_entry_for_the_version() -> None:
    from tfreg_core._version import __version__

    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert re.search(
        rf"^## \[{re.escape(__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M
    )
