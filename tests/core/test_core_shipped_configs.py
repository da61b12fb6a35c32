"""Every YAML config we ship parses and validates against its family's dataclasses."""

from pathlib import Path

import pytest

from foundation.config import load_pretrain_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_configs_are_found():
    assert {p.parent.name for p in CONFIGS} == {"astroclip", "mpp", "xval"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_validates(path):
    cfg = load_pretrain_config(path)
    assert cfg.family == path.parent.name
    assert cfg.train.steps > 0
