"""Moved to :mod:`tfreg_harness.torch_side.architecture`; this name is that same module."""

import sys

from tfreg_harness.torch_side import architecture

sys.modules[__name__] = architecture
