"""Fixtures shared by tests/ and parity_tests/."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Run a module's torch code on one thread, restoring the setting afterwards.

    Tiny tensors: torch's 2-thread pool costs ~50x more than the math on a loaded 2-core machine.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
