"""Moved to :mod:`tfreg_harness.keras_side.architecture`; this name is that same module."""

import sys

from tfreg_harness.keras_side import architecture

sys.modules[__name__] = architecture
