"""A tiny two-tower (image, spectrum) family for the export tests, loaded by child processes as
`tests.testkit.export_test_family:FAMILY`; its data is `tests.testkit.shards.write_galaxy_shards`.

Its `embed` counts the samples it sees, so a test can check that a resumed export does not embed
rows that are already in the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from foundation.config import option
from foundation.registry import Family

SEEN: list[str] = []


@dataclass
class TinyConfig:
    dim: int = option(8, "Embedding width.")
    image_size: int = option(48, "Flattened image length.")
    spectrum_size: int = option(20, "Spectrum length.")
    collate: bool = option(False, "Use the family's own collate (else the exporter's default).")


class TinyTowers(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.image = nn.Linear(cfg.image_size, cfg.dim)
        self.spectrum = nn.Linear(cfg.spectrum_size, cfg.dim)

    def forward(self, image: torch.Tensor, spectrum: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": self.image(image.flatten(1)), "spectrum": self.spectrum(spectrum)}


def build_model(cfg: TinyConfig, manifest) -> nn.Module:
    return TinyTowers(cfg)


def loss(model, batch):
    out = model(batch["image"], batch["spectrum"])
    value = (out["image"] - out["spectrum"]).pow(2).mean()
    return value, {"loss": float(value)}


class Collate:
    """Family-style evaluation collate: stacks and standardises each spectrum."""

    def __call__(self, samples):
        spectra = np.stack([s["spectrum"] for s in samples])
        return {
            "image": torch.from_numpy(np.stack([s["image"] for s in samples])),
            "spectrum": torch.from_numpy(spectra),
            "__key__": [s["__key__"] for s in samples],
        }


def make_collate(cfg: TinyConfig, manifest, train: bool):
    return Collate() if cfg.collate else None


def embed(model, batch):
    SEEN.extend(batch["__key__"])
    return model(batch["image"], batch["spectrum"])


FAMILY = Family(
    name="tests.testkit.export_test_family:FAMILY",
    model_config=TinyConfig,
    build_model=build_model,
    loss=loss,
    make_collate=make_collate,
    embed=embed,
)


def write_checkpoint(path, data_path, *, seed: int = 0, collate: bool = False, dim: int = 8):
    """A `model.pt` in the trainer's inference format, without running the trainer."""
    from foundation import config

    cfg = config.PretrainConfig(
        family=FAMILY.name,
        data=config.DataSection(path=str(data_path)),
        model=TinyConfig(dim=dim, collate=collate),
    )
    cfg.run.seed = seed
    torch.manual_seed(seed)
    model = build_model(cfg.model, None)
    payload = {
        "format": "foundation.model",
        "version": 1,
        "family": FAMILY.name,
        "step": 1,
        "config": config.to_dict(cfg),
        "dataset": None,
        "state_dict": model.state_dict(),
    }
    torch.save(payload, path)
    return model
