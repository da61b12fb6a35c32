"""Shared test settings: deterministic, single-threaded-friendly torch on a small CPU machine."""

import os

import pytest

# Loader workers and spawned ranks inherit this; keeps 2-core CI machines responsive.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def torchrun():
    """Run `foundation ARGS...` under `torchrun --standalone` with `nproc` CPU ranks (gloo)."""
    import subprocess
    import sys

    def run(
        args: list[str], nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "foundation.cli",
            *args,
        ]
        child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        return subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout)

    return run
