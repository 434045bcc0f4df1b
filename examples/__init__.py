"""Runnable, corrected versions of the seed notebooks (``python -m examples.<name>``)."""
