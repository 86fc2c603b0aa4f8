"""Kernel tests. Without a GPU, the Triton kernels (kernels/triton/) run on CPU tensors through Triton's
interpreter, which triton.jit chooses when a kernel is decorated: TRITON_INTERPRET=1 must be in the
environment before kernels.triton is first imported. This conftest is loaded before any test module of
this folder is imported, so it sets the flag here (setdefault: an explicit TRITON_INTERPRET wins; with
a CUDA device it is left alone and the kernels are compiled for it). Harmless for the other tests: they
never import triton, and with HYBRIDSERVE_KERNELS unset kernels/ops.py never imports it on CPU tensors.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed (pytest shows it when the test fails); HYBRIDSERVE_TEST_SEED replays one."""
    s = int(os.environ.get("HYBRIDSERVE_TEST_SEED") or random.SystemRandom().randrange(2 ** 31))
    print(f"{request.node.nodeid}: seed {s} (replay: HYBRIDSERVE_TEST_SEED={s})")
    return s


@pytest.fixture
def poison_triton_outputs(monkeypatch):
    """The Triton wrappers fill their outputs with NaN first, so an element a kernel never writes fails."""
    from kernels.triton import _common
    monkeypatch.setattr(_common, "POISON", True)

