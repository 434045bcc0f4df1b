"""Moved to :mod:`tfreg_harness.keras_side.pytest_plugin` (the side it needs); this name is that
same module, for environments whose ``pytest11`` entry point was installed before the move
(reinstalling refreshes it)."""

import sys

from tfreg_harness.keras_side import pytest_plugin

sys.modules[__name__] = pytest_plugin
