"""Kernel reference tests run on small shapes: one torch thread is faster than several, and keeps the
shared CPUs usable (with 2 threads on a busy 2-core machine, OpenMP spinning makes them ~50x slower)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
