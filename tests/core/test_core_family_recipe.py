"""encoders/README.md's worked example, run as written: its code blocks become a package, which
goes through synth -> pretrain -> export -> evaluate with the shared commands."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import h5py
import pytest
import yaml

from foundation.cli import main

README = Path(__file__).resolve().parents[2] / "encoders" / "README.md"
# A code block belongs to the file named in backticks at the start of the paragraph before it.
BLOCK = re.compile(r"^`(wave/[\w/]+\.py|configs/wave/[\w.]+)`(?:(?!\n\n).)*\n\n```\w*\n(.*?)```", re.M | re.S)


def recipe_files() -> dict[str, str]:
    return {name: code for name, code in BLOCK.findall(README.read_text(encoding="utf-8"))}


def test_the_readme_names_every_role_file_of_the_recipe():
    files = recipe_files()
    roles = ("model", "synth", "loss", "evaluate", "family")
    assert {f"wave/{role}.py" for role in roles} <= set(files)
    assert "configs/wave/tiny.yaml" in files


@pytest.fixture
def wave_package(tmp_path, monkeypatch):
    for name, code in recipe_files().items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FOUNDATION_FAMILY_MODULES", "wave.family")
    yield tmp_path
    for module in [m for m in sys.modules if m == "wave" or m.startswith("wave.")]:
        del sys.modules[module]


def test_a_family_built_from_the_recipe_trains_exports_and_evaluates(wave_package, monkeypatch):
    from wave.evaluate import frequency_r2
    from wave.synth import write_waves

    from foundation.train import load_pretrained

    monkeypatch.chdir(wave_package)
    write_waves(Path("data/wave"), n=640)
    config = yaml.safe_load(Path("configs/wave/tiny.yaml").read_text())
    assert config["family"] == "wave.family:FAMILY"
    assert main(["pretrain", "configs/wave/tiny.yaml", "train.steps=150", "train.val_every=75"]) == 0
    model, cfg, family = load_pretrained("runs/wave")
    assert family.name == "wave" and cfg.model.width == 32
    # The model learned the frequency: far better than predicting the mean (R² = 0).
    r2 = frequency_r2(model, "data/wave")
    assert r2 > 0.5
    assert main(["export", "--checkpoint", "runs/wave", "--data", "data/wave", "--out", "wave.h5"]) == 0
    with h5py.File("wave.h5") as f:
        assert f["wave"].shape == (640, 32)
