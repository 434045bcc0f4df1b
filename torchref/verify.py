"""Moved to :mod:`tfreg_harness.torch_side.verify`; this name is that same module, and
``python -m torchref.verify`` runs its command line."""

import sys

from tfreg_harness.torch_side import verify

if __name__ == "__main__":
    sys.exit(verify.main())
sys.modules[__name__] = verify
