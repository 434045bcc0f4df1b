"""The one version of the distribution: ``pyproject.toml`` reads it (setuptools' dynamic
``version``) and ``tfreg``, ``torchref``, ``tfreg_core`` and ``tfreg_harness`` re-export it as
``__version__``. Bump it here, with a CHANGELOG.md entry."""

__version__ = "0.1.0"
