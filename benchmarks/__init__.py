"""Benchmarks of exact gradient accumulation and penalties: ``make bench`` (see ``run.py``)."""
