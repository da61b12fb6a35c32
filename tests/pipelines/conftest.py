"""Fixtures of the pipeline tests: synthetic embeddings files, a tiny shard set and checkpoint."""

from __future__ import annotations

import pytest

from tests.testkit import toyfamily
from tests.testkit.embeddings import latent_embeddings, write_embeddings
from tests.testkit.shards import write_galaxy_shards


@pytest.fixture
def make_embeddings(tmp_path):
    """make_embeddings(name="e.h5", **latent_kwargs) -> (path, data)."""

    def make(name: str = "emb.h5", chunk: int = 128, attrs: dict | None = None, **kwargs):
        data = latent_embeddings(**kwargs)
        return write_embeddings(tmp_path / name, data, chunk=chunk, **(attrs or {})), data

    return make


@pytest.fixture
def embeddings_writer():
    """The `write_embeddings(path, data)` helper, for tests that build their own data dicts."""
    return write_embeddings


# ----------------------------------------------------------------------------- export fixtures


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    return write_galaxy_shards(tmp_path_factory.mktemp("shards") / "tiny")


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_shards):
    """(model.pt path, the model) of the toy family with galaxy towers."""
    path = tmp_path / "model.pt"
    model = toyfamily.write_checkpoint(path, tiny_shards)
    return path, model
