"""Shared test settings: deterministic, single-threaded-friendly torch on a small CPU machine.

Helpers shared across folders live in `tests/testkit` (import `tests.testkit.<module>`), not in
conftest files: a `from conftest import ...` resolves to whichever folder's conftest came first.
"""

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
    """`torchrun(args, nproc=2, env=None, timeout=300)`: `foundation ARGS` under `torchrun
    --standalone` with `nproc` CPU ranks (gloo); see `tests.testkit.ranks`."""
    from tests.testkit import ranks

    return ranks.torchrun
