"""Synthetic embeddings files for the search and evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foundation.embeddings import EmbeddingsWriter


def latent_embeddings(n: int = 400, dim: int = 16, noise: float = 0.05, seed: int = 0) -> dict:
    """ids, image/spectrum vectors that both encode (redshift, stellar_mass), targets, splits."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.0, 1.0, n)
    mass = rng.normal(10.0, 0.7, n)
    latents = np.stack([z * 2 - 1, (mass - 10.0) / 0.7, rng.normal(size=n)], axis=1)
    mix = rng.normal(size=(3, dim))
    clean = np.tanh(latents @ mix)
    image = clean + noise * rng.normal(size=(n, dim))
    spectrum = clean + noise * rng.normal(size=(n, dim))
    return {
        "ids": [f"gal-{i:05d}" for i in range(n)],
        "vectors": {"image": image.astype(np.float32), "spectrum": spectrum.astype(np.float32)},
        "targets": {"redshift": z, "stellar_mass": mass},
        "split": np.where(rng.uniform(size=n) < 0.25, "test", "train").tolist(),
    }


def write_embeddings(path: Path, data: dict, chunk: int = 128, **attrs) -> Path:
    attrs = {"checkpoint": "synthetic", "family": "test", **attrs}
    writer = EmbeddingsWriter(path, attrs=attrs, chunk_rows=chunk)
    for start in range(0, len(data["ids"]), chunk):
        sl = slice(start, start + chunk)
        writer.append(
            data["ids"][sl],
            {m: v[sl] for m, v in data["vectors"].items()},
            {t: v[sl] for t, v in data["targets"].items()},
            split=data["split"][sl] if data.get("split") is not None else None,
        )
    return writer.finish()
