"""The tests' two kinds of shard sets, written through the real shard writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.testkit import toyfamily
from tests.testkit.configs import TOY_FAMILY


def write_toy_shards(
    path: Path,
    n_train: int = 96,
    n_valid: int = 24,
    *,
    nan_at: int | None = None,
    samples_per_shard: int = 16,
    seed: int = 123,
) -> Path:
    """A train/valid set for the toy family: `x` (4, 4) float32 tokens, `y = 0.3 * sum(x) + noise`;
    `nan_at` poisons that training sample's target."""
    from foundation.data import ShardWriter

    cfg = toyfamily.ToyConfig()
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        with ShardWriter(path, split=split, samples_per_shard=samples_per_shard, family="toy") as writer:
            for i in range(n):
                x = rng.normal(size=(cfg.length, cfg.features)).astype(np.float32)
                y = float(0.3 * x.sum() + 0.05 * rng.normal())
                if split == "train" and i == nan_at:
                    y = float("nan")
                writer.write({"__key__": f"{split}-{i:04d}", "x": x, "y": y})
    return path


def write_galaxy_shards(
    out: Path, n: int = 120, seed: int = 0, samples_per_shard: int = 16, files: dict | None = None
) -> Path:
    """Galaxies in miniature for the toy family's towers: image `toyfamily.GALAXY_IMAGE_SHAPE`,
    spectrum (`toyfamily.GALAXY_SPECTRUM_LENGTH`,), redshift, JSON meta (stellar_mass), in
    train/valid/test splits; `files` are extra files of the set."""
    from foundation.data import ShardSetWriter

    rng = np.random.default_rng(seed)
    with ShardSetWriter(
        out,
        {"train": 0.6, "valid": 0.2, "test": 0.2},
        samples_per_shard=samples_per_shard,
        family=TOY_FAMILY,
        extra={"targets": ["redshift", "stellar_mass"]},
        files=files,
    ) as w:
        for i in range(n):
            z = float(rng.uniform(0, 1))
            spectrum = rng.normal(size=toyfamily.GALAXY_SPECTRUM_LENGTH) * (1 + z)
            w.write(
                {
                    "__key__": f"obj-{i:04d}",
                    "image": (rng.normal(size=toyfamily.GALAXY_IMAGE_SHAPE) + z).astype(np.float32),
                    "spectrum": spectrum.astype(np.float32),
                    "redshift": z,
                    "meta": {"stellar_mass": 10.0 + i / n, "ra": 1.0},
                }
            )
    return out
