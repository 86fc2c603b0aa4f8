"""Shared fixtures. Ray is started once per session on loopback with more logical CPUs than cores
(actors ask for fractions and cap their torch threads), and re-started if a test shut it down."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HYBRIDSERVE_LOG_LEVEL", "WARNING")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Small tensors on a shared 2-core machine: one thread is much faster than two fighting threads.
torch.set_num_threads(1)


@pytest.fixture
def ray_local():
    """A running local Ray instance (started on first use, shared by the tests that follow)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield ray


@pytest.fixture(scope="session")
def preset_cache(tmp_path_factory):
    """Random-weight preset checkpoints are written once per session into a temporary folder."""
    path = tmp_path_factory.mktemp("hybridserve-cache")
    os.environ["HYBRIDSERVE_CACHE"] = str(path)
    return path
