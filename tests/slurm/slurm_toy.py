"""A tiny model family for the SLURM job tests, loaded by the job's ranks as `slurm_toy:FAMILY`
(with tests/slurm on PYTHONPATH), so these tests do not depend on any real family.

Samples: `x` (features,) float32 and `y` float32. The model is a two-layer MLP regressing `y`;
its hidden layer is the embedding that `foundation export` writes.
`step_delay` seconds of sleep per training micro-batch stretch a run to a few seconds, so
that a test can signal the job while it trains; the sleep changes no number.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from foundation.config import option
from foundation.registry import Family


@dataclasses.dataclass
class SlurmToyConfig:
    features: int = option(8, "Input features per sample.")
    width: int = option(32, "Hidden width.")
    step_delay: float = option(0.0, "Seconds to sleep per training micro-batch (stretches the run).")


class SlurmToyNet(nn.Module):
    def __init__(self, cfg: SlurmToyConfig) -> None:
        super().__init__()
        self.step_delay = cfg.step_delay
        self.hidden = nn.Linear(cfg.features, cfg.width)
        self.out = nn.Linear(cfg.width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.step_delay:
            time.sleep(self.step_delay)
        return self.out(torch.tanh(self.hidden(x))).squeeze(-1)


def build_model(cfg: SlurmToyConfig, manifest) -> nn.Module:
    return SlurmToyNet(cfg)


def loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    prediction = model(batch["x"].float())
    return F.mse_loss(prediction, batch["y"].float().reshape(prediction.shape)), {}


def embed(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The hidden layer's activations: what `foundation export` writes for this family."""
    return {"hidden": torch.tanh(model.hidden(batch["x"].float()))}


FAMILY = Family(
    name="slurm-toy", model_config=SlurmToyConfig, build_model=build_model, loss=loss, embed=embed
)


def write_shards(out_dir, samples: int = 512, features: int = 8, seed: int = 0) -> None:
    """A train/valid shard set for this family: y is a fixed smooth function of x."""
    from foundation.data import ShardSetWriter

    rng = np.random.default_rng(seed)
    weights = rng.normal(size=features)
    with ShardSetWriter(
        out_dir, {"train": 0.9, "valid": 0.1}, samples_per_shard=64, family="slurm-toy", seed=seed
    ) as writer:
        for i in range(samples):
            x = rng.normal(size=features).astype(np.float32)
            writer.write({"__key__": f"s{i:05d}", "x": x, "y": np.float32(np.sin(x @ weights))})
