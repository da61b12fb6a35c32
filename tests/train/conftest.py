"""The trainer tests' shard set; the toy family, configs and launchers are in `tests.testkit`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.testkit.shards import write_toy_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("toy-shards"))
