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
