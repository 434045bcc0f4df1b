"""Cross-framework parity harness: the only part of this project that sees TensorFlow and PyTorch.

torch is imported lazily (inside these modules' functions or on import of this subpackage's
torch-facing modules), so ``import tfreg`` never needs it.
"""

from tfreg.parity.seeding import disable_tf32, seed_everything

__all__ = ["disable_tf32", "seed_everything"]
